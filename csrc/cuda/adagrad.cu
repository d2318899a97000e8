// CUDA kernels of fused_optim::adagrad_: the launchers of launch.h. The math is
// adagrad_update (update_rules.h), the element op and its dispatch are in ops.cuh,
// the torch glue is ops_cuda.cpp.
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/ops.cuh"

namespace fused_optim::cuda {

cudaError_t launch_adagrad(const MultiTensorArgs<AdagradScalars<float>>& args,
                           cudaStream_t stream) {
  return dispatch_adagrad(args, CudaLauncher{stream});
}

cudaError_t launch_adagrad(const MultiTensorArgs<AdagradScalars<double>>& args,
                           cudaStream_t stream) {
  return dispatch_adagrad(args, CudaLauncher{stream});
}

}  // namespace fused_optim::cuda
