// Host-side planning of the CUDA multi-tensor launches, and the
// chunk -> element-range mapping that the kernels use.
//
// Plain C++17: no CUDA and no torch header, so that all of the bookkeeping
// (which tensor, which elements, which hyperparameters) is unit-tested on a
// machine without a GPU (csrc/cuda/tests/, run by scripts/check_cuda_kernels.sh).
//
// How one op call becomes kernel launches:
//
//   tensors of the call ──plan_launches──> TensorListMeta #0, #1, ...
//                                          (one per launch, passed BY VALUE as
//                                           the kernel's only parameter)
//
// A TensorListMeta lists up to kMaxTensors non-empty tensors: for each, the
// base address of every operand (param, grad, state...), its element count
// (int64), its first chunk number, whether all its operands are 16-byte
// aligned, and a slot into a small table of per-tensor scalars (the narrowed
// *Scalars structs of update_rules.h, plus the weight-decay mode). Tensors of
// one param group at one step share a slot, so param groups cost table
// entries, not launches.
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

#include "fused_optim/macros.h"
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

// Element type of the tensors of a call, as the launchers see it.
enum class ScalarType : uint8_t { kFloat, kDouble, kHalf, kBFloat16 };

// Everything a launcher needs from one op call, in host memory.
// `Scalars` is the narrowed per-tensor scalar struct, e.g.
// AdamScalars<float> (fp16/bf16/fp32 params) or AdamScalars<double> (fp64).
template <typename Scalars>
struct MultiTensorArgs {
  ScalarType dtype = ScalarType::kFloat;
  // operands[k][i]: base address of operand k of tensor i, all operands of
  // tensor i laid out alike (dense, same strides), so element e of the
  // update is element e of every operand in memory order. The operand order
  // is the op's (launch.h); unused state lists are left out.
  std::vector<std::vector<void*>> operands;
  std::vector<int64_t> numels;        // per tensor; 0 = skipped
  std::vector<int32_t> scalar_set;    // per tensor: index into scalars/decay
  std::vector<Scalars> scalars;       // per distinct set
  std::vector<WeightDecay> decay;     // per distinct set
};

// Fills args.scalar_set, args.scalars and args.decay for `n` tensors: tensors
// whose `key_of(i)` are equal share one set, made once by `make(i)`, which
// returns {Scalars, WeightDecay}. Keys are e.g. (group, step): the scalars
// depend on nothing else, and deriving them (pow, sqrt in double) once per
// group rather than per tensor keeps thousands of tensors cheap.
template <typename Scalars, typename KeyOf, typename Make>
void assign_scalar_sets(MultiTensorArgs<Scalars>& args, int64_t n,
                        const KeyOf& key_of, const Make& make) {
  using Key = std::decay_t<decltype(key_of(int64_t{0}))>;
  std::map<Key, int32_t> set_of_key;
  args.scalar_set.assign(static_cast<size_t>(n), 0);
  args.scalars.clear();
  args.decay.clear();
  for (int64_t i = 0; i < n; ++i) {
    const auto [it, inserted] = set_of_key.try_emplace(
        key_of(i), static_cast<int32_t>(args.scalars.size()));
    if (inserted) {
      const std::pair<Scalars, WeightDecay> made = make(i);
      args.scalars.push_back(made.first);
      args.decay.push_back(made.second);
    }
    args.scalar_set[static_cast<size_t>(i)] = it->second;
  }
}

// Slots of the per-launch scalar table. Why this budget: about a sixth of
// the parameter space, so 16 float sets (Adam: 40 bytes each) or 8 double
// sets fit beside 60-80 tensors; a launch then covers 8-16 param groups
// (e.g. layer-wise learning rates) before a new one starts.
template <typename Scalars>
constexpr int max_scalar_slots() {
  constexpr size_t kBudgetBytes = 640;
  constexpr size_t slots = kBudgetBytes / sizeof(Scalars);
  return slots < 4 ? 4 : (slots > 16 ? 16 : static_cast<int>(slots));
}

// How many tensors fit in the metadata: the parameter space minus the slot
// table and the counters, divided by the bytes per tensor. The 32 spare
// bytes cover alignment padding between the arrays; the static_assert below
// checks the result against the real struct.
template <int kNumOperands, typename Scalars>
constexpr int max_tensors_per_launch() {
  constexpr size_t kPerTensor = kNumOperands * sizeof(void*)  // data
                                + sizeof(int64_t)             // numel
                                + sizeof(int64_t)             // first_chunk
                                + 2;                          // slot, aligned
  constexpr size_t kFixed =
      max_scalar_slots<Scalars>() * (sizeof(Scalars) + 1)  // scalars, decay
      + sizeof(int64_t) + sizeof(int32_t)                  // counters
      + 32;                                                // padding
  return static_cast<int>((kMaxKernelParamBytes - kFixed) / kPerTensor);
}

// The kernel's only parameter: one launch's tensors. Plain data, copied to
// the GPU with the launch (no allocation, no copy, no sync).
template <int kNumOperands, typename Scalars>
struct TensorListMeta {
  static constexpr int kMaxSlots = max_scalar_slots<Scalars>();
  static constexpr int kMaxTensors =
      max_tensors_per_launch<kNumOperands, Scalars>();

  void* data[kNumOperands][kMaxTensors];  // base address of each operand
  int64_t numel[kMaxTensors];             // > 0
  int64_t first_chunk[kMaxTensors];       // strictly increasing
  Scalars scalars[kMaxSlots];
  int64_t num_chunks;  // chunks of all tensors of this launch
  int32_t num_tensors;
  uint8_t slot[kMaxTensors];     // index into scalars / decay
  uint8_t aligned[kMaxTensors];  // all operands 16-byte aligned
  uint8_t decay[kMaxSlots];      // a WeightDecay
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

// Checks what the kernels rely on and throws std::invalid_argument with the
// reason: these are programming errors of the caller (the glue), not user
// errors, which op_inputs.h has reported already.
template <typename Scalars>
void check_multi_tensor_args(const MultiTensorArgs<Scalars>& args,
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
  if (args.scalar_set.size() != n) fail("scalar_set has the wrong length");
  if (args.decay.size() != args.scalars.size()) {
    fail("decay and scalars differ in length");
  }
  for (size_t i = 0; i < n; ++i) {
    if (args.numels[i] < 0) fail("negative numel");
    if (args.numels[i] == 0) continue;
    if (args.scalar_set[i] < 0 ||
        static_cast<size_t>(args.scalar_set[i]) >= args.scalars.size()) {
      fail("scalar_set out of range");
    }
    for (const std::vector<void*>& list : args.operands) {
      if (list[i] == nullptr) fail("null operand of a non-empty tensor");
    }
  }
  for (WeightDecay d : args.decay) {
    if (d == WeightDecay::kDecoupled && !allows_decoupled_decay) {
      fail("decoupled weight decay requested for an op without it");
    }
  }
}

// Splits the tensors of `args` into launches and calls `launch(meta)` for
// each, in tensor order. Empty tensors are skipped. `args` must have passed
// check_multi_tensor_args.
template <int kNumOperands, typename Scalars, typename Launch>
void plan_launches(const MultiTensorArgs<Scalars>& args, const Launch& launch) {
  using Meta = TensorListMeta<kNumOperands, Scalars>;
  static_assert(sizeof(Meta) <= kMaxKernelParamBytes,
                "kernel metadata exceeds the kernel parameter space");
  static_assert(std::is_trivially_copyable_v<Meta>,
                "kernel parameters are copied bytewise");
  static_assert(Meta::kMaxTensors > 0 && Meta::kMaxSlots <= 255);

  Meta meta{};  // value-initialised: all zero
  int num_slots = 0;
  std::vector<int> slot_of_set(args.scalars.size(), -1);  // in `meta`
  std::vector<int32_t> sets_in_meta;

  auto flush = [&] {
    if (meta.num_tensors == 0) return;
    launch(static_cast<const Meta&>(meta));
    for (int32_t set : sets_in_meta) slot_of_set[set] = -1;
    sets_in_meta.clear();
    num_slots = 0;
    meta = Meta{};
  };

  for (size_t i = 0; i < args.numels.size(); ++i) {
    const int64_t numel = args.numels[i];
    if (numel == 0) continue;
    const int32_t set = args.scalar_set[i];
    const bool needs_slot = slot_of_set[set] < 0;
    if (meta.num_tensors == Meta::kMaxTensors ||
        (needs_slot && num_slots == Meta::kMaxSlots)) {
      flush();
    }
    if (slot_of_set[set] < 0) {  // (again: flush() frees every slot)
      slot_of_set[set] = num_slots;
      sets_in_meta.push_back(set);
      meta.scalars[num_slots] = args.scalars[set];
      meta.decay[num_slots] = static_cast<uint8_t>(args.decay[set]);
      ++num_slots;
    }
    const int32_t t = meta.num_tensors++;
    bool aligned = true;
    for (int k = 0; k < kNumOperands; ++k) {
      void* const p = args.operands[k][i];
      meta.data[k][t] = p;
      aligned = aligned && reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0;
    }
    meta.numel[t] = numel;
    meta.first_chunk[t] = meta.num_chunks;
    meta.num_chunks += (numel + kChunkSize - 1) / kChunkSize;
    meta.slot[t] = static_cast<uint8_t>(slot_of_set[set]);
    meta.aligned[t] = aligned ? 1 : 0;
  }
  flush();
}

}  // namespace fused_optim::cuda
