// The CUDA launcher of fused_optim::lamb_ (launch.h), instantiated in a
// unit of its own so that the ops' kernels compile in parallel. The math is
// in update_rules.h, the element op in element_ops.h, the spec in
// op_specs.h, the torch glue in ops_cuda.cpp.
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/ops.cuh"

namespace fused_optim::cuda {

template <>
cudaError_t launch<LambSpec>(const MultiTensorArgs<LambSpec::Hyper>& args,
                           const CallModes& modes, cudaStream_t stream) {
  return dispatch<LambSpec>(args, modes, CudaLauncher{stream});
}

}  // namespace fused_optim::cuda
