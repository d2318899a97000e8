// The launcher of the CUDA kernels, as the torch glue (ops_cuda.cpp) calls
// it: raw addresses, element counts, hyperparameter sets and the device
// addresses of the step counters, lr tensors and AMP scalars in; launches on
// `stream` out. No torch type crosses this line, so the kernels (*.cu) build
// with plain nvcc.
//
// launch<Spec> first launches the step kernel (ops with step counters:
// every counter +1 unless *found_inf != 0), then the main kernel(s), which
// derive the per-tensor scalars on the device (hyperparams.h). It returns
// the first CUDA launch error (cudaSuccess if none) and throws
// std::invalid_argument if `args` is malformed (a bug of the glue). It
// allocates nothing, never synchronises with the host, and decides nothing
// from tensor values: capturable in a CUDA graph.
//
// Operand order of args.operands: the op's state lists in spec order
// (op_specs.h), after param and grad, with the lists the call does not use
// left out; the master weights go in args.master. Weight decay per set:
// kNone / kL2, and kDecoupled for ops with kDecoupledDecay.
//
// Each op's launcher is instantiated in its own .cu file (adam.cu, ...), so
// the kernels compile in parallel.
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/multi_tensor_plan.h"
#include "fused_optim/hyperparams.h"
#include "fused_optim/op_specs.h"

namespace fused_optim::cuda {

template <typename Spec>
cudaError_t launch(const MultiTensorArgs<typename Spec::Hyper>& args,
                   const CallModes& modes, cudaStream_t stream);

// Each op's launcher, defined in its own .cu file.
#define FO_DECLARE_LAUNCH(Spec)                                        \
  template <>                                                          \
  cudaError_t launch<Spec>(const MultiTensorArgs<Spec::Hyper>& args,   \
                           const CallModes& modes, cudaStream_t stream);
FO_FOR_EACH_OP(FO_DECLARE_LAUNCH)
#undef FO_DECLARE_LAUNCH

}  // namespace fused_optim::cuda
