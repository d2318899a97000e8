// An element loop that the compiler vectorizes for the widest SIMD the CPU
// running it has, chosen at run time.
//
// Why not -march=native: a wheel or a cached build moved to an older CPU
// dies with SIGILL (DeepSpeed's CPU Adam has such reports). Why not
// at::vec::Vectorized: outside ATen's own per-ISA build it compiles to its
// generic fallback. Instead the same loop is compiled three times, for
// baseline x86-64 (SSE2), AVX2 + F16C and AVX-512, with GCC's per-function
// target attribute, and we branch once per range. The loop body is the
// shared scalar update rule (update_rules.h); GCC's auto-vectorizer turns it
// into SIMD (the build passes -O3 -fno-math-errno -fno-trapping-math so that
// sqrt and the selects vectorize). AVX-512 measured 2-5% faster than AVX2 for
// Adam on the 2-core EPYC (Zen 4) we benchmark on; the step is memory-bound,
// so wider vectors mostly mean fewer instructions in flight per byte.
//
// FMA contraction is off (-ffp-contract=off in setup.py): the update rules
// spell out each fused multiply-add torch's kernels compute (Note [fused
// multiply-add] in update_rules.h) and nothing else is fused, so results
// are the same on every ISA and thread count. The AVX2 and AVX-512 loops
// enable the FMA instructions; the baseline loop calls libm's fma (correct,
// slow: only for CPUs without AVX2).
#pragma once

#include <cstdint>

namespace fused_optim::cpu {

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
// Note [inlined body]: a loop vectorizes only if its body is inlined into
// it; a call left in the loop "clobbers memory" and GCC gives up. GCC's
// inliner weighs the body's size, and Adam's update with the
// stochastic-rounding hash exceeded it: that loop ran scalar (bf16 Adam
// with stochastic_rounding=True: ~6x its round-to-nearest step). The
// element bodies are therefore lambdas marked FO_LOOP_BODY, which forces
// the inlining. The test suite checks the built loops
// (scripts/check_cpu_vectorization.py): any loop_avx512 / loop_avx2 left
// scalar, or with a call in it, fails it.
#if defined(__GNUC__)
#define FO_LOOP_BODY __attribute__((always_inline))
#else
#define FO_LOOP_BODY
#endif

#define FO_ELEMENT_LOOP(n, body)                 \
  do {                                           \
    const auto local = (body); /* [local body] */ \
    _Pragma("GCC ivdep") /* Note [ivdep] */      \
    for (int64_t i = 0; i < (n); ++i) local(i);  \
  } while (0)

#if defined(__x86_64__) && defined(__GNUC__)

// The two instruction sets each loop is compiled for, besides the baseline
// (also used by the reductions, cpu/sum_squares.h).
#define FO_TARGET_AVX512                                            \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma," \
                        "prefer-vector-width=512")))
#define FO_TARGET_AVX2 __attribute__((target("avx2,f16c,fma")))

template <typename Body>
FO_TARGET_AVX512 void loop_avx512(int64_t n, const Body& body) {
  FO_ELEMENT_LOOP(n, body);
}

template <typename Body>
FO_TARGET_AVX2 void loop_avx2(int64_t n, const Body& body) {
  FO_ELEMENT_LOOP(n, body);
}

inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("f16c") &&
                          __builtin_cpu_supports("fma");
  return has;
}

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("f16c") &&
                          __builtin_cpu_supports("fma");
  return has;
}

#endif

template <typename Body>
void loop_baseline(int64_t n, const Body& body) {
  FO_ELEMENT_LOOP(n, body);
}

// Calls body(i) for i in [0, n).
template <typename Body>
void vectorized_loop(int64_t n, const Body& body) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx512()) return loop_avx512(n, body);
  if (cpu_has_avx2()) return loop_avx2(n, body);
#endif
  loop_baseline(n, body);
}

}  // namespace fused_optim::cpu
