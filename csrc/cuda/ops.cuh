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
// kernel. Master weights, stochastic rounding and AMP unscaling are run-time
// flags uniform across a launch (branches every thread takes alike cost
// next to nothing), not template parameters: that keeps the kernel count,
// and the build time on 2-core CI, in check.
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
