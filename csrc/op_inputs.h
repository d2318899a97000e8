// Host-side argument handling shared by every backend of every op:
// validation (all of it before any tensor is written) and the per-tensor view
// of per-group hyperparameters and step counters.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>
#include <vector>

#include "fused_optim/storage_table.h"

namespace fused_optim {

// Which dtype the tensors of a list must have.
enum class ListDtype {
  kParam,    // the params' dtype (params, grads)
  kState,    // the call's state dtype: one dtype for every state list
  kFloat32,  // always float32 (master weights)
};

// One aligned tensor-list argument of an op.
struct TensorListArg {
  const char* name;
  at::TensorList tensors;
  bool written;
  // An optional list may be empty (state the call does not use); a
  // non-empty one must have one entry per param.
  bool optional;
  ListDtype dtype;
};

// The storage precision of a call, as check_tensor_lists found it.
struct CallPrecision {
  at::ScalarType param_dtype = at::kFloat;
  // Of every state list; the param dtype when the call uses no state.
  at::ScalarType state_dtype = at::kFloat;
  // The call has master weights (a non-empty float32 master_params list):
  // the update reads and writes them and only writes the params.
  bool master_weights = false;
  bool stochastic_rounding = false;
};

// The storage dtype of a torch dtype, or nothing for a dtype no op stores
// (storage_table.h).
std::optional<Dtype> storage_dtype(at::ScalarType dtype);

// Note [validate only]
// A step of several op calls (buckets) checks every call before the first
// writes anything: the caller sets this thread's validate-only flag (the
// fast call's validate_<op>), and each kernel returns right after its
// checks. The same checks as a real call, so nothing a call would reject
// slips through after an earlier call was written.
bool validate_only();

class ValidateOnlyGuard {
 public:
  ValidateOnlyGuard();
  ~ValidateOnlyGuard();
  ValidateOnlyGuard(const ValidateOnlyGuard&) = delete;
  ValidateOnlyGuard& operator=(const ValidateOnlyGuard&) = delete;

 private:
  bool previous_;
};

// Checks every list against `params` (length, layout, device, dtype, shape,
// no internal overlap where written, no two written tensors sharing
// memory: Note [overlapping tensors]), and the storage precision against
// the table of storage_table.h. Throws with the list name and tensor index.
// `lists[0]` must be the params.
CallPrecision check_tensor_lists(const char* op,
                                 const std::vector<TensorListArg>& lists,
                                 bool stochastic_rounding);

// AMP's GradScaler inputs (torch.amp.GradScaler hands them to optimizers
// with `_step_supports_amp_scaling`): each undefined, or a one-element
// float32 tensor on `device`. `grad_scale` is the factor the gradients are
// scaled by (the kernels divide it out and write the unscaled gradients
// back); a non-zero `found_inf` skips the whole step.
void check_amp_args(const char* op, const c10::optional<at::Tensor>& grad_scale,
                    const c10::optional<at::Tensor>& found_inf,
                    at::Device device);

// Clipping by the global gradient norm: `grad_norm` undefined, or a
// one-element float32/float64 tensor on `device`; each group's
// max_grad_norm positive (inf: the group is not clipped).
void check_grad_norm(const char* op, const c10::optional<at::Tensor>& grad_norm,
                     at::ArrayRef<double> max_grad_norm, at::Device device);

// Learning rates given as tensors (the `tensor_lr` overloads): one
// one-element float32/float64 tensor per group, on `device`.
void check_lr_tensors(const char* op, at::TensorList lr_tensors,
                      at::Device device);

// Checks that `group_index` has one entry per tensor, each naming one of
// the groups, and that every per-group list (name, length) has one entry
// per group; the first list's length is the number of groups.
void check_groups(
    const char* op, int64_t num_tensors, at::IntArrayRef group_index,
    const std::vector<std::pair<const char*, int64_t>>& per_group_lengths);

// Checks that each step counter is a one-element (usually 0-d)
// float32/float64 tensor on `device` (the CPU for the CPU kernels; the
// params' GPU for the CUDA kernels, which read and increment them there).
void check_state_steps(const char* op, at::TensorList state_steps,
                       int64_t num_tensors, at::Device device);

// Checks a per-tensor scalar list `name` as check_state_steps checks the
// step counters (Note [per-tensor scalar state] in hyperparams.h).
void check_per_tensor_scalars(const char* op, const char* name,
                              at::TensorList tensors, int64_t num_tensors,
                              at::Device device);

// Increments every step counter by one, as torch.optim's `step_t += 1` does
// (in the counter's own dtype), and returns the new values. Call only after
// every check has passed.
std::vector<double> increment_state_steps(at::TensorList state_steps);

// The values increment_state_steps would give, without writing them: the
// step a measuring call (the ops' `measure` overloads, Note [norms across
// shards] in op_front.h) derives its scalars at.
std::vector<double> incremented_state_steps(at::TensorList state_steps);

// Checks that `indices` are valid, distinct tensor indices.
void check_tensor_indices(const char* op, const char* name,
                          at::IntArrayRef indices, int64_t num_tensors);

}  // namespace fused_optim
