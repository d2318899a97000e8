#include "op_inputs.h"

#include <ATen/MemoryOverlap.h>

namespace fused_optim {

namespace {

bool is_supported_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf ||
         t == at::kBFloat16;
}

}  // namespace

void check_tensor_lists(const char* op,
                        const std::vector<TensorListArg>& lists) {
  TORCH_INTERNAL_ASSERT(!lists.empty());
  const at::TensorList params = lists[0].tensors;
  const size_t n = params.size();
  for (const TensorListArg& list : lists) {
    TORCH_CHECK(list.tensors.size() == n ||
                    (list.optional && list.tensors.empty()),
                op, ": ", list.name, " has ", list.tensors.size(),
                " tensors but params has ", n);
  }
  if (n == 0) return;
  const at::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(is_supported_param_dtype(dtype), op,
              ": params must be float16, bfloat16, float32 or float64, got ",
              dtype, " (params[0])");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    for (const TensorListArg& list : lists) {
      if (list.tensors.empty()) continue;
      const at::Tensor& t = list.tensors[i];
      TORCH_CHECK(t.defined(), op, ": ", list.name, "[", i, "] is undefined");
      TORCH_CHECK(t.layout() == at::kStrided, op, ": ", list.name, "[", i,
                  "] has layout ", t.layout(),
                  "; only dense (strided) tensors are supported");
      TORCH_CHECK(t.device() == device, op, ": ", list.name, "[", i,
                  "] is on ", t.device(), " but params[0] is on ", device,
                  "; all tensors of one call must be on one device");
      TORCH_CHECK(t.scalar_type() == dtype, op, ": ", list.name, "[", i,
                  "] has dtype ", t.scalar_type(), " but params[0] has dtype ",
                  dtype, "; all tensors of one call must share a dtype");
      TORCH_CHECK(t.sizes() == param.sizes(), op, ": ", list.name, "[", i,
                  "] has shape ", t.sizes(), " but params[", i, "] has shape ",
                  param.sizes());
      if (list.written && t.numel() > 1) {
        TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op,
                    ": ", list.name, "[", i,
                    "] has overlapping memory (e.g. an expanded tensor) and "
                    "cannot be updated in place");
      }
    }
  }
}

void check_groups(
    const char* op, int64_t num_tensors, at::IntArrayRef group_index,
    const std::vector<std::pair<const char*, at::ArrayRef<double>>>&
        per_group) {
  TORCH_CHECK(static_cast<int64_t>(group_index.size()) == num_tensors, op,
              ": group_index has ", group_index.size(),
              " entries but there are ", num_tensors, " tensors");
  TORCH_INTERNAL_ASSERT(!per_group.empty());
  const int64_t num_groups = per_group[0].second.size();
  for (const auto& [name, values] : per_group) {
    TORCH_CHECK(static_cast<int64_t>(values.size()) == num_groups, op, ": ",
                name, " has ", values.size(), " entries but ",
                per_group[0].first, " has ", num_groups,
                "; every hyperparameter list has one entry per group");
  }
  for (int64_t i = 0; i < num_tensors; ++i) {
    TORCH_CHECK(group_index[i] >= 0 && group_index[i] < num_groups, op,
                ": group_index[", i, "] = ", group_index[i],
                " is out of range for ", num_groups, " groups");
  }
}

void check_state_steps(const char* op, at::TensorList state_steps,
                       int64_t num_tensors) {
  TORCH_CHECK(static_cast<int64_t>(state_steps.size()) == num_tensors, op,
              ": state_steps has ", state_steps.size(),
              " tensors but params has ", num_tensors);
  for (int64_t i = 0; i < num_tensors; ++i) {
    const at::Tensor& step = state_steps[i];
    TORCH_CHECK(step.defined() && step.dim() == 0 && step.is_cpu() &&
                    (step.scalar_type() == at::kFloat ||
                     step.scalar_type() == at::kDouble),
                op, ": state_steps[", i,
                "] must be a 0-d float32 or float64 CPU tensor, got ",
                step.defined() ? step.toString() : "undefined", " of shape ",
                step.defined() ? step.sizes() : at::IntArrayRef{}, " on ",
                step.defined() ? step.device() : at::Device(at::kCPU));
  }
}

std::vector<double> increment_state_steps(at::TensorList state_steps) {
  std::vector<double> steps(state_steps.size());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const at::Tensor& step = state_steps[i];
    if (step.scalar_type() == at::kFloat) {
      float* value = step.data_ptr<float>();
      *value += 1.0f;
      steps[i] = *value;
    } else {
      double* value = step.data_ptr<double>();
      *value += 1.0;
      steps[i] = *value;
    }
  }
  return steps;
}

void check_tensor_indices(const char* op, const char* name,
                          at::IntArrayRef indices, int64_t num_tensors) {
  std::vector<bool> seen(num_tensors, false);
  for (int64_t index : indices) {
    TORCH_CHECK(index >= 0 && index < num_tensors, op, ": ", name,
                " holds index ", index, ", out of range for ", num_tensors,
                " tensors");
    TORCH_CHECK(!seen[index], op, ": ", name, " holds index ", index,
                " twice");
    seen[index] = true;
  }
}

}  // namespace fused_optim
