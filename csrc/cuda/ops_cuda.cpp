// CUDA registrations of the fused_optim ops: the only CUDA file that sees
// torch. For each op, run<Spec>
//   1. under a device guard for params[0]'s device, runs the shared front
//      (op_front.h: the very checks the CPU kernels run, with the step
//      counters, lr tensors and AMP scalars required on the params' GPU,
//      then the staging of each tensor's operands to one dense layout,
//      copies on the current stream);
//   2. hands launch<Spec> (launch.h) the addresses, element counts, the
//      hyperparameter sets (and lr tensor addresses), the step counters'
//      addresses and the AMP scalars' addresses. The launchers
//      increment the step counters and derive the per-tensor scalars ON THE
//      DEVICE (hyperparams.h), on the current stream;
//   3. copies staged operands back (again on the current stream).
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

#include "cuda/launch.h"
#include "cuda/sum_of_squares.h"
#include "fused_optim/precision.h"
#include "op_front.h"
#include "sum_of_squares_inputs.h"

namespace fused_optim::cuda {
namespace {

// Device address of an optional one-element float32 tensor, or null.
const float* optional_data(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

// The launch arguments of a prepared call: the addresses of the operand
// lists in use (the non-empty ones, in schema order: launch.h's operand
// order) in their dense layout, the master weights, the element counts,
// the hyperparameter sets, the step counters, the AMP scalars.
template <typename Spec>
MultiTensorArgs<typename Spec::Hyper> make_args(const PreparedCall<Spec>& call) {
  const std::vector<TensorListArg>& lists = call.lists;
  const at::TensorList params = lists[0].tensors;
  const size_t n = params.size();
  const size_t master_list = call.master_list();
  const DenseOperands& operands = *call.operands;
  MultiTensorArgs<typename Spec::Hyper> args;
  args.param_dtype = *storage_dtype(call.precision.param_dtype);
  args.state_dtype = *storage_dtype(call.precision.state_dtype);
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
  args.hyper_set = call.set_of;
  args.hypers = call.sets;
  args.decay = call.decay;
  args.rounding_streams = call.rounding_streams;
  if (!call.state_steps.empty()) {  // (sgd_'s may be empty)
    args.steps.resize(n);
    for (size_t i = 0; i < n; ++i) {
      args.steps[i] = StepCounter{call.state_steps[i].data_ptr(),
                                  call.state_steps[i].scalar_type() == at::kDouble};
    }
  }
  for (const at::Tensor& value : call.scalar_state) {
    args.scalar_state.push_back(
        StepCounter{value.data_ptr(), value.scalar_type() == at::kDouble});
  }
  if (call.tensor_sums.defined()) {  // Note [per-tensor norms]
    args.tensor_sums = call.tensor_sums.data_ptr();
    args.tensor_sums_is_double = call.tensor_sums.scalar_type() == at::kDouble;
  }
  args.grad_scale = optional_data(*call.grad_scale);
  args.found_inf = optional_data(*call.found_inf);
  if (call.has_grad_norm()) {
    args.grad_norm = (*call.grad_norm)->data_ptr();
    args.grad_norm_is_double = (*call.grad_norm)->scalar_type() == at::kDouble;
  }
  args.stochastic_rounding = call.precision.stochastic_rounding;
  return args;
}

// Note [norms of the update]: the measuring pass's scratch and the float64
// sums it writes (zeros: what a call skipped by AMP reports), from the
// caching allocator (stream-ordered: no sync), set in `args`. Returns the
// two tensors, which must outlive the launch on the host side.
template <typename Spec>
std::pair<at::Tensor, at::Tensor> measuring_buffers(
    const PreparedCall<Spec>& call, MultiTensorArgs<typename Spec::Hyper>& args) {
  const auto doubles = call.lists[0].tensors[0].options().dtype(at::kDouble);
  at::Tensor partials = at::empty({2 * num_partials(args.numels)}, doubles);
  at::Tensor sums =
      at::zeros({2 * static_cast<int64_t>(args.numels.size())}, doubles);
  args.tensor_sums = sums.data_ptr();
  args.tensor_sums_is_double = true;
  args.measure_partials = partials.data_ptr<double>();
  return {std::move(partials), std::move(sums)};
}

// The device guard of a call: params[0]'s device.
void guard_device(c10::cuda::OptionalCUDAGuard& guard, const OpCall& call) {
  if (!call.params.empty() && call.params[0].is_cuda()) {
    guard.set_device(call.params[0].device());
  }
}

// The CUDA kernel of op Spec (registered for both lr overloads below).
template <typename Spec>
void run(const OpCall& op_call) {
  c10::cuda::OptionalCUDAGuard device_guard;
  guard_device(device_guard, op_call);
  std::optional<PreparedCall<Spec>> call = prepare<Spec>(at::kCUDA, op_call);
  if (!call) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  MultiTensorArgs<typename Spec::Hyper> args = make_args(*call);
  std::pair<at::Tensor, at::Tensor> measuring;
  if constexpr (NormsOfUpdate<typename Spec::Hyper>::value) {
    if (call->tensor_sums.defined()) {
      args.passes = NormPasses::kUpdateOnly;  // Note [norms across shards]
    } else {
      measuring = measuring_buffers(*call, args);
    }
  }
  // Every check has passed: from here on we write (on the device).
  C10_CUDA_CHECK(launch<Spec>(args, call->modes, stream));
  call->operands->write_back();
}

// The `measure` overloads' CUDA kernel (Note [norms across shards] in
// op_front.h): the sums run<Spec> would read, at the step it would use. The
// step kernel advances copies of the counters, and only the measuring pass
// follows it.
template <typename Spec>
at::Tensor measure(const OpCall& op_call) {
  c10::cuda::OptionalCUDAGuard device_guard;
  guard_device(device_guard, op_call);
  std::optional<PreparedCall<Spec>> call = prepare<Spec>(at::kCUDA, op_call);
  if (std::optional<at::Tensor> sums = sums_from_front(call)) return *sums;
  if constexpr (NormsOfUpdate<typename Spec::Hyper>::value) {
    MultiTensorArgs<typename Spec::Hyper> args = make_args(*call);
    // Copies of the counters for the step kernel to advance, made in one
    // multi-tensor op (not one clone launch per tensor); their dtypes are
    // the counters' (+ 0 changes no value).
    const std::vector<at::Tensor> step_copies =
        args.steps.empty() ? std::vector<at::Tensor>{}
                           : at::_foreach_add(call->state_steps, 0);
    for (size_t i = 0; i < args.steps.size(); ++i) {
      args.steps[i].data = step_copies[i].data_ptr();
    }
    const std::pair<at::Tensor, at::Tensor> measuring = measuring_buffers(*call, args);
    args.passes = NormPasses::kMeasureOnly;
    C10_CUDA_CHECK(launch<Spec>(args, call->modes,
                                c10::cuda::getCurrentCUDAStream().stream()));
    return measuring.second;
  }
  TORCH_INTERNAL_ASSERT(false, "unreachable: sums_from_front covers the others");
}

// fused_optim::sum_of_squares on CUDA: the shared checks, two scratch
// buffers from the caching allocator (stream-ordered: no sync), the launches.
at::Tensor sum_of_squares(at::TensorList tensors,
                          const std::optional<at::Tensor>& grad_scale,
                          bool per_tensor) {
  c10::cuda::OptionalCUDAGuard device_guard;
  if (!tensors.empty() && tensors[0].is_cuda()) {
    device_guard.set_device(tensors[0].device());
  }
  at::Tensor out = checked_sum_of_squares_output(tensors, grad_scale, per_tensor);
  const std::vector<at::Tensor> dense = dense_inputs(tensors);
  SumOfSquaresArgs args;
  for (const at::Tensor& t : dense) {
    args.data.push_back(t.data_ptr());
    args.numels.push_back(t.numel());
    args.dtypes.push_back(*storage_dtype(t.scalar_type()));
  }
  const auto doubles = out.options().dtype(at::kDouble);
  const at::Tensor partials = at::empty({num_partials(args.numels)}, doubles);
  const at::Tensor tensor_sums =
      at::empty({static_cast<int64_t>(dense.size())}, doubles);
  args.grad_scale = optional_data(grad_scale);
  args.partials = partials.data_ptr<double>();
  args.tensor_sums = tensor_sums.data_ptr<double>();
  args.out = out.data_ptr();
  args.out_is_double = out.scalar_type() == at::kDouble;
  args.per_tensor = per_tensor;
  C10_CUDA_CHECK(launch_sum_of_squares(
      args, c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) {
  m.impl("sum_of_squares", &sum_of_squares);
#define FO_IMPL_CUDA(Spec) FO_IMPL_OP(m, Spec, ::fused_optim::cuda);
  FO_FOR_EACH_OP(FO_IMPL_CUDA)
#undef FO_IMPL_CUDA
}

}  // namespace fused_optim::cuda
