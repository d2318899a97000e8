// CUDA kernels of fused_optim::sgd_: the launchers of launch.h. The math is
// sgd_update (update_rules.h), the element op and its dispatch are in ops.cuh,
// the torch glue is ops_cuda.cpp.
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/ops.cuh"

namespace fused_optim::cuda {

cudaError_t launch_sgd(const MultiTensorArgs<SgdScalars<float>>& args,
                       bool momentum, bool nesterov, cudaStream_t stream) {
  return dispatch_sgd(args, momentum, nesterov, CudaLauncher{stream});
}

cudaError_t launch_sgd(const MultiTensorArgs<SgdScalars<double>>& args,
                       bool momentum, bool nesterov, cudaStream_t stream) {
  return dispatch_sgd(args, momentum, nesterov, CudaLauncher{stream});
}

}  // namespace fused_optim::cuda
