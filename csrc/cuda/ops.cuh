// Dispatch of the CUDA kernels: an op call's mode flags and run-time storage
// dtypes -> one (element op, param type, state type), handed to an executor:
// CudaLauncher in the launchers (*.cu), a host emulator in the tests, so the
// tests run the same dispatch as production.
//
// Which element op a call runs is the op spec's (op_specs.h), shared with
// the CPU kernels; the (param, state) pairs are the storage table's.
//
// Instantiation matrix: per op, the element ops of its modes times the
// storage pairs (8 with state, 4 without). The weight-decay mode is not
// among them: it is per hyperparameter set, chosen per chunk inside the
// kernel. Nor are master weights and stochastic rounding: the param mode
// (ParamMode, multi_tensor_apply.cuh) is a template parameter of the chunk
// loop, and each kernel holds one compiled loop per mode its param type
// allows, chosen once per launch (as a run-time branch inside one loop they
// would cost registers in every mode). AMP unscaling is a run-time flag
// uniform across a launch (a branch every thread takes alike costs next to
// nothing). That keeps the kernel count, and the build time on 2-core CI,
// in check.
#pragma once

#include <stdexcept>

#include "cuda/multi_tensor_apply.cuh"
#include "cuda/multi_tensor_plan.h"
#include "fused_optim/op_specs.h"

namespace fused_optim::cuda {

template <typename Spec, typename Exec>
cudaError_t dispatch(const MultiTensorArgs<typename Spec::Hyper>& args,
                     const CallModes& modes, const Exec& exec) {
  return Spec::with_element_op(modes, [&](auto op) {
    using Op = decltype(op);
    return with_storage_types<(Op::kNumOperands > 2)>(
        args.param_dtype, args.state_dtype, [&](auto p, auto s) {
          using P = typename decltype(p)::type;
          using S = typename decltype(s)::type;
          return exec.template run<Op, P, S>(args);
        });
  });
}

}  // namespace fused_optim::cuda
