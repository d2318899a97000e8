// An element loop that the compiler vectorizes for the widest SIMD the CPU
// running it has, chosen at run time.
//
// Why not -march=native: a wheel or a cached build moved to an older CPU
// dies with SIGILL (DeepSpeed's CPU Adam has such reports). Why not
// at::vec::Vectorized: outside ATen's own per-ISA build it compiles to its
// generic fallback. Instead the same loop is compiled twice, for baseline
// x86-64 (SSE2) and for AVX2 + F16C, with GCC's per-function target
// attribute, and we branch once per range. The loop body is the shared
// scalar update rule (update_rules.h); GCC's auto-vectorizer turns it into
// SIMD (the build passes -O3 -fno-math-errno so that sqrt vectorizes).
//
// FMA is deliberately NOT enabled: contracting `a * b + c` changes rounding,
// and we keep fp32 results within a bit or two of torch.optim's.
#pragma once

#include <cstdint>

namespace fused_optim::cpu {

#if defined(__x86_64__) && defined(__GNUC__)

// Note [ivdep]: every operand of an update is indexed by the same i and the
// operands of one tensor are distinct tensors (or staged copies), so no
// iteration reads what another writes. Saying so spares GCC the run-time
// alias checks it otherwise needs between each pair of 4-6 pointers, beyond
// whose limit (10 checks) it gives up vectorizing.
//
// Note [local body]: the loop runs a local copy of the body. The caller's
// closure lives in memory the stores could alias (its captured scalars are
// floats too), which would force a reload of every captured value on each
// iteration; a local copy whose address never escapes is split into
// registers instead.
template <typename Body>
__attribute__((target("avx2,f16c"))) void loop_avx2(int64_t n,
                                                    const Body& body) {
  const Body local = body;  // Note [local body]
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) local(i);
}

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

#endif

template <typename Body>
void loop_baseline(int64_t n, const Body& body) {
  const Body local = body;  // Note [local body]
#pragma GCC ivdep  // Note [ivdep]
  for (int64_t i = 0; i < n; ++i) local(i);
}

// Calls body(i) for i in [0, n).
template <typename Body>
void vectorized_loop(int64_t n, const Body& body) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx2()) {
    loop_avx2(n, body);
    return;
  }
#endif
  loop_baseline(n, body);
}

}  // namespace fused_optim::cpu
