// The sum of the squares of a block of elements, for the reductions of the
// CPU backend (the sum_of_squares op, Note [norms of the update]'s measuring
// pass): each element converted to its compute type and multiplied by
// `scale` there (as the update kernels unscale), then squared and summed in
// double, in kSumLanes independent lanes added at the end (32: four
// AVX-512 registers of doubles, so that four additions are in flight). The lanes let the
// compiler vectorize the loop without reassociating anything, so the result
// has the same bits on every instruction set; the loop is compiled for
// AVX-512, AVX2 and the baseline like the element loops (vectorized_loop.h),
// because the conversions and double arithmetic are what bound it.
#pragma once

#include <cstdint>

#include "cpu/convert.h"
#include "cpu/vectorized_loop.h"

namespace fused_optim::cpu {

constexpr int kSumLanes = 32;

#define FO_SUM_SQUARES_BODY(x, n, scale)                               \
  using T = decltype(to_compute(x[0]));                                \
  const T s = static_cast<T>(scale);                                   \
  double lane[kSumLanes] = {};                                         \
  int64_t i = 0;                                                       \
  for (; i + kSumLanes <= (n); i += kSumLanes) {                       \
    for (int l = 0; l < kSumLanes; ++l) {                              \
      const double v = static_cast<double>(to_compute(x[i + l]) * s);  \
      lane[l] += v * v;                                                \
    }                                                                  \
  }                                                                    \
  for (int l = 0; i < (n); ++i, ++l) {                                 \
    const double v = static_cast<double>(to_compute(x[i]) * s);        \
    lane[l] += v * v;                                                  \
  }                                                                    \
  double sum = 0.0;                                                    \
  for (int l = 0; l < kSumLanes; ++l) sum += lane[l];                  \
  return sum;

#if defined(__x86_64__) && defined(__GNUC__)
template <typename scalar_t>
FO_TARGET_AVX512 double sum_squares_avx512(const scalar_t* x, int64_t n,
                                           float scale) {
  FO_SUM_SQUARES_BODY(x, n, scale)
}

template <typename scalar_t>
FO_TARGET_AVX2 double sum_squares_avx2(const scalar_t* x, int64_t n,
                                       float scale) {
  FO_SUM_SQUARES_BODY(x, n, scale)
}
#endif

template <typename scalar_t>
double sum_squares_baseline(const scalar_t* x, int64_t n, float scale) {
  FO_SUM_SQUARES_BODY(x, n, scale)
}

// The sum over [0, n) of (x[i] * scale)^2 (see above).
template <typename scalar_t>
double sum_squares(const scalar_t* x, int64_t n, float scale = 1.0f) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx512()) return sum_squares_avx512(x, n, scale);
  if (cpu_has_avx2()) return sum_squares_avx2(x, n, scale);
#endif
  return sum_squares_baseline(x, n, scale);
}

#undef FO_SUM_SQUARES_BODY

}  // namespace fused_optim::cpu
