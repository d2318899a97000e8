#include "op_inputs.h"

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace fused_optim {

namespace {

thread_local bool validate_only_flag = false;

}  // namespace

std::optional<Dtype> storage_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return Dtype::kFloat;
    case at::kDouble:
      return Dtype::kDouble;
    case at::kHalf:
      return Dtype::kHalf;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    default:
      return std::nullopt;
  }
}

bool validate_only() { return validate_only_flag; }

ValidateOnlyGuard::ValidateOnlyGuard() : previous_(validate_only_flag) {
  validate_only_flag = true;
}

ValidateOnlyGuard::~ValidateOnlyGuard() { validate_only_flag = previous_; }

namespace {

const char* dtype_rule(ListDtype rule) {
  switch (rule) {
    case ListDtype::kParam:
      return "the params' dtype";
    case ListDtype::kState:
      return "the dtype of the other state tensors";
    case ListDtype::kFloat32:
      return "float32";
  }
  return "";
}

// Note [overlapping tensors]
// Two params of one call that share memory (overlapping views of one
// buffer) would be updated by several threads at once: lost updates, a
// different result on every run. torch.optim updates such params one after
// the other; we refuse them, before anything is written. Checked: the
// params and master weights, the tensors a user hands over. State tensors
// are made by the optimizer (or copied by load_state_dict) and are not
// checked: sorting them too cost about 1 ms per step for 2000 params on
// the 2-core benchmark machine. Byte ranges are sorted by start
// and each is compared with the furthest-reaching one before it; ranges
// that intersect are refused unless ATen proves the tensors disjoint
// (interleaved views, such as the even and odd columns of one matrix, that
// ATen cannot decide are refused too: "may overlap").
void check_no_shared_memory(const char* op,
                            const std::vector<TensorListArg>& lists) {
  struct Range {
    uintptr_t begin, end;
    size_t list, index;
  };
  std::vector<Range> ranges;
  for (size_t l = 0; l < lists.size(); ++l) {
    if (!lists[l].written || lists[l].dtype == ListDtype::kState) continue;
    for (size_t i = 0; i < lists[l].tensors.size(); ++i) {
      const at::Tensor& t = lists[l].tensors[i];
      if (t.numel() == 0) continue;
      int64_t extent = 1;  // in elements, from the first to past the last
      for (int64_t d = 0; d < t.dim(); ++d) {
        extent += (t.size(d) - 1) * std::abs(t.stride(d));
      }
      const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
      ranges.push_back({begin, begin + extent * t.element_size(), l, i});
    }
  }
  const auto by_start = [](const Range& a, const Range& b) {
    return a.begin < b.begin;
  };
  // (a model's params are usually allocated, and so listed, in address
  // order: then no sort is needed)
  if (!std::is_sorted(ranges.begin(), ranges.end(), by_start)) {
    std::sort(ranges.begin(), ranges.end(), by_start);
  }
  const Range* furthest = nullptr;
  for (const Range& r : ranges) {
    if (furthest != nullptr && r.begin < furthest->end) {
      const at::Tensor& a = lists[furthest->list].tensors[furthest->index];
      const at::Tensor& b = lists[r.list].tensors[r.index];
      const at::MemOverlapStatus status = at::get_overlap_status(a, b);
      TORCH_CHECK(status == at::MemOverlapStatus::No, op, ": ",
                  lists[furthest->list].name, "[", furthest->index, "] and ",
                  lists[r.list].name, "[", r.index, "] ",
                  status == at::MemOverlapStatus::TooHard ? "may share" : "share",
                  " memory; tensors updated by one step must not overlap "
                  "(torch.optim would update them one after the other; here "
                  "they would race). Give each param its own memory.");
    }
    if (furthest == nullptr || r.end > furthest->end) furthest = &r;
  }
}

}  // namespace

CallPrecision check_tensor_lists(const char* op,
                                 const std::vector<TensorListArg>& lists,
                                 bool stochastic_rounding) {
  TORCH_INTERNAL_ASSERT(!lists.empty());
  const at::TensorList params = lists[0].tensors;
  const size_t n = params.size();
  for (const TensorListArg& list : lists) {
    TORCH_CHECK(list.tensors.size() == n ||
                    (list.optional && list.tensors.empty()),
                op, ": ", list.name, " has ", list.tensors.size(),
                " tensors but params has ", n);
  }
  CallPrecision precision;
  precision.stochastic_rounding = stochastic_rounding;
  if (n == 0) return precision;
  const at::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();
  const std::optional<Dtype> param_dtype = storage_dtype(dtype);
  TORCH_CHECK(param_dtype.has_value(), op,
              ": params must be float16, bfloat16, float32 or float64, got ",
              dtype, " (params[0])");
  precision.param_dtype = dtype;
  precision.state_dtype = dtype;
  for (const TensorListArg& list : lists) {
    if (list.dtype == ListDtype::kState && !list.tensors.empty()) {
      precision.state_dtype = list.tensors[0].scalar_type();
      break;
    }
  }
  const std::optional<Dtype> state_dtype = storage_dtype(precision.state_dtype);
  TORCH_CHECK(state_dtype.has_value() &&
                  legal_state_dtype(*param_dtype, *state_dtype),
              op, ": state tensors of ", dtype, " params must be ",
              dtype == at::kDouble ? "float64"
                                   : "float32, bfloat16 or the params' dtype",
              ", got ", precision.state_dtype);
  for (const TensorListArg& list : lists) {
    if (list.dtype == ListDtype::kFloat32 && !list.tensors.empty()) {
      TORCH_CHECK(legal_master_weights(*param_dtype), op, ": ", list.name,
                  " (master weights) are for float16 and bfloat16 "
                  "params; the params are ", dtype);
      precision.master_weights = true;
    }
  }
  TORCH_CHECK(!stochastic_rounding || *param_dtype == Dtype::kBFloat16, op,
              ": stochastic_rounding is for bfloat16 params; the params are ",
              dtype);
  TORCH_CHECK(legal_stochastic_rounding(*param_dtype, precision.master_weights) ||
                  !stochastic_rounding,
              op,
              ": stochastic_rounding and master weights exclude each other "
              "(the master copy already keeps the low bits)");
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
      const at::ScalarType expected =
          list.dtype == ListDtype::kParam   ? dtype
          : list.dtype == ListDtype::kState ? precision.state_dtype
                                            : at::kFloat;
      TORCH_CHECK(t.scalar_type() == expected, op, ": ", list.name, "[", i,
                  "] has dtype ", t.scalar_type(), " but must have ",
                  dtype_rule(list.dtype), ", ", expected);
      TORCH_CHECK(&t == &param || t.sizes() == param.sizes(), op, ": ", list.name, "[", i,
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
  check_no_shared_memory(op, lists);
  return precision;
}

namespace {

void check_one_element_float(const char* op, const char* name,
                             const at::Tensor& t, at::Device device,
                             bool allow_double) {
  TORCH_CHECK(t.numel() == 1 && t.layout() == at::kStrided, op, ": ", name,
              " must be a one-element tensor, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat ||
                  (allow_double && t.scalar_type() == at::kDouble),
              op, ": ", name, " must be float32", allow_double ? " or float64" : "",
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(),
              " but the params are on ", device);
}

}  // namespace

void check_amp_args(const char* op, const c10::optional<at::Tensor>& grad_scale,
                    const c10::optional<at::Tensor>& found_inf,
                    at::Device device) {
  if (grad_scale.has_value() && grad_scale->defined()) {
    check_one_element_float(op, "grad_scale", *grad_scale, device, false);
  }
  if (found_inf.has_value() && found_inf->defined()) {
    check_one_element_float(op, "found_inf", *found_inf, device, false);
  }
}

void check_grad_norm(const char* op, const c10::optional<at::Tensor>& grad_norm,
                     at::ArrayRef<double> max_grad_norm, at::Device device) {
  if (grad_norm.has_value() && grad_norm->defined()) {
    check_one_element_float(op, "grad_norm", *grad_norm, device, true);
  }
  for (double m : max_grad_norm) {
    TORCH_CHECK(m > 0.0, op, ": max_grad_norm must be positive (inf: not clipped), got ", m);
  }
}

void check_lr_tensors(const char* op, at::TensorList lr_tensors,
                      at::Device device) {
  for (const at::Tensor& lr : lr_tensors) {
    TORCH_CHECK(lr.defined(), op, ": an lr tensor is undefined");
    check_one_element_float(op, "each lr tensor", lr, device, true);
  }
}

void check_groups(
    const char* op, int64_t num_tensors, at::IntArrayRef group_index,
    const std::vector<std::pair<const char*, int64_t>>& per_group_lengths) {
  TORCH_CHECK(static_cast<int64_t>(group_index.size()) == num_tensors, op,
              ": group_index has ", group_index.size(),
              " entries but there are ", num_tensors, " tensors");
  TORCH_INTERNAL_ASSERT(!per_group_lengths.empty());
  const int64_t num_groups = per_group_lengths[0].second;
  for (const auto& [name, length] : per_group_lengths) {
    TORCH_CHECK(length == num_groups, op, ": ", name, " has ", length,
                " entries but ", per_group_lengths[0].first, " has ",
                num_groups, "; every per-group list has one entry per group");
  }
  for (int64_t i = 0; i < num_tensors; ++i) {
    TORCH_CHECK(group_index[i] >= 0 && group_index[i] < num_groups, op,
                ": group_index[", i, "] = ", group_index[i],
                " is out of range for ", num_groups, " groups");
  }
}

void check_state_steps(const char* op, at::TensorList state_steps,
                       int64_t num_tensors, at::Device device) {
  check_per_tensor_scalars(op, "state_steps", state_steps, num_tensors, device);
}

void check_per_tensor_scalars(const char* op, const char* name,
                              at::TensorList state_steps, int64_t num_tensors,
                              at::Device device) {
  TORCH_CHECK(static_cast<int64_t>(state_steps.size()) == num_tensors, op,
              ": ", name, " has ", state_steps.size(),
              " tensors but params has ", num_tensors);
  for (int64_t i = 0; i < num_tensors; ++i) {
    const at::Tensor& step = state_steps[i];
    // (one element of any shape: torch.optim reads a counter with
    // .item(), so a shape-[1] one, as A3C's shared-memory Adam makes, steps
    // there; the kernels read and write its one element in place)
    TORCH_CHECK(step.defined() && step.numel() == 1 &&
                    step.device() == device &&
                    (step.scalar_type() == at::kFloat ||
                     step.scalar_type() == at::kDouble),
                op, ": ", name, "[", i,
                "] must be a one-element float32 or float64 tensor on ", device,
                ", got ",
                step.defined() ? step.toString() : "undefined", " of shape ",
                step.defined() ? step.sizes() : at::IntArrayRef{}, " on ",
                step.defined() ? step.device() : at::Device(at::kCPU));
  }
}

namespace {

// Each counter plus one in its own dtype (float32 counters round as
// torch's `step_t += 1` does), written back when `write`.
std::vector<double> next_steps(at::TensorList state_steps, bool write) {
  std::vector<double> steps(state_steps.size());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const at::Tensor& step = state_steps[i];
    if (step.scalar_type() == at::kFloat) {
      float* value = step.data_ptr<float>();
      const float next = *value + 1.0f;
      if (write) *value = next;
      steps[i] = next;
    } else {
      double* value = step.data_ptr<double>();
      const double next = *value + 1.0;
      if (write) *value = next;
      steps[i] = next;
    }
  }
  return steps;
}

}  // namespace

std::vector<double> increment_state_steps(at::TensorList state_steps) {
  return next_steps(state_steps, /*write=*/true);
}

std::vector<double> incremented_state_steps(at::TensorList state_steps) {
  return next_steps(state_steps, /*write=*/false);
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
