// CUDA kernels of fused_optim::rmsprop_: the launchers of launch.h. The math is
// rmsprop_update (update_rules.h), the element op and its dispatch are in ops.cuh,
// the torch glue is ops_cuda.cpp.
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/ops.cuh"

namespace fused_optim::cuda {

cudaError_t launch_rmsprop(const MultiTensorArgs<RmspropScalars<float>>& args,
                           bool centered, bool momentum, cudaStream_t stream) {
  return dispatch_rmsprop(args, centered, momentum, CudaLauncher{stream});
}

cudaError_t launch_rmsprop(const MultiTensorArgs<RmspropScalars<double>>& args,
                           bool centered, bool momentum, cudaStream_t stream) {
  return dispatch_rmsprop(args, centered, momentum, CudaLauncher{stream});
}

}  // namespace fused_optim::cuda
