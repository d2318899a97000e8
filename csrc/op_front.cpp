#include "op_front.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include "fused_optim/precision.h"

namespace fused_optim {

namespace {

// The dispatcher sends a call to the backend of its tensors' highest-priority
// device; params on another device (e.g. a mix) are an error.
void check_backend(const char* op, at::TensorList params,
                   at::DeviceType device_type) {
  if (params.empty()) return;
  TORCH_CHECK(params[0].device().type() == device_type, op, ": expected ",
              at::DeviceTypeName(device_type, /*lower_case=*/true),
              " tensors, got params[0] on ", params[0].device());
}

// Where the scalar inputs of a call must live: with the params on CUDA
// (read by the kernels there), on the CPU for the CPU kernels.
at::Device scalar_device(at::DeviceType backend, at::TensorList params) {
  return backend == at::kCPU || params.empty() ? at::Device(at::kCPU)
                                                : params[0].device();
}

void check_group_flags(const char* op, const char* name,
                       const c10::List<bool>* flags, size_t num_groups) {
  if (flags == nullptr) return;
  TORCH_CHECK(flags->size() == num_groups, op, ": ", name, " has ",
              flags->size(), " entries but lr has ", num_groups,
              "; every per-group list has one entry per group");
}

}  // namespace

CommonChecks check_common(at::DeviceType backend, const OpCall& call,
                          std::vector<TensorListArg> lists,
                          const std::vector<const char*>& hyper_names,
                          bool steps_optional) {
  const char* op = call.op;
  check_backend(op, call.params, backend);
  lists.push_back({"master_params", call.master_params, /*written=*/true,
                   /*optional=*/true, ListDtype::kFloat32});
  CommonChecks out;
  out.precision = check_tensor_lists(op, lists, call.stochastic_rounding);
  out.lists = std::move(lists);
  const at::Device device = scalar_device(backend, call.params);
  check_amp_args(op, *call.grad_scale, *call.found_inf, device);
  check_grad_norm(op, *call.grad_norm, call.max_grad_norm, device);
  const size_t groups = num_groups(call);
  if (call.lr_is_tensor) check_lr_tensors(op, call.lr_tensors, device);
  std::vector<std::pair<const char*, int64_t>> per_group = {
      {"lr", static_cast<int64_t>(groups)}};
  for (size_t k = 0; k < hyper_names.size(); ++k) {
    per_group.push_back({hyper_names[k], static_cast<int64_t>(call.hyper[k].size())});
  }
  per_group.push_back({"max_grad_norm", static_cast<int64_t>(call.max_grad_norm.size())});
  const int64_t n = call.params.size();
  check_groups(op, n, call.group_index, per_group);
  TORCH_CHECK(!call.rounding_ids.has_value() ||
                  static_cast<int64_t>(call.rounding_ids->size()) == n,
              op, ": rounding_ids has ",
              call.rounding_ids.has_value() ? call.rounding_ids->size() : 0,
              " entries but there are ", n, " tensors");
  check_group_flags(op, "maximize", call.maximize, groups);
  check_group_flags(op, "decoupled_weight_decay", call.decoupled_weight_decay,
                    groups);
  // Ops whose counters are optional (SGD) keep them only with stochastic
  // rounding, whose random bits must change from step to step.
  if (!steps_optional || !call.state_steps.empty() ||
      call.stochastic_rounding) {
    check_state_steps(op, call.state_steps, n,
                      scalar_device(backend, call.params));
  }
  return out;
}

at::Tensor per_tensor_sums(at::TensorList params, at::TensorList grads) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_optim::sum_of_squares", "")
          .typed<at::Tensor(at::TensorList, const std::optional<at::Tensor>&,
                            bool)>();
  std::vector<at::Tensor> tensors;
  tensors.reserve(params.size() + grads.size());
  tensors.insert(tensors.end(), params.begin(), params.end());
  tensors.insert(tensors.end(), grads.begin(), grads.end());
  return op.call(tensors, std::nullopt, /*per_tensor=*/true);
}

void check_tensor_sums(at::DeviceType backend, const OpCall& call) {
  const std::optional<at::Tensor>& sums = *call.tensor_sums;
  if (!sums.has_value() || !sums->defined()) return;
  const char* op = call.op;
  TORCH_CHECK(!call.measure_only, op,
              ".measure: tensor_sums must be None (measure computes them)");
  const int64_t n = static_cast<int64_t>(call.params.size());
  TORCH_CHECK(sums->dim() == 1 && sums->numel() == 2 * n, op,
              ": tensor_sums must have shape [", 2 * n,
              "] (each param's sum of squares, then each gradient's or "
              "update's), got ", sums->sizes());
  TORCH_CHECK(sums->scalar_type() == at::kFloat ||
                  sums->scalar_type() == at::kDouble,
              op, ": tensor_sums must be float32 or float64, got ",
              sums->scalar_type());
  TORCH_CHECK(sums->is_contiguous(), op, ": tensor_sums must be contiguous");
  const at::Device device = scalar_device(backend, call.params);
  TORCH_CHECK(sums->device() == device, op, ": tensor_sums must be on ",
              device, ", got ", sums->device());
}

void check_scalar_state(at::DeviceType backend, const OpCall& call,
                        const char* name) {
  check_per_tensor_scalars(call.op, name, call.scalar_state,
                           static_cast<int64_t>(call.params.size()),
                           scalar_device(backend, call.params));
}

std::vector<uint32_t> rounding_streams(const OpCall& call) {
  std::vector<uint32_t> out(call.params.size());
  for (size_t i = 0; i < out.size(); ++i) {
    const uint64_t id =
        call.rounding_ids.has_value()
            ? static_cast<uint64_t>((*call.rounding_ids)[i])
            : (static_cast<uint64_t>(call.group_index[i]) << 32) | i;
    out[i] = stochastic_rounding_stream(id);
  }
  return out;
}

LrSource lr_source(const OpCall& call, size_t g) {
  LrSource source;
  if (call.lr_is_tensor) {
    source.tensor = call.lr_tensors[g].data_ptr();
    source.tensor_is_double = call.lr_tensors[g].scalar_type() == at::kDouble;
  } else {
    source.value = call.lr_values[g];
  }
  return source;
}

std::vector<at::Tensor> grads_read_after_decoupled_decay(
    const OpCall& call, size_t weight_decay_index) {
  const at::ArrayRef<double> weight_decay = call.hyper[weight_decay_index];
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < call.params.size(); ++i) {
    const int64_t g = call.group_index[i];
    const at::Tensor& p = call.params[i];
    const at::Tensor& grad = call.grads[i];
    const bool decoupled = call.decoupled_weight_decay == nullptr ||
                           call.decoupled_weight_decay->get(g);
    if (!decoupled || call.maximize->get(g) ||
        weight_decay[g] == 0.0 || p.numel() == 0 ||
        grad.data_ptr() != p.data_ptr() || grad.strides() != p.strides()) {
      continue;
    }
    if (out.empty()) out = call.grads.vec();
    out[i] = call.lr_is_tensor
                 ? p.mul(1.0 - call.lr_tensors[g].to(p.device()) * weight_decay[g])
                 : p.mul(1.0 - call.lr_values[g] * weight_decay[g]);
  }
  return out;
}

}  // namespace fused_optim
