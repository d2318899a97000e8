// CUDA kernels of fused_optim::adagrad_: the launcher of launch.h. The math is
// adagrad_update (update_rules.h), the element op is in element_ops.h, the
// dispatch in ops.cuh, the torch glue in ops_cuda.cpp.
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/ops.cuh"

namespace fused_optim::cuda {

cudaError_t launch_adagrad(const MultiTensorArgs<AdagradHyper>& args, cudaStream_t stream) {
  return dispatch_adagrad(args, CudaLauncher{stream});
}

}  // namespace fused_optim::cuda
