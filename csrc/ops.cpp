// Operator schemas of fused_optim, defined once; backends register kernels
// for them with TORCH_LIBRARY_IMPL(fused_optim, CPU|CUDA, m).
//
// Conventions shared by every op (see fused_optim/_bucket.py for the caller):
// - The tensor lists are aligned: entry i of every list belongs to tensor i.
//   A list of state the call does not use (e.g. max_exp_avg_sqs without
//   amsgrad) is empty.
// - Hyperparameters are per param group (`float[] lr` has one entry per
//   group); `group_index[i]` names the group of tensor i. So one call covers
//   the tensors of all groups, and a scheduler's new `lr` is read every step.
// - `state_steps` are the per-tensor 0-d step counters; the op increments
//   them (after validating everything) and uses the new value for the bias
//   corrections, so the caller needs no per-tensor Python work.
// - Mode flags that change the instruction stream (amsgrad, nesterov,
//   centered, momentum on/off) and `maximize` are per call: the caller puts
//   groups that differ in them into different calls.
// - Every list the op writes is annotated (a!), and ops return nothing, so
//   torch.library.opcheck and torch.compile see the mutations. `grads` are
//   written only when `grad_scale` is given (the unscaled gradients).
// - Mixed precision (any op): state lists share one dtype, the params' or
//   float32 or bfloat16; `master_params` (float32, or empty) are master
//   weights of fp16/bf16 params: the update reads and writes them and writes
//   the params rounded; `stochastic_rounding` rounds bf16 param writes
//   stochastically (precision.h).
// - AMP: `grad_scale` and `found_inf` are torch.amp.GradScaler's (or None):
//   gradients are divided by grad_scale in registers, and a non-zero
//   found_inf skips the call: nothing is written, no step counter advances.
// - sgd_'s `state_steps` may be empty: torch's SGD keeps no counter. We
//   keep one (our own state) only with stochastic rounding, whose random
//   bits must change from step to step (precision.h).
// - `lr_tensors` (or empty): one learning-rate tensor per group, read by the
//   kernel on the params' device instead of `lr` (capturable steps).
#include <torch/library.h>

// The arguments every op ends with (op_args.h, SharedArgs).
#define FO_SHARED_ARGS                                                    \
  "Tensor[] lr_tensors, Tensor? grad_scale, Tensor? found_inf, "
#define FO_SHARED_FLAGS "bool stochastic_rounding"

TORCH_LIBRARY(fused_optim, m) {
  m.def(
      "adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, "
      "Tensor(f!)[] master_params, Tensor(g!)[] state_steps, "
      "int[] group_index, float[] lr, float[] beta1, float[] beta2, "
      "float[] eps, float[] weight_decay, " FO_SHARED_ARGS
      "*, bool amsgrad, bool decoupled_weight_decay, bool maximize, "
      FO_SHARED_FLAGS ") -> ()");
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, "
      "Tensor(c!)[] momentum_buffers, Tensor(d!)[] master_params, "
      "Tensor(e!)[] state_steps, int[] group_index, float[] lr, "
      "float[] momentum, float[] dampening, float[] weight_decay, int[] new_momentum_buffers, " FO_SHARED_ARGS
      "*, bool nesterov, bool maximize, " FO_SHARED_FLAGS ") -> ()");
  m.def(
      "adagrad_(Tensor(a!)[] params, Tensor(b!)[] grads, "
      "Tensor(c!)[] state_sums, Tensor(d!)[] master_params, "
      "Tensor(e!)[] state_steps, int[] group_index, float[] lr, "
      "float[] lr_decay, float[] weight_decay, float[] eps, " FO_SHARED_ARGS
      "*, bool maximize, " FO_SHARED_FLAGS ") -> ()");
  m.def(
      "rmsprop_(Tensor(a!)[] params, Tensor(b!)[] grads, "
      "Tensor(c!)[] square_avgs, Tensor(d!)[] grad_avgs, "
      "Tensor(e!)[] momentum_buffers, Tensor(f!)[] master_params, "
      "Tensor(g!)[] state_steps, int[] group_index, float[] lr, "
      "float[] alpha, float[] eps, float[] weight_decay, float[] momentum, "
      FO_SHARED_ARGS "*, bool centered, bool maximize, " FO_SHARED_FLAGS
      ") -> ()");
}
