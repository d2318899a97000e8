// Per-group hyperparameters of each op, and the derivation of a tensor's
// narrowed scalars (update_rules.h) from them, its group's lr and its step
// count: written once, for both backends. (op_front.h builds them from an
// op call's per-group lists, through each op's spec, op_specs.h.)
//
// The CPU kernels derive the scalars on the host. The CUDA kernels derive
// them ON THE DEVICE, per chunk: the step counters live on the GPU (so that
// AMP's skipped steps and CUDA graph replays advance them without a host
// sync), and so may the learning rate (the ops' `tensor_lr` overload: capturable
// steps). Same
// inputs, same functions, same bits (up to the device's double pow, see
// csrc/cuda/README.md).
//
// Plain C++17 (FO_HOST_DEVICE): no torch, no CUDA header.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "fused_optim/macros.h"
#include "fused_optim/update_rules.h"

namespace fused_optim {

// A group's learning rate: the host float `value`, or, when `tensor` is set,
// the one-element float32 (or float64) tensor it points to, read by the
// kernel where the tensor lives (on CUDA, capturable steps: a scheduler's
// `lr.fill_(...)` is seen on replay).
struct LrSource {
  double value = 0.0;
  const void* tensor = nullptr;
  bool tensor_is_double = false;

  FO_HOST_DEVICE FO_FORCE_INLINE double read() const {
    if (tensor == nullptr) return value;
    return tensor_is_double ? *static_cast<const double*>(tensor)
                            : static_cast<double>(*static_cast<const float*>(tensor));
  }
};

// A step counter: a one-element (usually 0-d) float32 or float64 tensor on
// the device.
struct StepCounter {
  void* data = nullptr;
  bool is_double = false;
};

FO_HOST_DEVICE FO_FORCE_INLINE double read_step(const void* data,
                                                bool is_double) {
  return is_double ? *static_cast<const double*>(data)
                   : static_cast<double>(*static_cast<const float*>(data));
}

// What every op's per-group hyperparameters share, set by the shared front
// (op_front.h) for every op: the group's lr, its `maximize`, and its
// `max_grad_norm` (clipping by the global gradient norm: the group's
// gradients are multiplied by min(1, max_grad_norm / (norm + 1e-6)), or
// not at all when it is infinite or the call has no norm).
struct GroupCommon {
  LrSource lr;
  double max_grad_norm = INFINITY;
  bool maximize = false;
};

// Each *Hyper derives from GroupCommon and adds `double weight_decay`
// (the front reads it to choose the group's weight-decay mode; an op
// without weight decay leaves it 0) and its own fields. Each *Hyper: what
// one param group passes (the op's float[] lists at the group's index),
// `kStepsOptional` (whether the op's step counters may be absent; the step
// kernel increments those given, and the main kernel reads them, for the
// scalars and for the stochastic-rounding key; an absent counter reads as
// 0), and scalars<T>(lr, step): the narrowed scalars of a tensor of the
// group, `step` being its counter after this step's increment.

struct AdamHyper : GroupCommon {
  static constexpr bool kStepsOptional = false;
  double beta1 = 0.0;
  double beta2 = 0.0;
  double eps = 0.0;
  double weight_decay = 0.0;

  template <typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE AdamScalars<T> scalars(double lr_value,
                                                        double step) const {
    return AdamScalars<T>(make_adam_scalars(lr_value, beta1, beta2, eps,
                                            weight_decay, maximize, step));
  }
};

// SGD's scalars depend on no step count but on whether the tensor's
// momentum buffer is new this step (`new_buffer`), so the host keys its
// slots by (group, new_buffer). torch's SGD keeps no step counter; ours
// exist only with stochastic rounding, whose bits must change from step to
// step (op_schema.cpp). Without them the rounding key uses step 0.
struct SgdHyper : GroupCommon {
  static constexpr bool kStepsOptional = true;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool new_buffer = false;

  template <typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE SgdScalars<T> scalars(double lr_value,
                                                       double /*step*/) const {
    return SgdScalars<T>(lr_value, momentum, dampening, weight_decay, maximize,
                         new_buffer);
  }
};

struct AdagradHyper : GroupCommon {
  static constexpr bool kStepsOptional = false;
  double lr_decay = 0.0;
  double eps = 0.0;
  double weight_decay = 0.0;

  template <typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE AdagradScalars<T> scalars(double lr_value,
                                                           double step) const {
    return AdagradScalars<T>(lr_value, lr_decay, eps, weight_decay, maximize,
                             step);
  }
};

// RMSprop's scalars do not depend on the step; torch keeps (and
// checkpoints) the counter, and stochastic rounding keys on it.
struct RmspropHyper : GroupCommon {
  static constexpr bool kStepsOptional = false;
  double alpha = 0.0;
  double eps = 0.0;
  double weight_decay = 0.0;
  double momentum = 0.0;

  template <typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE RmspropScalars<T> scalars(double lr_value,
                                                           double /*step*/) const {
    return RmspropScalars<T>(lr_value, alpha, eps, weight_decay, momentum,
                             maximize);
  }
};

struct RadamHyper : GroupCommon {
  static constexpr bool kStepsOptional = false;
  double beta1 = 0.0;
  double beta2 = 0.0;
  double eps = 0.0;
  double weight_decay = 0.0;

  template <typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE RadamScalars<T> scalars(double lr_value,
                                                         double step) const {
    return RadamScalars<T>(lr_value, beta1, beta2, eps, weight_decay, maximize,
                           step);
  }
};

// Lion's scalars do not depend on the step. lion-pytorch keeps no counter;
// ours exist only with stochastic rounding, as SGD's.
struct LionHyper : GroupCommon {
  static constexpr bool kStepsOptional = true;
  double beta1 = 0.0;
  double beta2 = 0.0;
  double weight_decay = 0.0;
  double max_lr = 0.0;  // Note [corrected weight decay]

  template <typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE LionScalars<T> scalars(double lr_value,
                                                        double /*step*/) const {
    return LionScalars<T>(lr_value, decay_lr(lr_value, max_lr), beta1, beta2,
                          weight_decay, maximize);
  }
};

// NAdam keeps per-tensor scalar state besides the step counter: torch's
// `mu_product` (the product of the momentum schedule mu_1 .. mu_t), a 0-d
// float32/float64 tensor per param (Note [per-tensor scalar state]).
struct NadamHyper : GroupCommon {
  static constexpr bool kStepsOptional = false;
  static constexpr bool kHasScalarState = true;
  double beta1 = 0.0;
  double beta2 = 0.0;
  double eps = 0.0;
  double weight_decay = 0.0;
  double momentum_decay = 0.0;

  // mu_product *= mu_t, in the tensor's own dtype U (float or double), as
  // torch's in-place multiply by a Python float: the float narrowed to U.
  template <typename U>
  FO_HOST_DEVICE FO_FORCE_INLINE U advance_scalar_state(double /*lr_value*/,
                                                        double step,
                                                        U mu_product) const {
    return mu_product * static_cast<U>(nadam_mu(beta1, momentum_decay, step));
  }

  template <typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE NadamScalars<T> scalars(
      double lr_value, double step, double mu_product) const {
    return NadamScalars<T>(lr_value, beta1, beta2, eps, weight_decay,
                           momentum_decay, maximize, step, mu_product);
  }
};

// Note [per-tensor scalar state]
// An op may keep, besides the step counter, one more per-param scalar that
// the update reads and changes (NAdam's mu_product): a list of 0-d float32
// or float64 tensors named by the spec's kScalarState, one per param,
// checked like state_steps and updated by the op. Its Hyper says
// kHasScalarState and defines
//   advance_scalar_state<U>(lr, step, old) -> new   (U: the tensor's dtype)
//   scalars<T>(lr, step, new)                       (instead of (lr, step))
// The new value is derived from the old one after the step counter's
// increment, and the element scalars from the new value. The CPU does both
// on the host, per tensor, after every check has passed. CUDA does it on
// the device, with no host sync: a scalar-state kernel, launched after the
// step kernel and before the main kernel, writes every new value (skipped
// on found_inf, like the step kernel), and the main kernel reads them per
// chunk; stream order means no chunk can read a value half-updated.
template <typename Hyper, typename = void>
struct HasScalarState {
  static constexpr bool value = false;
};
template <typename Hyper>
struct HasScalarState<Hyper, std::void_t<decltype(Hyper::kHasScalarState)>> {
  static constexpr bool value = Hyper::kHasScalarState;
};

// Note [per-tensor norms]
// An op whose scalars depend on the norms of each tensor's param and
// gradient (LARS's trust ratio; LAMB's would reuse it) says kHasTensorNorms
// in its Hyper and defines
//   scalars<T>(lr, step, TensorNorms)               (instead of (lr, step))
// The front (prepare, op_front.h) computes, for such an op, every tensor's
// sum of squares in ONE pass over the call (the sum_of_squares op with
// per_tensor=True, on the params' device, over the params, or the float32
// master weights when the call has them, followed by the grads): a
// `tensor_sums` tensor of shape [2n] (float32, float64 if any tensor is
// float64), entry t the param's and n + t the grad's, of the gradient as
// given (AMP-scaled, unclipped). Each backend reads tensor t's two entries
// when it derives tensor t's scalars: the CPU on the host, CUDA on the
// device per chunk (an address and each tensor's position in the call in the
// launch metadata; stream order, no host sync). The gradient's norm is then
// made the norm of the gradient the step uses: times the inverse AMP scale
// and times the clipping coefficient (the same factors the loops apply to
// each element), so the norms are of unscaled, clipped gradients.
//
// Note [norms of the update]
// An op whose ratio needs the norm of its own update direction (LAMB: known
// only once the moments are updated) says kNormsOfUpdate as well, and its
// element op defines direction<kDecay>(x, s): the first half of its update,
// in registers, returning the direction and leaving in x[0] the param whose
// norm is taken (after a decoupled decay). Such an op does not call
// sum_of_squares: each backend runs a MEASURING PASS over the call first
// (the element loops with direction() and nothing stored, the squares of
// x[0] and of the direction summed per tensor in float64, in a fixed
// order), then the update pass, whose scalars get TensorNorms{param,
// update}. The measuring pass applies the AMP unscale and the clipping in
// registers as the update does, so these norms need no factors. Its scalars
// are those of trust ratio 1 (the ratio is not known yet and the direction
// does not read it). Traffic: the operands are read twice, written once.
struct TensorNorms {
  double param = 0.0;
  double grad = 0.0;    // of the gradient the step uses (LARS)
  double update = 0.0;  // of the update direction (kNormsOfUpdate: LAMB)
};

template <typename Hyper, typename = void>
struct NormsOfUpdate {
  static constexpr bool value = false;
};
template <typename Hyper>
struct NormsOfUpdate<Hyper, std::void_t<decltype(Hyper::kNormsOfUpdate)>> {
  static constexpr bool value = Hyper::kNormsOfUpdate;
};

template <typename Hyper, typename = void>
struct HasTensorNorms {
  static constexpr bool value = false;
};
template <typename Hyper>
struct HasTensorNorms<Hyper, std::void_t<decltype(Hyper::kHasTensorNorms)>> {
  static constexpr bool value = Hyper::kHasTensorNorms;
};

// Tensor norms from the two sums of squares, the inverse AMP scale (1
// without AMP) and the clipping coefficient (1 without clipping).
FO_HOST_DEVICE FO_FORCE_INLINE TensorNorms tensor_norms(double param_sum,
                                                        double grad_sum,
                                                        double inverse_grad_scale,
                                                        double grad_clip) {
  TensorNorms out;
  out.param = std::sqrt(param_sum);
  out.grad = std::sqrt(grad_sum) * inverse_grad_scale * grad_clip;
  return out;
}

// Tensor norms from a measuring pass's sums of squares (Note [norms of the
// update]): of the param and of the update direction.
FO_HOST_DEVICE FO_FORCE_INLINE TensorNorms update_norms(double param_sum,
                                                        double update_sum) {
  TensorNorms out;
  out.param = std::sqrt(param_sum);
  out.update = std::sqrt(update_sum);
  return out;
}

// A tensor's norms from its two entries of a call's sums: of the update for
// an op with kNormsOfUpdate, else of the gradient, made that of the gradient
// the step uses by the factors the loops apply.
template <typename Hyper>
FO_HOST_DEVICE FO_FORCE_INLINE TensorNorms norms_from_sums(
    double param_sum, double second_sum, double inverse_grad_scale,
    double grad_clip) {
  if constexpr (NormsOfUpdate<Hyper>::value) {
    return update_norms(param_sum, second_sum);
  } else {
    return tensor_norms(param_sum, second_sum, inverse_grad_scale, grad_clip);
  }
}

// The scalars of a tensor whose (already advanced) scalar state, if its op
// has one, is `scalar_state`, and whose norms, if its op reads them, are
// `norms`.
template <typename T, typename Hyper>
FO_HOST_DEVICE FO_FORCE_INLINE auto scalars_for(const Hyper& h, double lr,
                                                double step,
                                                double scalar_state,
                                                const TensorNorms& norms = {}) {
  if constexpr (HasScalarState<Hyper>::value) {
    static_assert(!HasTensorNorms<Hyper>::value,
                  "scalar state with tensor norms: no such op yet");
    return h.template scalars<T>(lr, step, scalar_state);
  } else if constexpr (HasTensorNorms<Hyper>::value) {
    return h.template scalars<T>(lr, step, norms);
  } else {
    return h.template scalars<T>(lr, step);
  }
}

// LARS: SGD's fields, the trust-ratio options, and the tensor norms.
struct LarsHyper : GroupCommon {
  static constexpr bool kStepsOptional = true;
  static constexpr bool kHasTensorNorms = true;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  double trust_coeff = 0.0;
  double eps = 0.0;
  bool trust_clip = false;
  bool always_adapt = false;
  bool new_buffer = false;

  template <typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE LarsScalars<T> scalars(
      double lr_value, double /*step*/, const TensorNorms& norms) const {
    const bool adapt = weight_decay != 0.0 || always_adapt;
    return LarsScalars<T>(lr_value, momentum, dampening, weight_decay, maximize,
                          new_buffer,
                          lars_trust_ratio(lr_value, weight_decay, trust_coeff,
                                           eps, trust_clip, adapt, norms.param,
                                           norms.grad));
  }
};

// LAMB: Adam's moments with timm's options, and the norms of the param and
// of the update (Note [norms of the update]). The bools travel as the float
// lists' 0 or 1.
struct LambHyper : GroupCommon {
  static constexpr bool kStepsOptional = false;
  static constexpr bool kHasTensorNorms = true;
  static constexpr bool kNormsOfUpdate = true;
  double beta1 = 0.0;
  double beta2 = 0.0;
  double eps = 0.0;
  double weight_decay = 0.0;
  bool bias_correction = true;
  bool grad_averaging = true;
  bool trust_clip = false;
  bool always_adapt = false;
  double max_lr = 0.0;  // Note [corrected weight decay]

  template <typename T>
  FO_HOST_DEVICE FO_FORCE_INLINE LambScalars<T> scalars(
      double lr_value, double step, const TensorNorms& norms) const {
    const bool adapt = weight_decay != 0.0 || always_adapt;
    return LambScalars<T>(lr_value, decay_lr(lr_value, max_lr), beta1, beta2,
                          eps, weight_decay,
                          bias_correction, grad_averaging, maximize, step,
                          lamb_trust_ratio(trust_clip, adapt, norms.param,
                                           norms.update));
  }
};

// Ops whose scalars keep many registers live on CUDA (a dozen or more,
// derived on the device): their kernels get 80 registers per thread instead
// of 64 (kMinBlocksPerSm, multi_tensor_apply.cuh).
template <typename Hyper>
struct ManyScalars {
  static constexpr bool value = false;
};
template <>
struct ManyScalars<AdamHyper> {
  static constexpr bool value = true;
};
template <>
struct ManyScalars<RadamHyper> {
  static constexpr bool value = true;
};
template <>
struct ManyScalars<NadamHyper> {
  static constexpr bool value = true;
};
template <>
struct ManyScalars<LambHyper> {
  static constexpr bool value = true;
};

}  // namespace fused_optim
