// The launchers of the CUDA kernels, as the torch glue (ops_cuda.cpp) calls
// them: raw addresses, element counts, per-group hyperparameters and the
// device addresses of the step counters, lr tensors and AMP scalars in;
// launches on `stream` out. No torch type crosses this line, so the kernels
// (*.cu) build with plain nvcc.
//
// Each launcher first launches the step kernel (ops with step counters:
// every counter +1 unless *found_inf != 0), then the main kernel(s), which
// derive the per-tensor scalars on the device (hyperparams.h). It returns
// the first CUDA launch error (cudaSuccess if none) and throws
// std::invalid_argument if `args` is malformed (a bug of the glue). It
// allocates nothing, never synchronises with the host, and decides nothing
// from tensor values: capturable in a CUDA graph.
//
// Operand order of args.operands (lists a mode does not use are left out,
// so the order is that of the op schema with the unused lists dropped; the
// master weights go in args.master):
//   adam_:    param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq if amsgrad]
//   sgd_:     param, grad[, momentum_buffer if momentum]
//   adagrad_: param, grad, state_sum
//   rmsprop_: param, grad, square_avg[, grad_avg if centered]
//             [, momentum_buffer if momentum]
// Weight decay per set: kNone / kL2, and kDecoupled for adam_ only.
#pragma once

#include <cuda_runtime_api.h>

#include "fused_optim/hyperparams.h"
#include "cuda/multi_tensor_plan.h"

namespace fused_optim::cuda {

cudaError_t launch_adam(const MultiTensorArgs<AdamHyper>& args, bool amsgrad,
                        cudaStream_t stream);

// nesterov requires momentum.
cudaError_t launch_sgd(const MultiTensorArgs<SgdHyper>& args, bool momentum,
                       bool nesterov, cudaStream_t stream);

cudaError_t launch_adagrad(const MultiTensorArgs<AdagradHyper>& args,
                           cudaStream_t stream);

cudaError_t launch_rmsprop(const MultiTensorArgs<RmspropHyper>& args,
                           bool centered, bool momentum, cudaStream_t stream);

}  // namespace fused_optim::cuda
