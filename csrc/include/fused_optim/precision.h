// How values move between storage and the compute type, beyond plain
// round-to-nearest: the AMP unscale factor and stochastic rounding to bf16.
// Shared by the CPU loops and the CUDA kernels, so both produce the same bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "fused_optim/macros.h"

namespace fused_optim {

// The factor that unscales an AMP-scaled gradient: torch.amp.GradScaler
// multiplies by `scale.double().reciprocal().float()` (its unscale_), so we
// do exactly that. For the usual power-of-two scales it is exact.
FO_HOST_DEVICE FO_FORCE_INLINE float inverse_grad_scale(float scale) {
  return static_cast<float>(1.0 / static_cast<double>(scale));
}

// ---------------------------------------------------------------------------
// Stochastic rounding
//
// Rounding fp32 -> bf16 to nearest drops every update smaller than half a
// bf16 ulp of the param (2^-9 relative), so a bf16 model with a small
// learning rate stops learning. Rounding up with probability equal to the
// dropped fraction makes the rounding unbiased, E[round(x)] = x, so small
// updates accumulate in expectation (Gupta et al., "Deep Learning with
// Limited Numerical Precision", ICML 2015; Zamirai et al., "Revisiting
// BFloat16 Training", 2020).
//
// The random bits are a pure function of (step, tensor, element): a
// counter-based hash, no generator state. So a step gives the same bits run
// after run, on the CPU and on CUDA, whatever the threading or chunking, and
// a CUDA graph replay (whose step counter lives on the device) draws new
// bits each replay.
// ---------------------------------------------------------------------------

// A 32-bit integer hash with full avalanche: "lowbias32" by Chris Wellons
// (https://nullprogram.com/blog/2018/07/31/). 32-bit multiplies only, so the
// CPU loops vectorize it (vpmulld).
FO_HOST_DEVICE FO_FORCE_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Which random stream a tensor draws from, given its 64-bit rounding id
// (the ops' `rounding_ids`): the optimizer classes give (param group << 32)
// | position in the group's params, so a param draws the same bits however
// the step splits its params into calls (eager, compiled, some gradients
// missing); a call without ids uses (group_index << 32) | position in the
// call.
FO_HOST_DEVICE FO_FORCE_INLINE uint32_t stochastic_rounding_stream(
    uint64_t rounding_id) {
  const uint32_t position = static_cast<uint32_t>(rounding_id);
  const uint32_t group = static_cast<uint32_t>(rounding_id >> 32);
  return position ^ mix32(group + 0x3c6ef372U);
}

// The key of one tensor's rounding at one step. `tensor` is the tensor's
// stream (stochastic_rounding_stream); `step` the step count after this
// step's increment (an integer held in a float, as torch.optim's counters
// are).
FO_HOST_DEVICE FO_FORCE_INLINE uint32_t stochastic_rounding_key(uint32_t tensor,
                                                                double step) {
  const uint64_t s = static_cast<uint64_t>(step);
  return mix32(mix32(static_cast<uint32_t>(s) ^ 0x243f6a88U) +
               static_cast<uint32_t>(s >> 32) * 0x85ebca6bU +
               tensor * 0x9e3779b9U);
}

// 32 random bits for element `element` (0-based, in memory order) of the
// tensor whose key is `key`, the element index given as its low and high
// 32 bits: a loop whose elements share the high half (the CPU loops split
// ranges at multiples of 2^32) then runs on 32-bit lanes only, which
// vectorizes.
FO_HOST_DEVICE FO_FORCE_INLINE uint32_t stochastic_rounding_bits(
    uint32_t key, uint32_t element_low, uint32_t element_high) {
  return mix32(key ^ mix32(element_low + element_high * 0xc2b2ae35U));
}

FO_HOST_DEVICE FO_FORCE_INLINE uint32_t stochastic_rounding_bits(
    uint32_t key, int64_t element) {
  const uint64_t e = static_cast<uint64_t>(element);
  return stochastic_rounding_bits(key, static_cast<uint32_t>(e),
                                  static_cast<uint32_t>(e >> 32));
}

// The bits of `x` rounded to bf16 stochastically: x's float bits plus 16
// random bits, truncated. Of the two bf16 neighbours of x, the upper one
// (in magnitude) is chosen with probability (x - lower) / (upper - lower).
// Exact values stay exact; infinities stay infinite; a finite value beyond
// the largest bf16 can round to infinity (as round-to-nearest would past the
// midpoint). NaN becomes the quiet NaN (adding to its bits could carry into
// the sign).
FO_HOST_DEVICE FO_FORCE_INLINE uint16_t bf16_bits_round_stochastic(
    float x, uint32_t random) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  const uint32_t rounded = (bits + (random & 0xFFFFU)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x0040U;
  // A select on a float comparison (x != x: NaN), as the round-to-nearest
  // conversion of the CPU loops (csrc/cpu/convert.h) does: it vectorizes.
  return static_cast<uint16_t>(x != x ? quiet_nan : rounded);
}

}  // namespace fused_optim
