// Conversions between a tensor's storage type and the compute type, written
// branch-free so that the element loops still vectorize for fp16 and bf16
// (c10::Half's own conversion has branches that stop GCC's vectorizer).
// Results are bit-identical to c10's: round-to-nearest-even, NaN stays NaN
// (as the canonical quiet NaN, with its sign), overflow becomes infinity,
// subnormals are exact. tests/test_conversions.py checks every fp16 and bf16
// value and rounding against torch.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace fused_optim::cpu {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float to_compute(float x) { return x; }
inline double to_compute(double x) { return x; }

inline float to_compute(c10::BFloat16 x) {
  return bits_to_float(static_cast<uint32_t>(x.x) << 16);
}

inline float to_compute(c10::Half x) {
  const uint32_t h = x.x;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t magnitude = h & 0x7FFFu;
  // Place exponent and mantissa in a float's bit positions, then rescale by
  // 2^(127 - 15): exact for normals and subnormals alike.
  const float scaled = bits_to_float(magnitude << 13) * 0x1p112f;
  // Infinity and NaN (all-ones exponent) keep their mantissa, get exponent 255.
  const uint32_t inf_nan = magnitude >= 0x7C00u ? 0x7F800000u : 0u;
  return bits_to_float(float_to_bits(scaled) | inf_nan | sign);
}

template <typename T>
T from_compute(float x);
template <typename T>
T from_compute(double x);

template <>
inline float from_compute<float>(float x) { return x; }
template <>
inline double from_compute<double>(double x) { return x; }

template <>
inline c10::BFloat16 from_compute<c10::BFloat16>(float x) {
  const uint32_t u = float_to_bits(x);
  // Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit.
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = x != x ? uint16_t(0x7FC0) : uint16_t(rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

template <>
inline c10::Half from_compute<c10::Half>(float x) {
  const uint32_t u_signed = float_to_bits(x);
  const uint32_t sign = u_signed & 0x80000000u;
  const uint32_t u = u_signed ^ sign;
  constexpr uint32_t kInfinity = 255u << 23;
  constexpr uint32_t kHalfOverflow = (127u + 16u) << 23;  // >= 65536.0f
  constexpr uint32_t kHalfNormalMin = 113u << 23;          // 2^-14
  // Subnormal result: adding 0.5 (as a float with exponent 126 - 13) makes
  // the FPU round the 10 kept mantissa bits, to nearest even.
  constexpr uint32_t kSubnormalMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t subnormal =
      float_to_bits(bits_to_float(u) + bits_to_float(kSubnormalMagic)) -
      kSubnormalMagic;
  // Normal result: rebias the exponent and round to nearest even.
  const uint32_t odd = (u >> 13) & 1u;
  const uint32_t normal = (u + ((15u - 127u) << 23) + 0xFFFu + odd) >> 13;
  const uint32_t special = u > kInfinity ? 0x7E00u : 0x7C00u;  // NaN : inf
  const uint32_t magnitude = u >= kHalfOverflow    ? special
                             : u < kHalfNormalMin ? subnormal
                                                  : normal;
  return c10::Half(static_cast<uint16_t>(magnitude | (sign >> 16)),
                   c10::Half::from_bits());
}

}  // namespace fused_optim::cpu
