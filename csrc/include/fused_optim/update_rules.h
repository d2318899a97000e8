// The update rules of every optimizer, written once.
//
// Each rule updates ONE element held in registers, in the compute type `T`
// (float for fp16/bf16/fp32 params, double for fp64). The CPU loops
// (csrc/cpu) and the CUDA kernels (csrc/cuda) load an element, call the rule,
// and store the result; neither has a copy of the math.
//
// Operation order follows torch.optim's single-tensor implementation op by op
// (e.g. `v = fma((1 - beta2) * g, g, v * beta2)` is mul_ then addcmul_), with
// a fused multiply-add exactly where torch's CPU kernels compute one (Note
// [fused multiply-add]), so that fp32 and fp64 results agree with
// torch.optim's to the bit in most elements. Where a torch op rounds an
// intermediate to the parameter dtype (bf16/fp16), we do not: the whole rule
// runs in fp32 and rounds once, on the store.
//
// Note [fused multiply-add]
// ATen's CPU kernels compute `add(other, alpha)` as fma(other, alpha, self),
// `lerp` as fma(coefficient, end - start, anchor) and `addcmul(t1, t2,
// value)` as fma(value * t1, t2, self) (vec::fmadd, in vector bodies and
// tails alike); `addcdiv` and plain `+`/`*` round each operation. We spell
// those fmas out (fmadd below: std::fma, one rounding, on every ISA and on
// CUDA), and the compiler contracts nothing else (-ffp-contract=off), so
// results do not depend on the ISA, the vector width or the thread count.
// (Measured against torch 2.13 on AVX-512 and AVX2 CPUs; tests/
// test_properties.py's parity fuzz holds us to it.)
//
// The per-tensor scalars (`*Scalars`) are derived in double from the param
// group's hyperparameters and the tensor's step count, exactly as torch.optim
// derives them in Python (`1 - beta1 ** step` etc.), then narrowed to `T`:
// see make_*_scalars below. The CPU derives them on the host; the CUDA
// kernels, whose step counters live on the device (so that AMP's skipped
// steps and CUDA graphs need no host sync), derive them on the device with
// the same functions.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fused_optim/macros.h"

namespace fused_optim {

// How a mode changes weight decay: none (the term is skipped, so an inf
// param cannot turn 0 * inf into NaN), L2 (added to the gradient, "coupled"),
// or decoupled (the param shrinks before the update, AdamW).
enum class WeightDecay { kNone, kL2, kDecoupled };

// A group's weight-decay mode: none when the decay is 0 (so an inf param
// cannot make 0 * inf = NaN), else decoupled or L2 as the op says.
FO_HOST_DEVICE inline WeightDecay weight_decay_mode(double weight_decay,
                                                   bool decoupled) {
  if (weight_decay == 0.0) return WeightDecay::kNone;
  return decoupled ? WeightDecay::kDecoupled : WeightDecay::kL2;
}

// Note [corrected weight decay]
// A decoupled decay shrinks the param by lr * weight_decay. timm's
// `corrected_weight_decay` (Lion, LAMB) scales it by lr^2 / max_lr instead,
// max_lr being the peak lr (the constructor's, timm's group
// `max_lr_snapshot`), so that the decay follows the lr schedule squared and
// equals the plain decay at the peak. The op takes max_lr per group: 0 for
// the plain decay. Derived from this step's lr (a tensor lr included) where
// the other scalars are, so a schedule costs no host work.
FO_HOST_DEVICE inline double decay_lr(double lr, double max_lr) {
  return max_lr > 0.0 ? lr * lr / max_lr : lr;
}

// Chooses a or b by a mask of all ones (a) or all zeros (b), on the bits:
// a select that GCC vectorizes in loops mixing 16- and 32-bit types, where a
// `cond ? a : b` on a loop-invariant bool stops its vectorizer.
template <typename T>
struct BitsOf;
template <>
struct BitsOf<float> {
  using type = uint32_t;
};
template <>
struct BitsOf<double> {
  using type = uint64_t;
};

template <typename T>
FO_HOST_DEVICE FO_FORCE_INLINE T select_by_mask(typename BitsOf<T>::type mask,
                                                T a, T b) {
  typename BitsOf<T>::type ua, ub;
  memcpy(&ua, &a, sizeof(T));
  memcpy(&ub, &b, sizeof(T));
  const typename BitsOf<T>::type bits = (ua & mask) | (ub & ~mask);
  T out;
  memcpy(&out, &bits, sizeof(T));
  return out;
}

// torch.lerp's formula (ATen/native/Lerp.h): for small weights it anchors at
// `start`, for large ones at `end`, which keeps lerp exact at both ends. We
// choose the anchor once per tensor, on the host; the arithmetic is
// bit-identical to
//   w < 0.5 ? start + w * (end - start) : end - (end - start) * (1 - w).
template <typename T>
struct LerpWeight {
  typename BitsOf<T>::type from_start;  // all ones if w < 0.5, else zero
  T coefficient;                        // w, or -(1 - w)

  LerpWeight() = default;
  FO_HOST_DEVICE explicit LerpWeight(double w)
      : from_start(w < 0.5 ? ~typename BitsOf<T>::type(0)
                           : typename BitsOf<T>::type(0)),
        coefficient(T(w < 0.5 ? w : -(1.0 - T(w)))) {}
};

// a * b + c with one rounding: Note [fused multiply-add].
template <typename T>
FO_HOST_DEVICE FO_FORCE_INLINE T fmadd(T a, T b, T c) {
  return std::fma(a, b, c);
}

template <typename T>
FO_HOST_DEVICE FO_FORCE_INLINE T lerp(T start, T end, const LerpWeight<T>& w) {
  return fmadd(w.coefficient, end - start,
               select_by_mask(w.from_start, start, end));
}

template <typename T>
FO_HOST_DEVICE FO_FORCE_INLINE T max_of(T a, T b) {
  // NaN-propagating like torch.maximum: if either is NaN the result is NaN.
  // `|`, not `||`: no short-circuit branch, so loops over it vectorize.
  return ((a != a) | (a > b)) ? a : b;
}

// Clipping by the global gradient norm: the factor each gradient of a
// clipped group is multiplied by, in registers, before the update rule sees
// it. torch.nn.utils.clip_grad_norm_'s formula and operation order in the
// norm's dtype T: `max_norm / (norm + 1e-6)` (a Python float over a tensor
// is `reciprocal() * max_norm`), clamped to at most 1 (NaN stays NaN, as
// torch.clamp). An infinite max_grad_norm means "not clipped": factor 1,
// even for an infinite norm.
template <typename T>
FO_HOST_DEVICE FO_FORCE_INLINE T clip_coefficient(T norm, double max_norm) {
  if (max_norm == INFINITY) return T(1);
  const T coefficient = (T(1) / (norm + T(1e-6))) * T(max_norm);
  return coefficient > T(1) ? T(1) : coefficient;
}

// Every rule below takes the gradient sign as a multiplier (`grad_sign`, -1
// for maximize=True): multiplying by +-1 is exact and keeps the loop
// branch-free.

// ---------------------------------------------------------------------------
// Adam / AdamW
// ---------------------------------------------------------------------------

// Host-side, double-precision per-tensor scalars for one Adam step, derived
// as torch.optim derives them in Python.
struct AdamStepScalars {
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  double step_size;              // lr / (1 - beta1^t)
  double bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  double decay_factor;           // 1 - lr * weight_decay (decoupled decay)
  bool maximize;
};

// `step` is the step count AFTER this step's increment (t >= 1).
FO_HOST_DEVICE inline AdamStepScalars make_adam_scalars(double lr, double beta1, double beta2,
                                         double eps, double weight_decay,
                                         bool maximize, double step) {
  AdamStepScalars s;
  s.beta1 = beta1;
  s.beta2 = beta2;
  s.eps = eps;
  s.weight_decay = weight_decay;
  s.step_size = lr / (1.0 - std::pow(beta1, step));
  s.bias_correction2_sqrt = std::sqrt(1.0 - std::pow(beta2, step));
  s.decay_factor = 1.0 - lr * weight_decay;
  s.maximize = maximize;
  return s;
}

// The same scalars narrowed to the compute type, as torch narrows a Python
// float scalar when it multiplies a tensor of that type.
template <typename T>
struct AdamScalars {
  T grad_sign;
  LerpWeight<T> exp_avg_weight;  // 1 - beta1
  T beta2;
  T one_minus_beta2;
  T eps;
  T weight_decay;
  T neg_step_size;
  T bias_correction2_sqrt;
  T decay_factor;

  AdamScalars() = default;
  FO_HOST_DEVICE explicit AdamScalars(const AdamStepScalars& s)
      : grad_sign(s.maximize ? T(-1) : T(1)),
        exp_avg_weight(1.0 - s.beta1),
        beta2(T(s.beta2)),
        one_minus_beta2(T(1.0 - s.beta2)),
        eps(T(s.eps)),
        weight_decay(T(s.weight_decay)),
        neg_step_size(T(-s.step_size)),
        bias_correction2_sqrt(T(s.bias_correction2_sqrt)),
        decay_factor(T(s.decay_factor)) {}
};

// One Adam / AdamW element update. `max_exp_avg_sq` is used only when
// kAmsgrad.
template <bool kAmsgrad, WeightDecay kDecay, typename T>
FO_HOST_DEVICE FO_FORCE_INLINE void adam_update(T& param, T grad, T& exp_avg,
                                                T& exp_avg_sq,
                                                T& max_exp_avg_sq,
                                                const AdamScalars<T>& s) {
  grad = grad * s.grad_sign;
  if (kDecay == WeightDecay::kDecoupled) param = param * s.decay_factor;
  if (kDecay == WeightDecay::kL2) grad = fmadd(param, s.weight_decay, grad);
  exp_avg = lerp(exp_avg, grad, s.exp_avg_weight);
  exp_avg_sq = fmadd(s.one_minus_beta2 * grad, grad, exp_avg_sq * s.beta2);
  T second_moment = exp_avg_sq;
  if (kAmsgrad) {
    max_exp_avg_sq = max_of(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  const T denom = std::sqrt(second_moment) / s.bias_correction2_sqrt + s.eps;
  param = param + s.neg_step_size * exp_avg / denom;
}

// ---------------------------------------------------------------------------
// SGD (with optional momentum, dampening, Nesterov)
// ---------------------------------------------------------------------------

template <typename T>
struct SgdScalars {
  T grad_sign;
  T neg_lr;
  T weight_decay;
  T momentum;  // for Nesterov's look-ahead
  // buf = buf * buffer_decay + grad_weight * grad. On the step that creates
  // the buffer (zero-filled) these are 0 and 1, so buf = grad exactly, as
  // torch's `buf = grad.clone()`; afterwards momentum and 1 - dampening.
  T buffer_decay;
  T grad_weight;

  SgdScalars() = default;
  FO_HOST_DEVICE SgdScalars(double lr, double momentum_, double dampening,
             double weight_decay_, bool maximize, bool new_buffer)
      : grad_sign(maximize ? T(-1) : T(1)),
        neg_lr(T(-lr)),
        weight_decay(T(weight_decay_)),
        momentum(T(momentum_)),
        buffer_decay(new_buffer ? T(0) : T(momentum_)),
        grad_weight(new_buffer ? T(1) : T(1.0 - dampening)) {}
};

// kMomentum: a momentum buffer exists (momentum != 0); kNesterov implies it.
template <bool kMomentum, bool kNesterov, WeightDecay kDecay, typename T>
FO_HOST_DEVICE FO_FORCE_INLINE void sgd_update(T& param, T grad,
                                               T& momentum_buffer,
                                               const SgdScalars<T>& s) {
  static_assert(kDecay != WeightDecay::kDecoupled, "SGD decay is L2");
  grad = grad * s.grad_sign;
  if (kDecay == WeightDecay::kL2) grad = fmadd(param, s.weight_decay, grad);
  if (kMomentum) {
    momentum_buffer =
        fmadd(grad, s.grad_weight, momentum_buffer * s.buffer_decay);
    grad = kNesterov ? fmadd(momentum_buffer, s.momentum, grad)
                     : momentum_buffer;
  }
  param = fmadd(grad, s.neg_lr, param);
}

// ---------------------------------------------------------------------------
// LARS (You, Gitman, Ginsburg 2017), as timm's `Lars` (timm/optim/lars.py)
// ---------------------------------------------------------------------------

// The layer-wise trust ratio of one tensor, in double, from the norms of its
// param and of its gradient (the gradient the step uses: unscaled, clipped;
// Note [per-tensor norms] in hyperparams.h). As timm's Lars: applied only
// when `adapt` (weight_decay != 0 or always_adapt); 1 where either norm is
// not positive; with trust_clip, min(ratio / lr, 1) (after that choice, as
// timm clamps its `where`).
FO_HOST_DEVICE FO_FORCE_INLINE double lars_trust_ratio(
    double lr, double weight_decay, double trust_coeff, double eps,
    bool trust_clip, bool adapt, double param_norm, double grad_norm) {
  if (!adapt) return 1.0;
  double ratio =
      trust_coeff * param_norm / (grad_norm + param_norm * weight_decay + eps);
  if (!(param_norm > 0.0) || !(grad_norm > 0.0)) ratio = 1.0;
  if (trust_clip) {
    const double clipped = ratio / lr;
    ratio = clipped < 1.0 ? clipped : 1.0;  // torch.clamp(max=1): NaN stays
    if (clipped != clipped) ratio = clipped;
  }
  return ratio;
}

template <typename T>
struct LarsScalars {
  SgdScalars<T> sgd;  // the SGD step that follows (its weight decay: LARS's)
  T trust_ratio;

  LarsScalars() = default;
  FO_HOST_DEVICE LarsScalars(double lr, double momentum, double dampening,
                             double weight_decay, bool maximize,
                             bool new_buffer, double trust_ratio_)
      : sgd(lr, momentum, dampening, weight_decay, maximize, new_buffer),
        trust_ratio(T(trust_ratio_)) {}
};

// timm's Lars: grad = (grad + weight_decay * param) * trust_ratio (decay only
// where the ratio is applied: the front picks kL2 exactly for a non-zero
// weight_decay, and then the ratio is applied), then torch's SGD momentum,
// dampening and Nesterov without further decay.
template <bool kMomentum, bool kNesterov, WeightDecay kDecay, typename T>
FO_HOST_DEVICE FO_FORCE_INLINE void lars_update(T& param, T grad,
                                                T& momentum_buffer,
                                                const LarsScalars<T>& s) {
  static_assert(kDecay != WeightDecay::kDecoupled, "LARS decay is L2");
  grad = grad * s.sgd.grad_sign;
  if (kDecay == WeightDecay::kL2) grad = fmadd(param, s.sgd.weight_decay, grad);
  grad = grad * s.trust_ratio;
  if (kMomentum) {
    momentum_buffer =
        fmadd(grad, s.sgd.grad_weight, momentum_buffer * s.sgd.buffer_decay);
    grad = kNesterov ? fmadd(momentum_buffer, s.sgd.momentum, grad)
                     : momentum_buffer;
  }
  param = fmadd(grad, s.sgd.neg_lr, param);
}

// ---------------------------------------------------------------------------
// LAMB (You et al. 2020), as timm's `Lamb` (timm/optim/lamb.py)
// ---------------------------------------------------------------------------

// The layer-wise trust ratio of one tensor, in double, from the norms of its
// param (after a decoupled decay) and of its update direction (Note [norms
// of the update] in hyperparams.h). As timm's Lamb: applied only when
// `adapt` (weight_decay != 0 or always_adapt); 1 where either norm is not
// positive; with trust_clip (LAMBC), at most 1 (NaN stays, as torch.clamp).
FO_HOST_DEVICE FO_FORCE_INLINE double lamb_trust_ratio(bool trust_clip,
                                                       bool adapt,
                                                       double param_norm,
                                                       double update_norm) {
  if (!adapt) return 1.0;
  double ratio = param_norm / update_norm;
  if (!(param_norm > 0.0) || !(update_norm > 0.0)) ratio = 1.0;
  if (trust_clip && ratio > 1.0) ratio = 1.0;
  return ratio;
}

template <typename T>
struct LambScalars {
  T grad_sign;
  T beta1;
  // timm's moment: exp_avg.lerp_(grad, 1 - beta1) with grad_averaging
  // (averaging all ones), else exp_avg.mul_(beta1).add_(grad).
  typename BitsOf<T>::type averaging;
  LerpWeight<T> exp_avg_weight;  // 1 - beta1
  T beta2;
  T one_minus_beta2;
  T bias_correction1;       // 1 - beta1^t, or 1 without bias correction
  T bias_correction2_sqrt;  // sqrt(1 - beta2^t), or 1
  T eps;
  T weight_decay;
  T neg_lr_decay;  // -decay_lr * weight_decay (decoupled decay)
  T neg_lr;
  T trust_ratio;   // 1 when not adapted (and in the measuring pass)

  LambScalars() = default;
  // `step` is the step count after this step's increment (t >= 1);
  // `decay_lr` the lr the decoupled decay is scaled by (decay_lr()).
  FO_HOST_DEVICE LambScalars(double lr, double decay_lr, double beta1_, double beta2_,
                             double eps_, double weight_decay_,
                             bool bias_correction, bool grad_averaging,
                             bool maximize, double step, double trust_ratio_)
      : grad_sign(maximize ? T(-1) : T(1)),
        beta1(T(beta1_)),
        averaging(grad_averaging ? ~typename BitsOf<T>::type(0)
                                 : typename BitsOf<T>::type(0)),
        exp_avg_weight(1.0 - beta1_),
        beta2(T(beta2_)),
        one_minus_beta2(T(1.0 - beta2_)),
        bias_correction1(T(bias_correction ? 1.0 - std::pow(beta1_, step) : 1.0)),
        bias_correction2_sqrt(
            T(std::sqrt(bias_correction ? 1.0 - std::pow(beta2_, step) : 1.0))),
        eps(T(eps_)),
        weight_decay(T(weight_decay_)),
        neg_lr_decay(T(-decay_lr * weight_decay_)),
        neg_lr(T(-lr)),
        trust_ratio(T(trust_ratio_)) {}
};

// The first half of a LAMB step, shared by the measuring pass and the
// update: the moments, the decoupled decay of the param (kDecoupled: timm's
// decoupled_decay, before the norm is taken) and the update direction
//   u = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)  [+ weight_decay * param]
// in timm's operation order. The trust ratio is not applied.
template <WeightDecay kDecay, typename T>
FO_HOST_DEVICE FO_FORCE_INLINE T lamb_direction(T& param, T grad, T& exp_avg,
                                                T& exp_avg_sq,
                                                const LambScalars<T>& s) {
  grad = grad * s.grad_sign;
  // (both computed, one kept: a select, not a branch, keeps the CPU loop
  // vectorized)
  exp_avg = select_by_mask(s.averaging, lerp(exp_avg, grad, s.exp_avg_weight),
                           exp_avg * s.beta1 + grad);
  exp_avg_sq = fmadd(s.one_minus_beta2 * grad, grad, exp_avg_sq * s.beta2);
  const T denom = std::sqrt(exp_avg_sq) / s.bias_correction2_sqrt + s.eps;
  T update = exp_avg / s.bias_correction1 / denom;
  if (kDecay == WeightDecay::kDecoupled) param = fmadd(param, s.neg_lr_decay, param);
  if (kDecay == WeightDecay::kL2) update = fmadd(param, s.weight_decay, update);
  return update;
}

// One LAMB element: the direction, scaled by the tensor's trust ratio, then
// param += -lr * update.
template <WeightDecay kDecay, typename T>
FO_HOST_DEVICE FO_FORCE_INLINE void lamb_update(T& param, T grad, T& exp_avg,
                                                T& exp_avg_sq,
                                                const LambScalars<T>& s) {
  const T update =
      lamb_direction<kDecay>(param, grad, exp_avg, exp_avg_sq, s) * s.trust_ratio;
  param = fmadd(update, s.neg_lr, param);
}

// ---------------------------------------------------------------------------
// Adagrad
// ---------------------------------------------------------------------------

template <typename T>
struct AdagradScalars {
  T grad_sign;
  T neg_clr;  // -lr / (1 + (t - 1) * lr_decay)
  T eps;
  T weight_decay;

  AdagradScalars() = default;
  // `step` is the step count after this step's increment (t >= 1).
  FO_HOST_DEVICE AdagradScalars(double lr, double lr_decay, double eps_, double weight_decay_,
                 bool maximize, double step)
      : grad_sign(maximize ? T(-1) : T(1)),
        neg_clr(T(-(lr / (1.0 + (step - 1.0) * lr_decay)))),
        eps(T(eps_)),
        weight_decay(T(weight_decay_)) {}
};

template <WeightDecay kDecay, typename T>
FO_HOST_DEVICE FO_FORCE_INLINE void adagrad_update(T& param, T grad, T& sum,
                                                   const AdagradScalars<T>& s) {
  static_assert(kDecay != WeightDecay::kDecoupled, "Adagrad decay is L2");
  grad = grad * s.grad_sign;
  if (kDecay == WeightDecay::kL2) grad = fmadd(param, s.weight_decay, grad);
  sum = fmadd(grad, grad, sum);
  const T std_dev = std::sqrt(sum) + s.eps;
  param = param + s.neg_clr * grad / std_dev;
}

// ---------------------------------------------------------------------------
// RMSprop (with optional centering and momentum)
// ---------------------------------------------------------------------------

template <typename T>
struct RmspropScalars {
  T grad_sign;
  T neg_lr;
  T alpha;
  T one_minus_alpha;
  LerpWeight<T> grad_avg_weight;  // 1 - alpha
  T eps;
  T weight_decay;
  T momentum;

  RmspropScalars() = default;
  FO_HOST_DEVICE RmspropScalars(double lr, double alpha_, double eps_, double weight_decay_,
                 double momentum_, bool maximize)
      : grad_sign(maximize ? T(-1) : T(1)),
        neg_lr(T(-lr)),
        alpha(T(alpha_)),
        one_minus_alpha(T(1.0 - alpha_)),
        grad_avg_weight(1.0 - alpha_),
        eps(T(eps_)),
        weight_decay(T(weight_decay_)),
        momentum(T(momentum_)) {}
};

// kCentered: grad_avg is kept and its square subtracted from square_avg.
// kMomentum: momentum_buffer is kept (momentum > 0).
template <bool kCentered, bool kMomentum, WeightDecay kDecay, typename T>
FO_HOST_DEVICE FO_FORCE_INLINE void rmsprop_update(T& param, T grad,
                                                   T& square_avg, T& grad_avg,
                                                   T& momentum_buffer,
                                                   const RmspropScalars<T>& s) {
  static_assert(kDecay != WeightDecay::kDecoupled, "RMSprop decay is L2");
  grad = grad * s.grad_sign;
  if (kDecay == WeightDecay::kL2) grad = fmadd(param, s.weight_decay, grad);
  square_avg = fmadd(s.one_minus_alpha * grad, grad, square_avg * s.alpha);
  T avg;
  if (kCentered) {
    grad_avg = lerp(grad_avg, grad, s.grad_avg_weight);
    avg = std::sqrt(fmadd(T(-1) * grad_avg, grad_avg, square_avg));
  } else {
    avg = std::sqrt(square_avg);
  }
  avg = avg + s.eps;
  if (kMomentum) {
    momentum_buffer = momentum_buffer * s.momentum + grad / avg;
    param = fmadd(momentum_buffer, s.neg_lr, param);
  } else {
    param = param + s.neg_lr * grad / avg;
  }
}

// ---------------------------------------------------------------------------
// RAdam (rectified Adam; decoupled weight decay optional)
// ---------------------------------------------------------------------------

// The per-tensor scalars of one RAdam step, derived in double as
// torch.optim's _single_tensor_radam derives them in Python. Whether the
// variance is rectified (rho_t > 5) depends only on the step and beta2: a
// per-tensor decision, carried as a select mask, not a per-element branch.
template <typename T>
struct RadamScalars {
  T grad_sign;
  LerpWeight<T> exp_avg_weight;  // 1 - beta1
  T beta2;
  T one_minus_beta2;
  T eps;
  T weight_decay;
  T decay_factor;                // 1 - lr * weight_decay (decoupled decay)
  T bias_correction1;            // 1 - beta1^t
  T lr;
  T bias_correction2_sqrt;       // (1 - beta2^t) ** 0.5
  T rect;                        // the rectification term (rho_t > 5 only)
  typename BitsOf<T>::type rectified;  // all ones if rho_t > 5, else zero

  RadamScalars() = default;
  // `step` is the step count after this step's increment (t >= 1).
  FO_HOST_DEVICE RadamScalars(double lr_, double beta1, double beta2_,
                              double eps_, double weight_decay_, bool maximize,
                              double step)
      : grad_sign(maximize ? T(-1) : T(1)),
        exp_avg_weight(1.0 - beta1),
        beta2(T(beta2_)),
        one_minus_beta2(T(1.0 - beta2_)),
        eps(T(eps_)),
        weight_decay(T(weight_decay_)),
        decay_factor(T(1.0 - lr_ * weight_decay_)),
        bias_correction1(T(1.0 - std::pow(beta1, step))),
        lr(T(lr_)) {
    const double bias_correction2 = 1.0 - std::pow(beta2_, step);
    bias_correction2_sqrt = T(std::pow(bias_correction2, 0.5));
    const double rho_inf = 2.0 / (1.0 - beta2_) - 1.0;
    const double rho_t =
        rho_inf - 2.0 * step * std::pow(beta2_, step) / bias_correction2;
    const bool on = rho_t > 5.0;
    rectified = on ? ~typename BitsOf<T>::type(0) : typename BitsOf<T>::type(0);
    rect = on ? T(std::pow((rho_t - 4.0) * (rho_t - 2.0) * rho_inf /
                               ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t),
                           0.5))
              : T(0);
  }
};

// One RAdam element update, torch's single-tensor code op by op:
//   exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(...)
//   u = exp_avg / bc1 * lr                           (rho_t <= 5)
//   u = exp_avg / bc1 * lr * (bc2 ** 0.5 / (sqrt(v) + eps)) * rect
//   param.add_(u, alpha=-1)
// `scalar / tensor` is torch's reciprocal(tensor) * scalar (Tensor.__rdiv__).
// Both candidates are computed and one is selected by the per-tensor mask,
// so the loop has no branch on a run-time value.
template <WeightDecay kDecay, typename T>
FO_HOST_DEVICE FO_FORCE_INLINE void radam_update(T& param, T grad, T& exp_avg,
                                                 T& exp_avg_sq,
                                                 const RadamScalars<T>& s) {
  grad = grad * s.grad_sign;
  if (kDecay == WeightDecay::kDecoupled) param = param * s.decay_factor;
  if (kDecay == WeightDecay::kL2) grad = fmadd(param, s.weight_decay, grad);
  exp_avg = lerp(exp_avg, grad, s.exp_avg_weight);
  exp_avg_sq = fmadd(s.one_minus_beta2 * grad, grad, exp_avg_sq * s.beta2);
  const T scaled = exp_avg / s.bias_correction1 * s.lr;
  const T adaptive =
      T(1) / (std::sqrt(exp_avg_sq) + s.eps) * s.bias_correction2_sqrt;
  const T rectified = scaled * adaptive * s.rect;
  param = param - select_by_mask(s.rectified, rectified, scaled);
}

// ---------------------------------------------------------------------------
// Lion (Chen et al., 2023; decoupled weight decay)
// ---------------------------------------------------------------------------

template <typename T>
struct LionScalars {
  T grad_sign;
  T beta1;
  T one_minus_beta1;
  T beta2;
  T one_minus_beta2;
  T neg_lr;
  T decay_factor;  // 1 - decay_lr * weight_decay

  LionScalars() = default;
  // `decay_lr`: the lr the decay is scaled by (decay_lr()).
  FO_HOST_DEVICE LionScalars(double lr, double decay_lr, double beta1_, double beta2_,
                             double weight_decay, bool maximize)
      : grad_sign(maximize ? T(-1) : T(1)),
        beta1(T(beta1_)),
        one_minus_beta1(T(1.0 - beta1_)),
        beta2(T(beta2_)),
        one_minus_beta2(T(1.0 - beta2_)),
        neg_lr(T(-lr)),
        decay_factor(T(1.0 - decay_lr * weight_decay)) {}
};

// sign(x) as torch.sign: -1, 0 or 1 (0 for a zero and for NaN), by selects.
template <typename T>
FO_HOST_DEVICE FO_FORCE_INLINE T sign_of(T x) {
  return T(x > T(0) ? 1 : 0) - T(x < T(0) ? 1 : 0);
}

// One Lion element update, in lion-pytorch's op order (0.2.5 update_fn):
//   p.mul_(1 - lr * wd)
//   c = exp_avg * beta1 (then .add(grad, alpha=1 - beta1): an fma)
//   p.add_(sign(c), alpha=-lr)
//   exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
// Weight decay is decoupled (the paper's); there is no L2 mode.
template <WeightDecay kDecay, typename T>
FO_HOST_DEVICE FO_FORCE_INLINE void lion_update(T& param, T grad, T& exp_avg,
                                                const LionScalars<T>& s) {
  static_assert(kDecay != WeightDecay::kL2, "Lion decay is decoupled");
  grad = grad * s.grad_sign;
  if (kDecay == WeightDecay::kDecoupled) param = param * s.decay_factor;
  const T c = fmadd(grad, s.one_minus_beta1, exp_avg * s.beta1);
  param = fmadd(sign_of(c), s.neg_lr, param);
  exp_avg = fmadd(grad, s.one_minus_beta2, exp_avg * s.beta2);
}

// ---------------------------------------------------------------------------
// NAdam (Nesterov-accelerated Adam, Dozat 2016; decoupled decay optional)
// ---------------------------------------------------------------------------

// The momentum schedule mu_t = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay)),
// in double, as torch.optim.NAdam computes it in Python.
FO_HOST_DEVICE inline double nadam_mu(double beta1, double momentum_decay,
                                      double step) {
  return beta1 * (1.0 - 0.5 * std::pow(0.96, step * momentum_decay));
}

// The per-tensor scalars of one NAdam step. `mu_product` is the tensor's
// product of mu_1 .. mu_t AFTER this step's update (its per-tensor scalar
// state, read as a double from its float32/float64 tensor), as torch's
// `_get_value(mu_product)` reads it after `mu_product *= mu`.
template <typename T>
struct NadamScalars {
  T grad_sign;
  LerpWeight<T> exp_avg_weight;  // 1 - beta1
  T beta2;
  T one_minus_beta2;
  T eps;
  T weight_decay;
  T decay_factor;       // 1 - lr * weight_decay (decoupled decay)
  T bias_correction2;   // 1 - beta2^t
  T grad_coefficient;   // -lr * (1 - mu_t) / (1 - mu_product)
  T exp_avg_coefficient;  // -lr * mu_{t+1} / (1 - mu_product * mu_{t+1})

  NadamScalars() = default;
  FO_HOST_DEVICE NadamScalars(double lr, double beta1, double beta2_,
                              double eps_, double weight_decay_,
                              double momentum_decay, bool maximize,
                              double step, double mu_product)
      : grad_sign(maximize ? T(-1) : T(1)),
        exp_avg_weight(1.0 - beta1),
        beta2(T(beta2_)),
        one_minus_beta2(T(1.0 - beta2_)),
        eps(T(eps_)),
        weight_decay(T(weight_decay_)),
        decay_factor(T(1.0 - lr * weight_decay_)),
        bias_correction2(T(1.0 - std::pow(beta2_, step))) {
    const double mu = nadam_mu(beta1, momentum_decay, step);
    const double mu_next = nadam_mu(beta1, momentum_decay, step + 1.0);
    const double mu_product_next = mu_product * mu_next;
    grad_coefficient = T(-lr * (1.0 - mu) / (1.0 - mu_product));
    exp_avg_coefficient = T((-lr * mu_next) / (1.0 - mu_product_next));
  }
};

// One NAdam element update, torch's single-tensor code op by op:
//   denom = exp_avg_sq.div(bias_correction2).sqrt() + eps
//   param.addcdiv_(grad, denom, value=c1); param.addcdiv_(exp_avg, denom, value=c2)
// (addcdiv: param + value * t1 / t2, each operation rounded).
template <WeightDecay kDecay, typename T>
FO_HOST_DEVICE FO_FORCE_INLINE void nadam_update(T& param, T grad, T& exp_avg,
                                                 T& exp_avg_sq,
                                                 const NadamScalars<T>& s) {
  grad = grad * s.grad_sign;
  if (kDecay == WeightDecay::kDecoupled) param = param * s.decay_factor;
  if (kDecay == WeightDecay::kL2) grad = fmadd(param, s.weight_decay, grad);
  exp_avg = lerp(exp_avg, grad, s.exp_avg_weight);
  exp_avg_sq = fmadd(s.one_minus_beta2 * grad, grad, exp_avg_sq * s.beta2);
  const T denom = std::sqrt(exp_avg_sq / s.bias_correction2) + s.eps;
  param = param + s.grad_coefficient * grad / denom;
  param = param + s.exp_avg_coefficient * exp_avg / denom;
}

}  // namespace fused_optim
