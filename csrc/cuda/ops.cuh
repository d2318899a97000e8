// The element ops of the CUDA kernels: for each optimizer, which operands an
// element has (in the order of launch.h) and which update rule of
// update_rules.h runs on them. No math here, and no memory access:
// multi_tensor_apply.cuh loads the operands into x[], calls update(), and
// stores the written ones back.
//
// Operand 0 is always the param and operand 1 the grad (read only). State
// that a mode does not use is not an operand at all (nothing is loaded for
// it); the update rule then gets a dummy register.
//
// The dispatch_* functions at the end turn an op call's run-time dtype and
// mode flags into one (Op, storage type) pair and hand it to an executor:
// CudaLauncher in the launchers (*.cu), a host emulator in the tests, so the
// tests run the same dispatch as production.
#pragma once

#include <stdexcept>

#include "cuda/multi_tensor_apply.cuh"
#include "cuda/multi_tensor_plan.h"
#include "fused_optim/bool_switch.h"
#include "fused_optim/element_ops.h"
#include "fused_optim/macros.h"
#include "fused_optim/update_rules.h"

namespace fused_optim::cuda {

// ---------------------------------------------------------------------------
// Dispatch: dtype and mode flags -> (Op, storage type) -> exec.run.
// Each instantiates the kernels of its op: {fp32, fp16, bf16} with T = float,
// fp64 with T = double, times the mode flags below. The weight-decay mode is
// not among them: it is per tensor, chosen per chunk inside the kernel.
// ---------------------------------------------------------------------------

template <typename T, typename Exec>
cudaError_t dispatch_adam(const MultiTensorArgs<AdamScalars<T>>& args,
                          bool amsgrad, const Exec& exec) {
  return with_storage_type<T>(args.dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    return FO_BOOL_SWITCH(amsgrad, kAmsgrad, [&] {
      return exec.template run<AdamOp<kAmsgrad>, scalar_t>(args);
    });
  });
}

// Modes: no momentum, momentum, Nesterov momentum (needs momentum).
template <typename T, typename Exec>
cudaError_t dispatch_sgd(const MultiTensorArgs<SgdScalars<T>>& args,
                         bool momentum, bool nesterov, const Exec& exec) {
  if (nesterov && !momentum) {
    throw std::invalid_argument(
        "fused_optim CUDA launch: sgd_ with nesterov needs momentum");
  }
  return with_storage_type<T>(args.dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    return FO_BOOL_SWITCH(momentum, kMomentum, [&] {
      return FO_BOOL_SWITCH(nesterov, kNesterov, [&] {
        return exec.template run<SgdOp<kMomentum, kMomentum && kNesterov>,
                                 scalar_t>(args);
      });
    });
  });
}

template <typename T, typename Exec>
cudaError_t dispatch_adagrad(const MultiTensorArgs<AdagradScalars<T>>& args,
                             const Exec& exec) {
  return with_storage_type<T>(args.dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    return exec.template run<AdagradOp, scalar_t>(args);
  });
}

template <typename T, typename Exec>
cudaError_t dispatch_rmsprop(const MultiTensorArgs<RmspropScalars<T>>& args,
                             bool centered, bool momentum, const Exec& exec) {
  return with_storage_type<T>(args.dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    return FO_BOOL_SWITCH(centered, kCentered, [&] {
      return FO_BOOL_SWITCH(momentum, kMomentum, [&] {
        return exec.template run<RmspropOp<kCentered, kMomentum>, scalar_t>(
            args);
      });
    });
  });
}

}  // namespace fused_optim::cuda
