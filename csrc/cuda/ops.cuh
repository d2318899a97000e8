// Dispatch of the CUDA kernels: an op call's run-time storage dtypes and mode
// flags -> one (element op, param type, state type), handed to an executor:
// CudaLauncher in the launchers (*.cu), a host emulator in the tests, so the
// tests run the same dispatch as production.
//
// The element ops (which operands, which update rule) are shared with the
// CPU kernels: fused_optim/element_ops.h.
//
// Instantiation matrix: per op, the mode flags below times the storage
// pairs of with_storage_types (8 with state, 4 without). The weight-decay
// mode is not among them: it is per tensor, chosen per chunk inside the
// kernel. Master weights, stochastic rounding and AMP unscaling are run-time
// flags uniform across a launch (branches every thread takes alike cost
// next to nothing), not template parameters: that keeps the kernel count,
// and the build time on 2-core CI, in check.
#pragma once

#include <stdexcept>

#include "fused_optim/hyperparams.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/multi_tensor_plan.h"
#include "fused_optim/bool_switch.h"
#include "fused_optim/element_ops.h"
#include "fused_optim/macros.h"
#include "fused_optim/update_rules.h"

namespace fused_optim::cuda {

template <typename Exec>
cudaError_t dispatch_adam(const MultiTensorArgs<AdamHyper>& args,
                          bool amsgrad, const Exec& exec) {
  return with_storage_types(
      args.param_dtype, args.state_dtype, /*has_state=*/true,
      [&](auto p, auto s) {
        using P = typename decltype(p)::type;
        using S = typename decltype(s)::type;
        return FO_BOOL_SWITCH(amsgrad, kAmsgrad, [&] {
          return exec.template run<AdamOp<kAmsgrad>, P, S>(args);
        });
      });
}

// Modes: no momentum, momentum, Nesterov momentum (needs momentum).
template <typename Exec>
cudaError_t dispatch_sgd(const MultiTensorArgs<SgdHyper>& args, bool momentum,
                         bool nesterov, const Exec& exec) {
  if (nesterov && !momentum) {
    throw std::invalid_argument(
        "fused_optim CUDA launch: sgd_ with nesterov needs momentum");
  }
  return FO_BOOL_SWITCH(momentum, kMomentum, [&] {
    return with_storage_types(
        args.param_dtype, args.state_dtype, /*has_state=*/kMomentum,
        [&](auto p, auto s) {
          using P = typename decltype(p)::type;
          using S = typename decltype(s)::type;
          return FO_BOOL_SWITCH(nesterov, kNesterov, [&] {
            return exec.template run<SgdOp<kMomentum, kMomentum && kNesterov>,
                                     P, S>(args);
          });
        });
  });
}

template <typename Exec>
cudaError_t dispatch_adagrad(const MultiTensorArgs<AdagradHyper>& args,
                             const Exec& exec) {
  return with_storage_types(args.param_dtype, args.state_dtype,
                            /*has_state=*/true, [&](auto p, auto s) {
                              using P = typename decltype(p)::type;
                              using S = typename decltype(s)::type;
                              return exec.template run<AdagradOp, P, S>(args);
                            });
}

template <typename Exec>
cudaError_t dispatch_rmsprop(const MultiTensorArgs<RmspropHyper>& args,
                             bool centered, bool momentum, const Exec& exec) {
  return with_storage_types(
      args.param_dtype, args.state_dtype, /*has_state=*/true,
      [&](auto p, auto s) {
        using P = typename decltype(p)::type;
        using S = typename decltype(s)::type;
        return FO_BOOL_SWITCH(centered, kCentered, [&] {
          return FO_BOOL_SWITCH(momentum, kMomentum, [&] {
            return exec.template run<RmspropOp<kCentered, kMomentum>, P, S>(
                args);
          });
        });
      });
}

}  // namespace fused_optim::cuda
