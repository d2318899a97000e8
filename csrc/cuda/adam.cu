// CUDA kernels of fused_optim::adam_: the launchers of launch.h. The math is
// adam_update (update_rules.h), the element op and its dispatch are in ops.cuh,
// the torch glue is ops_cuda.cpp.
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/ops.cuh"

namespace fused_optim::cuda {

cudaError_t launch_adam(const MultiTensorArgs<AdamScalars<float>>& args,
                        bool amsgrad, cudaStream_t stream) {
  return dispatch_adam(args, amsgrad, CudaLauncher{stream});
}

cudaError_t launch_adam(const MultiTensorArgs<AdamScalars<double>>& args,
                        bool amsgrad, cudaStream_t stream) {
  return dispatch_adam(args, amsgrad, CudaLauncher{stream});
}

}  // namespace fused_optim::cuda
