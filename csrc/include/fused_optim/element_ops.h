// The element ops: for each optimizer, which operands an element has and
// which update rule of update_rules.h runs on them. No math here and no
// memory access: the CPU loops (csrc/cpu/apply.h) and the CUDA kernels
// (csrc/cuda/multi_tensor_apply.cuh) load the operands into x[], call
// update(), and store the written ones back.
//
// Operand order: the op schema's tensor lists with the unused ones dropped.
// Operand 0 is always the param and operand 1 the grad; the rest are state,
// all of one storage dtype. Master weights are not an operand: the loops
// load operand 0 from them when a call has them (and store to both).
// State that a mode does not use is not an operand at all (nothing is
// loaded for it); the update rule then gets a dummy register.
#pragma once

#include <type_traits>

#include "fused_optim/macros.h"
#include "fused_optim/update_rules.h"

namespace fused_optim {

// Operands: param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq if amsgrad].
template <bool kAmsgrad>
struct AdamOp {
  static constexpr int kNumOperands = kAmsgrad ? 5 : 4;
  static constexpr bool kAllowsDecoupledDecay = true;
  FO_HOST_DEVICE static constexpr bool is_written(int k) { return k != 1; }

  template <WeightDecay kDecay, typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE static void update(T (&x)[kNumOperands],
                                                    const AdamScalars<T>& s) {
    if constexpr (kAmsgrad) {
      adam_update<true, kDecay>(x[0], x[1], x[2], x[3], x[4], s);
    } else {
      T unused = T(0);
      adam_update<false, kDecay>(x[0], x[1], x[2], x[3], unused, s);
    }
  }
};

// Operands: param, grad[, momentum_buffer if kMomentum].
// kNesterov implies kMomentum (the launcher never instantiates it without).
template <bool kMomentum, bool kNesterov>
struct SgdOp {
  static_assert(kMomentum || !kNesterov, "Nesterov needs momentum");
  static constexpr int kNumOperands = kMomentum ? 3 : 2;
  static constexpr bool kAllowsDecoupledDecay = false;
  FO_HOST_DEVICE static constexpr bool is_written(int k) { return k != 1; }

  template <WeightDecay kDecay, typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE static void update(T (&x)[kNumOperands],
                                                    const SgdScalars<T>& s) {
    if constexpr (kMomentum) {
      sgd_update<true, kNesterov, kDecay>(x[0], x[1], x[2], s);
    } else {
      T unused = T(0);
      sgd_update<false, false, kDecay>(x[0], x[1], unused, s);
    }
  }
};

// Operands: param, grad[, momentum_buffer if kMomentum] (as SgdOp).
template <bool kMomentum, bool kNesterov>
struct LarsOp {
  static_assert(kMomentum || !kNesterov, "Nesterov needs momentum");
  static constexpr int kNumOperands = kMomentum ? 3 : 2;
  static constexpr bool kAllowsDecoupledDecay = false;
  FO_HOST_DEVICE static constexpr bool is_written(int k) { return k != 1; }

  template <WeightDecay kDecay, typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE static void update(T (&x)[kNumOperands],
                                                    const LarsScalars<T>& s) {
    if constexpr (kMomentum) {
      lars_update<true, kNesterov, kDecay>(x[0], x[1], x[2], s);
    } else {
      T unused = T(0);
      lars_update<false, false, kDecay>(x[0], x[1], unused, s);
    }
  }
};

// Operands: param, grad, exp_avg, exp_avg_sq. The weight-decay modes:
// kL2 adds weight_decay * param to the update direction (timm's default),
// kDecoupled decays the param first (timm's decoupled_decay). direction():
// Note [norms of the update] (hyperparams.h).
struct LambOp {
  static constexpr int kNumOperands = 4;
  static constexpr bool kAllowsDecoupledDecay = true;
  FO_HOST_DEVICE static constexpr bool is_written(int k) { return k != 1; }

  template <WeightDecay kDecay, typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE static T direction(T (&x)[kNumOperands],
                                                    const LambScalars<T>& s) {
    return lamb_direction<kDecay>(x[0], x[1], x[2], x[3], s);
  }

  template <WeightDecay kDecay, typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE static void update(T (&x)[kNumOperands],
                                                    const LambScalars<T>& s) {
    lamb_update<kDecay>(x[0], x[1], x[2], x[3], s);
  }
};

// Operands: param, grad, state_sum.
struct AdagradOp {
  static constexpr int kNumOperands = 3;
  static constexpr bool kAllowsDecoupledDecay = false;
  FO_HOST_DEVICE static constexpr bool is_written(int k) { return k != 1; }

  template <WeightDecay kDecay, typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE static void update(
      T (&x)[kNumOperands], const AdagradScalars<T>& s) {
    adagrad_update<kDecay>(x[0], x[1], x[2], s);
  }
};

// Operands: param, grad, square_avg[, grad_avg if kCentered]
// [, momentum_buffer if kMomentum].
template <bool kCentered, bool kMomentum>
struct RmspropOp {
  static constexpr int kGradAvg = 3;                   // if kCentered
  static constexpr int kMomentumBuffer = kCentered ? 4 : 3;  // if kMomentum
  static constexpr int kNumOperands = 3 + int(kCentered) + int(kMomentum);
  static constexpr bool kAllowsDecoupledDecay = false;
  FO_HOST_DEVICE static constexpr bool is_written(int k) { return k != 1; }

  template <WeightDecay kDecay, typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE static void update(
      T (&x)[kNumOperands], const RmspropScalars<T>& s) {
    T unused_grad_avg = T(0);
    T unused_buffer = T(0);
    T* grad_avg = &unused_grad_avg;
    T* buffer = &unused_buffer;
    if constexpr (kCentered) grad_avg = &x[kGradAvg];
    if constexpr (kMomentum) buffer = &x[kMomentumBuffer];
    rmsprop_update<kCentered, kMomentum, kDecay>(x[0], x[1], x[2], *grad_avg,
                                                 *buffer, s);
  }
};

// Operands: param, grad, exp_avg, exp_avg_sq.
struct RadamOp {
  static constexpr int kNumOperands = 4;
  static constexpr bool kAllowsDecoupledDecay = true;
  FO_HOST_DEVICE static constexpr bool is_written(int k) { return k != 1; }

  template <WeightDecay kDecay, typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE static void update(T (&x)[kNumOperands],
                                                    const RadamScalars<T>& s) {
    radam_update<kDecay>(x[0], x[1], x[2], x[3], s);
  }
};

// Operands: param, grad, exp_avg. Decay is decoupled or none.
struct LionOp {
  static constexpr int kNumOperands = 3;
  static constexpr bool kAllowsDecoupledDecay = true;
  FO_HOST_DEVICE static constexpr bool is_written(int k) { return k != 1; }

  template <WeightDecay kDecay, typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE static void update(T (&x)[kNumOperands],
                                                    const LionScalars<T>& s) {
    if constexpr (kDecay != WeightDecay::kL2) {
      lion_update<kDecay>(x[0], x[1], x[2], s);
    }
  }
};

// Operands: param, grad, exp_avg, exp_avg_sq (mu_product is per-tensor
// scalar state, in the scalars, not an operand).
struct NadamOp {
  static constexpr int kNumOperands = 4;
  static constexpr bool kAllowsDecoupledDecay = true;
  FO_HOST_DEVICE static constexpr bool is_written(int k) { return k != 1; }

  template <WeightDecay kDecay, typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE static void update(T (&x)[kNumOperands],
                                                    const NadamScalars<T>& s) {
    nadam_update<kDecay>(x[0], x[1], x[2], x[3], s);
  }
};

// Calls fn(std::integral_constant<WeightDecay, d>{}) for a hyperparameter
// set's decay mode d: the dispatch of both backends' element loops (CPU per
// range, CUDA per chunk). Op must allow kDecoupled for it to be called with
// it (the front and check_multi_tensor_args refuse it otherwise); returns
// false, calling nothing, when it does not.
template <typename Op, typename Fn>
FO_HOST_DEVICE FO_FORCE_INLINE bool with_decay_mode(WeightDecay decay, const Fn& fn) {
  switch (decay) {
    case WeightDecay::kNone:
      fn(std::integral_constant<WeightDecay, WeightDecay::kNone>{});
      return true;
    case WeightDecay::kL2:
      fn(std::integral_constant<WeightDecay, WeightDecay::kL2>{});
      return true;
    case WeightDecay::kDecoupled:
      if constexpr (Op::kAllowsDecoupledDecay) {
        fn(std::integral_constant<WeightDecay, WeightDecay::kDecoupled>{});
        return true;
      }
      break;
  }
  return false;
}

}  // namespace fused_optim
