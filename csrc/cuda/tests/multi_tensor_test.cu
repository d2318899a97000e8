// Host-side tests of the CUDA multi-tensor machinery; no GPU needed.
//
// Built and run by scripts/check_cuda_kernels.sh with nvcc as HOST code:
//   1. the launch planner (multi_tensor_plan.h): every non-empty tensor in
//      exactly one launch, in order; capacities respected; slots map to the
//      right scalars and decay modes; alignment flags; every element of every
//      tensor covered by exactly one chunk (also for a 3e9-element tensor);
//   2. the kernels' block body, run_block (multi_tensor_apply.cuh), emulated
//      by looping over blocks and threads, through the same dispatch as
//      production (ops.cuh: dtype x mode flags -> Op), for every op, mode and
//      dtype, on aligned and misaligned tensors of sizes that hit the vector
//      body and the tails, with several param groups (hyperparameters and
//      weight-decay modes) in one call. Results must equal, bit for bit, a
//      plain element loop that calls the update rules of update_rules.h
//      directly (same compute type, same rounding); guard elements around
//      every tensor must be untouched, and grads must not be written;
//   3. 64-bit offsets: chunks past element 2^31 of a (virtual) 3e9-element
//      tensor land on the right addresses.
// What this cannot test: the GPU itself (launches, the parameter space,
// __grid_constant__, the current stream); see csrc/cuda/README.md.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "cuda/multi_tensor_apply.cuh"
#include "cuda/multi_tensor_plan.h"
#include "cuda/ops.cuh"
#include "fused_optim/update_rules.h"

using namespace fused_optim;
using namespace fused_optim::cuda;

namespace {

int g_failures = 0;
int g_checks = 0;

#define EXPECT(cond, ...)                                          \
  do {                                                             \
    ++g_checks;                                                    \
    if (!(cond)) {                                                 \
      if (++g_failures <= 20) {                                    \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                                  \
        std::printf("\n");                                         \
      }                                                            \
    }                                                              \
  } while (0)

// Runs the kernel's block body for every block and thread of every launch,
// with the grid capped at max_blocks (a small cap exercises the grid-stride
// loop over chunks).
struct HostEmulator {
  int64_t max_blocks = kMaxBlocksPerLaunch;
  int64_t* launches = nullptr;

  template <typename Op, typename scalar_t, typename Scalars>
  cudaError_t run(const MultiTensorArgs<Scalars>& args) const {
    constexpr int kN = Op::kNumOperands;
    check_multi_tensor_args(args, kN, Op::kAllowsDecoupledDecay);
    plan_launches<kN>(args, [&](const TensorListMeta<kN, Scalars>& meta) {
      if (launches != nullptr) ++*launches;
      const int64_t blocks = std::min(launch_blocks(meta), max_blocks);
      for (int64_t b = 0; b < blocks; ++b) {
        for (int32_t t = 0; t < kBlockSize; ++t) {
          run_block<Op, scalar_t>(meta, b, blocks, t, kBlockSize);
        }
      }
    });
    return cudaSuccess;
  }
};

// ---------------------------------------------------------------------------
// 1. The planner
// ---------------------------------------------------------------------------

void test_plan() {
  using Scalars = AdagradScalars<float>;
  constexpr int kN = 3;
  using Meta = TensorListMeta<kN, Scalars>;

  std::vector<int64_t> numels = {0,          1,          7,
                                 8,          9,          4099,
                                 kChunkSize - 1, kChunkSize, kChunkSize + 1,
                                 0,          3000000000LL, 5};
  // Enough small tensors to overflow the tensor list twice.
  for (int i = 0; i < 2 * Meta::kMaxTensors; ++i) numels.push_back(1 + i % 37);
  constexpr int kSets = 40;  // more than the slot table holds

  MultiTensorArgs<Scalars> args;
  args.dtype = ScalarType::kFloat;
  // The first 2 * kMaxTensors + 12 tensors share set 0 (the tensor list
  // overflows); then sets change every 3 tensors and cycle (the slot table
  // overflows, and slots are re-used in later launches).
  const int64_t shared = 2 * Meta::kMaxTensors + 12;
  auto set_of = [shared](int64_t i) {
    return i < shared ? int64_t{0} : ((i - shared) / 3) % kSets;
  };
  for (int i = 0; i < 3 * kSets; ++i) numels.push_back(1 + i % 5);
  const int64_t n = static_cast<int64_t>(numels.size());
  args.numels = numels;
  args.operands.assign(kN, std::vector<void*>(n));
  for (int64_t i = 0; i < n; ++i) {
    for (int k = 0; k < kN; ++k) {
      // Fake addresses, never dereferenced. Tensors i % 4 == 3 have a
      // misaligned third operand.
      uintptr_t a = 0x10000000u + static_cast<uintptr_t>(i) * 0x1000u +
                    static_cast<uintptr_t>(k) * 0x100u;
      if (k == 2 && i % 4 == 3) a += 2;
      args.operands[k][i] = reinterpret_cast<void*>(a);
    }
  }
  assign_scalar_sets(args, n, set_of,
                     [&](int64_t i) {
                       const int64_t set = set_of(i);
                       Scalars s{};
                       s.neg_clr = -static_cast<float>(set);
                       return std::make_pair(
                           s, set % 2 ? WeightDecay::kL2 : WeightDecay::kNone);
                     });
  EXPECT(args.scalars.size() == kSets, "%zu sets", args.scalars.size());
  check_multi_tensor_args(args, kN, false);

  std::vector<int64_t> seen;  // tensors in launch order
  int64_t launches = 0;
  plan_launches<kN>(args, [&](const Meta& meta) {
    ++launches;
    EXPECT(meta.num_tensors >= 1 && meta.num_tensors <= Meta::kMaxTensors,
           "num_tensors %d", meta.num_tensors);
    int max_slot = -1;
    int64_t chunks = 0;
    for (int32_t t = 0; t < meta.num_tensors; ++t) {
      const int64_t i = [&] {
        // The tensor of the call this entry is: the next non-empty one.
        int64_t next = seen.empty() ? 0 : seen.back() + 1;
        while (next < n && numels[next] == 0) ++next;
        return next;
      }();
      seen.push_back(i);
      if (i >= n) break;
      EXPECT(meta.numel[t] == numels[i], "numel of tensor %lld",
             static_cast<long long>(i));
      bool aligned = true;
      for (int k = 0; k < kN; ++k) {
        EXPECT(meta.data[k][t] == args.operands[k][i], "data[%d] of %lld", k,
               static_cast<long long>(i));
        aligned = aligned &&
                  reinterpret_cast<uintptr_t>(args.operands[k][i]) % 16 == 0;
      }
      EXPECT(meta.aligned[t] == (aligned ? 1 : 0), "aligned of %lld",
             static_cast<long long>(i));
      const int set = args.scalar_set[i];
      EXPECT(meta.slot[t] < Meta::kMaxSlots, "slot %d", meta.slot[t]);
      max_slot = std::max<int>(max_slot, meta.slot[t]);
      EXPECT(meta.scalars[meta.slot[t]].neg_clr == -static_cast<float>(set),
             "scalars of tensor %lld", static_cast<long long>(i));
      EXPECT(meta.decay[meta.slot[t]] ==
                 static_cast<uint8_t>(args.decay[set]),
             "decay of tensor %lld", static_cast<long long>(i));
      EXPECT(meta.first_chunk[t] == chunks, "first_chunk of %lld",
             static_cast<long long>(i));
      chunks += (numels[i] + kChunkSize - 1) / kChunkSize;
    }
    EXPECT(meta.num_chunks == chunks, "num_chunks");
    EXPECT(max_slot < Meta::kMaxSlots, "slots");

    // Every element of every tensor in exactly one chunk, in order.
    int32_t tensor = 0;
    int64_t next_begin = 0;
    for (int64_t c = 0; c < meta.num_chunks; ++c) {
      const ChunkRange r = locate_chunk(meta, c);
      if (r.tensor != tensor) {
        EXPECT(next_begin == meta.numel[tensor], "tensor %d ends early",
               tensor);
        EXPECT(r.tensor == tensor + 1, "tensor skipped at chunk %lld",
               static_cast<long long>(c));
        tensor = r.tensor;
        next_begin = 0;
      }
      EXPECT(r.begin == next_begin, "chunk %lld begins at %lld",
             static_cast<long long>(c), static_cast<long long>(r.begin));
      EXPECT(r.end > r.begin && r.end - r.begin <= kChunkSize &&
                 r.end <= meta.numel[r.tensor],
             "chunk %lld range", static_cast<long long>(c));
      next_begin = r.end;
    }
    EXPECT(tensor == meta.num_tensors - 1 &&
               next_begin == meta.numel[meta.num_tensors - 1],
           "last tensor covered");
  });
  int64_t non_empty = 0;
  for (int64_t v : numels) non_empty += v > 0;
  EXPECT(static_cast<int64_t>(seen.size()) == non_empty &&
             (seen.empty() || seen.back() < n),
         "%zu tensors planned, %lld non-empty", seen.size(),
         static_cast<long long>(non_empty));
  // Two full tensor lists, then 40 sets of 3 tensors in slot tables of 16.
  EXPECT(launches >= 5, "expected several launches, got %lld",
         static_cast<long long>(launches));
  std::printf("  %lld tensors in %lld launches\n", static_cast<long long>(n),
              static_cast<long long>(launches));

  // Capacities of every metadata the kernels use fit the parameter space
  // (also a static_assert in plan_launches), and hold a useful number.
  std::printf("  metadata capacity (tensors/slots per launch, bytes):\n");
  auto show = [](const char* name, int tensors, int slots, size_t bytes) {
    std::printf("    %-30s %3d / %2d  %zu\n", name, tensors, slots, bytes);
    EXPECT(bytes <= kMaxKernelParamBytes && tensors >= 32, "%s", name);
  };
#define SHOW(N, S)                                                      \
  show(#S " x" #N, TensorListMeta<N, S>::kMaxTensors,                   \
       TensorListMeta<N, S>::kMaxSlots, sizeof(TensorListMeta<N, S>))
  SHOW(4, AdamScalars<float>);
  SHOW(5, AdamScalars<float>);
  SHOW(5, AdamScalars<double>);
  SHOW(2, SgdScalars<float>);
  SHOW(3, SgdScalars<double>);
  SHOW(3, AdagradScalars<float>);
  SHOW(5, RmspropScalars<float>);
  SHOW(5, RmspropScalars<double>);
#undef SHOW
}

void test_empty_and_errors() {
  // No tensors, or only empty ones: no launch.
  MultiTensorArgs<AdagradScalars<float>> args;
  args.operands.assign(3, {});
  int64_t launches = 0;
  HostEmulator emu;
  emu.launches = &launches;
  dispatch_adagrad(args, emu);
  args.numels = {0, 0};
  args.operands.assign(3, std::vector<void*>(2, nullptr));
  args.scalar_set = {0, 0};
  args.scalars.resize(1);
  args.decay = {WeightDecay::kNone};
  dispatch_adagrad(args, emu);
  EXPECT(launches == 0, "%lld launches for empty tensors",
         static_cast<long long>(launches));

  auto throws = [](const std::function<void()>& fn) {
    try {
      fn();
    } catch (const std::invalid_argument&) {
      return true;
    }
    return false;
  };
  // Wrong operand count, decoupled decay on a coupled-only op, dtype that
  // does not match the compute type, Nesterov without momentum.
  MultiTensorArgs<SgdScalars<float>> sgd;
  sgd.operands.assign(3, {});
  EXPECT(throws([&] { dispatch_sgd(sgd, false, false, emu); }),
         "operand count");
  sgd.operands.assign(2, {});
  sgd.decay = {WeightDecay::kDecoupled};
  sgd.scalars.resize(1);
  EXPECT(throws([&] { dispatch_sgd(sgd, false, false, emu); }),
         "decoupled decay");
  EXPECT(throws([&] { dispatch_sgd(sgd, false, true, emu); }), "nesterov");
  MultiTensorArgs<SgdScalars<double>> sgd_d;
  sgd_d.operands.assign(2, {});
  sgd_d.dtype = ScalarType::kFloat;
  EXPECT(throws([&] { dispatch_sgd(sgd_d, false, false, emu); }), "dtype");
}

// ---------------------------------------------------------------------------
// 2. The emulated kernels against a plain element loop
// ---------------------------------------------------------------------------

template <typename scalar_t>
const char* dtype_name() {
  if constexpr (std::is_same_v<scalar_t, float>) return "fp32";
  if constexpr (std::is_same_v<scalar_t, double>) return "fp64";
  if constexpr (std::is_same_v<scalar_t, __half>) return "fp16";
  return "bf16";
}
template <typename scalar_t>
ScalarType dtype_of() {
  if constexpr (std::is_same_v<scalar_t, float>) return ScalarType::kFloat;
  if constexpr (std::is_same_v<scalar_t, double>) return ScalarType::kDouble;
  if constexpr (std::is_same_v<scalar_t, __half>) return ScalarType::kHalf;
  return ScalarType::kBFloat16;
}

// Calls fn.template operator()<kDecay>() for a run-time mode.
template <typename Fn>
void with_decay(WeightDecay d, const Fn& fn) {
  switch (d) {
    case WeightDecay::kNone:
      fn(std::integral_constant<WeightDecay, WeightDecay::kNone>{});
      break;
    case WeightDecay::kL2:
      fn(std::integral_constant<WeightDecay, WeightDecay::kL2>{});
      break;
    case WeightDecay::kDecoupled:
      fn(std::integral_constant<WeightDecay, WeightDecay::kDecoupled>{});
      break;
  }
}

// The operands of one tensor, each in its own buffer with kGuard guard
// elements on both sides; `shift` elements past a 16-byte boundary.
constexpr int64_t kGuard = 16;

template <typename scalar_t>
struct Operand {
  std::vector<unsigned char> storage;
  int64_t numel = 0;
  int shift = 0;

  Operand(int64_t n, int shift_, std::mt19937& rng, bool non_negative)
      : numel(n), shift(shift_) {
    storage.resize((n + 2 * kGuard + 8) * sizeof(scalar_t) + 32);
    std::uniform_real_distribution<float> dist(non_negative ? 0.01f : -2.0f,
                                               2.0f);
    scalar_t* all = base() - kGuard;
    for (int64_t e = 0; e < n + 2 * kGuard; ++e) {
      all[e] = from_compute<scalar_t>(
          static_cast<compute_t<scalar_t>>(dist(rng)));
    }
  }
  scalar_t* base() {
    uintptr_t a = reinterpret_cast<uintptr_t>(storage.data()) +
                  kGuard * sizeof(scalar_t);
    a = (a + 15) / 16 * 16 + shift * sizeof(scalar_t);
    return reinterpret_cast<scalar_t*>(a);
  }
};

// One test case: tensors of `sizes`, operands as the op's operand order,
// scalars per tensor from `groups`, run through dispatch with the emulator
// and through `reference` on a copy; compare all bytes.
template <typename scalar_t, typename Scalars, typename Dispatch,
          typename Reference>
void run_case(const std::string& name, int num_operands,
              const std::vector<bool>& non_negative,
              const std::vector<std::pair<Scalars, WeightDecay>>& groups,
              const Dispatch& dispatch, const Reference& reference,
              int64_t max_blocks) {
  using T = compute_t<scalar_t>;
  const std::vector<int64_t> sizes = {1,    7,    8,    9,  33, 4099,
                                      kChunkSize + 3,  0, 2 * kChunkSize + 17,
                                      16,   kChunkSize};
  std::mt19937 rng(1234);
  const int64_t n = static_cast<int64_t>(sizes.size());
  // Misalignment patterns, by tensor: all aligned; param shifted; only the
  // grad shifted; everything shifted alike.
  auto shift_of = [&](int64_t i, int k) {
    switch (i % 4) {
      case 1: return k == 0 ? 1 : 0;
      case 2: return k == 1 ? 3 : 0;
      case 3: return 1;
      default: return 0;
    }
  };
  std::vector<std::vector<Operand<scalar_t>>> ops(num_operands);
  for (int k = 0; k < num_operands; ++k) {
    for (int64_t i = 0; i < n; ++i) {
      ops[k].emplace_back(sizes[i], shift_of(i, k), rng, non_negative[k]);
    }
  }
  auto expected = ops;  // deep copy (vectors of bytes)

  MultiTensorArgs<Scalars> args;
  args.dtype = dtype_of<scalar_t>();
  args.numels = sizes;
  args.operands.assign(num_operands, std::vector<void*>(n));
  for (int k = 0; k < num_operands; ++k) {
    for (int64_t i = 0; i < n; ++i) {
      args.operands[k][i] = sizes[i] ? ops[k][i].base() : nullptr;
    }
  }
  // Tensor i belongs to group i % groups (so groups interleave).
  const int64_t num_groups = static_cast<int64_t>(groups.size());
  assign_scalar_sets(args, n, [&](int64_t i) { return i % num_groups; },
                     [&](int64_t i) { return groups[i % num_groups]; });

  HostEmulator emu;
  emu.max_blocks = max_blocks;
  dispatch(args, emu);

  for (int64_t i = 0; i < n; ++i) {
    const Scalars& s = groups[i % num_groups].first;
    const WeightDecay decay = groups[i % num_groups].second;
    std::vector<scalar_t*> p(num_operands);
    for (int k = 0; k < num_operands; ++k) p[k] = expected[k][i].base();
    for (int64_t e = 0; e < sizes[i]; ++e) {
      T x[8];
      for (int k = 0; k < num_operands; ++k) x[k] = to_compute(p[k][e]);
      with_decay(decay, [&](auto d) { reference(d, x, s); });
      for (int k = 0; k < num_operands; ++k) {
        if (k != 1) p[k][e] = from_compute<scalar_t>(x[k]);
      }
    }
  }
  int64_t mismatches = 0;
  for (int k = 0; k < num_operands; ++k) {
    for (int64_t i = 0; i < n; ++i) {
      const auto& got = ops[k][i].storage;
      const auto& want = expected[k][i].storage;
      if (got != want) {
        ++mismatches;
        if (mismatches <= 3) {
          size_t b = 0;
          while (got[b] == want[b]) ++b;
          std::printf("    %s: operand %d of tensor %lld (numel %lld) "
                      "differs at byte %zu\n",
                      name.c_str(), k, static_cast<long long>(i),
                      static_cast<long long>(sizes[i]), b);
        }
      }
    }
  }
  EXPECT(mismatches == 0, "%s (grid cap %lld): %lld operand buffers differ",
         name.c_str(), static_cast<long long>(max_blocks),
         static_cast<long long>(mismatches));
}

template <typename scalar_t>
void test_ops() {
  using T = compute_t<scalar_t>;
  const std::string dt = dtype_name<scalar_t>();
  for (int64_t max_blocks : {kMaxBlocksPerLaunch, int64_t{3}}) {
    for (bool maximize : {false, true}) {
      const std::string suffix =
          dt + (maximize ? " maximize" : "");
      // Adam / AdamW: groups with every decay mode, different steps.
      for (bool amsgrad : {false, true}) {
        std::vector<std::pair<AdamScalars<T>, WeightDecay>> groups = {
            {AdamScalars<T>(make_adam_scalars(1e-3, 0.9, 0.999, 1e-8, 0.0,
                                              maximize, 1)),
             WeightDecay::kNone},
            {AdamScalars<T>(make_adam_scalars(3e-2, 0.8, 0.99, 1e-6, 0.1,
                                              maximize, 7)),
             WeightDecay::kDecoupled},
            {AdamScalars<T>(make_adam_scalars(5e-3, 0.95, 0.9, 1e-3, 0.05,
                                              maximize, 3)),
             WeightDecay::kL2},
        };
        const int num = amsgrad ? 5 : 4;
        run_case<scalar_t>(
            "adam" + std::string(amsgrad ? " amsgrad " : " ") + suffix, num,
            {false, false, false, true, true}, groups,
            [&](const auto& args, const HostEmulator& emu) {
              dispatch_adam(args, amsgrad, emu);
            },
            [&](auto d, T* x, const AdamScalars<T>& s) {
              constexpr WeightDecay kD = decltype(d)::value;
              T unused = 0;
              if (amsgrad) {
                adam_update<true, kD>(x[0], x[1], x[2], x[3], x[4], s);
              } else {
                adam_update<false, kD>(x[0], x[1], x[2], x[3], unused, s);
              }
            },
            max_blocks);
      }
      // SGD: no momentum, momentum (one group on its first step), Nesterov.
      for (int mode = 0; mode < 3; ++mode) {
        const bool momentum = mode > 0;
        const bool nesterov = mode == 2;
        std::vector<std::pair<SgdScalars<T>, WeightDecay>> groups = {
            {SgdScalars<T>(0.1, 0.9, 0.0, 0.0, maximize, false),
             WeightDecay::kNone},
            {SgdScalars<T>(0.01, 0.5, 0.1, 1e-2, maximize, true),
             WeightDecay::kL2},
            {SgdScalars<T>(0.03, 0.7, 0.0, 1e-3, maximize, false),
             WeightDecay::kL2},
        };
        if (nesterov) {
          // Nesterov needs dampening 0.
          groups[1].first = SgdScalars<T>(0.01, 0.5, 0.0, 1e-2, maximize, true);
        }
        run_case<scalar_t>(
            "sgd mode " + std::to_string(mode) + " " + suffix,
            momentum ? 3 : 2, {false, false, false}, groups,
            [&](const auto& args, const HostEmulator& emu) {
              dispatch_sgd(args, momentum, nesterov, emu);
            },
            [&](auto d, T* x, const SgdScalars<T>& s) {
              constexpr WeightDecay kD = decltype(d)::value;
              if constexpr (kD != WeightDecay::kDecoupled) {
                T unused = 0;
                if (nesterov) {
                  sgd_update<true, true, kD>(x[0], x[1], x[2], s);
                } else if (momentum) {
                  sgd_update<true, false, kD>(x[0], x[1], x[2], s);
                } else {
                  sgd_update<false, false, kD>(x[0], x[1], unused, s);
                }
              }
            },
            max_blocks);
      }
      // Adagrad.
      {
        std::vector<std::pair<AdagradScalars<T>, WeightDecay>> groups = {
            {AdagradScalars<T>(1e-2, 0.0, 1e-10, 0.0, maximize, 1),
             WeightDecay::kNone},
            {AdagradScalars<T>(5e-2, 1e-3, 1e-8, 1e-2, maximize, 9),
             WeightDecay::kL2},
        };
        run_case<scalar_t>(
            "adagrad " + suffix, 3, {false, false, true}, groups,
            [&](const auto& args, const HostEmulator& emu) {
              dispatch_adagrad(args, emu);
            },
            [&](auto d, T* x, const AdagradScalars<T>& s) {
              constexpr WeightDecay kD = decltype(d)::value;
              if constexpr (kD != WeightDecay::kDecoupled) {
                adagrad_update<kD>(x[0], x[1], x[2], s);
              }
            },
            max_blocks);
      }
      // RMSprop: centered x momentum.
      for (bool centered : {false, true}) {
        for (bool momentum : {false, true}) {
          std::vector<std::pair<RmspropScalars<T>, WeightDecay>> groups = {
              {RmspropScalars<T>(1e-2, 0.99, 1e-8, 0.0, 0.9, maximize),
               WeightDecay::kNone},
              {RmspropScalars<T>(3e-3, 0.9, 1e-6, 1e-2, 0.5, maximize),
               WeightDecay::kL2},
          };
          const int num = 3 + int(centered) + int(momentum);
          // The grad_avg is signed; square_avg (and, centered, the
          // difference) stays mostly positive.
          std::vector<bool> non_negative = {false, false, true, false, false};
          run_case<scalar_t>(
              std::string("rmsprop") + (centered ? " centered" : "") +
                  (momentum ? " momentum " : " ") + suffix,
              num, non_negative, groups,
              [&](const auto& args, const HostEmulator& emu) {
                dispatch_rmsprop(args, centered, momentum, emu);
              },
              [&](auto d, T* x, const RmspropScalars<T>& s) {
                constexpr WeightDecay kD = decltype(d)::value;
                if constexpr (kD != WeightDecay::kDecoupled) {
                  // Operand order of launch.h: optional lists in order.
                  int next = 3;
                  T unused_avg = 0;
                  T unused_buf = 0;
                  T& grad_avg = centered ? x[next++] : unused_avg;
                  T& buf = momentum ? x[next++] : unused_buf;
                  if (centered && momentum) {
                    rmsprop_update<true, true, kD>(x[0], x[1], x[2], grad_avg,
                                                   buf, s);
                  } else if (centered) {
                    rmsprop_update<true, false, kD>(x[0], x[1], x[2], grad_avg,
                                                    buf, s);
                  } else if (momentum) {
                    rmsprop_update<false, true, kD>(x[0], x[1], x[2],
                                                    grad_avg, buf, s);
                  } else {
                    rmsprop_update<false, false, kD>(x[0], x[1], x[2],
                                                     grad_avg, buf, s);
                  }
                }
              },
              max_blocks);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// 3. 64-bit offsets
// ---------------------------------------------------------------------------

// A virtual tensor of 3e9 + 5 elements whose operands' base addresses are
// set so that only a window [window_begin, window_begin + window) of
// elements is backed by memory. Running the kernel body for the chunks in
// the window (chunk c alone: block c of c + 1 blocks... we pass block = c,
// num_blocks = num_chunks, so the loop visits exactly chunk c) updates
// exactly the window; a 32-bit truncation of an offset would land elsewhere.
template <typename scalar_t>
void test_large_offsets() {
  using T = compute_t<scalar_t>;
  const int64_t numel = 3000000000LL + 5;
  const int64_t num_chunks = (numel + kChunkSize - 1) / kChunkSize;
  // Windows: the chunk starting at 2^31, and the last chunk (with a tail).
  const int64_t chunks[] = {(int64_t{1} << 31) / kChunkSize, num_chunks - 1};
  static_assert((int64_t{1} << 31) % kChunkSize == 0);
  for (int64_t chunk : chunks) {
    const int64_t window_begin = chunk * kChunkSize;
    const int64_t window = std::min(kChunkSize, numel - window_begin);
    std::mt19937 rng(7);
    std::vector<Operand<scalar_t>> ops;
    for (int k = 0; k < 4; ++k) ops.emplace_back(window, 0, rng, k == 3);
    auto expected = ops;

    MultiTensorArgs<AdamScalars<T>> args;
    args.dtype = dtype_of<scalar_t>();
    args.numels = {numel};
    args.operands.assign(4, std::vector<void*>(1));
    for (int k = 0; k < 4; ++k) {
      // base + window_begin elements == the window's memory.
      const uintptr_t base = reinterpret_cast<uintptr_t>(ops[k].base()) -
                             static_cast<uintptr_t>(window_begin) *
                                 sizeof(scalar_t);
      args.operands[k][0] = reinterpret_cast<void*>(base);
    }
    const AdamScalars<T> s(
        make_adam_scalars(1e-3, 0.9, 0.999, 1e-8, 0.1, false, 5));
    args.scalar_set = {0};
    args.scalars = {s};
    args.decay = {WeightDecay::kDecoupled};
    check_multi_tensor_args(args, 4, true);
    int64_t launches = 0;
    plan_launches<4>(args, [&](const TensorListMeta<4, AdamScalars<T>>& meta) {
      ++launches;
      EXPECT(meta.num_chunks == num_chunks, "num_chunks");
      const ChunkRange r = locate_chunk(meta, chunk);
      EXPECT(r.tensor == 0 && r.begin == window_begin &&
                 r.end == window_begin + window,
             "range of chunk %lld", static_cast<long long>(chunk));
      for (int32_t t = 0; t < kBlockSize; ++t) {
        run_block<AdamOp<false>, scalar_t>(meta, chunk, num_chunks, t,
                                           kBlockSize);
      }
    });
    EXPECT(launches == 1, "one launch for one tensor");
    for (int64_t e = 0; e < window; ++e) {
      T x[4];
      for (int k = 0; k < 4; ++k) x[k] = to_compute(expected[k].base()[e]);
      adam_update<false, WeightDecay::kDecoupled>(x[0], x[1], x[2], x[3],
                                                  x[3], s);
      for (int k = 0; k < 4; ++k) {
        if (k != 1) expected[k].base()[e] = from_compute<scalar_t>(x[k]);
      }
    }
    for (int k = 0; k < 4; ++k) {
      EXPECT(ops[k].storage == expected[k].storage,
             "%s: chunk %lld past 2^31, operand %d", dtype_name<scalar_t>(),
             static_cast<long long>(chunk), k);
    }
  }
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);  // keep output if a bug crashes us
  std::printf("planner\n");
  test_plan();
  test_empty_and_errors();
  std::printf("emulated kernels\n");
  test_ops<float>();
  test_ops<double>();
  test_ops<__half>();
  test_ops<__nv_bfloat16>();
  std::printf("64-bit offsets\n");
  test_large_offsets<float>();
  test_large_offsets<__nv_bfloat16>();
  test_large_offsets<double>();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
