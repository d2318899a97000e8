// The launchers of the CUDA kernels, as the torch glue (ops_cuda.cpp) calls
// them: raw addresses, element counts and per-tensor scalars in, launches on
// `stream` out. No torch type crosses this line, so the kernels (*.cu) build
// with plain nvcc.
//
// Each launcher returns the first CUDA launch error (cudaSuccess if none) and
// throws std::invalid_argument if `args` is malformed (a bug of the glue).
// It allocates nothing and never synchronises with the host.
//
// Overloads: *Scalars<float> for fp32/fp16/bf16 params (args.dtype says
// which), *Scalars<double> for fp64 params.
//
// Operand order of args.operands (lists a mode does not use are left out,
// so the order is that of the op schema with the unused lists dropped):
//   adam_:    param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq if amsgrad]
//   sgd_:     param, grad[, momentum_buffer if momentum]
//   adagrad_: param, grad, state_sum
//   rmsprop_: param, grad, square_avg[, grad_avg if centered]
//             [, momentum_buffer if momentum]
// Weight decay per set: kNone / kL2, and kDecoupled for adam_ only.
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/multi_tensor_plan.h"
#include "fused_optim/update_rules.h"

namespace fused_optim::cuda {

cudaError_t launch_adam(const MultiTensorArgs<AdamScalars<float>>& args,
                        bool amsgrad, cudaStream_t stream);
cudaError_t launch_adam(const MultiTensorArgs<AdamScalars<double>>& args,
                        bool amsgrad, cudaStream_t stream);

// nesterov requires momentum.
cudaError_t launch_sgd(const MultiTensorArgs<SgdScalars<float>>& args,
                       bool momentum, bool nesterov, cudaStream_t stream);
cudaError_t launch_sgd(const MultiTensorArgs<SgdScalars<double>>& args,
                       bool momentum, bool nesterov, cudaStream_t stream);

cudaError_t launch_adagrad(const MultiTensorArgs<AdagradScalars<float>>& args,
                           cudaStream_t stream);
cudaError_t launch_adagrad(const MultiTensorArgs<AdagradScalars<double>>& args,
                           cudaStream_t stream);

cudaError_t launch_rmsprop(const MultiTensorArgs<RmspropScalars<float>>& args,
                           bool centered, bool momentum, cudaStream_t stream);
cudaError_t launch_rmsprop(const MultiTensorArgs<RmspropScalars<double>>& args,
                           bool centered, bool momentum, cudaStream_t stream);

}  // namespace fused_optim::cuda
