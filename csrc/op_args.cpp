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

}  // namespace

std::vector<TensorListArg> check_adam_args(
    at::DeviceType backend,
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
    at::TensorList state_steps, at::IntArrayRef group_index,
    at::ArrayRef<double> lr, at::ArrayRef<double> beta1,
    at::ArrayRef<double> beta2, at::ArrayRef<double> eps,
    at::ArrayRef<double> weight_decay, bool amsgrad) {
  constexpr const char* kOp = "fused_optim.adam_";
  check_backend(kOp, params, backend);
  std::vector<TensorListArg> lists = {
      {"params", params, /*written=*/true, /*optional=*/false},
      {"grads", grads, false, false},
      {"exp_avgs", exp_avgs, true, false},
      {"exp_avg_sqs", exp_avg_sqs, true, false},
      {"max_exp_avg_sqs", max_exp_avg_sqs, true, /*optional=*/!amsgrad},
  };
  check_tensor_lists(kOp, lists);
  TORCH_CHECK(amsgrad || max_exp_avg_sqs.empty(), kOp,
              ": max_exp_avg_sqs must be empty when amsgrad=False");
  const int64_t n = params.size();
  check_groups(kOp, n, group_index,
               {{"lr", lr}, {"beta1", beta1}, {"beta2", beta2}, {"eps", eps},
                {"weight_decay", weight_decay}});
  check_state_steps(kOp, state_steps, n);
  return lists;
}

std::vector<TensorListArg> check_sgd_args(
    at::DeviceType backend,
    at::TensorList params, at::TensorList grads,
    at::TensorList momentum_buffers, at::IntArrayRef group_index,
    at::ArrayRef<double> lr, at::ArrayRef<double> momentum,
    at::ArrayRef<double> dampening, at::ArrayRef<double> weight_decay,
    at::IntArrayRef new_momentum_buffers, bool nesterov) {
  constexpr const char* kOp = "fused_optim.sgd_";
  check_backend(kOp, params, backend);
  std::vector<TensorListArg> lists = {
      {"params", params, /*written=*/true, /*optional=*/false},
      {"grads", grads, false, false},
      {"momentum_buffers", momentum_buffers, true, /*optional=*/true},
  };
  check_tensor_lists(kOp, lists);
  const int64_t n = params.size();
  const bool use_momentum = !momentum_buffers.empty();
  TORCH_CHECK(!nesterov || use_momentum || n == 0, kOp,
              ": nesterov=True needs momentum buffers");
  check_groups(kOp, n, group_index,
               {{"lr", lr}, {"momentum", momentum}, {"dampening", dampening},
                {"weight_decay", weight_decay}});
  check_tensor_indices(kOp, "new_momentum_buffers", new_momentum_buffers,
                       use_momentum ? n : 0);
  return lists;
}

std::vector<TensorListArg> check_adagrad_args(
    at::DeviceType backend,
    at::TensorList params, at::TensorList grads, at::TensorList state_sums,
    at::TensorList state_steps, at::IntArrayRef group_index,
    at::ArrayRef<double> lr, at::ArrayRef<double> lr_decay,
    at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps) {
  constexpr const char* kOp = "fused_optim.adagrad_";
  check_backend(kOp, params, backend);
  std::vector<TensorListArg> lists = {
      {"params", params, /*written=*/true, /*optional=*/false},
      {"grads", grads, false, false},
      {"state_sums", state_sums, true, false},
  };
  check_tensor_lists(kOp, lists);
  const int64_t n = params.size();
  check_groups(kOp, n, group_index,
               {{"lr", lr}, {"lr_decay", lr_decay},
                {"weight_decay", weight_decay}, {"eps", eps}});
  check_state_steps(kOp, state_steps, n);
  return lists;
}

std::vector<TensorListArg> check_rmsprop_args(
    at::DeviceType backend,
    at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
    at::TensorList grad_avgs, at::TensorList momentum_buffers,
    at::TensorList state_steps, at::IntArrayRef group_index,
    at::ArrayRef<double> lr, at::ArrayRef<double> alpha,
    at::ArrayRef<double> eps, at::ArrayRef<double> weight_decay,
    at::ArrayRef<double> momentum, bool centered) {
  constexpr const char* kOp = "fused_optim.rmsprop_";
  check_backend(kOp, params, backend);
  std::vector<TensorListArg> lists = {
      {"params", params, /*written=*/true, /*optional=*/false},
      {"grads", grads, false, false},
      {"square_avgs", square_avgs, true, false},
      {"grad_avgs", grad_avgs, true, /*optional=*/!centered},
      {"momentum_buffers", momentum_buffers, true, /*optional=*/true},
  };
  check_tensor_lists(kOp, lists);
  TORCH_CHECK(centered || grad_avgs.empty(), kOp,
              ": grad_avgs must be empty when centered=False");
  const int64_t n = params.size();
  check_groups(kOp, n, group_index,
               {{"lr", lr}, {"alpha", alpha}, {"eps", eps},
                {"weight_decay", weight_decay}, {"momentum", momentum}});
  check_state_steps(kOp, state_steps, n);
  return lists;
}

}  // namespace fused_optim
