#include "op_args.h"

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

// The checks every op shares, after its own lists are in `lists` (params
// first): appends master_params, checks all lists, the AMP inputs and the
// learning-rate tensors.
CheckedCall check_shared(const char* op, at::DeviceType backend,
                         std::vector<TensorListArg> lists,
                         int64_t num_groups, const SharedArgs& shared) {
  check_backend(op, lists[0].tensors, backend);
  lists.push_back({"master_params", shared.master_params, /*written=*/true,
                   /*optional=*/true, ListDtype::kFloat32});
  CheckedCall call;
  call.precision = check_tensor_lists(op, lists, shared.stochastic_rounding);
  call.lists = std::move(lists);
  const at::Device device = scalar_device(backend, call.lists[0].tensors);
  check_amp_args(op, shared.grad_scale, shared.found_inf, device);
  check_lr_tensors(op, shared.lr_tensors, num_groups, device);
  return call;
}

// The grads are written (unscaled, in place) only when AMP scaled them.
TensorListArg grads_arg(at::TensorList grads, const SharedArgs& shared) {
  const bool unscaled =
      shared.grad_scale.has_value() && shared.grad_scale->defined();
  return {"grads", grads, /*written=*/unscaled, /*optional=*/false,
          ListDtype::kParam};
}

TensorListArg params_arg(at::TensorList params) {
  return {"params", params, /*written=*/true, /*optional=*/false,
          ListDtype::kParam};
}

TensorListArg state_arg(const char* name, at::TensorList tensors,
                        bool optional) {
  return {name, tensors, /*written=*/true, optional, ListDtype::kState};
}

}  // namespace

CheckedCall check_adam_args(
    at::DeviceType backend, at::TensorList params, at::TensorList grads,
    at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
    at::IntArrayRef group_index, at::ArrayRef<double> lr,
    at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
    at::ArrayRef<double> eps, at::ArrayRef<double> weight_decay,
    bool amsgrad, const SharedArgs& shared) {
  constexpr const char* kOp = "fused_optim.adam_";
  CheckedCall call = check_shared(
      kOp, backend,
      {params_arg(params), grads_arg(grads, shared),
       state_arg("exp_avgs", exp_avgs, false),
       state_arg("exp_avg_sqs", exp_avg_sqs, false),
       state_arg("max_exp_avg_sqs", max_exp_avg_sqs, !amsgrad)},
      lr.size(), shared);
  TORCH_CHECK(amsgrad || max_exp_avg_sqs.empty(), kOp,
              ": max_exp_avg_sqs must be empty when amsgrad=False");
  const int64_t n = params.size();
  check_groups(kOp, n, group_index,
               {{"lr", lr}, {"beta1", beta1}, {"beta2", beta2}, {"eps", eps},
                {"weight_decay", weight_decay}});
  check_state_steps(kOp, state_steps, n, scalar_device(backend, params));
  return call;
}

CheckedCall check_sgd_args(
    at::DeviceType backend, at::TensorList params, at::TensorList grads,
    at::TensorList momentum_buffers, at::TensorList state_steps,
    at::IntArrayRef group_index, at::ArrayRef<double> lr,
    at::ArrayRef<double> momentum, at::ArrayRef<double> dampening,
    at::ArrayRef<double> weight_decay, at::IntArrayRef new_momentum_buffers,
    bool nesterov, const SharedArgs& shared) {
  constexpr const char* kOp = "fused_optim.sgd_";
  CheckedCall call = check_shared(
      kOp, backend,
      {params_arg(params), grads_arg(grads, shared),
       state_arg("momentum_buffers", momentum_buffers, true)},
      lr.size(), shared);
  const int64_t n = params.size();
  const bool use_momentum = !momentum_buffers.empty();
  TORCH_CHECK(!nesterov || use_momentum || n == 0, kOp,
              ": nesterov=True needs momentum buffers");
  check_groups(kOp, n, group_index,
               {{"lr", lr}, {"momentum", momentum}, {"dampening", dampening},
                {"weight_decay", weight_decay}});
  check_tensor_indices(kOp, "new_momentum_buffers", new_momentum_buffers,
                       use_momentum ? n : 0);
  // SGD keeps step counters only with stochastic rounding (ops.cpp).
  if (!state_steps.empty() || shared.stochastic_rounding) {
    check_state_steps(kOp, state_steps, n, scalar_device(backend, params));
  }
  return call;
}

CheckedCall check_adagrad_args(
    at::DeviceType backend, at::TensorList params, at::TensorList grads,
    at::TensorList state_sums, at::TensorList state_steps,
    at::IntArrayRef group_index, at::ArrayRef<double> lr,
    at::ArrayRef<double> lr_decay, at::ArrayRef<double> weight_decay,
    at::ArrayRef<double> eps, const SharedArgs& shared) {
  constexpr const char* kOp = "fused_optim.adagrad_";
  CheckedCall call = check_shared(
      kOp, backend,
      {params_arg(params), grads_arg(grads, shared),
       state_arg("state_sums", state_sums, false)},
      lr.size(), shared);
  const int64_t n = params.size();
  check_groups(kOp, n, group_index,
               {{"lr", lr}, {"lr_decay", lr_decay},
                {"weight_decay", weight_decay}, {"eps", eps}});
  check_state_steps(kOp, state_steps, n, scalar_device(backend, params));
  return call;
}

CheckedCall check_rmsprop_args(
    at::DeviceType backend, at::TensorList params, at::TensorList grads,
    at::TensorList square_avgs, at::TensorList grad_avgs,
    at::TensorList momentum_buffers, at::TensorList state_steps,
    at::IntArrayRef group_index, at::ArrayRef<double> lr,
    at::ArrayRef<double> alpha, at::ArrayRef<double> eps,
    at::ArrayRef<double> weight_decay, at::ArrayRef<double> momentum,
    bool centered, const SharedArgs& shared) {
  constexpr const char* kOp = "fused_optim.rmsprop_";
  CheckedCall call = check_shared(
      kOp, backend,
      {params_arg(params), grads_arg(grads, shared),
       state_arg("square_avgs", square_avgs, false),
       state_arg("grad_avgs", grad_avgs, !centered),
       state_arg("momentum_buffers", momentum_buffers, true)},
      lr.size(), shared);
  TORCH_CHECK(centered || grad_avgs.empty(), kOp,
              ": grad_avgs must be empty when centered=False");
  const int64_t n = params.size();
  check_groups(kOp, n, group_index,
               {{"lr", lr}, {"alpha", alpha}, {"eps", eps},
                {"weight_decay", weight_decay}, {"momentum", momentum}});
  check_state_steps(kOp, state_steps, n, scalar_device(backend, params));
  return call;
}

namespace {

// Group g's learning rate: its lr tensor when the call has them, else the
// float.
LrSource lr_source(at::ArrayRef<double> lr, at::TensorList lr_tensors,
                   size_t g) {
  LrSource source;
  source.value = lr[g];
  if (!lr_tensors.empty()) {
    source.tensor = lr_tensors[g].data_ptr();
    source.tensor_is_double = lr_tensors[g].scalar_type() == at::kDouble;
  }
  return source;
}

}  // namespace

std::vector<AdamHyper> adam_hypers(at::ArrayRef<double> lr,
                                   at::TensorList lr_tensors,
                                   at::ArrayRef<double> beta1,
                                   at::ArrayRef<double> beta2,
                                   at::ArrayRef<double> eps,
                                   at::ArrayRef<double> weight_decay,
                                   bool maximize) {
  std::vector<AdamHyper> out(lr.size());
  for (size_t g = 0; g < out.size(); ++g) {
    out[g].lr = lr_source(lr, lr_tensors, g);
    out[g].beta1 = beta1[g];
    out[g].beta2 = beta2[g];
    out[g].eps = eps[g];
    out[g].weight_decay = weight_decay[g];
    out[g].maximize = maximize;
  }
  return out;
}

std::vector<SgdHyper> sgd_hypers(at::ArrayRef<double> lr,
                                 at::TensorList lr_tensors,
                                 at::ArrayRef<double> momentum,
                                 at::ArrayRef<double> dampening,
                                 at::ArrayRef<double> weight_decay,
                                 bool maximize) {
  std::vector<SgdHyper> out(lr.size());
  for (size_t g = 0; g < out.size(); ++g) {
    out[g].lr = lr_source(lr, lr_tensors, g);
    out[g].momentum = momentum[g];
    out[g].dampening = dampening[g];
    out[g].weight_decay = weight_decay[g];
    out[g].maximize = maximize;
  }
  return out;
}

std::vector<AdagradHyper> adagrad_hypers(at::ArrayRef<double> lr,
                                         at::TensorList lr_tensors,
                                         at::ArrayRef<double> lr_decay,
                                         at::ArrayRef<double> weight_decay,
                                         at::ArrayRef<double> eps,
                                         bool maximize) {
  std::vector<AdagradHyper> out(lr.size());
  for (size_t g = 0; g < out.size(); ++g) {
    out[g].lr = lr_source(lr, lr_tensors, g);
    out[g].lr_decay = lr_decay[g];
    out[g].eps = eps[g];
    out[g].weight_decay = weight_decay[g];
    out[g].maximize = maximize;
  }
  return out;
}

std::vector<at::Tensor> grads_read_after_decoupled_decay(
    at::TensorList params, at::TensorList grads, at::IntArrayRef group_index,
    at::ArrayRef<double> lr, at::TensorList lr_tensors,
    at::ArrayRef<double> weight_decay) {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t g = group_index[i];
    const at::Tensor& p = params[i];
    const at::Tensor& grad = grads[i];
    if (weight_decay[g] == 0.0 || p.numel() == 0 ||
        grad.data_ptr() != p.data_ptr() || grad.strides() != p.strides()) {
      continue;
    }
    if (out.empty()) out = grads.vec();
    out[i] = lr_tensors.empty()
                 ? p.mul(1.0 - lr[g] * weight_decay[g])
                 : p.mul(1.0 - lr_tensors[g].to(p.device()) * weight_decay[g]);
  }
  return out;
}

std::vector<RmspropHyper> rmsprop_hypers(at::ArrayRef<double> lr,
                                         at::TensorList lr_tensors,
                                         at::ArrayRef<double> alpha,
                                         at::ArrayRef<double> eps,
                                         at::ArrayRef<double> weight_decay,
                                         at::ArrayRef<double> momentum,
                                         bool maximize) {
  std::vector<RmspropHyper> out(lr.size());
  for (size_t g = 0; g < out.size(); ++g) {
    out[g].lr = lr_source(lr, lr_tensors, g);
    out[g].alpha = alpha[g];
    out[g].eps = eps[g];
    out[g].weight_decay = weight_decay[g];
    out[g].momentum = momentum[g];
    out[g].maximize = maximize;
  }
  return out;
}

}  // namespace fused_optim
