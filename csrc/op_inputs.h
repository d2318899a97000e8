// Host-side argument handling shared by every backend of every op:
// validation (all of it before any tensor is written) and the per-tensor view
// of per-group hyperparameters and step counters.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fused_optim {

// One aligned tensor-list argument of an op.
struct TensorListArg {
  const char* name;
  at::TensorList tensors;
  bool written;
  // An optional list may be empty (state the call does not use); a
  // non-empty one must have one entry per param.
  bool optional;
};

// Checks every list against `params` (length, layout, device, dtype, shape,
// no internal overlap where written) and the param dtypes against the
// floating types we support. Throws with the list name and tensor index.
// `lists[0]` must be the params.
void check_tensor_lists(const char* op, const std::vector<TensorListArg>& lists);

// Checks that `group_index` has one entry per tensor, each naming one of
// `num_groups` groups, and that every per-group list has num_groups entries.
void check_groups(const char* op, int64_t num_tensors,
                  at::IntArrayRef group_index,
                  const std::vector<std::pair<const char*, at::ArrayRef<double>>>&
                      per_group);

// Checks that each step counter is a 0-d float32/float64 tensor on the CPU.
void check_state_steps(const char* op, at::TensorList state_steps,
                       int64_t num_tensors);

// Increments every step counter by one, as torch.optim's `step_t += 1` does
// (in the counter's own dtype), and returns the new values. Call only after
// every check has passed.
std::vector<double> increment_state_steps(at::TensorList state_steps);

// Checks that `indices` are valid, distinct tensor indices.
void check_tensor_indices(const char* op, const char* name,
                          at::IntArrayRef indices, int64_t num_tensors);

}  // namespace fused_optim
