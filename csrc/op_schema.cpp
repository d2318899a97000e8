// The operator schemas of fused_optim, generated from the op specs
// (fused_optim/op_specs.h); backends register kernels for them with
// TORCH_LIBRARY_IMPL(fused_optim, CPU|CUDA, m) (op_front.h's FO_IMPL_OP).
//
// Conventions shared by every op (fused_optim/_ops.py builds the calls):
// - The tensor lists are aligned: entry i of every list belongs to tensor i.
//   A state list the call does not use (e.g. max_exp_avg_sqs without
//   amsgrad) is empty.
// - Hyperparameters are per param group (`float[] lr` has one entry per
//   group, and so has every float[] and bool[] list); `group_index[i]` names
//   the group of tensor i. So one call covers the tensors of all groups, and
//   a scheduler's new `lr` is read every step. `maximize` and (Adam)
//   `decoupled_weight_decay` are per group too.
// - `lr` is a float list, or, in the `tensor_lr` overload, a list of
//   one-element float32/float64 tensors on the params' device (CPU for the
//   CPU kernels), read by the kernel: capturable CUDA steps.
// - `state_steps` are the per-tensor step counters (one-element tensors,
//   usually 0-d); the op increments them (after validating everything) and
//   uses the new value for the bias corrections, so the caller needs no
//   per-tensor Python work. sgd_'s may be empty: torch's SGD keeps no
//   counter; ours exist only with stochastic rounding, whose random bits
//   must change from step to step (precision.h).
// - The keyword-only mode flags change the instruction stream (amsgrad,
//   nesterov, centered); the caller puts groups that differ in them into
//   different calls.
// - Every list the op writes is annotated (a!), and ops return nothing, so
//   torch.library.opcheck and torch.compile see the mutations. `grads` are
//   written only when `grad_scale` is given (the unscaled gradients).
// - Mixed precision (any op): state lists share one dtype (the table of
//   storage_table.h); `master_params` (float32, or empty) are master
//   weights of fp16/bf16 params: the update reads and writes them and
//   writes the params rounded; `stochastic_rounding` rounds bf16 param
//   writes stochastically (precision.h), tensor i with the random stream
//   of `rounding_ids[i]` (a 64-bit id, stochastic_rounding_stream; None:
//   (group_index[i] << 32) | i).
// - AMP: `grad_scale` and `found_inf` are torch.amp.GradScaler's (or None):
//   gradients are divided by grad_scale in registers, and a non-zero
//   found_inf skips the call: nothing is written, no step counter advances.
// - Per-tensor scalar state (nadam_'s `mu_products`, after state_steps):
//   one-element float32/float64 tensors, one per param, checked like
//   state_steps and updated by the op (Note [per-tensor scalar state], hyperparams.h).
// - Clipping by the global gradient norm: `grad_norm` (or None) is the norm
//   of all the optimizer's (unscaled) gradients, a one-element float32 or
//   float64 tensor on the params' device, computed before the call
//   (sum_of_squares below, then a square root: the norm spans every call,
//   device and rank of a step); each gradient of group g is multiplied in
//   registers by min(1, max_grad_norm[g] / (grad_norm + 1e-6))
//   (update_rules.h's clip_coefficient; inf: not clipped) and never
//   written clipped.
// - Per-tensor norms (lars_, lamb_: Note [per-tensor norms] in
//   hyperparams.h): `tensor_sums` (after grad_norm; None in a plain call)
//   gives the [2n] sums of squares the update reads instead of computing
//   them, and the `measure` / `measure_tensor_lr` overloads (same
//   arguments, none written) return the sums a call would compute, float64:
//   together they make the call on sharded tensors (Note [norms across
//   shards] in op_front.h).
//
// sum_of_squares(tensors, grad_scale, per_tensor): the sum of the squares of
// every element of `tensors` (each first multiplied by 1 / grad_scale when
// given, as the kernels unscale), per tensor (`per_tensor`: shape [n]) or in
// all (shape []): one pass over all of them. float64 if any tensor is,
// else float32, on the tensors' device; accumulated in double on the CPU,
// deterministically (the same bits whatever the thread count).
#include <torch/library.h>

#include <string>

#include "fused_optim/op_specs.h"
#include "op_front.h"

namespace fused_optim {
namespace {

// The schema of op Spec, with `float[] lr` or (tensor_lr) `Tensor[] lr`;
// with `measure`, that of its measuring overload (Note [norms across
// shards], op_front.h): the same arguments, none written, the sums returned.
template <typename Spec>
std::string schema(LrKind lr, bool measure) {
  const bool tensor_lr = lr == LrKind::kTensors;
  std::string s = overload_name<Spec>(lr, measure) + "(";
  char alias = 'a';
  auto written_list = [&](const char* name) {
    if (measure) {
      s += std::string("Tensor[] ") + name + ", ";
    } else {
      s += std::string("Tensor(") + alias++ + "!)[] " + name + ", ";
    }
  };
  written_list("params");
  written_list("grads");
  for (const StateList& list : Spec::kState) written_list(list.name);
  written_list("master_params");
  written_list("state_steps");
  if (ScalarStateList<Spec>::name != nullptr) {
    written_list(ScalarStateList<Spec>::name);  // per-tensor scalar state
  }
  s += "int[] group_index, ";
  s += tensor_lr ? "Tensor[] lr, " : "float[] lr, ";
  for (const auto& field : Spec::kHyper) {
    s += std::string("float[] ") + field.name + ", ";
  }
  s += "bool[] maximize, ";
  if (Spec::kDecoupledDecay) s += "bool[] decoupled_weight_decay, ";
  s += "float[] max_grad_norm, ";
  if (Spec::kNewState != nullptr) s += std::string("int[] ") + Spec::kNewState + ", ";
  s += "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, ";
  if (HasTensorNorms<typename Spec::Hyper>::value) s += "Tensor? tensor_sums, ";
  s += "*, ";
  for (size_t k = 0; k < ModeCount<Spec>::value; ++k) {
    s += std::string("bool ") + Spec::kModes[k] + ", ";
  }
  s += "bool stochastic_rounding, int[]? rounding_ids=None) -> ";
  s += measure ? "Tensor" : "()";
  return s;
}

}  // namespace

TORCH_LIBRARY(fused_optim, m) {
#define FO_DEF_OP(Spec)                                            \
  for (LrKind lr : {LrKind::kFloats, LrKind::kTensors}) {          \
    m.def(schema<Spec>(lr, false).c_str());                        \
    if (HasTensorNorms<Spec::Hyper>::value) {                      \
      m.def(schema<Spec>(lr, true).c_str());                       \
    }                                                              \
  }
  FO_FOR_EACH_OP(FO_DEF_OP)
#undef FO_DEF_OP
  m.def("sum_of_squares(Tensor[] tensors, Tensor? grad_scale, bool per_tensor) -> Tensor");
}

}  // namespace fused_optim
