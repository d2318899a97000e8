// CUDA registrations of the fused_optim ops: the only CUDA file that sees
// torch. For each op it
//   1. validates every argument (op_args.h, the very checks the CPU kernels
//      run) before anything is written;
//   2. increments the step counters, 0-d CPU tensors read and written on the
//      host (no device synchronisation);
//   3. under a device guard for params[0]'s device, brings each tensor's
//      operands to one dense layout (dense_operands.h; copies run on the
//      current stream), derives the per-tensor scalars in double on the host
//      as torch.optim does, narrows them (update_rules.h), and calls the
//      torch-free launchers of launch.h on the current stream;
//   4. copies staged operands back (again on the current stream).
// Compiled only in CUDA builds (setup.py), with FUSED_OPTIM_WITH_CUDA=1.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "cuda/launch.h"
#include "dense_operands.h"
#include "fused_optim/update_rules.h"
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

// Calls fn(T{}) with T the compute type of the params: double for fp64,
// float for fp32/fp16/bf16 (the CPU kernels' at::opmath_type).
template <typename Fn>
void with_compute_type(at::ScalarType dtype, const Fn& fn) {
  if (dtype == at::kDouble) {
    fn(double{});
  } else {
    fn(float{});
  }
}

// The launch arguments of one call except the scalars: the addresses of the
// operand lists in use (the non-empty ones, in schema order: launch.h's
// operand order) in their dense layout, and the element counts.
template <typename Scalars>
MultiTensorArgs<Scalars> make_args(const std::vector<TensorListArg>& lists,
                                   const DenseOperands& operands) {
  const at::TensorList params = lists[0].tensors;
  const size_t n = params.size();
  MultiTensorArgs<Scalars> args;
  args.dtype = launch_dtype(params[0].scalar_type());
  for (size_t k = 0; k < lists.size(); ++k) {
    if (lists[k].tensors.empty()) continue;  // state this call does not use
    std::vector<void*> data(n);
    for (size_t i = 0; i < n; ++i) data[i] = operands.data(k, i);
    args.operands.push_back(std::move(data));
  }
  args.numels.resize(n);
  for (size_t i = 0; i < n; ++i) args.numels[i] = params[i].numel();
  return args;
}

// The weight-decay mode of a group, as the CPU kernels choose it: none when
// the decay is 0 (so an inf param cannot make 0 * inf = NaN).
WeightDecay decay_mode(double weight_decay, bool decoupled) {
  if (weight_decay == 0.0) return WeightDecay::kNone;
  return decoupled ? WeightDecay::kDecoupled : WeightDecay::kL2;
}

// ---------------------------------------------------------------------------
// adam_
// ---------------------------------------------------------------------------

void adam_cuda(at::TensorList params, at::TensorList grads,
               at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
               at::IntArrayRef group_index, at::ArrayRef<double> lr,
               at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
               at::ArrayRef<double> eps, at::ArrayRef<double> weight_decay,
               bool amsgrad, bool decoupled_weight_decay, bool maximize) {
  constexpr const char* kOp = "fused_optim.adam_";
  const std::vector<TensorListArg> lists = check_adam_args(
      at::kCUDA, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
      state_steps, group_index, lr, beta1, beta2, eps, weight_decay,
      amsgrad);
  const int64_t n = params.size();
  if (n == 0) return;
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // Staging allocates and copies but writes no input: it goes before the
  // first write, so that even an allocation failure loses nothing.
  DenseOperands operands(lists);

  // Every check has passed: from here on we write.
  const std::vector<double> steps = increment_state_steps(state_steps);
  with_compute_type(params[0].scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    MultiTensorArgs<AdamScalars<T>> args =
        make_args<AdamScalars<T>>(lists, operands);
    assign_scalar_sets(
        args, n,
        [&](int64_t i) { return std::make_pair(group_index[i], steps[i]); },
        [&](int64_t i) {
          const int64_t g = group_index[i];
          return std::make_pair(
              AdamScalars<T>(make_adam_scalars(lr[g], beta1[g], beta2[g],
                                               eps[g], weight_decay[g],
                                               maximize, steps[i])),
              decay_mode(weight_decay[g], decoupled_weight_decay));
        });
    C10_CUDA_CHECK(launch_adam(args, amsgrad, stream));
  });
  operands.write_back();
}

// ---------------------------------------------------------------------------
// sgd_
// ---------------------------------------------------------------------------

void sgd_cuda(at::TensorList params, at::TensorList grads,
              at::TensorList momentum_buffers, at::IntArrayRef group_index,
              at::ArrayRef<double> lr, at::ArrayRef<double> momentum,
              at::ArrayRef<double> dampening, at::ArrayRef<double> weight_decay,
              at::IntArrayRef new_momentum_buffers, bool nesterov,
              bool maximize) {
  constexpr const char* kOp = "fused_optim.sgd_";
  const std::vector<TensorListArg> lists = check_sgd_args(
      at::kCUDA, params, grads, momentum_buffers, group_index, lr,
      momentum, dampening, weight_decay, new_momentum_buffers, nesterov);
  const int64_t n = params.size();
  if (n == 0) return;
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // Staging allocates and copies but writes no input: it goes before the
  // first write, so that even an allocation failure loses nothing.
  DenseOperands operands(lists);
  const bool use_momentum = !momentum_buffers.empty();
  std::vector<bool> is_new(n, false);
  for (int64_t i : new_momentum_buffers) is_new[i] = true;
  with_compute_type(params[0].scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    MultiTensorArgs<SgdScalars<T>> args =
        make_args<SgdScalars<T>>(lists, operands);
    assign_scalar_sets(
        args, n,
        [&](int64_t i) {
          return std::make_pair(group_index[i], static_cast<bool>(is_new[i]));
        },
        [&](int64_t i) {
          const int64_t g = group_index[i];
          return std::make_pair(
              SgdScalars<T>(lr[g], momentum[g], dampening[g], weight_decay[g],
                            maximize, is_new[i]),
              decay_mode(weight_decay[g], /*decoupled=*/false));
        });
    C10_CUDA_CHECK(launch_sgd(args, use_momentum, nesterov, stream));
  });
  operands.write_back();
}

// ---------------------------------------------------------------------------
// adagrad_
// ---------------------------------------------------------------------------

void adagrad_cuda(at::TensorList params, at::TensorList grads,
                  at::TensorList state_sums, at::TensorList state_steps,
                  at::IntArrayRef group_index, at::ArrayRef<double> lr,
                  at::ArrayRef<double> lr_decay,
                  at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps,
                  bool maximize) {
  constexpr const char* kOp = "fused_optim.adagrad_";
  const std::vector<TensorListArg> lists = check_adagrad_args(
      at::kCUDA, params, grads, state_sums, state_steps, group_index, lr,
      lr_decay, weight_decay, eps);
  const int64_t n = params.size();
  if (n == 0) return;
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // Staging allocates and copies but writes no input: it goes before the
  // first write, so that even an allocation failure loses nothing.
  DenseOperands operands(lists);

  // Every check has passed: from here on we write.
  const std::vector<double> steps = increment_state_steps(state_steps);
  with_compute_type(params[0].scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    MultiTensorArgs<AdagradScalars<T>> args =
        make_args<AdagradScalars<T>>(lists, operands);
    assign_scalar_sets(
        args, n,
        [&](int64_t i) { return std::make_pair(group_index[i], steps[i]); },
        [&](int64_t i) {
          const int64_t g = group_index[i];
          return std::make_pair(
              AdagradScalars<T>(lr[g], lr_decay[g], eps[g], weight_decay[g],
                                maximize, steps[i]),
              decay_mode(weight_decay[g], /*decoupled=*/false));
        });
    C10_CUDA_CHECK(launch_adagrad(args, stream));
  });
  operands.write_back();
}

// ---------------------------------------------------------------------------
// rmsprop_
// ---------------------------------------------------------------------------

void rmsprop_cuda(at::TensorList params, at::TensorList grads,
                  at::TensorList square_avgs, at::TensorList grad_avgs,
                  at::TensorList momentum_buffers, at::TensorList state_steps,
                  at::IntArrayRef group_index, at::ArrayRef<double> lr,
                  at::ArrayRef<double> alpha, at::ArrayRef<double> eps,
                  at::ArrayRef<double> weight_decay,
                  at::ArrayRef<double> momentum, bool centered, bool maximize) {
  constexpr const char* kOp = "fused_optim.rmsprop_";
  const std::vector<TensorListArg> lists = check_rmsprop_args(
      at::kCUDA, params, grads, square_avgs, grad_avgs, momentum_buffers,
      state_steps, group_index, lr, alpha, eps, weight_decay, momentum,
      centered);
  const int64_t n = params.size();
  if (n == 0) return;
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // Staging allocates and copies but writes no input: it goes before the
  // first write, so that even an allocation failure loses nothing.
  DenseOperands operands(lists);
  const bool use_momentum = !momentum_buffers.empty();

  // Every check has passed: from here on we write. RMSprop's update does not
  // depend on the step count, but torch keeps (and checkpoints) it.
  increment_state_steps(state_steps);
  with_compute_type(params[0].scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    MultiTensorArgs<RmspropScalars<T>> args =
        make_args<RmspropScalars<T>>(lists, operands);
    assign_scalar_sets(
        args, n, [&](int64_t i) { return group_index[i]; },
        [&](int64_t i) {
          const int64_t g = group_index[i];
          return std::make_pair(
              RmspropScalars<T>(lr[g], alpha[g], eps[g], weight_decay[g],
                                momentum[g], maximize),
              decay_mode(weight_decay[g], /*decoupled=*/false));
        });
    C10_CUDA_CHECK(launch_rmsprop(args, centered, use_momentum, stream));
  });
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
