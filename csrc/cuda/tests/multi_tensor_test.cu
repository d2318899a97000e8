// Host-side tests of the CUDA multi-tensor machinery; no GPU needed.
//
// Built and run by scripts/check_cuda_kernels.sh with nvcc as HOST code:
//   1. the launch planners (multi_tensor_plan.h): every non-empty tensor in
//      exactly one launch, in order; capacities respected; slots map to the
//      right hyperparameters and decay modes; step counters, positions in
//      the call, master weights and AMP pointers carried; alignment flags;
//      every element of every tensor covered by exactly one chunk (also for
//      a 3e9-element tensor); every step counter in one step launch;
//   2. the kernels, emulated: the step kernel's body (increment_steps) and
//      the main kernel's block body (run_block, multi_tensor_apply.cuh), run
//      by looping over blocks and threads, in launch order, through the same
//      dispatch as production (ops.cuh: dtypes x mode flags -> Op, P, S), for
//      every op, mode and (param, state) dtype pair, on aligned and
//      misaligned tensors of sizes that hit the vector body and the tails,
//      with several param groups (hyperparameters and weight-decay modes)
//      and mixed float32/float64 step counters in one call; with master
//      weights, stochastic rounding, AMP unscaling (grads written back),
//      found_inf (nothing written, no step advanced) and lr tensors. Results
//      must equal, bit for bit, a plain element loop that derives each
//      tensor's scalars on the host from the update_rules.h constructors
//      (as the CPU kernels do) and calls the update rules and precision.h
//      directly; guard elements around every tensor must be untouched;
//   3. stochastic rounding through the kernel is unbiased: the mean of many
//      rounded updates too small for round-to-nearest matches the exact
//      value;
//   4. 64-bit offsets: chunks past element 2^31 of a (virtual) 3e9-element
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

#include "fused_optim/hyperparams.h"
#include "fused_optim/op_specs.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/multi_tensor_plan.h"
#include "cuda/ops.cuh"
#include "cuda/sum_of_squares.cuh"
#include "fused_optim/precision.h"
#include "fused_optim/update_rules.h"

using namespace fused_optim;
using namespace fused_optim::cuda;

// (The glue takes the sets from the shared front, op_front.h; the tests
// make them here.) Fills args.hyper_set, args.hypers and args.decay for `n` tensors: tensors
// whose `key_of(i)` are equal share one set, made once by `make(i)`, which
// returns {Hyper, WeightDecay}. Keys are e.g. the group index: nothing else
// is per group (SGD adds the new-momentum-buffer flag).
template <typename Hyper, typename KeyOf, typename Make>
void assign_hyper_sets(MultiTensorArgs<Hyper>& args, int64_t n,
                       const KeyOf& key_of, const Make& make) {
  using Key = std::decay_t<decltype(key_of(int64_t{0}))>;
  std::map<Key, int32_t> set_of_key;
  args.hyper_set.assign(static_cast<size_t>(n), 0);
  args.hypers.clear();
  args.decay.clear();
  for (int64_t i = 0; i < n; ++i) {
    const auto [it, inserted] = set_of_key.try_emplace(
        key_of(i), static_cast<int32_t>(args.hypers.size()));
    if (inserted) {
      const std::pair<Hyper, WeightDecay> made = make(i);
      args.hypers.push_back(made.first);
      args.decay.push_back(made.second);
    }
    args.hyper_set[static_cast<size_t>(i)] = it->second;
  }
}



// The mode flags of a call, as the glue passes them (op_specs.h).
CallModes adam_modes(bool amsgrad) {
  CallModes m;
  m.mode[0] = amsgrad;
  return m;
}
CallModes sgd_modes(bool momentum, bool nesterov) {
  CallModes m;
  m.mode[0] = nesterov;
  m.has_state[0] = momentum;
  return m;
}
CallModes rmsprop_modes(bool centered, bool momentum) {
  CallModes m;
  m.mode[0] = centered;
  m.has_state[1] = centered;
  m.has_state[2] = momentum;
  return m;
}

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

// Runs what multi_tensor_apply launches, in its order: the step kernel's
// body for every thread of every step launch, then the main kernel's block
// body for every block and thread of every launch, with the grid capped at
// max_blocks (a small cap exercises the grid-stride loop over chunks).
struct HostEmulator {
  int64_t max_blocks = kMaxBlocksPerLaunch;
  int64_t* launches = nullptr;

  template <typename Op, typename P, typename S, typename Hyper>
  cudaError_t run(const MultiTensorArgs<Hyper>& args) const {
    constexpr int kN = Op::kNumOperands;
    check_multi_tensor_args(args, kN, Op::kAllowsDecoupledDecay);
    plan_step_launches(args.steps, args.found_inf,
                       [&](const StepListMeta& meta, int64_t blocks) {
                         const int64_t threads = blocks * kStepBlockSize;
                         for (int64_t t = 0; t < threads; ++t) {
                           increment_steps(meta, t, threads);
                         }
                       });
    plan_scalar_state_launches(
        args, [&](const ScalarStateMeta<Hyper>& meta, int64_t blocks) {
          const int64_t threads = blocks * kStepBlockSize;
          for (int64_t t = 0; t < threads; ++t) {
            advance_scalar_states(meta, t, threads);
          }
        });
    if constexpr (NormsOfUpdate<Hyper>::value) {
      // The measuring pass: measure_kernel per chunk (each thread's sums,
      // then the kernel's tree), then measure_tensor_kernel per tensor.
      if (args.passes != NormPasses::kUpdateOnly) {
        plan_launches<kN>(args, [&](const TensorListMeta<kN, Hyper>& meta) {
          if (meta.found_inf != nullptr && *meta.found_inf != 0.0f) return;
          for (int64_t chunk = 0; chunk < meta.num_chunks; ++chunk) {
            double values[2][kBlockSize];
            for (int32_t t = 0; t < kBlockSize; ++t) {
              const MeasuredSums mine =
                  measure_chunk_thread<Op, P, S>(meta, chunk, t, kBlockSize);
              values[0][t] = mine.param;
              values[1][t] = mine.update;
            }
            for (int stride = kBlockSize / 2; stride > 0; stride /= 2) {
              for (int t = 0; t < kBlockSize; ++t) {
                tree_level(values[0], stride, t);
                tree_level(values[1], stride, t);
              }
            }
            meta.measure_partials[2 * (meta.first_partial + chunk)] = values[0][0];
            meta.measure_partials[2 * (meta.first_partial + chunk) + 1] = values[1][0];
          }
          for (int32_t t = 0; t < meta.num_tensors; ++t) sum_measured_tensor(meta, t);
        });
      }
    }
    if (args.passes == NormPasses::kMeasureOnly) return cudaSuccess;
    plan_launches<kN>(args, [&](const TensorListMeta<kN, Hyper>& meta) {
      if (launches != nullptr) ++*launches;
      const int64_t blocks = std::min(launch_blocks(meta), max_blocks);
      for (int64_t b = 0; b < blocks; ++b) {
        for (int32_t t = 0; t < kBlockSize; ++t) {
          run_block<Op, P, S>(meta, b, blocks, t, kBlockSize);
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
  using Hyper = AdagradHyper;
  constexpr int kN = 3;
  using Meta = TensorListMeta<kN, Hyper>;

  std::vector<int64_t> numels = {0,          1,          7,
                                 8,          9,          4099,
                                 kChunkSize - 1, kChunkSize, kChunkSize + 1,
                                 0,          3000000000LL, 5};
  // Enough small tensors to overflow the tensor list twice.
  for (int i = 0; i < 2 * Meta::kMaxTensors; ++i) numels.push_back(1 + i % 37);
  constexpr int kSets = 40;  // more than the slot table holds

  MultiTensorArgs<Hyper> args;
  args.param_dtype = ScalarType::kHalf;
  args.state_dtype = ScalarType::kFloat;
  const float fake_scale = 0.0f, fake_inf = 0.0f;
  args.grad_scale = &fake_scale;
  args.found_inf = &fake_inf;
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
    // Master weights: misaligned for tensors i % 8 == 6.
    args.master.push_back(reinterpret_cast<void*>(
        0x80000000u + static_cast<uintptr_t>(i) * 0x1000u +
        (i % 8 == 6 ? 4 : 0)));
    args.steps.push_back(StepCounter{
        reinterpret_cast<void*>(0x90000000u + static_cast<uintptr_t>(i) * 8),
        i % 3 == 1});
  }
  assign_hyper_sets(args, n, set_of,
                    [&](int64_t i) {
                      const int64_t set = set_of(i);
                      Hyper h{};
                      h.lr.value = -static_cast<double>(set);
                      return std::make_pair(
                          h, set % 2 ? WeightDecay::kL2 : WeightDecay::kNone);
                    });
  EXPECT(args.hypers.size() == kSets, "%zu sets", args.hypers.size());
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
      EXPECT(meta.master[t] == args.master[i], "master of %lld",
             static_cast<long long>(i));
      aligned = aligned && reinterpret_cast<uintptr_t>(args.master[i]) % 16 == 0;
      EXPECT(meta.aligned[t] == (aligned ? 1 : 0), "aligned of %lld",
             static_cast<long long>(i));
      EXPECT(meta.step[t] == args.steps[i].data &&
                 meta.step_is_double[t] == (args.steps[i].is_double ? 1 : 0),
             "step of %lld", static_cast<long long>(i));
      EXPECT(meta.index[t] == i, "index of %lld", static_cast<long long>(i));
      EXPECT(meta.grad_scale == &fake_scale && meta.found_inf == &fake_inf &&
                 meta.master_weights == 1 && meta.stochastic_rounding == 0,
             "launch-wide fields");
      const int set = args.hyper_set[i];
      EXPECT(meta.slot[t] < Meta::kMaxSlots, "slot %d", meta.slot[t]);
      max_slot = std::max<int>(max_slot, meta.slot[t]);
      EXPECT(meta.hyper[meta.slot[t]].lr.value == -static_cast<double>(set),
             "hyper of tensor %lld", static_cast<long long>(i));
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
  // Two full tensor lists, then 40 sets of 3 tensors in slot tables of <= 16.
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
  SHOW(4, AdamHyper);
  SHOW(5, AdamHyper);
  SHOW(2, SgdHyper);
  SHOW(3, SgdHyper);
  SHOW(3, AdagradHyper);
  SHOW(3, RmspropHyper);
  SHOW(5, RmspropHyper);
#undef SHOW
  std::printf("    %-30s %3d        %zu\n", "step counters",
              StepListMeta::kMaxSteps, sizeof(StepListMeta));
}

void test_plan_steps() {
  // Every counter in exactly one step launch, in order, with enough threads.
  std::vector<StepCounter> steps;
  for (int i = 0; i < 2 * StepListMeta::kMaxSteps + 5; ++i) {
    steps.push_back(StepCounter{reinterpret_cast<void*>(uintptr_t{8} * (i + 1)),
                                i % 2 == 1});
  }
  const float inf = 0.0f;
  size_t next = 0;
  int launches = 0;
  plan_step_launches(steps, &inf, [&](const StepListMeta& meta, int64_t blocks) {
    ++launches;
    EXPECT(meta.found_inf == &inf, "found_inf");
    EXPECT(blocks * kStepBlockSize >= meta.count, "threads");
    for (int32_t j = 0; j < meta.count; ++j, ++next) {
      EXPECT(meta.step[j] == steps[next].data &&
                 meta.is_double[j] == (steps[next].is_double ? 1 : 0),
             "step %zu", next);
    }
  });
  EXPECT(next == steps.size() && launches == 3, "%zu steps in %d launches",
         next, launches);
}

void test_empty_and_errors() {
  // No tensors, or only empty ones: no launch.
  MultiTensorArgs<AdagradHyper> args;
  args.operands.assign(3, {});
  int64_t launches = 0;
  HostEmulator emu;
  emu.launches = &launches;
  dispatch<AdagradSpec>(args, CallModes{}, emu);
  // Empty tensors: no main launch, but their step counters still advance.
  float steps[2] = {3.0f, 0.0f};
  args.numels = {0, 0};
  args.operands.assign(3, std::vector<void*>(2, nullptr));
  args.steps = {StepCounter{&steps[0], false}, StepCounter{&steps[1], false}};
  args.hyper_set = {0, 0};
  args.hypers.resize(1);
  args.decay = {WeightDecay::kNone};
  dispatch<AdagradSpec>(args, CallModes{}, emu);
  EXPECT(launches == 0, "%lld launches for empty tensors",
         static_cast<long long>(launches));
  EXPECT(steps[0] == 4.0f && steps[1] == 1.0f, "steps of empty tensors");

  auto throws = [](const std::function<void()>& fn) {
    try {
      fn();
    } catch (const std::invalid_argument&) {
      return true;
    }
    return false;
  };
  // Wrong operand count, decoupled decay on a coupled-only op, Nesterov
  // without momentum, unsupported dtype pairs, master weights and
  // stochastic rounding where they are not allowed, missing steps.
  MultiTensorArgs<SgdHyper> sgd;
  sgd.operands.assign(3, {});
  EXPECT(throws([&] { dispatch<SgdSpec>(sgd, sgd_modes(false, false), emu); }),
         "operand count");
  sgd.operands.assign(2, {});
  EXPECT(!throws([&] { dispatch<SgdSpec>(sgd, sgd_modes(false, false), emu); }), "valid");
  sgd.decay = {WeightDecay::kDecoupled};
  sgd.hypers.resize(1);
  EXPECT(throws([&] { dispatch<SgdSpec>(sgd, sgd_modes(false, false), emu); }),
         "decoupled decay");
  EXPECT(throws([&] { dispatch<SgdSpec>(sgd, sgd_modes(false, true), emu); }), "nesterov");
  sgd.decay = {WeightDecay::kNone};
  sgd.state_dtype = ScalarType::kBFloat16;  // no state: must be the param's
  EXPECT(throws([&] { dispatch<SgdSpec>(sgd, sgd_modes(false, false), emu); }),
         "stateless dtype pair");
  MultiTensorArgs<AdamHyper> adam;
  adam.operands.assign(4, {});
  auto adam_throws = [&] {
    return throws([&] { dispatch<AdamSpec>(adam, adam_modes(false), emu); });
  };
  EXPECT(!adam_throws(), "valid adam");
  const std::pair<ScalarType, ScalarType> bad_pairs[] = {
      {ScalarType::kFloat, ScalarType::kHalf},
      {ScalarType::kFloat, ScalarType::kDouble},
      {ScalarType::kDouble, ScalarType::kFloat},
      {ScalarType::kBFloat16, ScalarType::kHalf},
      {ScalarType::kHalf, ScalarType::kDouble}};
  for (const auto& [p, st] : bad_pairs) {
    adam.param_dtype = p;
    adam.state_dtype = st;
    EXPECT(adam_throws(), "dtype pair %d/%d", int(p), int(st));
  }
  float fake = 0.0f;
  adam.param_dtype = adam.state_dtype = ScalarType::kFloat;
  adam.numels = {1};
  adam.operands.assign(4, std::vector<void*>(1, &fake));
  adam.hyper_set = {0};
  adam.hypers.resize(1);
  adam.decay = {WeightDecay::kNone};
  EXPECT(adam_throws(), "missing step counters");
  adam.steps = {StepCounter{&fake, false}};
  adam.master = {&fake};
  EXPECT(adam_throws(), "master weights of fp32 params");
  adam.master.clear();
  adam.stochastic_rounding = true;
  EXPECT(adam_throws(), "stochastic rounding of fp32 params");
  adam.param_dtype = ScalarType::kBFloat16;
  adam.state_dtype = ScalarType::kBFloat16;
  adam.master = {&fake};
  EXPECT(adam_throws(), "stochastic rounding with master weights");
}

// ---------------------------------------------------------------------------
// 2. The emulated kernels against a plain element loop
// ---------------------------------------------------------------------------

template <typename U>
const char* dtype_name() {
  if constexpr (std::is_same_v<U, float>) return "fp32";
  if constexpr (std::is_same_v<U, double>) return "fp64";
  if constexpr (std::is_same_v<U, __half>) return "fp16";
  return "bf16";
}
template <typename U>
ScalarType dtype_of() {
  if constexpr (std::is_same_v<U, float>) return ScalarType::kFloat;
  if constexpr (std::is_same_v<U, double>) return ScalarType::kDouble;
  if constexpr (std::is_same_v<U, __half>) return ScalarType::kHalf;
  return ScalarType::kBFloat16;
}

// Calls fn(integral_constant<WeightDecay, d>) for a run-time mode.
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

// The storage of one operand of one tensor, with kGuard guard elements on
// both sides; `shift` elements past a 16-byte boundary.
constexpr int64_t kGuard = 16;

template <typename U>
struct Operand {
  std::vector<unsigned char> storage;
  int64_t numel = 0;
  int shift = 0;

  Operand(int64_t n, int shift_, std::mt19937& rng, bool non_negative)
      : numel(n), shift(shift_) {
    storage.resize((n + 2 * kGuard + 8) * sizeof(U) + 32);
    std::uniform_real_distribution<float> dist(non_negative ? 0.01f : -2.0f,
                                               2.0f);
    U* all = base() - kGuard;
    for (int64_t e = 0; e < n + 2 * kGuard; ++e) {
      all[e] = from_compute<U>(static_cast<compute_t<U>>(dist(rng)));
    }
  }
  U* base() {
    uintptr_t a = reinterpret_cast<uintptr_t>(storage.data()) +
                  kGuard * sizeof(U);
    a = (a + 15) / 16 * 16 + shift * sizeof(U);
    return reinterpret_cast<U*>(a);
  }
};

// How a case runs.
struct CaseOptions {
  ParamMode mode = ParamMode::kPlain;  // master weights / stochastic rounding
  bool unscale = false;                // grad_scale given
  bool found_inf = false;              // found_inf given and non-zero
  bool lr_tensor = false;              // lr from per-group lr tensors
  bool clip = false;                   // clipping by a global grad norm
  int64_t max_blocks = kMaxBlocksPerLaunch;
};

std::string describe(const CaseOptions& o) {
  std::string s;
  if (o.mode == ParamMode::kMaster) s += " master";
  if (o.mode == ParamMode::kStochastic) s += " stochastic";
  if (o.unscale) s += " unscale";
  if (o.found_inf) s += " found_inf";
  if (o.lr_tensor) s += " lr_tensor";
  if (o.clip) s += " clip";
  if (o.max_blocks < kMaxBlocksPerLaunch) s += " grid-capped";
  return s;
}

// The element op whose direction() the reference measures, for the ops
// with norms of their update (Note [norms of the update]).
template <typename Hyper>
struct MeasuringOp;
template <>
struct MeasuringOp<LambHyper> {
  using type = LambOp;
  static constexpr int kNumOperands = LambOp::kNumOperands;
  template <WeightDecay kDecay, typename T>
  static T direction(T (&x)[kNumOperands], const LambScalars<T>& s) {
    return LambOp::direction<kDecay>(x, s);
  }
};

// One test case: tensors of `sizes`, operands in the op's operand order
// (param and grad of type P, state of type S), hyperparameters per tensor
// from `groups` (tensor i in group i % groups), run through the production
// dispatch with the emulator, and through a plain element loop on a copy
// that derives the scalars on the host with `host_scalars(hyper, lr, step)`
// (written with the update_rules.h constructors, as the CPU kernels derive
// them) and calls `reference(decay, x, scalars)`. All bytes must match:
// operands with their guards, master weights, step counters.
template <typename P, typename S, typename Hyper, typename HostScalars,
          typename Dispatch, typename Reference>
void run_case(const std::string& name, int num_operands,
              const std::vector<bool>& non_negative,
              const std::vector<std::pair<Hyper, WeightDecay>>& groups,
              const CaseOptions& o, const HostScalars& host_scalars,
              const Dispatch& dispatch, const Reference& reference) {
  using T = compute_t<P>;
  // Sizes hit the vector body and every tail length; the empty tensor makes
  // positions in the call differ from positions in a launch.
  const std::vector<int64_t> sizes = {1,    7,    8,    9,  33, 4099,
                                      kChunkSize + 3,  0, 2 * kChunkSize + 17,
                                      16,   kChunkSize, 5};
  std::mt19937 rng(1234);
  const int64_t n = static_cast<int64_t>(sizes.size());
  const int64_t num_groups = static_cast<int64_t>(groups.size());
  const bool master = o.mode == ParamMode::kMaster;
  // Misalignment patterns, by tensor (shifts in elements of each operand's
  // own type, so e.g. a 1-element shift misaligns bf16 by 2 bytes and fp32
  // by 4): all aligned; param shifted; only the grad shifted; everything
  // shifted alike; only a state (or the master) shifted.
  auto shift_of = [&](int64_t i, int k) {
    switch (i % 5) {
      case 1: return k == 0 ? 1 : 0;
      case 2: return k == 1 ? 3 : 0;
      case 3: return 1;
      case 4: return k == num_operands - 1 ? 2 : 0;
      default: return 0;
    }
  };
  std::vector<std::vector<Operand<P>>> pg(2);         // param, grad
  std::vector<std::vector<Operand<S>>> st(num_operands - 2);
  std::vector<Operand<float>> ms;                     // master weights
  for (int64_t i = 0; i < n; ++i) {
    for (int k = 0; k < num_operands; ++k) {
      if (k < 2) {
        pg[k].emplace_back(sizes[i], shift_of(i, k), rng, non_negative[k]);
      } else {
        st[k - 2].emplace_back(sizes[i], shift_of(i, k), rng, non_negative[k]);
      }
    }
    ms.emplace_back(sizes[i], shift_of(i, num_operands - 1), rng, false);
    if (master) {
      // The param is never read with master weights: poison it.
      P* p = pg[0][i].base();
      for (int64_t e = 0; e < sizes[i]; ++e) p[e] = from_compute<P>(T(NAN));
    }
  }
  // Step counters: float32 or float64 (every third tensor), at different
  // counts; lr tensors: float32 or float64 by group.
  std::vector<float> step_f(n);
  std::vector<double> step_d(n);
  for (int64_t i = 0; i < n; ++i) {
    step_f[i] = static_cast<float>(1 + i % 4 + 10 * (i % num_groups));
    step_d[i] = 2.0 + static_cast<double>(i);
  }
  auto step_is_double = [](int64_t i) { return i % 3 == 1; };
  std::vector<float> lr_f(num_groups);
  std::vector<double> lr_d(num_groups);
  for (int64_t g = 0; g < num_groups; ++g) {
    lr_f[g] = static_cast<float>(groups[g].first.lr.value * 0.75);
    lr_d[g] = groups[g].first.lr.value * 1.25;
  }
  // Per-tensor scalar state (Note [per-tensor scalar state]; NAdam's
  // mu_product): float32 or float64 (every other tensor), distinct values.
  std::vector<float> scalar_f(n);
  std::vector<double> scalar_d(n);
  for (int64_t i = 0; i < n; ++i) {
    scalar_f[i] = 0.9f - 0.03f * static_cast<float>(i);
    scalar_d[i] = 0.85 - 0.02 * static_cast<double>(i);
  }
  auto scalar_is_double = [](int64_t i) { return i % 2 == 1; };
  auto want_scalar_f = scalar_f;
  auto want_scalar_d = scalar_d;
  // Per-tensor norms (Note [per-tensor norms]; LARS): the [2n] sums of
  // squares, float64 for float64 params and float32 otherwise, as the
  // front makes them; distinct by position in the call (the empty tensor
  // shifts launch positions), zero for one param and one grad (ratio 1).
  std::vector<float> sums_f(2 * n);
  std::vector<double> sums_d(2 * n);
  for (int64_t i = 0; i < n; ++i) {
    sums_d[i] = i == 3 ? 0.0 : 0.5 + 0.37 * static_cast<double>(i);
    sums_d[n + i] = i == 5 ? 0.0 : 2.0 + 0.71 * static_cast<double>(i);
  }
  for (int64_t i = 0; i < 2 * n; ++i) sums_f[i] = static_cast<float>(sums_d[i]);
  constexpr bool kSumsDouble = std::is_same_v<P, double>;
  auto sum_of = [&](int64_t k) {
    return kSumsDouble ? sums_d[k] : static_cast<double>(sums_f[k]);
  };
  const float grad_scale = 3.0f;  // not a power of two: inverse rounds
  // SGD's counters are optional (given with stochastic rounding): run it
  // both ways.
  const bool with_steps = !Hyper::kStepsOptional ||
                          o.mode == ParamMode::kStochastic || o.unscale;
  const float found_inf = o.found_inf ? 1.0f : 0.0f;
  // Clipping: a float64 norm; groups not clipped (inf), clipped (factor
  // about 0.4) and clipped by a factor clamped to 1.
  const double grad_norm = 3.7;
  auto max_grad_norm_of = [](int64_t g) {
    return g % 3 == 0 ? INFINITY : (g % 3 == 1 ? 1.5 : 100.0);
  };

  auto want_pg = pg;
  auto want_st = st;
  auto want_ms = ms;
  auto want_step_f = step_f;
  auto want_step_d = step_d;

  MultiTensorArgs<Hyper> args;
  args.param_dtype = dtype_of<P>();
  args.state_dtype = num_operands > 2 ? dtype_of<S>() : dtype_of<P>();
  args.numels = sizes;
  args.operands.assign(num_operands, std::vector<void*>(n));
  for (int k = 0; k < num_operands; ++k) {
    for (int64_t i = 0; i < n; ++i) {
      void* base = k < 2 ? static_cast<void*>(pg[k][i].base())
                         : static_cast<void*>(st[k - 2][i].base());
      args.operands[k][i] = sizes[i] ? base : nullptr;
    }
  }
  if (master) {
    for (int64_t i = 0; i < n; ++i) {
      args.master.push_back(sizes[i] ? ms[i].base() : nullptr);
    }
  }
  if (with_steps) {
    for (int64_t i = 0; i < n; ++i) {
      args.steps.push_back(
          step_is_double(i) ? StepCounter{&step_d[i], true}
                            : StepCounter{&step_f[i], false});
    }
  }
  // Note [norms of the update]: the measuring pass writes its float64 sums
  // (poisoned first) and needs two partials per chunk.
  std::vector<double> measured(2 * n, NAN);
  std::vector<double> measure_partials(2 * num_partials(sizes), NAN);
  if constexpr (NormsOfUpdate<Hyper>::value) {
    args.tensor_sums = measured.data();
    args.tensor_sums_is_double = true;
    args.measure_partials = measure_partials.data();
  } else if constexpr (HasTensorNorms<Hyper>::value) {
    args.tensor_sums = kSumsDouble ? static_cast<const void*>(sums_d.data())
                                   : static_cast<const void*>(sums_f.data());
    args.tensor_sums_is_double = kSumsDouble;
  }
  if constexpr (HasScalarState<Hyper>::value) {
    for (int64_t i = 0; i < n; ++i) {
      args.scalar_state.push_back(
          scalar_is_double(i) ? StepCounter{&scalar_d[i], true}
                              : StepCounter{&scalar_f[i], false});
    }
  }
  assign_hyper_sets(args, n, [&](int64_t i) { return i % num_groups; },
                    [&](int64_t i) {
                      const int64_t g = i % num_groups;
                      std::pair<Hyper, WeightDecay> h = groups[g];
                      if (o.clip) h.first.max_grad_norm = max_grad_norm_of(g);
                      if (o.lr_tensor) {
                        // The host value must not be used.
                        h.first.lr.value = 1e30;
                        h.first.lr.tensor_is_double = g % 2 == 1;
                        h.first.lr.tensor =
                            g % 2 ? static_cast<const void*>(&lr_d[g])
                                  : static_cast<const void*>(&lr_f[g]);
                      }
                      return h;
                    });
  if (o.unscale) args.grad_scale = &grad_scale;
  if (o.found_inf || o.unscale) args.found_inf = &found_inf;
  if (o.clip) {
    args.grad_norm = &grad_norm;
    args.grad_norm_is_double = true;
  }
  args.stochastic_rounding = o.mode == ParamMode::kStochastic;

  HostEmulator emu;
  emu.max_blocks = o.max_blocks;
  dispatch(args, emu);

  // The reference.
  if (!o.found_inf) {
    for (int64_t i = 0; i < n; ++i) {
      double step = 0.0;
      if (with_steps) {
        if (step_is_double(i)) {
          step = want_step_d[i] += 1.0;
        } else {
          step = want_step_f[i] += 1.0f;
        }
      }
      const int64_t g = i % num_groups;
      const Hyper& h = groups[g].first;
      const double lr =
          !o.lr_tensor ? h.lr.value
                       : (g % 2 ? lr_d[g] : static_cast<double>(lr_f[g]));
      const auto s = [&] {
        if constexpr (HasScalarState<Hyper>::value) {
          // The scalars see the advanced value, as the kernels do.
          const double value =
              scalar_is_double(i)
                  ? (want_scalar_d[i] = h.advance_scalar_state(lr, step, want_scalar_d[i]))
                  : static_cast<double>(want_scalar_f[i] = h.advance_scalar_state(
                                            lr, step, want_scalar_f[i]));
          return host_scalars(h, lr, step, value);
        } else if constexpr (NormsOfUpdate<Hyper>::value) {
          // The measuring pass on the reference's operands (before this
          // tensor's update), summed in the kernels' order: per chunk, each
          // of kBlockSize threads over elements thread, thread + kBlockSize,
          // ..., then the tree, then the chunks in order.
          const auto s0 = host_scalars(h, lr, step, TensorNorms{});
          const T clip = o.clip ? clip_coefficient<T>(static_cast<T>(grad_norm),
                                                     max_grad_norm_of(g))
                                : T(1);
          double total[2] = {0.0, 0.0};
          for (int64_t c0 = 0; c0 < sizes[i]; c0 += kChunkSize) {
            const int64_t c1 = std::min(sizes[i], c0 + kChunkSize);
            double values[2][kBlockSize] = {};
            for (int64_t e = c0; e < c1; ++e) {
              T x[8];
              x[0] = master ? static_cast<T>(want_ms[i].base()[e])
                            : to_compute(want_pg[0][i].base()[e]);
              x[1] = to_compute(want_pg[1][i].base()[e]);
              if (o.unscale) {
                x[1] = x[1] * static_cast<T>(inverse_grad_scale(grad_scale));
              }
              x[1] = x[1] * clip;
              for (int k = 2; k < num_operands; ++k) {
                x[k] = to_compute(want_st[k - 2][i].base()[e]);
              }
              T u = 0;
              with_decay(groups[g].second, [&](auto d) {
                u = MeasuringOp<Hyper>::template direction<decltype(d)::value>(
                    reinterpret_cast<T(&)[MeasuringOp<Hyper>::kNumOperands]>(x), s0);
              });
              const int64_t t = (e - c0) % kBlockSize;
              values[0][t] += static_cast<double>(x[0]) * static_cast<double>(x[0]);
              values[1][t] += static_cast<double>(u) * static_cast<double>(u);
            }
            for (int stride = kBlockSize / 2; stride > 0; stride /= 2) {
              for (int t = 0; t < kBlockSize; ++t) {
                tree_level(values[0], stride, t);
                tree_level(values[1], stride, t);
              }
            }
            total[0] += values[0][0];
            total[1] += values[1][0];
          }
          EXPECT(sizes[i] == 0 || (measured[i] == total[0] &&
                                   measured[n + i] == total[1]),
                 "%s%s: measured sums of tensor %lld", name.c_str(),
                 describe(o).c_str(), static_cast<long long>(i));
          return host_scalars(h, lr, step, update_norms(total[0], total[1]));
        } else if constexpr (HasTensorNorms<Hyper>::value) {
          // The grad's norm times the factors the loop applies.
          const TensorNorms norms = tensor_norms(
              sum_of(i), sum_of(n + i),
              o.unscale ? static_cast<double>(inverse_grad_scale(grad_scale)) : 1.0,
              o.clip ? static_cast<double>(clip_coefficient<T>(
                           static_cast<T>(grad_norm), max_grad_norm_of(g)))
                     : 1.0);
          return host_scalars(h, lr, step, norms);
        } else {
          return host_scalars(h, lr, step);
        }
      }();
      const WeightDecay decay = groups[g].second;
      const uint32_t key =
          stochastic_rounding_key(static_cast<uint32_t>(i), step);
      P* p = want_pg[0][i].base();
      P* gr = want_pg[1][i].base();
      float* m = want_ms[i].base();
      for (int64_t e = 0; e < sizes[i]; ++e) {
        T x[8];
        x[0] = master ? static_cast<T>(m[e]) : to_compute(p[e]);
        x[1] = to_compute(gr[e]);
        if (o.unscale) {
          x[1] = x[1] * static_cast<T>(inverse_grad_scale(grad_scale));
          gr[e] = from_compute<P>(x[1]);
        }
        if (o.clip) {
          x[1] = x[1] * clip_coefficient<T>(static_cast<T>(grad_norm),
                                            max_grad_norm_of(g));
        }
        for (int k = 2; k < num_operands; ++k) {
          x[k] = to_compute(want_st[k - 2][i].base()[e]);
        }
        with_decay(decay, [&](auto d) { reference(d, x, s); });
        if (master) m[e] = static_cast<float>(x[0]);
        if constexpr (std::is_same_v<P, __nv_bfloat16>) {
          if (o.mode == ParamMode::kStochastic) {
            p[e] = bf16_from_bits(bf16_bits_round_stochastic(
                static_cast<float>(x[0]), stochastic_rounding_bits(key, e)));
          } else {
            p[e] = from_compute<P>(x[0]);
          }
        } else {
          p[e] = from_compute<P>(x[0]);
        }
        for (int k = 2; k < num_operands; ++k) {
          want_st[k - 2][i].base()[e] = from_compute<S>(x[k]);
        }
      }
    }
  }

  int64_t mismatches = 0;
  auto compare = [&](const std::vector<unsigned char>& got,
                     const std::vector<unsigned char>& want, const char* what,
                     int64_t i) {
    if (got == want) return;
    ++mismatches;
    if (mismatches <= 3) {
      size_t b = 0;
      while (got[b] == want[b]) ++b;
      std::printf("    %s%s: %s of tensor %lld (numel %lld) differs at byte "
                  "%zu\n",
                  name.c_str(), describe(o).c_str(), what,
                  static_cast<long long>(i), static_cast<long long>(sizes[i]),
                  b);
    }
  };
  for (int64_t i = 0; i < n; ++i) {
    compare(pg[0][i].storage, want_pg[0][i].storage, "param", i);
    compare(pg[1][i].storage, want_pg[1][i].storage, "grad", i);
    for (int k = 2; k < num_operands; ++k) {
      compare(st[k - 2][i].storage, want_st[k - 2][i].storage, "state", i);
    }
    compare(ms[i].storage, want_ms[i].storage, "master", i);
  }
  EXPECT(mismatches == 0, "%s%s: %lld buffers differ", name.c_str(),
         describe(o).c_str(), static_cast<long long>(mismatches));
  EXPECT(step_f == want_step_f && step_d == want_step_d, "%s%s: step counters",
         name.c_str(), describe(o).c_str());
  EXPECT(scalar_f == want_scalar_f && scalar_d == want_scalar_d,
         "%s%s: scalar state", name.c_str(), describe(o).c_str());
}

// The options each (P, S) pair runs with: plain (full grid; then grid-capped
// with AMP unscaling and lr tensors), master weights (fp16/bf16 params),
// stochastic rounding (bf16 params); found_inf once per op and mode.
template <typename P, typename S>
std::vector<CaseOptions> case_options(bool with_found_inf) {
  std::vector<CaseOptions> out;
  out.push_back(CaseOptions{});
  CaseOptions amp;
  amp.unscale = true;
  amp.lr_tensor = true;
  amp.clip = true;
  amp.max_blocks = 3;
  out.push_back(amp);
  if constexpr (sizeof(P) == 2) {
    CaseOptions m;
    m.mode = ParamMode::kMaster;
    m.unscale = true;
    out.push_back(m);
  }
  if constexpr (std::is_same_v<P, __nv_bfloat16>) {
    CaseOptions sr;
    sr.mode = ParamMode::kStochastic;
    sr.lr_tensor = true;
    out.push_back(sr);
  }
  if (with_found_inf) {
    CaseOptions inf;
    inf.unscale = true;
    inf.found_inf = true;
    out.push_back(inf);
  }
  return out;
}

template <typename P, typename S>
void test_ops() {
  using T = compute_t<P>;
  const std::string dt =
      std::string(dtype_name<P>()) + "/" + dtype_name<S>() + " state";
  const bool with_found_inf = std::is_same_v<P, float> && std::is_same_v<S, float>;
  const std::vector<CaseOptions> options = case_options<P, S>(with_found_inf);
  for (bool maximize : {false, true}) {
    const std::string suffix = dt + (maximize ? " maximize" : "");
    // Adam / AdamW: groups with every decay mode.
    for (bool amsgrad : {false, true}) {
      auto adam = [&](double lr, double b1, double b2, double eps, double wd) {
        AdamHyper h;
        h.lr.value = lr;
        h.beta1 = b1;
        h.beta2 = b2;
        h.eps = eps;
        h.weight_decay = wd;
        h.maximize = maximize;
        return h;
      };
      const std::vector<std::pair<AdamHyper, WeightDecay>> groups = {
          {adam(1e-3, 0.9, 0.999, 1e-8, 0.0), WeightDecay::kNone},
          {adam(3e-2, 0.8, 0.99, 1e-6, 0.1), WeightDecay::kDecoupled},
          {adam(5e-3, 0.95, 0.9, 1e-3, 0.05), WeightDecay::kL2},
      };
      for (const CaseOptions& o : options) {
        run_case<P, S>(
            "adam" + std::string(amsgrad ? " amsgrad " : " ") + suffix,
            amsgrad ? 5 : 4, {false, false, false, true, true}, groups, o,
            [](const AdamHyper& h, double lr, double step) {
              return AdamScalars<T>(make_adam_scalars(
                  lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.maximize,
                  step));
            },
            [&](const auto& args, const HostEmulator& emu) {
              dispatch<AdamSpec>(args, adam_modes(amsgrad), emu);
            },
            [&](auto d, T* x, const AdamScalars<T>& s) {
              constexpr WeightDecay kD = decltype(d)::value;
              T unused = 0;
              if (amsgrad) {
                adam_update<true, kD>(x[0], x[1], x[2], x[3], x[4], s);
              } else {
                adam_update<false, kD>(x[0], x[1], x[2], x[3], unused, s);
              }
            });
      }
    }
    // SGD: no momentum (state type = param type), momentum (one group on
    // its first step), Nesterov.
    for (int mode = 0; mode < 3; ++mode) {
      const bool momentum = mode > 0;
      const bool nesterov = mode == 2;
      if (!momentum && !std::is_same_v<P, S>) continue;
      auto sgd = [&](double lr, double mom, double damp, double wd,
                     bool new_buffer) {
        SgdHyper h;
        h.lr.value = lr;
        h.momentum = mom;
        h.dampening = damp;
        h.weight_decay = wd;
        h.maximize = maximize;
        h.new_buffer = new_buffer;
        return h;
      };
      const std::vector<std::pair<SgdHyper, WeightDecay>> groups = {
          {sgd(0.1, 0.9, 0.0, 0.0, false), WeightDecay::kNone},
          // Nesterov needs dampening 0.
          {sgd(0.01, 0.5, nesterov ? 0.0 : 0.1, 1e-2, true), WeightDecay::kL2},
          {sgd(0.03, 0.7, 0.0, 1e-3, false), WeightDecay::kL2},
      };
      for (const CaseOptions& o : options) {
        run_case<P, S>(
            "sgd mode " + std::to_string(mode) + " " + suffix,
            momentum ? 3 : 2, {false, false, false}, groups, o,
            [](const SgdHyper& h, double lr, double) {
              return SgdScalars<T>(lr, h.momentum, h.dampening,
                                   h.weight_decay, h.maximize, h.new_buffer);
            },
            [&](const auto& args, const HostEmulator& emu) {
              dispatch<SgdSpec>(args, sgd_modes(momentum, nesterov), emu);
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
            });
      }
    }
    // LARS: SGD's modes, groups not adapted, adapted with decay and LARC
    // clipping, adapted without decay (always_adapt).
    for (int mode = 0; mode < 3; ++mode) {
      const bool momentum = mode > 0;
      const bool nesterov = mode == 2;
      if (!momentum && !std::is_same_v<P, S>) continue;
      auto lars = [&](double lr, double mom, double damp, double wd,
                      double trust_coeff, bool trust_clip, bool always_adapt,
                      bool new_buffer) {
        LarsHyper h;
        h.lr.value = lr;
        h.momentum = mom;
        h.dampening = damp;
        h.weight_decay = wd;
        h.trust_coeff = trust_coeff;
        h.eps = 1e-8;
        h.trust_clip = trust_clip;
        h.always_adapt = always_adapt;
        h.maximize = maximize;
        h.new_buffer = new_buffer;
        return h;
      };
      const std::vector<std::pair<LarsHyper, WeightDecay>> groups = {
          {lars(0.1, 0.9, 0.0, 0.0, 1e-3, false, false, false), WeightDecay::kNone},
          {lars(0.5, 0.5, nesterov ? 0.0 : 0.1, 1e-2, 0.02, true, false, true),
           WeightDecay::kL2},
          {lars(1.0, 0.7, 0.0, 0.0, 0.01, false, true, false), WeightDecay::kNone},
      };
      for (const CaseOptions& o : options) {
        run_case<P, S>(
            "lars mode " + std::to_string(mode) + " " + suffix,
            momentum ? 3 : 2, {false, false, false}, groups, o,
            [](const LarsHyper& h, double lr, double, const TensorNorms& norms) {
              return LarsScalars<T>(
                  lr, h.momentum, h.dampening, h.weight_decay, h.maximize,
                  h.new_buffer,
                  lars_trust_ratio(lr, h.weight_decay, h.trust_coeff, h.eps,
                                   h.trust_clip,
                                   h.weight_decay != 0.0 || h.always_adapt,
                                   norms.param, norms.grad));
            },
            [&](const auto& args, const HostEmulator& emu) {
              dispatch<LarsSpec>(args, sgd_modes(momentum, nesterov), emu);
            },
            [&](auto d, T* x, const LarsScalars<T>& s) {
              constexpr WeightDecay kD = decltype(d)::value;
              if constexpr (kD != WeightDecay::kDecoupled) {
                T unused = 0;
                if (nesterov) {
                  lars_update<true, true, kD>(x[0], x[1], x[2], s);
                } else if (momentum) {
                  lars_update<true, false, kD>(x[0], x[1], x[2], s);
                } else {
                  lars_update<false, false, kD>(x[0], x[1], unused, s);
                }
              }
            });
      }
    }
    // LAMB: decay in the update (adapted), decoupled decay with LAMBC
    // clipping and no bias correction, the same corrected (Note [corrected
    // weight decay]), no decay (not adapted), no decay but always_adapt
    // without grad averaging.
    {
      auto lamb = [&](double lr, double b1, double b2, double eps, double wd,
                      bool bias_correction, bool grad_averaging,
                      bool trust_clip, bool always_adapt, double max_lr = 0.0) {
        LambHyper h;
        h.lr.value = lr;
        h.beta1 = b1;
        h.beta2 = b2;
        h.eps = eps;
        h.weight_decay = wd;
        h.bias_correction = bias_correction;
        h.grad_averaging = grad_averaging;
        h.trust_clip = trust_clip;
        h.always_adapt = always_adapt;
        h.max_lr = max_lr;
        h.maximize = maximize;
        return h;
      };
      const std::vector<std::pair<LambHyper, WeightDecay>> groups = {
          {lamb(1e-2, 0.9, 0.999, 1e-6, 0.01, true, true, false, false),
           WeightDecay::kL2},
          {lamb(3e-2, 0.8, 0.99, 1e-4, 0.1, false, true, true, false),
           WeightDecay::kDecoupled},
          {lamb(3e-2, 0.8, 0.99, 1e-4, 0.1, false, true, true, false, 4e-2),
           WeightDecay::kDecoupled},
          {lamb(5e-3, 0.95, 0.9, 1e-3, 0.0, true, true, false, false),
           WeightDecay::kNone},
          {lamb(2e-2, 0.9, 0.99, 1e-6, 0.0, true, false, false, true),
           WeightDecay::kNone},
      };
      // In one launch, and (Note [norms across shards]) as the `measure`
      // call, on copies of the step counters, then the update reading the
      // sums it wrote: the same bytes.
      for (bool two_calls : {false, true}) {
        for (const CaseOptions& o : options) {
          run_case<P, S>(
              std::string(two_calls ? "lamb (measure, then update) " : "lamb ") + suffix,
              4, {false, false, false, true}, groups, o,
              [](const LambHyper& h, double lr, double step,
                 const TensorNorms& norms) { return h.scalars<T>(lr, step, norms); },
              [&](const auto& args, const HostEmulator& emu) {
                if (!two_calls) {
                  dispatch<LambSpec>(args, CallModes{}, emu);
                  return;
                }
                auto measure = args;
                std::vector<double> copies(args.steps.size());
                for (size_t i = 0; i < copies.size(); ++i) {
                  copies[i] = read_step(args.steps[i].data, args.steps[i].is_double);
                  measure.steps[i] = StepCounter{&copies[i], true};
                }
                measure.passes = NormPasses::kMeasureOnly;
                dispatch<LambSpec>(measure, CallModes{}, emu);
                auto update = args;
                update.passes = NormPasses::kUpdateOnly;
                update.measure_partials = nullptr;
                dispatch<LambSpec>(update, CallModes{}, emu);
              },
              [&](auto d, T* x, const LambScalars<T>& s) {
                lamb_update<decltype(d)::value>(x[0], x[1], x[2], x[3], s);
              });
        }
      }
    }
    // Adagrad.
    {
      auto adagrad = [&](double lr, double lr_decay, double eps, double wd) {
        AdagradHyper h;
        h.lr.value = lr;
        h.lr_decay = lr_decay;
        h.eps = eps;
        h.weight_decay = wd;
        h.maximize = maximize;
        return h;
      };
      const std::vector<std::pair<AdagradHyper, WeightDecay>> groups = {
          {adagrad(1e-2, 0.0, 1e-10, 0.0), WeightDecay::kNone},
          {adagrad(5e-2, 1e-3, 1e-8, 1e-2), WeightDecay::kL2},
      };
      for (const CaseOptions& o : options) {
        run_case<P, S>(
            "adagrad " + suffix, 3, {false, false, true}, groups, o,
            [](const AdagradHyper& h, double lr, double step) {
              return AdagradScalars<T>(lr, h.lr_decay, h.eps, h.weight_decay,
                                       h.maximize, step);
            },
            [&](const auto& args, const HostEmulator& emu) {
              dispatch<AdagradSpec>(args, CallModes{}, emu);
            },
            [&](auto d, T* x, const AdagradScalars<T>& s) {
              constexpr WeightDecay kD = decltype(d)::value;
              if constexpr (kD != WeightDecay::kDecoupled) {
                adagrad_update<kD>(x[0], x[1], x[2], s);
              }
            });
      }
    }
    // RMSprop: centered x momentum.
    for (bool centered : {false, true}) {
      for (bool momentum : {false, true}) {
        auto rmsprop = [&](double lr, double alpha, double eps, double wd,
                           double mom) {
          RmspropHyper h;
          h.lr.value = lr;
          h.alpha = alpha;
          h.eps = eps;
          h.weight_decay = wd;
          h.momentum = mom;
          h.maximize = maximize;
          return h;
        };
        const std::vector<std::pair<RmspropHyper, WeightDecay>> groups = {
            {rmsprop(1e-2, 0.99, 1e-8, 0.0, 0.9), WeightDecay::kNone},
            {rmsprop(3e-3, 0.9, 1e-6, 1e-2, 0.5), WeightDecay::kL2},
        };
        const int num = 3 + int(centered) + int(momentum);
        // The grad_avg is signed; square_avg stays positive.
        const std::vector<bool> non_negative = {false, false, true, false,
                                                false};
        for (const CaseOptions& o : options) {
          run_case<P, S>(
              std::string("rmsprop") + (centered ? " centered" : "") +
                  (momentum ? " momentum " : " ") + suffix,
              num, non_negative, groups, o,
              [](const RmspropHyper& h, double lr, double) {
                return RmspropScalars<T>(lr, h.alpha, h.eps, h.weight_decay,
                                         h.momentum, h.maximize);
              },
              [&](const auto& args, const HostEmulator& emu) {
                dispatch<RmspropSpec>(args, rmsprop_modes(centered, momentum), emu);
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
                    rmsprop_update<true, false, kD>(x[0], x[1], x[2],
                                                    grad_avg, buf, s);
                  } else if (momentum) {
                    rmsprop_update<false, true, kD>(x[0], x[1], x[2],
                                                    grad_avg, buf, s);
                  } else {
                    rmsprop_update<false, false, kD>(x[0], x[1], x[2],
                                                     grad_avg, buf, s);
                  }
                }
              });
        }
      }
    }
    // RAdam: every decay mode; steps on both sides of the rectification
    // threshold (the counters run from 2 to 34).
    {
      auto radam = [&](double lr, double b1, double b2, double eps, double wd) {
        RadamHyper h;
        h.lr.value = lr;
        h.beta1 = b1;
        h.beta2 = b2;
        h.eps = eps;
        h.weight_decay = wd;
        h.maximize = maximize;
        return h;
      };
      const std::vector<std::pair<RadamHyper, WeightDecay>> groups = {
          {radam(1e-3, 0.9, 0.999, 1e-8, 0.0), WeightDecay::kNone},
          {radam(3e-2, 0.8, 0.99, 1e-6, 0.1), WeightDecay::kDecoupled},
          {radam(5e-3, 0.95, 0.9, 1e-3, 0.05), WeightDecay::kL2},
      };
      for (const CaseOptions& o : options) {
        run_case<P, S>(
            "radam " + suffix, 4, {false, false, false, true}, groups, o,
            [](const RadamHyper& h, double lr, double step) {
              return RadamScalars<T>(lr, h.beta1, h.beta2, h.eps,
                                     h.weight_decay, h.maximize, step);
            },
            [&](const auto& args, const HostEmulator& emu) {
              dispatch<RadamSpec>(args, CallModes{}, emu);
            },
            [&](auto d, T* x, const RadamScalars<T>& s) {
              constexpr WeightDecay kD = decltype(d)::value;
              radam_update<kD>(x[0], x[1], x[2], x[3], s);
            });
      }
    }
    // NAdam: every decay mode, with per-tensor scalar state (mu_product).
    {
      auto nadam = [&](double lr, double b1, double b2, double eps, double wd,
                       double md) {
        NadamHyper h;
        h.lr.value = lr;
        h.beta1 = b1;
        h.beta2 = b2;
        h.eps = eps;
        h.weight_decay = wd;
        h.momentum_decay = md;
        h.maximize = maximize;
        return h;
      };
      const std::vector<std::pair<NadamHyper, WeightDecay>> groups = {
          {nadam(2e-3, 0.9, 0.999, 1e-8, 0.0, 4e-3), WeightDecay::kNone},
          {nadam(3e-2, 0.8, 0.99, 1e-6, 0.1, 1e-2), WeightDecay::kDecoupled},
          {nadam(5e-3, 0.95, 0.9, 1e-3, 0.05, 0.0), WeightDecay::kL2},
      };
      for (const CaseOptions& o : options) {
        run_case<P, S>(
            "nadam " + suffix, 4, {false, false, false, true}, groups, o,
            [](const NadamHyper& h, double lr, double step, double mu_product) {
              return NadamScalars<T>(lr, h.beta1, h.beta2, h.eps,
                                     h.weight_decay, h.momentum_decay,
                                     h.maximize, step, mu_product);
            },
            [&](const auto& args, const HostEmulator& emu) {
              dispatch<NadamSpec>(args, CallModes{}, emu);
            },
            [&](auto d, T* x, const NadamScalars<T>& s) {
              constexpr WeightDecay kD = decltype(d)::value;
              nadam_update<kD>(x[0], x[1], x[2], x[3], s);
            });
      }
    }
    // Lion: decoupled decay or none (its only modes), the decay also
    // corrected (Note [corrected weight decay]: max_lr > 0).
    {
      auto lion = [&](double lr, double b1, double b2, double wd, double max_lr) {
        LionHyper h;
        h.lr.value = lr;
        h.beta1 = b1;
        h.beta2 = b2;
        h.weight_decay = wd;
        h.max_lr = max_lr;
        h.maximize = maximize;
        return h;
      };
      const std::vector<std::pair<LionHyper, WeightDecay>> groups = {
          {lion(1e-3, 0.9, 0.99, 0.0, 0.0), WeightDecay::kNone},
          {lion(3e-2, 0.8, 0.95, 0.1, 0.0), WeightDecay::kDecoupled},
          {lion(3e-2, 0.8, 0.95, 0.1, 5e-2), WeightDecay::kDecoupled},
      };
      for (const CaseOptions& o : options) {
        run_case<P, S>(
            "lion " + suffix, 3, {false, false, false}, groups, o,
            [](const LionHyper& h, double lr, double) {
              return LionScalars<T>(lr, decay_lr(lr, h.max_lr), h.beta1, h.beta2,
                                    h.weight_decay, h.maximize);
            },
            [&](const auto& args, const HostEmulator& emu) {
              dispatch<LionSpec>(args, CallModes{}, emu);
            },
            [&](auto d, T* x, const LionScalars<T>& s) {
              constexpr WeightDecay kD = decltype(d)::value;
              if constexpr (kD != WeightDecay::kL2) {
                lion_update<kD>(x[0], x[1], x[2], s);
              }
            });
      }
    }
  }
}

// ---------------------------------------------------------------------------
// 3. Stochastic rounding is unbiased
// ---------------------------------------------------------------------------

// SGD on bf16 params of 1.0 with lr * grad = 1e-3, far below half a bf16
// ulp (2^-9 just below 1): round-to-nearest leaves every param at 1.0, and
// stochastic rounding must move them to 0.999 on average (the two bf16
// neighbours are 1 - 2^-8 and 1). Also over steps: the key changes with
// the tensor's position, so two tensors draw different bits.
void test_stochastic_rounding_is_unbiased() {
  const int64_t n = 200003;
  for (int round_stochastically = 0; round_stochastically < 2;
       ++round_stochastically) {
    std::vector<__nv_bfloat16> params(2 * n, from_compute<__nv_bfloat16>(1.0f));
    std::vector<__nv_bfloat16> grads(2 * n, from_compute<__nv_bfloat16>(1.0f));
    MultiTensorArgs<SgdHyper> args;
    args.param_dtype = args.state_dtype = ScalarType::kBFloat16;
    args.numels = {n, n};
    args.operands = {{params.data(), params.data() + n},
                     {grads.data(), grads.data() + n}};
    SgdHyper h;
    h.lr.value = 1e-3;
    args.hyper_set = {0, 0};
    args.hypers = {h};
    args.decay = {WeightDecay::kNone};
    args.stochastic_rounding = round_stochastically != 0;
    HostEmulator emu;
    dispatch<SgdSpec>(args, sgd_modes(false, false), emu);
    const double exact = 1.0 - static_cast<double>(static_cast<float>(1e-3));
    for (int t = 0; t < 2; ++t) {
      double sum = 0.0;
      for (int64_t e = 0; e < n; ++e) sum += to_compute(params[t * n + e]);
      const double mean = sum / static_cast<double>(n);
      if (round_stochastically) {
        // Each rounding has standard deviation < 2^-9; the mean of n has
        // < 2^-9 / sqrt(n) = 4.4e-6. 5e-5 is more than 10 of those.
        EXPECT(std::fabs(mean - exact) < 5e-5,
               "stochastic rounding mean %.8f vs %.8f (tensor %d)", mean,
               exact, t);
      } else {
        EXPECT(mean == 1.0, "round to nearest: mean %.8f", mean);
      }
    }
    if (round_stochastically) {
      EXPECT(std::memcmp(params.data(), params.data() + n,
                         n * sizeof(__nv_bfloat16)) != 0,
             "two tensors drew the same rounding bits");
    }
  }
}

// ---------------------------------------------------------------------------
// 4. 64-bit offsets
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
  using Meta = TensorListMeta<4, AdamHyper>;
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

    MultiTensorArgs<AdamHyper> args;
    args.param_dtype = args.state_dtype = dtype_of<scalar_t>();
    args.numels = {numel};
    args.operands.assign(4, std::vector<void*>(1));
    for (int k = 0; k < 4; ++k) {
      // base + window_begin elements == the window's memory.
      const uintptr_t base = reinterpret_cast<uintptr_t>(ops[k].base()) -
                             static_cast<uintptr_t>(window_begin) *
                                 sizeof(scalar_t);
      args.operands[k][0] = reinterpret_cast<void*>(base);
    }
    // The step kernel is not run here: the counter already holds the
    // incremented count, 5.
    float step = 5.0f;
    args.steps = {StepCounter{&step, false}};
    const AdamScalars<T> s(
        make_adam_scalars(1e-3, 0.9, 0.999, 1e-8, 0.1, false, 5));
    AdamHyper h;
    h.lr.value = 1e-3;
    h.beta1 = 0.9;
    h.beta2 = 0.999;
    h.eps = 1e-8;
    h.weight_decay = 0.1;
    args.hyper_set = {0};
    args.hypers = {h};
    args.decay = {WeightDecay::kDecoupled};
    check_multi_tensor_args(args, 4, true);
    int64_t launches = 0;
    plan_launches<4>(args, [&](const Meta& meta) {
      ++launches;
      EXPECT(meta.num_chunks == num_chunks, "num_chunks");
      const ChunkRange r = locate_chunk(meta, chunk);
      EXPECT(r.tensor == 0 && r.begin == window_begin &&
                 r.end == window_begin + window,
             "range of chunk %lld", static_cast<long long>(chunk));
      for (int32_t t = 0; t < kBlockSize; ++t) {
        run_block<AdamOp<false>, scalar_t, scalar_t>(meta, chunk, num_chunks,
                                                     t, kBlockSize);
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

// The reduction of sum_of_squares.cuh, emulated: every chunk of every
// tensor (of several dtypes, with empty ones and a launch split) summed by
// the partial kernel's body and tree, the partials by the tensor kernel's
// body, the total by the finish kernel's body; against a plain double sum.
void test_sum_of_squares() {
  std::mt19937 rng(99);
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  const std::vector<int64_t> sizes = {1, 0, 4099, kChunkSize + 3, 7,
                                      3 * kChunkSize, 33};
  // Tensor i: float (i % 3 == 0), bf16 (1), double (2); many small float
  // tensors after them split the launch.
  std::vector<std::vector<float>> f;
  std::vector<std::vector<__nv_bfloat16>> b;
  std::vector<std::vector<double>> d;
  SumOfSquaresArgs args;
  std::vector<double> want;
  const float grad_scale = 3.0f;
  args.grad_scale = &grad_scale;
  const float inv = inverse_grad_scale(grad_scale);
  auto add = [&](int64_t size, int kind) {
    double sum = 0.0;
    if (kind == 0) {
      f.emplace_back(size);
      for (float& x : f.back()) {
        x = dist(rng);
        const double v = static_cast<double>(x * inv);
        sum += v * v;
      }
      args.data.push_back(f.back().data());
      args.dtypes.push_back(Dtype::kFloat);
    } else if (kind == 1) {
      b.emplace_back(size);
      for (auto& x : b.back()) {
        x = __float2bfloat16_rn(dist(rng));
        const double v = static_cast<double>(__bfloat162float(x) * inv);
        sum += v * v;
      }
      args.data.push_back(b.back().data());
      args.dtypes.push_back(Dtype::kBFloat16);
    } else {
      d.emplace_back(size);
      for (double& x : d.back()) {
        x = dist(rng);
        const double v = x * static_cast<double>(inv);
        sum += v * v;
      }
      args.data.push_back(d.back().data());
      args.dtypes.push_back(Dtype::kDouble);
    }
    args.numels.push_back(size);
    want.push_back(sum);
  };
  f.reserve(1000); b.reserve(1000); d.reserve(1000);
  for (size_t i = 0; i < sizes.size(); ++i) add(sizes[i], static_cast<int>(i % 3));
  for (int i = 0; i < ReduceListMeta::kMaxTensors + 5; ++i) add(1 + i % 5, 0);
  const int64_t n = static_cast<int64_t>(args.numels.size());
  std::vector<double> partials(num_partials(args.numels), NAN);
  std::vector<double> tensor_sums(n, 0.0);  // (the launcher zeroes them)
  int64_t next_partial = 0;
  int launches = 0;
  for (Dtype dtype : kAllDtypes) {
    with_dtype(dtype, [&](auto tag) {
      using P = typename DeviceType<decltype(tag)::value>::type;
      plan_reduce_launches(args, dtype, &next_partial, [&](const ReduceListMeta& meta) {
        ++launches;
        for (int64_t chunk = 0; chunk < meta.num_chunks; ++chunk) {
          double values[kReduceBlockSize];
          for (int t = 0; t < kReduceBlockSize; ++t) {
            values[t] = chunk_thread_sum<P>(meta, chunk, t, kReduceBlockSize, inv);
          }
          for (int stride = kReduceBlockSize / 2; stride > 0; stride /= 2) {
            for (int t = 0; t < kReduceBlockSize; ++t) tree_level(values, stride, t);
          }
          partials[meta.first_partial + chunk] = values[0];
        }
        for (int32_t t = 0; t < meta.num_tensors; ++t) {
          sum_tensor_partials(meta, partials.data(), tensor_sums.data(), t);
        }
      });
    });
  }
  EXPECT(next_partial == static_cast<int64_t>(partials.size()),
         "sum_of_squares: %lld partials planned, %zu allocated",
         static_cast<long long>(next_partial), partials.size());
  EXPECT(launches >= 4, "sum_of_squares: %d launches (expected a split)", launches);
  double total_want = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    total_want += want[i];
    EXPECT(std::fabs(tensor_sums[i] - want[i]) <= 1e-12 * want[i],
           "sum_of_squares: tensor %lld: %.17g vs %.17g", static_cast<long long>(i),
           tensor_sums[i], want[i]);
  }
  double values[kReduceBlockSize];
  for (int t = 0; t < kReduceBlockSize; ++t) {
    values[t] = strided_sum(tensor_sums.data(), n, t, kReduceBlockSize);
  }
  for (int stride = kReduceBlockSize / 2; stride > 0; stride /= 2) {
    for (int t = 0; t < kReduceBlockSize; ++t) tree_level(values, stride, t);
  }
  EXPECT(std::fabs(values[0] - total_want) <= 1e-12 * total_want,
         "sum_of_squares: total %.17g vs %.17g", values[0], total_want);
}

int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);  // keep output if a bug crashes us
  std::printf("planner\n");
  test_plan();
  test_plan_steps();
  test_empty_and_errors();
  std::printf("emulated kernels\n");
  using F = float;
  using D = double;
  using H = __half;
  using B = __nv_bfloat16;
  test_ops<F, F>();
  test_ops<F, B>();
  test_ops<D, D>();
  test_ops<H, H>();
  test_ops<H, F>();
  test_ops<H, B>();
  test_ops<B, B>();
  test_ops<B, F>();
  std::printf("sum of squares\n");
  test_sum_of_squares();
  std::printf("stochastic rounding\n");
  test_stochastic_rounding_is_unbiased();
  std::printf("64-bit offsets\n");
  test_large_offsets<float>();
  test_large_offsets<__nv_bfloat16>();
  test_large_offsets<double>();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
