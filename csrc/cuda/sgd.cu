// CUDA kernels of fused_optim::sgd_: the launcher of launch.h. The math is
// sgd_update (update_rules.h), the element op is in element_ops.h, the
// dispatch in ops.cuh, the torch glue in ops_cuda.cpp.
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/ops.cuh"

namespace fused_optim::cuda {

cudaError_t launch_sgd(const MultiTensorArgs<SgdHyper>& args, bool momentum, bool nesterov, cudaStream_t stream) {
  return dispatch_sgd(args, momentum, nesterov, CudaLauncher{stream});
}

}  // namespace fused_optim::cuda
