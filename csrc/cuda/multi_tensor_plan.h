// Host-side planning of the CUDA multi-tensor launches, and the
// chunk -> element-range mapping that the kernels use.
//
// Plain C++17: no CUDA and no torch header, so that all of the bookkeeping
// (which tensor, which elements, which hyperparameters) is unit-tested on a
// machine without a GPU (csrc/cuda/tests/, run by scripts/check_cuda_kernels.sh).
//
// How one op call becomes kernel launches:
//
//   step counters ──plan_step_launches──> StepListMeta #0, #1, ...
//                                          (the step kernel: +1 each, unless
//                                           found_inf; launched first)
//   tensors of the call ──plan_launches──> TensorListMeta #0, #1, ...
//                                          (one per launch, passed BY VALUE as
//                                           the kernel's only parameter)
//
// A TensorListMeta lists up to kMaxTensors non-empty tensors: for each, the
// base address of every operand (param, grad, state..., and the float32
// master weights when the call has them), its element count (int64), its
// first chunk number, whether all its operands are 16-byte aligned, its step
// counter, its position in the call, and a slot into a small table of
// per-group hyperparameters (hyperparams.h: host floats and, for capturable
// steps, the address of the group's lr tensor) plus the weight-decay mode.
// The kernel derives each tensor's scalars from its slot, the lr and its
// step ON THE DEVICE. Tensors of one param group share a slot, so param
// groups cost table entries, not launches. Launch-wide: the AMP pointers
// (grad_scale, found_inf) and the master-weights and stochastic-rounding
// flags.
//
// Nothing in a plan depends on tensor VALUES (only on addresses, element
// counts, dtypes, flags and host floats), so a captured CUDA graph replays
// correctly whatever the values become.
//
// The chunks of a launch are numbered 0 .. num_chunks-1 across its tensors in
// order (tensor t owns chunks first_chunk[t] .. first_chunk[t+1]-1); a block
// takes chunks blockIdx.x, blockIdx.x + gridDim.x, ... and finds each chunk's
// tensor by binary search over first_chunk (locate_chunk). Because a launch
// carries whole tensors and any number of chunks, a tensor never has to be
// split across launches, however large: launches are split only when the
// tensor list or the slot table of the metadata is full.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "fused_optim/hyperparams.h"
#include "fused_optim/macros.h"
#include "fused_optim/storage_table.h"
#include "fused_optim/update_rules.h"

namespace fused_optim::cuda {

// Elements per chunk; one thread block updates one chunk at a time. Why 16K:
// a 256-thread block then makes 8-32 passes of 16-byte vectors per chunk
// (enough to amortise the chunk's lookup), while a bucket of many small
// tensors (LayerNorm weights, biases) still yields enough blocks to fill the
// GPU. Must be a multiple of every vector width (8 elements at most) so that
// every chunk of an aligned tensor starts 16-byte aligned.
constexpr int64_t kChunkSize = 16 * 1024;

// Threads per block. Why 256: small tensors (a few thousand elements) still
// occupy most threads of their block, and at <= 64 registers/thread four
// such blocks fit per SM.
constexpr int kBlockSize = 256;

// Why cap the grid: blocks loop over chunks (grid-stride), so any grid size is
// correct; 64K blocks is far more than any GPU runs at once (132 SMs x 4
// blocks on H100) and keeps gridDim.x far from its limit.
constexpr int64_t kMaxBlocksPerLaunch = 64 * 1024;

// The kernel's parameter space. 4096 bytes is the limit on every driver and
// toolkit (CUDA 12.1+ with driver R530+ allows 32764 bytes on Volta+, but an
// older driver would then fail the launch).
constexpr size_t kMaxKernelParamBytes = 4096;

// Bytes of one vector load/store: 4 fp32, 8 fp16/bf16, 2 fp64 elements.
constexpr uintptr_t kVectorBytes = 16;

static_assert(kChunkSize % 8 == 0, "a chunk must hold whole vectors");

// Element type of an operand, as the launchers see it: the storage table's
// dtype (fused_optim/storage_table.h).
using ScalarType = Dtype;

// Everything a launcher needs from one op call, in host memory. `Hyper` is
// the op's per-group hyperparameter struct (hyperparams.h).
//
// Storage precision (the table of storage_table.h: csrc/op_inputs.h checks
// it for the user; the launchers re-check it, see check_multi_tensor_args):
// params and grads in `param_dtype`, every state operand in `state_dtype`.
// `master`: empty, or one float32 master copy per tensor: the update reads
// the param from it, and writes it and the param (rounded to nearest).
// `stochastic_rounding`: param writes round stochastically (precision.h).
// Which passes a launch of an op with kNormsOfUpdate runs (Note [norms
// across shards] in csrc/op_front.h): both (the measuring pass writes
// tensor_sums, the update reads them), the measuring pass alone (the op's
// `measure` overload: only tensor_sums and the step counters are written,
// and the glue gives the counters as copies), or the update alone, reading
// the caller's tensor_sums (float32 or float64, no measure_partials).
enum class NormPasses { kMeasureAndUpdate, kMeasureOnly, kUpdateOnly };

template <typename Hyper>
struct MultiTensorArgs {
  ScalarType param_dtype = ScalarType::kFloat;
  // Of every state operand; the param dtype when the mode has no state.
  ScalarType state_dtype = ScalarType::kFloat;
  // operands[k][i]: base address of operand k of tensor i, all operands of
  // tensor i laid out alike (dense, same strides), so element e of the
  // update is element e of every operand in memory order. The operand order
  // is the op's (launch.h); unused state lists and the master weights are
  // left out.
  std::vector<std::vector<void*>> operands;
  std::vector<void*> master;         // empty, or float32 per tensor
  std::vector<StepCounter> steps;    // per tensor (SGD: or empty)
  // Per tensor, the op's scalar state (Note [per-tensor scalar state] in
  // hyperparams.h; a one-element float32/float64 tensor each), or empty.
  std::vector<StepCounter> scalar_state;
  // Note [per-tensor norms] (hyperparams.h): for an op whose Hyper has
  // kHasTensorNorms, the device address of the call's [2n] sums of squares
  // (float32, or float64 with tensor_sums_is_double): entry i of tensor i's
  // param (or master weights), entry n + i of its grad. Null otherwise.
  // For an op with kNormsOfUpdate (Note [norms of the update]) the
  // measuring pass WRITES these sums (float64), and needs `measure_partials`:
  // 2 * num_partials(numels) doubles of scratch (two per chunk).
  const void* tensor_sums = nullptr;
  bool tensor_sums_is_double = false;
  double* measure_partials = nullptr;
  NormPasses passes = NormPasses::kMeasureAndUpdate;
  std::vector<int64_t> numels;       // per tensor; 0 = no update (the
                                     // step counter still advances)
  std::vector<int32_t> hyper_set;    // per tensor: index into hypers/decay
  std::vector<Hyper> hypers;         // per distinct set
  std::vector<WeightDecay> decay;    // per distinct set
  // AMP (torch.amp.GradScaler), device addresses of float32 scalars, or
  // null: grads are multiplied by inverse_grad_scale(*grad_scale) and the
  // unscaled grads written back; a non-zero *found_inf skips everything.
  const float* grad_scale = nullptr;
  const float* found_inf = nullptr;
  // Clipping by the global gradient norm: the device address of the norm (a
  // float32 or float64 scalar, grad_norm_is_double), or null. Each tensor's
  // gradient is multiplied by clip_coefficient(norm, its set's
  // max_grad_norm) (update_rules.h).
  const void* grad_norm = nullptr;
  bool grad_norm_is_double = false;
  bool stochastic_rounding = false;
  // Per tensor, the stochastic-rounding stream (PreparedCall's
  // rounding_streams, precision.h); empty: the tensor's position in the
  // call (the front leaves it empty without stochastic rounding).
  std::vector<uint32_t> rounding_streams;
};

// Slots of the per-launch hyperparameter table. Why this budget: about a
// sixth of the parameter space, so 8-10 sets (64-72 bytes each) fit beside
// 43-62 tensors (csrc/cuda/README.md, "Tensors per launch"); a launch then
// covers that many param groups (e.g. layer-wise learning rates) before a
// new one starts.
template <typename Hyper>
constexpr int max_hyper_slots() {
  constexpr size_t kBudgetBytes = 640;
  constexpr size_t slots = kBudgetBytes / sizeof(Hyper);
  return slots < 4 ? 4 : (slots > 16 ? 16 : static_cast<int>(slots));
}

// How many tensors fit in the metadata: the parameter space minus the slot
// table and the launch-wide fields, divided by the bytes per tensor. The 32
// spare bytes cover alignment padding between the arrays; the static_assert
// in plan_launches checks the result against the real struct.
template <int kNumOperands, typename Hyper>
constexpr int max_tensors_per_launch() {
  constexpr size_t kPerTensor =
      (kNumOperands + 1) * sizeof(void*)                  // data, master
      + sizeof(int64_t)                                   // numel
      + sizeof(int64_t)                                   // first_chunk
      + sizeof(void*) + 1                                 // step, its dtype
      + sizeof(int32_t)                                   // index
      + 2                                                 // slot, aligned
      + (HasScalarState<Hyper>::value ? sizeof(void*) + 1 : 0)  // scalar state
      + (HasTensorNorms<Hyper>::value ? sizeof(int32_t) : 0);   // norms' position
  constexpr size_t kFixed =
      (HasTensorNorms<Hyper>::value ? sizeof(void*) + 16 : 0)  // norms
      + (NormsOfUpdate<Hyper>::value ? sizeof(void*) + 8 : 0)  // partials
      // (LARS's metadata carries the two partials fields unused; the
      // static_assert in plan_launches checks that it still fits)
      +
      max_hyper_slots<Hyper>() * (sizeof(Hyper) + 1)  // hyper, decay
      + 3 * sizeof(void*)                             // grad_scale, found_inf, grad_norm
      + sizeof(int64_t) + sizeof(int32_t) + 3         // counters, flags
      + 32;                                           // padding
  return static_cast<int>((kMaxKernelParamBytes - kFixed) / kPerTensor);
}

// Each tensor's scalar state in a launch (its address and dtype), for ops
// that have one (Note [per-tensor scalar state]); empty otherwise.
template <bool kHas, int kMaxTensors>
struct ScalarStateAddresses {
  FO_HOST_DEVICE FO_FORCE_INLINE double read(int32_t) const { return 0.0; }
};
template <int kMaxTensors>
struct ScalarStateAddresses<true, kMaxTensors> {
  void* value[kMaxTensors];
  uint8_t is_double[kMaxTensors];
  FO_HOST_DEVICE FO_FORCE_INLINE double read(int32_t t) const {
    return read_step(value[t], is_double[t] != 0);
  }
};

// Each tensor's norms in a launch (Note [per-tensor norms]): the call's sums
// of squares and each tensor's position in the call, for ops that read them.
// A base of TensorListMeta, empty (and so taking no bytes: the empty-base
// optimization) for the other ops, whose metadata keeps its size.
template <bool kHas, int kMaxTensors>
struct TensorNormsAddresses {
  template <typename Hyper>
  FO_HOST_DEVICE FO_FORCE_INLINE TensorNorms read_norms(int32_t, double,
                                                        double) const {
    return {};
  }
};
template <int kMaxTensors>
struct TensorNormsAddresses<true, kMaxTensors> {
  const void* norm_sums;
  int64_t norm_num_tensors;  // n: the call's; the sums hold 2n entries
  int32_t norm_position[kMaxTensors];  // each tensor's position in the call
  uint8_t norm_sums_is_double;
  // The measuring pass (Note [norms of the update]; null otherwise): chunk c
  // of this launch writes its two partial sums at
  // measure_partials[2 * (first_partial + c)], then each tensor's are summed
  // into norm_sums.
  double* measure_partials;
  int64_t first_partial;  // chunks of the call's earlier launches
  // Tensor t's norms: of the update (kNormsOfUpdate), or of the gradient
  // times `inverse_grad_scale` and `grad_clip` (the factors the loops apply).
  template <typename Hyper>
  FO_HOST_DEVICE FO_FORCE_INLINE TensorNorms read_norms(
      int32_t t, double inverse_grad_scale, double grad_clip) const {
    const int64_t i = norm_position[t];
    double param_sum, grad_sum;
    if (norm_sums_is_double != 0) {
      param_sum = static_cast<const double*>(norm_sums)[i];
      grad_sum = static_cast<const double*>(norm_sums)[norm_num_tensors + i];
    } else {
      param_sum = static_cast<const float*>(norm_sums)[i];
      grad_sum = static_cast<const float*>(norm_sums)[norm_num_tensors + i];
    }
    return norms_from_sums<Hyper>(param_sum, grad_sum, inverse_grad_scale,
                                  grad_clip);
  }
};

// The kernel's only parameter: one launch's tensors. Plain data, copied to
// the GPU with the launch (no allocation, no copy, no sync).
template <int kNumOperands, typename Hyper>
struct TensorListMeta
    : TensorNormsAddresses<HasTensorNorms<Hyper>::value,
                           max_tensors_per_launch<kNumOperands, Hyper>()> {
  using HyperType = Hyper;
  static constexpr int kMaxSlots = max_hyper_slots<Hyper>();
  static constexpr int kMaxTensors =
      max_tensors_per_launch<kNumOperands, Hyper>();

  void* data[kNumOperands][kMaxTensors];  // base address of each operand
  float* master[kMaxTensors];             // float32 master weights, or null
  int64_t numel[kMaxTensors];             // > 0
  int64_t first_chunk[kMaxTensors];       // strictly increasing
  void* step[kMaxTensors];                // its step counter, or null
  Hyper hyper[kMaxSlots];
  const float* grad_scale;  // AMP, or null
  const float* found_inf;   // AMP, or null
  const void* grad_norm;    // clipping, or null
  int64_t num_chunks;       // chunks of all tensors of this launch
  int32_t index[kMaxTensors];  // stochastic-rounding stream (rounding_streams)
  int32_t num_tensors;
  uint8_t slot[kMaxTensors];     // index into hyper / decay
  uint8_t aligned[kMaxTensors];  // all operands 16-byte aligned
  uint8_t step_is_double[kMaxTensors];
  uint8_t decay[kMaxSlots];      // a WeightDecay
  uint8_t grad_norm_is_double;
  uint8_t master_weights;        // master[] is set (the call has them)
  uint8_t stochastic_rounding;
  ScalarStateAddresses<HasScalarState<Hyper>::value, kMaxTensors> scalar_state;
};

// One chunk's elements: [begin, end) of tensor `tensor` of a launch.
struct ChunkRange {
  int32_t tensor;
  int64_t begin;
  int64_t end;
};

// The tensor and element range of chunk `chunk` (0 <= chunk < num_chunks).
// The owner is the last tensor whose first chunk is <= `chunk`; every tensor
// of a launch is non-empty, so first_chunk is strictly increasing and the
// owner is unique. Used by the kernels and by the host tests alike.
template <typename Meta>
FO_HOST_DEVICE FO_FORCE_INLINE ChunkRange locate_chunk(const Meta& meta,
                                                       int64_t chunk) {
  int32_t lo = 0;
  int32_t hi = meta.num_tensors - 1;
  while (lo < hi) {
    // Invariant: first_chunk[lo] <= chunk, and the owner is in [lo, hi].
    const int32_t mid = lo + (hi - lo + 1) / 2;  // > lo, so the loop ends
    if (meta.first_chunk[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  ChunkRange range;
  range.tensor = lo;
  range.begin = (chunk - meta.first_chunk[lo]) * kChunkSize;
  const int64_t stop = range.begin + kChunkSize;
  range.end = stop < meta.numel[lo] ? stop : meta.numel[lo];
  return range;
}

// Blocks of a launch: one per chunk, up to kMaxBlocksPerLaunch.
template <typename Meta>
int64_t launch_blocks(const Meta& meta) {
  return std::min(meta.num_chunks, kMaxBlocksPerLaunch);
}

inline size_t element_size(ScalarType t) {
  switch (t) {
    case ScalarType::kDouble:
      return 8;
    case ScalarType::kFloat:
      return 4;
    default:
      return 2;
  }
}

// Checks what the kernels rely on and throws std::invalid_argument with the
// reason: these are programming errors of the caller (the glue), not user
// errors, which op_inputs.h has reported already.
template <typename Hyper>
void check_multi_tensor_args(const MultiTensorArgs<Hyper>& args,
                             int num_operands, bool allows_decoupled_decay) {
  const size_t n = args.numels.size();
  auto fail = [](const std::string& what) {
    throw std::invalid_argument("fused_optim CUDA launch: " + what);
  };
  if (args.operands.size() != static_cast<size_t>(num_operands)) {
    fail("expected " + std::to_string(num_operands) + " operand lists, got " +
         std::to_string(args.operands.size()));
  }
  for (const std::vector<void*>& list : args.operands) {
    if (list.size() != n) fail("an operand list has the wrong length");
  }
  const bool master = !args.master.empty();
  if (master && args.master.size() != n) fail("master has the wrong length");
  if (!legal_storage(args.param_dtype, args.state_dtype, num_operands > 2,
                     master, args.stochastic_rounding)) {
    fail("a storage combination outside the table (storage_table.h)");
  }
  if (args.steps.size() != n &&
      !(Hyper::kStepsOptional && args.steps.empty())) {
    fail("steps has the wrong length");
  }
  for (const StepCounter& step : args.steps) {
    if (step.data == nullptr) fail("null step counter");
  }
  if ((args.tensor_sums != nullptr) != HasTensorNorms<Hyper>::value) {
    fail("tensor_sums must be given exactly for an op with tensor norms");
  }
  const bool measures =
      NormsOfUpdate<Hyper>::value && args.passes != NormPasses::kUpdateOnly;
  if (measures !=
      (args.measure_partials != nullptr && args.tensor_sums_is_double)) {
    fail("a measuring pass needs float64 tensor_sums and measure_partials, "
         "and nothing else takes measure_partials");
  }
  if (!NormsOfUpdate<Hyper>::value &&
      args.passes != NormPasses::kMeasureAndUpdate) {
    fail("only an op with norms of its update has separate passes");
  }
  if (args.scalar_state.size() != (HasScalarState<Hyper>::value ? n : 0)) {
    fail("scalar_state has the wrong length");
  }
  for (const StepCounter& value : args.scalar_state) {
    if (value.data == nullptr) fail("null scalar state");
  }
  if (args.hyper_set.size() != n) fail("hyper_set has the wrong length");
  if (args.decay.size() != args.hypers.size()) {
    fail("decay and hypers differ in length");
  }
  for (size_t i = 0; i < n; ++i) {
    if (args.numels[i] < 0) fail("negative numel");
    if (args.numels[i] == 0) continue;
    if (args.hyper_set[i] < 0 ||
        static_cast<size_t>(args.hyper_set[i]) >= args.hypers.size()) {
      fail("hyper_set out of range");
    }
    for (const std::vector<void*>& list : args.operands) {
      if (list[i] == nullptr) fail("null operand of a non-empty tensor");
    }
    if (master && args.master[i] == nullptr) {
      fail("null master weight of a non-empty tensor");
    }
  }
  if (n > static_cast<size_t>(INT32_MAX)) fail("too many tensors");
  for (WeightDecay d : args.decay) {
    if (d == WeightDecay::kDecoupled && !allows_decoupled_decay) {
      fail("decoupled weight decay requested for an op without it");
    }
  }
}

// Splits the tensors of `args` into launches and calls `launch(meta)` for
// each, in tensor order. Empty tensors are skipped. `args` must have passed
// check_multi_tensor_args.
template <int kNumOperands, typename Hyper, typename Launch>
void plan_launches(const MultiTensorArgs<Hyper>& args, const Launch& launch) {
  using Meta = TensorListMeta<kNumOperands, Hyper>;
  static_assert(sizeof(Meta) <= kMaxKernelParamBytes,
                "kernel metadata exceeds the kernel parameter space");
  static_assert(std::is_trivially_copyable_v<Meta>,
                "kernel parameters are copied bytewise");
  static_assert(Meta::kMaxTensors > 0 && Meta::kMaxSlots <= 255);

  const bool master = !args.master.empty();
  int64_t chunks_before = 0;  // of the launches already made
  auto fresh = [&] {
    Meta m{};  // value-initialised: all zero
    m.grad_scale = args.grad_scale;
    m.found_inf = args.found_inf;
    m.grad_norm = args.grad_norm;
    m.grad_norm_is_double = args.grad_norm_is_double ? 1 : 0;
    m.master_weights = master ? 1 : 0;
    m.stochastic_rounding = args.stochastic_rounding ? 1 : 0;
    if constexpr (HasTensorNorms<Hyper>::value) {
      m.norm_sums = args.tensor_sums;
      m.norm_num_tensors = static_cast<int64_t>(args.numels.size());
      m.norm_sums_is_double = args.tensor_sums_is_double ? 1 : 0;
      m.measure_partials = args.measure_partials;
      m.first_partial = chunks_before;
    }
    return m;
  };
  Meta meta = fresh();
  int num_slots = 0;
  std::vector<int> slot_of_set(args.hypers.size(), -1);  // in `meta`
  std::vector<int32_t> sets_in_meta;

  auto flush = [&] {
    if (meta.num_tensors == 0) return;
    launch(static_cast<const Meta&>(meta));
    chunks_before += meta.num_chunks;
    for (int32_t set : sets_in_meta) slot_of_set[set] = -1;
    sets_in_meta.clear();
    num_slots = 0;
    meta = fresh();
  };

  auto is_aligned = [](const void* p) {
    return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0;
  };
  for (size_t i = 0; i < args.numels.size(); ++i) {
    const int64_t numel = args.numels[i];
    if (numel == 0) continue;
    const int32_t set = args.hyper_set[i];
    const bool needs_slot = slot_of_set[set] < 0;
    if (meta.num_tensors == Meta::kMaxTensors ||
        (needs_slot && num_slots == Meta::kMaxSlots)) {
      flush();
    }
    if (slot_of_set[set] < 0) {  // (again: flush() frees every slot)
      slot_of_set[set] = num_slots;
      sets_in_meta.push_back(set);
      meta.hyper[num_slots] = args.hypers[set];
      meta.decay[num_slots] = static_cast<uint8_t>(args.decay[set]);
      ++num_slots;
    }
    const int32_t t = meta.num_tensors++;
    bool aligned = true;
    for (int k = 0; k < kNumOperands; ++k) {
      void* const p = args.operands[k][i];
      meta.data[k][t] = p;
      aligned = aligned && is_aligned(p);
    }
    if (master) {
      meta.master[t] = static_cast<float*>(args.master[i]);
      aligned = aligned && is_aligned(args.master[i]);
    }
    if (!args.steps.empty()) {
      meta.step[t] = args.steps[i].data;
      meta.step_is_double[t] = args.steps[i].is_double ? 1 : 0;
    }
    if constexpr (HasScalarState<Hyper>::value) {
      meta.scalar_state.value[t] = args.scalar_state[i].data;
      meta.scalar_state.is_double[t] = args.scalar_state[i].is_double ? 1 : 0;
    }
    if constexpr (HasTensorNorms<Hyper>::value) {
      meta.norm_position[t] = static_cast<int32_t>(i);
    }
    meta.numel[t] = numel;
    meta.first_chunk[t] = meta.num_chunks;
    meta.num_chunks += (numel + kChunkSize - 1) / kChunkSize;
    meta.index[t] = static_cast<int32_t>(
        args.rounding_streams.empty() ? static_cast<uint32_t>(i)
                                      : args.rounding_streams[i]);
    meta.slot[t] = static_cast<uint8_t>(slot_of_set[set]);
    meta.aligned[t] = aligned ? 1 : 0;
  }
  flush();
}

// ---------------------------------------------------------------------------
// The step kernel's metadata
// ---------------------------------------------------------------------------

// Threads per block of the step kernel.
constexpr int kStepBlockSize = 128;

// One launch of the step kernel: up to kMaxSteps counters, each incremented
// by one in its own dtype (torch.optim's `step_t += 1`), unless *found_inf
// is non-zero.
struct StepListMeta {
  static constexpr int kMaxSteps = static_cast<int>(
      (kMaxKernelParamBytes - sizeof(void*) - sizeof(int32_t) - 16) /
      (sizeof(void*) + 1));
  void* step[kMaxSteps];
  const float* found_inf;
  int32_t count;
  uint8_t is_double[kMaxSteps];
};
static_assert(sizeof(StepListMeta) <= kMaxKernelParamBytes);

// Splits `steps` (ALL the call's counters, empty tensors' included: torch
// advances them too) into step-kernel launches, calling launch(meta, blocks).
template <typename Launch>
void plan_step_launches(const std::vector<StepCounter>& steps,
                        const float* found_inf, const Launch& launch) {
  StepListMeta meta{};
  auto flush = [&] {
    if (meta.count == 0) return;
    const int64_t blocks = (meta.count + kStepBlockSize - 1) / kStepBlockSize;
    launch(static_cast<const StepListMeta&>(meta), blocks);
    meta = StepListMeta{};
  };
  for (const StepCounter& s : steps) {
    if (meta.count == StepListMeta::kMaxSteps) flush();
    meta.found_inf = found_inf;
    meta.step[meta.count] = s.data;
    meta.is_double[meta.count] = s.is_double ? 1 : 0;
    ++meta.count;
  }
  flush();
}

// The step kernel's body for thread `thread` of `num_threads` (all blocks).
FO_HOST_DEVICE FO_FORCE_INLINE void increment_steps(const StepListMeta& meta,
                                                    int64_t thread,
                                                    int64_t num_threads) {
  // Note [found_inf early exit]: a non-zero found_inf (AMP found an inf or
  // NaN gradient) skips the whole step, step counters included, as
  // torch.optim's skipped step does; read on the device, so no host sync.
  if (meta.found_inf != nullptr && *meta.found_inf != 0.0f) return;
  for (int64_t i = thread; i < meta.count; i += num_threads) {
    if (meta.is_double[i]) {
      *static_cast<double*>(meta.step[i]) += 1.0;
    } else {
      *static_cast<float*>(meta.step[i]) += 1.0f;
    }
  }
}

// ---------------------------------------------------------------------------
// The scalar-state kernel's metadata (Note [per-tensor scalar state])
// ---------------------------------------------------------------------------

// One launch of the scalar-state kernel: up to kMaxValues tensors' scalar
// state, each advanced by its group's Hyper::advance_scalar_state from its
// (already incremented) step counter, unless *found_inf is non-zero.
// Launched after the step kernel and before the main kernel, which reads
// the new values.
template <typename Hyper>
struct ScalarStateMeta {
  static constexpr int kMaxSlots = max_hyper_slots<Hyper>();
  static constexpr int kMaxValues = static_cast<int>(
      (kMaxKernelParamBytes - kMaxSlots * sizeof(Hyper) - sizeof(void*) -
       sizeof(int32_t) - 32) /
      (2 * sizeof(void*) + 3));
  void* value[kMaxValues];
  void* step[kMaxValues];
  Hyper hyper[kMaxSlots];
  const float* found_inf;
  int32_t count;
  uint8_t value_is_double[kMaxValues];
  uint8_t step_is_double[kMaxValues];
  uint8_t slot[kMaxValues];
};

// Splits the scalar state of `args` (every tensor's, empty tensors'
// included: torch advances them too) into launches, calling
// launch(meta, blocks).
template <typename Hyper, typename Launch>
void plan_scalar_state_launches(const MultiTensorArgs<Hyper>& args,
                                const Launch& launch) {
  if constexpr (HasScalarState<Hyper>::value) {
    using Meta = ScalarStateMeta<Hyper>;
    static_assert(sizeof(Meta) <= kMaxKernelParamBytes);
    static_assert(std::is_trivially_copyable_v<Meta>);
    Meta meta{};
    int num_slots = 0;
    std::vector<int> slot_of_set(args.hypers.size(), -1);
    auto flush = [&] {
      if (meta.count == 0) return;
      const int64_t blocks = (meta.count + kStepBlockSize - 1) / kStepBlockSize;
      launch(static_cast<const Meta&>(meta), blocks);
      meta = Meta{};
      num_slots = 0;
      std::fill(slot_of_set.begin(), slot_of_set.end(), -1);
    };
    for (size_t i = 0; i < args.scalar_state.size(); ++i) {
      const int32_t set = args.hyper_set[i];
      if (meta.count == Meta::kMaxValues ||
          (slot_of_set[set] < 0 && num_slots == Meta::kMaxSlots)) {
        flush();
      }
      if (slot_of_set[set] < 0) {
        slot_of_set[set] = num_slots;
        meta.hyper[num_slots++] = args.hypers[set];
      }
      const int32_t k = meta.count++;
      meta.found_inf = args.found_inf;
      meta.value[k] = args.scalar_state[i].data;
      meta.value_is_double[k] = args.scalar_state[i].is_double ? 1 : 0;
      meta.step[k] = args.steps.empty() ? nullptr : args.steps[i].data;
      meta.step_is_double[k] =
          !args.steps.empty() && args.steps[i].is_double ? 1 : 0;
      meta.slot[k] = static_cast<uint8_t>(slot_of_set[set]);
    }
    flush();
  }
}

// The scalar-state kernel's body for thread `thread` of `num_threads`.
template <typename Hyper>
FO_HOST_DEVICE FO_FORCE_INLINE void advance_scalar_states(
    const ScalarStateMeta<Hyper>& meta, int64_t thread, int64_t num_threads) {
  // Note [found_inf early exit], as the step kernel.
  if (meta.found_inf != nullptr && *meta.found_inf != 0.0f) return;
  if constexpr (HasScalarState<Hyper>::value) {  // (else never launched)
  for (int64_t i = thread; i < meta.count; i += num_threads) {
    const Hyper& h = meta.hyper[meta.slot[i]];
    const double step = meta.step[i] == nullptr
                            ? 0.0
                            : read_step(meta.step[i], meta.step_is_double[i] != 0);
    const double lr = h.lr.read();
    if (meta.value_is_double[i]) {
      double* v = static_cast<double*>(meta.value[i]);
      *v = h.advance_scalar_state(lr, step, *v);
    } else {
      float* v = static_cast<float*>(meta.value[i]);
      *v = h.advance_scalar_state(lr, step, *v);
    }
  }
  }
}

}  // namespace fused_optim::cuda
