// CUDA registrations of the fused_optim ops: the only CUDA file that sees
// torch. For each op it
//   1. validates every argument (op_args.h, the very checks the CPU kernels
//      run, with the step counters, lr tensors and AMP scalars required on
//      the params' GPU) before anything is written;
//   2. under a device guard for params[0]'s device, brings each tensor's
//      operands to one dense layout (dense_operands.h; copies run on the
//      current stream, each operand keeps its dtype);
//   3. hands the launchers of launch.h the addresses, element counts, the
//      per-group host hyperparameters (and lr tensor addresses), the step
//      counters' addresses and the AMP scalars' addresses. The launchers
//      increment the step counters and derive the per-tensor scalars ON THE
//      DEVICE (hyperparams.h), on the current stream;
//   4. copies staged operands back (again on the current stream).
// Nothing here reads a tensor's value on the host: no .item(), no
// device-to-host copy, no synchronisation. With lr given as tensors, a step
// is therefore capturable in a CUDA graph (README.md says what a capture
// bakes in).
// Compiled only in CUDA builds (setup.py), with FUSED_OPTIM_WITH_CUDA=1.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <utility>
#include <vector>

#include "fused_optim/hyperparams.h"
#include "cuda/launch.h"
#include "dense_operands.h"
#include "fused_optim/precision.h"
#include "op_args.h"
#include "op_inputs.h"

namespace fused_optim::cuda {
namespace {

ScalarType launch_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return ScalarType::kFloat;
    case at::kDouble:
      return ScalarType::kDouble;
    case at::kHalf:
      return ScalarType::kHalf;
    case at::kBFloat16:
      return ScalarType::kBFloat16;
    default:
      // check_tensor_lists has rejected every other dtype.
      TORCH_INTERNAL_ASSERT(false, "unexpected dtype ", dtype);
  }
}

// Device address of an optional one-element float32 tensor, or null.
const float* optional_data(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

// The launch arguments of one call except the hyperparameters: the
// addresses of the operand lists in use (the non-empty ones, in schema
// order: launch.h's operand order) in their dense layout, the master
// weights, the element counts, the step counters, the AMP scalars.
template <typename Hyper>
MultiTensorArgs<Hyper> make_args(const CheckedCall& call,
                                 const DenseOperands& operands,
                                 at::TensorList state_steps,
                                 at::IntArrayRef group_index,
                                 const SharedArgs& shared) {
  const std::vector<TensorListArg>& lists = call.lists;
  const at::TensorList params = lists[0].tensors;
  const size_t n = params.size();
  const size_t master_list = call.master_list();
  MultiTensorArgs<Hyper> args;
  args.param_dtype = launch_dtype(call.precision.param_dtype);
  args.state_dtype = launch_dtype(call.precision.state_dtype);
  for (size_t k = 0; k < master_list; ++k) {
    if (lists[k].tensors.empty()) continue;  // state this call does not use
    std::vector<void*> data(n);
    for (size_t i = 0; i < n; ++i) data[i] = operands.data(k, i);
    args.operands.push_back(std::move(data));
  }
  if (call.precision.master_weights) {
    args.master.resize(n);
    for (size_t i = 0; i < n; ++i) args.master[i] = operands.data(master_list, i);
  }
  args.numels.resize(n);
  for (size_t i = 0; i < n; ++i) args.numels[i] = params[i].numel();
  if (shared.stochastic_rounding) {
    args.rounding_streams.resize(n);
    for (size_t i = 0; i < n; ++i) {
      args.rounding_streams[i] = stochastic_rounding_stream(
          static_cast<uint32_t>(i), static_cast<uint32_t>(group_index[i]));
    }
  }
  if (!state_steps.empty()) {  // (sgd_'s may be empty)
    args.steps.resize(n);
    for (size_t i = 0; i < n; ++i) {
      args.steps[i] = StepCounter{state_steps[i].data_ptr(),
                                  state_steps[i].scalar_type() == at::kDouble};
    }
  }
  args.grad_scale = optional_data(shared.grad_scale);
  args.found_inf = optional_data(shared.found_inf);
  args.stochastic_rounding = call.precision.stochastic_rounding;
  return args;
}

// ---------------------------------------------------------------------------
// adam_
// ---------------------------------------------------------------------------

void adam_cuda(at::TensorList params, at::TensorList grads,
               at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList master_params,
               at::TensorList state_steps, at::IntArrayRef group_index,
               at::ArrayRef<double> lr, at::ArrayRef<double> beta1,
               at::ArrayRef<double> beta2, at::ArrayRef<double> eps,
               at::ArrayRef<double> weight_decay, at::TensorList lr_tensors,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, bool amsgrad,
               bool decoupled_weight_decay, bool maximize,
               bool stochastic_rounding) {
  const SharedArgs shared{master_params, lr_tensors, grad_scale, found_inf,
                          stochastic_rounding};
  CheckedCall call = check_adam_args(
      at::kCUDA, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
      state_steps, group_index, lr, beta1, beta2, eps, weight_decay, amsgrad,
      shared);
  const int64_t n = params.size();
  if (n == 0 || validate_only()) return;
  std::vector<at::Tensor> decayed_grads;  // Note [a gradient that aliases its param]
  if (decoupled_weight_decay && !maximize) {
    decayed_grads = grads_read_after_decoupled_decay(
        params, grads, group_index, lr, lr_tensors, weight_decay);
    if (!decayed_grads.empty()) call.lists[1].tensors = decayed_grads;
  }
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // Staging allocates and copies but writes no input: it goes before the
  // first write, so that even an allocation failure loses nothing.
  DenseOperands operands(call.lists);
  const std::vector<AdamHyper> hypers = adam_hypers(
      lr, lr_tensors, beta1, beta2, eps, weight_decay, maximize);
  MultiTensorArgs<AdamHyper> args =
      make_args<AdamHyper>(call, operands, state_steps, group_index, shared);
  assign_hyper_sets(
      args, n, [&](int64_t i) { return group_index[i]; },
      [&](int64_t i) {
        const int64_t g = group_index[i];
        return std::make_pair(
            hypers[g],
            weight_decay_mode(weight_decay[g], decoupled_weight_decay));
      });
  // Every check has passed: from here on we write (on the device).
  C10_CUDA_CHECK(launch_adam(args, amsgrad, stream));
  operands.write_back();
}

// ---------------------------------------------------------------------------
// sgd_
// ---------------------------------------------------------------------------

void sgd_cuda(at::TensorList params, at::TensorList grads,
              at::TensorList momentum_buffers, at::TensorList master_params,
              at::TensorList state_steps, at::IntArrayRef group_index,
              at::ArrayRef<double> lr,
              at::ArrayRef<double> momentum, at::ArrayRef<double> dampening,
              at::ArrayRef<double> weight_decay,
              at::IntArrayRef new_momentum_buffers, at::TensorList lr_tensors,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf, bool nesterov,
              bool maximize, bool stochastic_rounding) {
  const SharedArgs shared{master_params, lr_tensors, grad_scale, found_inf,
                          stochastic_rounding};
  const CheckedCall call = check_sgd_args(
      at::kCUDA, params, grads, momentum_buffers, state_steps, group_index,
      lr, momentum, dampening, weight_decay, new_momentum_buffers, nesterov,
      shared);
  const int64_t n = params.size();
  if (n == 0 || validate_only()) return;
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  DenseOperands operands(call.lists);
  const bool use_momentum = !momentum_buffers.empty();
  std::vector<bool> is_new(n, false);
  for (int64_t i : new_momentum_buffers) is_new[i] = true;
  // SGD's step counters exist only with stochastic rounding (ops.cpp).
  const std::vector<SgdHyper> hypers =
      sgd_hypers(lr, lr_tensors, momentum, dampening, weight_decay, maximize);
  MultiTensorArgs<SgdHyper> args =
      make_args<SgdHyper>(call, operands, state_steps, group_index, shared);
  assign_hyper_sets(
      args, n,
      [&](int64_t i) {
        return std::make_pair(group_index[i], static_cast<bool>(is_new[i]));
      },
      [&](int64_t i) {
        const int64_t g = group_index[i];
        SgdHyper h = hypers[g];
        h.new_buffer = is_new[i];  // (per tensor, not per group)
        return std::make_pair(h, weight_decay_mode(weight_decay[g], false));
      });
  C10_CUDA_CHECK(launch_sgd(args, use_momentum, nesterov, stream));
  operands.write_back();
}

// ---------------------------------------------------------------------------
// adagrad_
// ---------------------------------------------------------------------------

void adagrad_cuda(at::TensorList params, at::TensorList grads,
                  at::TensorList state_sums, at::TensorList master_params,
                  at::TensorList state_steps, at::IntArrayRef group_index,
                  at::ArrayRef<double> lr, at::ArrayRef<double> lr_decay,
                  at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps,
                  at::TensorList lr_tensors,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, bool maximize,
                  bool stochastic_rounding) {
  const SharedArgs shared{master_params, lr_tensors, grad_scale, found_inf,
                          stochastic_rounding};
  const CheckedCall call = check_adagrad_args(
      at::kCUDA, params, grads, state_sums, state_steps, group_index, lr,
      lr_decay, weight_decay, eps, shared);
  const int64_t n = params.size();
  if (n == 0 || validate_only()) return;
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  DenseOperands operands(call.lists);
  const std::vector<AdagradHyper> hypers = adagrad_hypers(
      lr, lr_tensors, lr_decay, weight_decay, eps, maximize);
  MultiTensorArgs<AdagradHyper> args =
      make_args<AdagradHyper>(call, operands, state_steps, group_index, shared);
  assign_hyper_sets(
      args, n, [&](int64_t i) { return group_index[i]; },
      [&](int64_t i) {
        const int64_t g = group_index[i];
        return std::make_pair(hypers[g],
                              weight_decay_mode(weight_decay[g], false));
      });
  C10_CUDA_CHECK(launch_adagrad(args, stream));
  operands.write_back();
}

// ---------------------------------------------------------------------------
// rmsprop_
// ---------------------------------------------------------------------------

void rmsprop_cuda(at::TensorList params, at::TensorList grads,
                  at::TensorList square_avgs, at::TensorList grad_avgs,
                  at::TensorList momentum_buffers,
                  at::TensorList master_params, at::TensorList state_steps,
                  at::IntArrayRef group_index, at::ArrayRef<double> lr,
                  at::ArrayRef<double> alpha, at::ArrayRef<double> eps,
                  at::ArrayRef<double> weight_decay,
                  at::ArrayRef<double> momentum, at::TensorList lr_tensors,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, bool centered,
                  bool maximize, bool stochastic_rounding) {
  const SharedArgs shared{master_params, lr_tensors, grad_scale, found_inf,
                          stochastic_rounding};
  const CheckedCall call = check_rmsprop_args(
      at::kCUDA, params, grads, square_avgs, grad_avgs, momentum_buffers,
      state_steps, group_index, lr, alpha, eps, weight_decay, momentum,
      centered, shared);
  const int64_t n = params.size();
  if (n == 0 || validate_only()) return;
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  DenseOperands operands(call.lists);
  const bool use_momentum = !momentum_buffers.empty();
  // RMSprop's update does not depend on the step count, but torch keeps
  // (and checkpoints) it, and stochastic rounding keys on it.
  const std::vector<RmspropHyper> hypers = rmsprop_hypers(
      lr, lr_tensors, alpha, eps, weight_decay, momentum, maximize);
  MultiTensorArgs<RmspropHyper> args =
      make_args<RmspropHyper>(call, operands, state_steps, group_index, shared);
  assign_hyper_sets(
      args, n, [&](int64_t i) { return group_index[i]; },
      [&](int64_t i) {
        const int64_t g = group_index[i];
        return std::make_pair(hypers[g],
                              weight_decay_mode(weight_decay[g], false));
      });
  C10_CUDA_CHECK(launch_rmsprop(args, centered, use_momentum, stream));
  operands.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) {
  m.impl("adam_", &adam_cuda);
  m.impl("sgd_", &sgd_cuda);
  m.impl("adagrad_", &adagrad_cuda);
  m.impl("rmsprop_", &rmsprop_cuda);
}

}  // namespace fused_optim::cuda
