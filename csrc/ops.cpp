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
//   torch.library.opcheck and torch.compile see the mutations.
#include <torch/library.h>

TORCH_LIBRARY(fused_optim, m) {
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, "
      "Tensor(e!)[] state_steps, int[] group_index, float[] lr, "
      "float[] beta1, float[] beta2, float[] eps, float[] weight_decay, "
      "*, bool amsgrad, bool decoupled_weight_decay, bool maximize) -> ()");
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, "
      "Tensor(b!)[] momentum_buffers, int[] group_index, float[] lr, "
      "float[] momentum, float[] dampening, float[] weight_decay, "
      "int[] new_momentum_buffers, *, bool nesterov, bool maximize) -> ()");
  m.def(
      "adagrad_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, "
      "Tensor(c!)[] state_steps, int[] group_index, float[] lr, "
      "float[] lr_decay, float[] weight_decay, float[] eps, "
      "*, bool maximize) -> ()");
  m.def(
      "rmsprop_(Tensor(a!)[] params, Tensor[] grads, "
      "Tensor(b!)[] square_avgs, Tensor(c!)[] grad_avgs, "
      "Tensor(d!)[] momentum_buffers, Tensor(e!)[] state_steps, "
      "int[] group_index, float[] lr, float[] alpha, float[] eps, "
      "float[] weight_decay, float[] momentum, *, bool centered, "
      "bool maximize) -> ()");
}
