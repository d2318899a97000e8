// The CUDA multi-tensor apply: one kernel launch updates many tensors, each
// with its own hyperparameters (multi_tensor_plan.h explains the metadata).
//
// The per-element math is NOT here: an element op (element_ops.h) loads
// nothing and stores nothing, it only calls its update rule from
// update_rules.h on values in registers. This file moves the bytes, and
// converts between storage and compute types:
//   - param/grad dtype P and state dtype S may differ (bf16 params with fp32
//     state, fp32 params with bf16 state, ...), with optional float32 master
//     weights: a thread takes kElems = 16 / max(sizeof P, sizeof S) elements
//     per iteration, and loads each operand in as many 16-byte (or one
//     8-byte) vectors as those elements need;
//   - clipping by the global gradient norm: each chunk's clip factor is
//     derived on the device from the norm tensor and its group's
//     max_grad_norm, and multiplies the gradient in registers;
//   - aligned tensors (every operand 16-byte aligned) take that vector path,
//     then a scalar tail; misaligned tensors (e.g. views at an odd storage
//     offset) take scalar accesses, still coalesced across a warp;
//   - AMP: grads are unscaled in registers (and written back), a non-zero
//     found_inf skips the launch; stochastic rounding of bf16 param writes.
// Compute type: float for fp16/bf16/fp32 params, double for fp64, as on the
// CPU. Indexing is int64 everywhere: a tensor may have more than 2^31
// elements.
//
// Includes CUDA headers and our own only (no torch): CI compile-checks this
// with plain nvcc against a CPU-only torch.
//
// The block body (run_block) is __host__ __device__ and takes its block and
// thread indices as arguments, so the host tests run the exact kernel code by
// looping over blocks and threads (threads of a block touch disjoint elements
// and never communicate, so a serial loop is a faithful emulation).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "cuda/multi_tensor_plan.h"
#include "fused_optim/element_ops.h"
#include "fused_optim/hyperparams.h"
#include "fused_optim/macros.h"
#include "fused_optim/precision.h"
#include "fused_optim/storage_table.h"
#include "fused_optim/update_rules.h"

namespace fused_optim::cuda {

// ---------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------

// The type the update rules compute in, for each storage type.
template <typename scalar_t>
struct ComputeTypeOf {
  using type = float;
};
template <>
struct ComputeTypeOf<double> {
  using type = double;
};
template <typename scalar_t>
using compute_t = typename ComputeTypeOf<scalar_t>::type;

// Conversions by intrinsic: torch's extension build defines
// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__, which
// remove __half's implicit conversions. Narrowing rounds to nearest even,
// as c10::Half / c10::BFloat16 do on the CPU.
FO_HOST_DEVICE FO_FORCE_INLINE float to_compute(float x) { return x; }
FO_HOST_DEVICE FO_FORCE_INLINE double to_compute(double x) { return x; }
FO_HOST_DEVICE FO_FORCE_INLINE float to_compute(__half x) {
  return __half2float(x);
}
FO_HOST_DEVICE FO_FORCE_INLINE float to_compute(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename scalar_t>
FO_HOST_DEVICE FO_FORCE_INLINE scalar_t from_compute(compute_t<scalar_t> x);
template <>
FO_HOST_DEVICE FO_FORCE_INLINE float from_compute<float>(float x) {
  return x;
}
template <>
FO_HOST_DEVICE FO_FORCE_INLINE double from_compute<double>(double x) {
  return x;
}
template <>
FO_HOST_DEVICE FO_FORCE_INLINE __half from_compute<__half>(float x) {
  return __float2half_rn(x);
}
template <>
FO_HOST_DEVICE FO_FORCE_INLINE __nv_bfloat16 from_compute<__nv_bfloat16>(
    float x) {
  return __float2bfloat16_rn(x);
}

// The bf16 whose bits are `bits`.
FO_HOST_DEVICE FO_FORCE_INLINE __nv_bfloat16 bf16_from_bits(uint16_t bits) {
  __nv_bfloat16_raw raw;
  raw.x = bits;
  return __nv_bfloat16(raw);
}

// ---------------------------------------------------------------------------
// Vectors
// ---------------------------------------------------------------------------

// Elements a thread takes per iteration of the vector path: one 16-byte
// vector of the widest operand type, the float32 master weights included
// when the call has them (4 for fp32 params with bf16 state, 8 for bf16/fp16
// params with bf16/fp16 state and no master weights, 2 for fp64). Narrower
// operands then load 8 bytes (e.g. 4 bf16).
template <typename P, typename S, bool kMaster = false>
constexpr int kElems = static_cast<int>(
    kVectorBytes / (sizeof(P) > sizeof(S) ? (kMaster && sizeof(P) < 4 ? 4 : sizeof(P))
                                          : (kMaster && sizeof(S) < 4 ? 4 : sizeof(S))));

// kE elements of one operand, aligned so that a load or store of the whole
// struct compiles to 16-byte (or, below 16 bytes, one 8-byte) accesses:
// LDG.E.128 / LDG.E.64.
template <typename U, int kE>
struct alignas(kE * sizeof(U) < kVectorBytes ? kE * sizeof(U) : kVectorBytes)
    Pack {
  U v[kE];
};
static_assert(sizeof(Pack<__nv_bfloat16, 4>) == 8 &&
              alignof(Pack<__nv_bfloat16, 4>) == 8);
static_assert(sizeof(Pack<float, 8>) == 32 && alignof(Pack<float, 8>) == 16);
static_assert(kElems<__half, float> == 4 &&
              kElems<__nv_bfloat16, __nv_bfloat16> == 8 &&
              kElems<__nv_bfloat16, __nv_bfloat16, true> == 4);
static_assert(kChunkSize % 8 == 0, "chunks start on vector boundaries");

template <typename U, int kE>
FO_HOST_DEVICE FO_FORCE_INLINE Pack<U, kE> load_pack(const U* p) {
  return *reinterpret_cast<const Pack<U, kE>*>(p);
}
template <typename U, int kE>
FO_HOST_DEVICE FO_FORCE_INLINE void store_pack(U* p, const Pack<U, kE>& x) {
  *reinterpret_cast<Pack<U, kE>*>(p) = x;
}

// Calls fn(TypeTag<P>{}, TypeTag<S>{}) for the storage dtypes of a call,
// instantiating only the pairs of the storage table (storage_table.h): for
// an element op with state, every legal (param, state) pair; without state
// (`kHasState` false), the four with S = P.
template <typename T>
struct TypeTag {
  using type = T;
};

template <Dtype>
struct DeviceType;
template <>
struct DeviceType<Dtype::kFloat> { using type = float; };
template <>
struct DeviceType<Dtype::kDouble> { using type = double; };
template <>
struct DeviceType<Dtype::kHalf> { using type = __half; };
template <>
struct DeviceType<Dtype::kBFloat16> { using type = __nv_bfloat16; };

template <bool kHasState, typename Fn>
cudaError_t with_storage_types(Dtype param, Dtype state, const Fn& fn) {
  return with_dtype(param, [&](auto param_tag) {
    return with_dtype(state, [&](auto state_tag) -> cudaError_t {
      constexpr Dtype kParam = decltype(param_tag)::value;
      constexpr Dtype kState = decltype(state_tag)::value;
      if constexpr (legal_storage(kParam, kState, kHasState,
                                  /*master_weights=*/false,
                                  /*stochastic_rounding=*/false)) {
        return fn(TypeTag<typename DeviceType<kParam>::type>{},
                  TypeTag<typename DeviceType<kState>::type>{});
      } else {
        throw std::invalid_argument(
            "fused_optim CUDA launch: unsupported (param, state) dtype pair");
      }
    });
  });
}

// ---------------------------------------------------------------------------
// The block body
// ---------------------------------------------------------------------------

// How the param is loaded and stored. Uniform across a launch; a template
// parameter of the chunk loop (the loop is compiled once per mode the param
// type allows), because each mode keeps different values live: as a
// run-time branch inside one loop, the float32 master vector and the
// rounding counter would cost registers in every mode (ptxas then spilled
// hundreds of bytes in the fp16/bf16 kernels).
enum class ParamMode {
  kPlain,       // load and store the param (round to nearest)
  kMaster,      // load the float32 master copy; store it and the param
                // rounded to nearest (fp16/bf16 params)
  kStochastic,  // load the param, store it rounded stochastically (bf16)
};

// What else is uniform across a launch (read once per block) and a chunk,
// for compute type T.
template <typename T>
struct ElementFlags {
  bool unscale = false;  // grad *= inv_scale, and written back
  float inv_scale = 1.0f;
  T grad_clip = T(1);    // per chunk: the group's clip_coefficient, or 1
  uint32_t rounding_key = 0;  // per chunk: key(tensor's index, step)
};

// An element's operands in the compute type, as the update and the
// measuring pass read them: the param (its master copy m with kMaster), the
// gradient unscaled and clipped (clipping in registers only: 1 when not
// clipped), state operand k from state_at(k). Returns the unscaled,
// unclipped gradient (what AMP writes back).
template <bool kMaster, int kN, typename T, typename P, typename StateAt>
FO_HOST_DEVICE FO_FORCE_INLINE T load_operands(T (&r)[kN], const P& p, float m,
                                               const P& g, const StateAt& state_at,
                                               const ElementFlags<T>& f) {
  if constexpr (kMaster) {
    r[0] = m;
  } else {
    r[0] = to_compute(p);
  }
  r[1] = to_compute(g);
  if (f.unscale) r[1] = r[1] * static_cast<T>(f.inv_scale);
  const T unscaled = r[1];
  r[1] = r[1] * f.grad_clip;
#pragma unroll
  for (int k = 2; k < kN; ++k) r[k] = to_compute(state_at(k));
  return unscaled;
}

// One element: param p (or master m), grad g, state st[] in storage types,
// updated in place. `element` is its 0-based index in its tensor (the
// stochastic-rounding counter).
template <typename Op, WeightDecay kDecay, ParamMode kMode, typename P,
          typename S, int kNS, typename Scalars>
FO_HOST_DEVICE FO_FORCE_INLINE void update_element(P& p, P& g, S (&st)[kNS],
                                                   float& m,
                                                   const Scalars& s,
                                                   const ElementFlags<compute_t<P>>& f,
                                                   int64_t element) {
  using T = compute_t<P>;
  constexpr int kN = Op::kNumOperands;
  T r[kN];
  const T unscaled = load_operands<kMode == ParamMode::kMaster>(
      r, p, m, g, [&](int k) { return st[k - 2]; }, f);
  // The update uses the unscaled value; the grad tensor gets it rounded to
  // its dtype.
  if (f.unscale) g = from_compute<P>(unscaled);
  Op::template update<kDecay>(r, s);
  if constexpr (kMode == ParamMode::kMaster) m = r[0];
  if constexpr (kMode == ParamMode::kStochastic) {
    static_assert(std::is_same_v<P, __nv_bfloat16>);
    p = bf16_from_bits(bf16_bits_round_stochastic(
        r[0], stochastic_rounding_bits(f.rounding_key, element)));
  } else {
    p = from_compute<P>(r[0]);
  }
#pragma unroll
  for (int k = 2; k < kN; ++k) {
    if (Op::is_written(k)) st[k - 2] = from_compute<S>(r[k]);
  }
}

// Updates elements [begin, end) of tensor `tensor` of `meta` (one chunk, so
// end - begin <= kChunkSize) with the threads `thread` of `num_threads` of
// one block, with the tensor's scalars `s`.
//
// Offsets: the chunk's start `begin` is int64 (a tensor may have more than
// 2^31 elements) and is added to each operand's base address once per chunk;
// offsets inside the chunk are below kChunkSize and use int32, which saves
// the registers of 64-bit index arithmetic in the loops.
//
// An element op (element_ops.h) provides:
//   kNumOperands             operands per element (param, grad, state...)
//   is_written(k)            whether operand k is stored back
//   update<kDecay>(x, s)     the update rule on x[kNumOperands] in registers
template <typename Op, typename P, typename S, WeightDecay kDecay,
          ParamMode kMode, typename Meta, typename Scalars>
FO_HOST_DEVICE FO_FORCE_INLINE void update_range(
    const Meta& meta, int32_t tensor, int64_t begin, int64_t end,
    const Scalars& s, const ElementFlags<compute_t<P>>& f, int32_t thread,
    int32_t num_threads) {
  static_assert(kChunkSize <= (int64_t{1} << 30),
                "offsets inside a chunk must fit int32");
  constexpr int kN = Op::kNumOperands;
  constexpr int kNS = kN > 2 ? kN - 2 : 1;  // state operands (>= 1 entry)
  constexpr bool kMaster = kMode == ParamMode::kMaster;
  constexpr int kE = kElems<P, S, kMaster>;
  P* const param = static_cast<P*>(meta.data[0][tensor]) + begin;
  P* const grad = static_cast<P*>(meta.data[1][tensor]) + begin;
  S* state[kNS];
#pragma unroll
  for (int k = 2; k < kN; ++k) {
    state[k - 2] = static_cast<S*>(meta.data[k][tensor]) + begin;
  }
  float* const master = kMaster ? meta.master[tensor] + begin : nullptr;
  const int32_t count = static_cast<int32_t>(end - begin);  // <= kChunkSize

  int32_t scalar_begin = 0;
  if (meta.aligned[tensor]) {
    // Every operand base is 16-byte aligned and `begin` is a multiple of
    // kChunkSize (a multiple of kE), so each operand + j * kE starts an
    // aligned Pack. Consecutive threads take consecutive packs, so a warp
    // moves 256-512 contiguous bytes per operand.
    const int32_t num_packs = count / kE;
#pragma unroll 1
    for (int32_t j = thread; j < num_packs; j += num_threads) {
      const int32_t o = j * kE;
      Pack<P, kE> xp;
      Pack<float, kE> xm;
      if constexpr (kMaster) {
        xm = load_pack<float, kE>(master + o);  // the param is not read
      } else {
        xp = load_pack<P, kE>(param + o);
      }
      Pack<P, kE> xg = load_pack<P, kE>(grad + o);
      Pack<S, kE> xs[kNS];
#pragma unroll
      for (int k = 2; k < kN; ++k) xs[k - 2] = load_pack<S, kE>(state[k - 2] + o);
#pragma unroll
      for (int l = 0; l < kE; ++l) {
        S st[kNS];
#pragma unroll
        for (int k = 2; k < kN; ++k) st[k - 2] = xs[k - 2].v[l];
        update_element<Op, kDecay, kMode>(xp.v[l], xg.v[l], st, xm.v[l], s,
                                          f, begin + o + l);
#pragma unroll
        for (int k = 2; k < kN; ++k) xs[k - 2].v[l] = st[k - 2];
      }
      store_pack<P, kE>(param + o, xp);
      if constexpr (kMaster) store_pack<float, kE>(master + o, xm);
      if (f.unscale) store_pack<P, kE>(grad + o, xg);
#pragma unroll
      for (int k = 2; k < kN; ++k) {
        if (Op::is_written(k)) store_pack<S, kE>(state[k - 2] + o, xs[k - 2]);
      }
    }
    // The tail (fewer than kE elements, only in a tensor's last chunk).
    scalar_begin = num_packs * kE;
  }

  // Scalar path: the tail of an aligned chunk, or all of a misaligned one.
#pragma unroll 1
  for (int32_t i = scalar_begin + thread; i < count; i += num_threads) {
    P xp;
    float xm = 0.0f;
    if constexpr (kMaster) {
      xm = master[i];
    } else {
      xp = param[i];
    }
    P xg = grad[i];
    S st[kNS];
#pragma unroll
    for (int k = 2; k < kN; ++k) st[k - 2] = state[k - 2][i];
    update_element<Op, kDecay, kMode>(xp, xg, st, xm, s, f, begin + i);
    param[i] = xp;
    if constexpr (kMaster) master[i] = xm;
    if (f.unscale) grad[i] = xg;
#pragma unroll
    for (int k = 2; k < kN; ++k) {
      if (Op::is_written(k)) state[k - 2][i] = st[k - 2];
    }
  }
}

// A chunk's tensor's step count after this step's increment (0 for a
// tensor without a counter: SGD's, whose rounding key then uses 0), and its
// group's clipping factor set in `f` (unchanged without a norm). Shared by
// the update and the measuring pass.
template <typename Meta, typename T>
FO_HOST_DEVICE FO_FORCE_INLINE double chunk_step_and_clip(
    const Meta& meta, int32_t tensor, double max_grad_norm, ElementFlags<T>& f) {
  double step = 0.0;
  if (meta.step[tensor] != nullptr) {
    step = read_step(meta.step[tensor], meta.step_is_double[tensor] != 0);
  }
  if (meta.grad_norm != nullptr) {
    f.grad_clip = clip_coefficient<T>(
        static_cast<T>(read_step(meta.grad_norm, meta.grad_norm_is_double != 0)),
        max_grad_norm);
  }
  return step;
}

// The chunks of a launch for one param mode (see run_block).
template <typename Op, typename P, typename S, ParamMode kMode, typename Meta>
FO_HOST_DEVICE FO_FORCE_INLINE void run_chunks(const Meta& meta, int64_t block,
                                               int64_t num_blocks,
                                               int32_t thread,
                                               int32_t num_threads,
                                               ElementFlags<compute_t<P>> f) {
  using T = compute_t<P>;
  using Hyper = typename Meta::HyperType;
  for (int64_t chunk = block; chunk < meta.num_chunks; chunk += num_blocks) {
    const ChunkRange r = locate_chunk(meta, chunk);
    const int slot = meta.slot[r.tensor];
    const Hyper& h = meta.hyper[slot];
    const double step = chunk_step_and_clip(meta, r.tensor, h.max_grad_norm, f);
    // (norms: Note [per-tensor norms]; empty for ops that do not read them)
    const auto s = scalars_for<T>(
        h, h.lr.read(), step, meta.scalar_state.read(r.tensor),
        meta.template read_norms<Hyper>(
            r.tensor, f.unscale ? static_cast<double>(f.inv_scale) : 1.0,
            static_cast<double>(f.grad_clip)));
    if constexpr (kMode == ParamMode::kStochastic) {
      f.rounding_key = stochastic_rounding_key(
          static_cast<uint32_t>(meta.index[r.tensor]), step);
    }
    with_decay_mode<Op>(static_cast<WeightDecay>(meta.decay[slot]), [&](auto decay) {
      update_range<Op, P, S, decltype(decay)::value, kMode>(
          meta, r.tensor, r.begin, r.end, s, f, thread, num_threads);
    });
  }
}

// The work of block `block` of `num_blocks`: chunks block, block +
// num_blocks, ... of the launch.
//
// Per chunk, the tensor's scalars are derived here, on the device, from its
// group's hyperparameters, the lr (a host float, or read from the group's
// lr tensor) and its step counter (already incremented by the step kernel):
// hyperparams.h. Uniform across the block, like the weight-decay mode, which
// selects one of the compiled variants per chunk: no divergence, and one
// launch serves groups with and without decay.
template <typename Op, typename P, typename S, typename Meta>
FO_HOST_DEVICE FO_FORCE_INLINE void run_block(const Meta& meta, int64_t block,
                                              int64_t num_blocks,
                                              int32_t thread,
                                              int32_t num_threads) {
  // Note [found_inf early exit]: AMP found an inf/NaN gradient, so the step
  // is skipped: nothing is written (no grad write-back either), and the step
  // kernel did not advance the counters.
  if (meta.found_inf != nullptr && *meta.found_inf != 0.0f) return;
  ElementFlags<compute_t<P>> f;
  f.unscale = meta.grad_scale != nullptr;
  if (f.unscale) f.inv_scale = inverse_grad_scale(*meta.grad_scale);
  // check_multi_tensor_args allows master weights only for fp16/bf16 params
  // and stochastic rounding only for bf16 params without them.
  if constexpr (sizeof(P) == 2) {
    if (meta.master_weights) {
      run_chunks<Op, P, S, ParamMode::kMaster>(meta, block, num_blocks, thread,
                                               num_threads, f);
      return;
    }
  }
  if constexpr (std::is_same_v<P, __nv_bfloat16>) {
    if (meta.stochastic_rounding) {
      run_chunks<Op, P, S, ParamMode::kStochastic>(meta, block, num_blocks,
                                                   thread, num_threads, f);
      return;
    }
  }
  run_chunks<Op, P, S, ParamMode::kPlain>(meta, block, num_blocks, thread,
                                          num_threads, f);
}

// ---------------------------------------------------------------------------
// The measuring pass (Note [norms of the update], hyperparams.h)
// ---------------------------------------------------------------------------
//
// For an op with kNormsOfUpdate, before the update: measure_kernel runs the
// op's direction() on every element (loaded as the update loads them;
// nothing stored), each thread summing the squares of the param and of the
// direction in double over its elements (thread, thread + num_threads, ...
// of a chunk), the block's threads summed by a fixed tree into two partials
// per chunk; then measure_tensor_kernel sums each tensor's partials in chunk
// order into the call's tensor_sums. Fixed orders: the same bits every run.
// One element per thread per iteration (coalesced scalar loads, not the
// update's 16-byte vectors): simple, and this pass only reads.

// One level of a tree sum over values[0, 2 * stride): thread t < stride
// adds values[t + stride] into values[t]. (The host tests emulate a tree by
// running each level for every thread in turn.)
FO_HOST_DEVICE FO_FORCE_INLINE void tree_level(double* values, int stride,
                                               int thread) {
  if (thread < stride) values[thread] += values[thread + stride];
}

struct MeasuredSums {
  double param = 0.0;
  double update = 0.0;
};

// The squares of one element's param (as direction() leaves it) and of its
// direction, added to `sums`.
template <typename Op, WeightDecay kDecay, bool kMaster, typename P,
          typename S, typename Scalars>
FO_HOST_DEVICE FO_FORCE_INLINE void measure_element(
    const P* param, const float* master, const P* grad, const S* const* state,
    int32_t i, const Scalars& s, const ElementFlags<compute_t<P>>& f,
    MeasuredSums& sums) {
  using T = compute_t<P>;
  constexpr int kN = Op::kNumOperands;
  T r[kN];
  load_operands<kMaster>(r, param[i], kMaster ? master[i] : 0.0f, grad[i],
                         [&](int k) { return state[k - 2][i]; }, f);
  const double u = static_cast<double>(Op::template direction<kDecay>(r, s));
  const double p = static_cast<double>(r[0]);
  sums.param += p * p;
  sums.update += u * u;
}

// Thread `thread`'s sums over chunk `chunk` of `meta`.
template <typename Op, typename P, typename S, typename Meta>
FO_HOST_DEVICE FO_FORCE_INLINE MeasuredSums measure_chunk_thread(
    const Meta& meta, int64_t chunk, int32_t thread, int32_t num_threads) {
  using T = compute_t<P>;
  using Hyper = typename Meta::HyperType;
  constexpr int kN = Op::kNumOperands;
  constexpr int kNS = kN > 2 ? kN - 2 : 1;
  ElementFlags<T> f;
  f.unscale = meta.grad_scale != nullptr;
  if (f.unscale) f.inv_scale = inverse_grad_scale(*meta.grad_scale);
  const ChunkRange r = locate_chunk(meta, chunk);
  const int slot = meta.slot[r.tensor];
  const Hyper& h = meta.hyper[slot];
  const double step = chunk_step_and_clip(meta, r.tensor, h.max_grad_norm, f);
  // The scalars of zero norms: trust ratio 1, which direction() never reads.
  const auto s = scalars_for<T>(h, h.lr.read(), step,
                                meta.scalar_state.read(r.tensor), TensorNorms{});
  const P* param = static_cast<const P*>(meta.data[0][r.tensor]) + r.begin;
  const P* grad = static_cast<const P*>(meta.data[1][r.tensor]) + r.begin;
  const S* state[kNS];
#pragma unroll
  for (int k = 2; k < kN; ++k) {
    state[k - 2] = static_cast<const S*>(meta.data[k][r.tensor]) + r.begin;
  }
  const bool master = sizeof(P) == 2 && meta.master_weights != 0;
  const float* master_data = master ? meta.master[r.tensor] + r.begin : nullptr;
  const int32_t count = static_cast<int32_t>(r.end - r.begin);
  MeasuredSums sums;
  auto loop = [&](auto decay_tag, auto master_tag) {
    constexpr WeightDecay kDecay = decltype(decay_tag)::value;
    constexpr bool kMaster = decltype(master_tag)::value;
#pragma unroll 1
    for (int32_t i = thread; i < count; i += num_threads) {
      measure_element<Op, kDecay, kMaster>(param, master_data, grad, state, i,
                                           s, f, sums);
    }
  };
  with_decay_mode<Op>(static_cast<WeightDecay>(meta.decay[slot]), [&](auto decay) {
    if (master) {
      loop(decay, std::true_type{});
    } else {
      loop(decay, std::false_type{});
    }
  });
  return sums;
}

// Tensor t of `meta`: its chunks' partials summed in order into the call's
// tensor_sums (entry position and n + position).
template <typename Meta>
FO_HOST_DEVICE FO_FORCE_INLINE void sum_measured_tensor(const Meta& meta,
                                                        int32_t t) {
  const int64_t first = meta.first_partial + meta.first_chunk[t];
  const int64_t last = meta.first_partial + (t + 1 < meta.num_tensors
                                                 ? meta.first_chunk[t + 1]
                                                 : meta.num_chunks);
  MeasuredSums sum;
  for (int64_t k = first; k < last; ++k) {
    sum.param += meta.measure_partials[2 * k];
    sum.update += meta.measure_partials[2 * k + 1];
  }
  // (The glue allocates these sums for the measuring pass to write.)
  double* sums = static_cast<double*>(const_cast<void*>(meta.norm_sums));
  sums[meta.norm_position[t]] = sum.param;
  sums[meta.norm_num_tensors + meta.norm_position[t]] = sum.update;
}

template <typename Op, typename P, typename S, typename Meta>
__global__ void __launch_bounds__(kBlockSize)
    measure_kernel(const __grid_constant__ Meta meta) {
  __shared__ double values[2][kBlockSize];
  // Note [found_inf early exit]: the update is skipped, so is this.
  if (meta.found_inf != nullptr && *meta.found_inf != 0.0f) return;
  for (int64_t chunk = blockIdx.x; chunk < meta.num_chunks; chunk += gridDim.x) {
    const MeasuredSums mine = measure_chunk_thread<Op, P, S>(
        meta, chunk, static_cast<int32_t>(threadIdx.x), kBlockSize);
    values[0][threadIdx.x] = mine.param;
    values[1][threadIdx.x] = mine.update;
    __syncthreads();
    for (int stride = kBlockSize / 2; stride > 0; stride /= 2) {
      tree_level(values[0], stride, static_cast<int>(threadIdx.x));
      tree_level(values[1], stride, static_cast<int>(threadIdx.x));
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      meta.measure_partials[2 * (meta.first_partial + chunk)] = values[0][0];
      meta.measure_partials[2 * (meta.first_partial + chunk) + 1] = values[1][0];
    }
    __syncthreads();  // values[] is reused by the next chunk
  }
}

template <typename Meta>
__global__ void __launch_bounds__(kStepBlockSize)
    measure_tensor_kernel(const __grid_constant__ Meta meta) {
  if (meta.found_inf != nullptr && *meta.found_inf != 0.0f) return;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < meta.num_tensors) sum_measured_tensor(meta, static_cast<int32_t>(t));
}

// Blocks per SM that ptxas must fit (the second __launch_bounds__
// argument), which caps the registers per thread at 65536 / (256 * blocks).
// Why 4 (64 registers) for fp32/fp16/bf16 params: the budget torch's fused
// AdamW was brought down to (pytorch#117872); SGD, Adagrad and RMSprop fit
// it with at most a few dozen bytes of spills (README.md has the numbers).
// Why 3 (80 registers) for Adam's (and the ops ManyScalars names, hyperparams.h:
// RAdam's): its scalars are derived on the device
// (hyperparams.h), so its nine scalars sit in registers instead of being
// read from the parameter space; at 64 registers ptxas spilled up to 500
// bytes (amsgrad), at 80 nothing or a few dozen. 3 x 256 threads with four
// or five vector loads in flight each still cover an SM's memory latency.
// Why 2 for fp64: doubles take two registers each and IEEE fp64 div/sqrt
// need more temporaries; at 64 the fp64 kernels spill, at 128 they do not.
template <typename P, typename Hyper>
constexpr int kMinBlocksPerSm =
    std::is_same_v<compute_t<P>, double>
        ? 2
        : (ManyScalars<Hyper>::value ? 3 : 4);

// Why __grid_constant__: the metadata is indexed with run-time tensor
// numbers; without it nvcc copies the whole (4 KB) parameter struct to each
// thread's local memory to take its address. With it, the accesses read the
// parameter space (constant bank) directly. Needs sm_70+.
template <typename Op, typename P, typename S, typename Meta>
__global__ void __launch_bounds__(
    kBlockSize, kMinBlocksPerSm<P, typename Meta::HyperType>)
    multi_tensor_kernel(const __grid_constant__ Meta meta) {
  run_block<Op, P, S>(meta, blockIdx.x, gridDim.x,
                      static_cast<int32_t>(threadIdx.x),
                      static_cast<int32_t>(blockDim.x));
}

// The step kernel (a template only so that every .cu including this header
// may instantiate it without a duplicate host stub).
template <typename Meta>
__global__ void __launch_bounds__(kStepBlockSize)
    step_kernel(const __grid_constant__ Meta meta) {
  increment_steps(meta,
                  static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                  static_cast<int64_t>(gridDim.x) * blockDim.x);
}

// The scalar-state kernel (Note [per-tensor scalar state]; instantiated
// only for ops that have one).
template <typename Hyper>
__global__ void __launch_bounds__(kStepBlockSize)
    scalar_state_kernel(const __grid_constant__ ScalarStateMeta<Hyper> meta) {
  advance_scalar_states(meta,
                        static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                        static_cast<int64_t>(gridDim.x) * blockDim.x);
}

// Launches Op over all tensors of `args` on `stream`: first the step kernel
// (if the call has step counters), then the scalar-state kernel (if the op
// has scalar state), then the measuring pass (if the op has norms of its
// update), then as many launches of the main kernel
// as the metadata needs; stream order makes the main kernel read the
// incremented counters. No allocation, no host-device synchronisation, and
// nothing depends on tensor values, so the launches can be captured in a
// CUDA graph. Returns the first launch error (cudaSuccess if none). Throws
// std::invalid_argument on malformed args (a bug of the caller).
template <typename Op, typename P, typename S, typename Hyper>
cudaError_t multi_tensor_apply(const MultiTensorArgs<Hyper>& args,
                               cudaStream_t stream) {
  constexpr int kN = Op::kNumOperands;
  using Meta = TensorListMeta<kN, Hyper>;
  check_multi_tensor_args(args, kN, Op::kAllowsDecoupledDecay);
  cudaError_t error = cudaSuccess;
  plan_step_launches(args.steps, args.found_inf,
                     [&](const StepListMeta& meta, int64_t blocks) {
                       if (error != cudaSuccess) return;
                       step_kernel<StepListMeta>
                           <<<static_cast<unsigned>(blocks), kStepBlockSize, 0,
                              stream>>>(meta);
                       error = cudaGetLastError();
                     });
  if constexpr (HasScalarState<Hyper>::value) {  // (no such kernel otherwise)
    plan_scalar_state_launches(
        args, [&](const ScalarStateMeta<Hyper>& meta, int64_t blocks) {
          if (error != cudaSuccess) return;
          scalar_state_kernel<Hyper>
              <<<static_cast<unsigned>(blocks), kStepBlockSize, 0, stream>>>(meta);
          error = cudaGetLastError();
        });
  }
  if constexpr (NormsOfUpdate<Hyper>::value) {  // (no such kernels otherwise)
    if (args.passes != NormPasses::kUpdateOnly) {
      plan_launches<kN>(args, [&](const Meta& meta) {
        if (error != cudaSuccess) return;
        measure_kernel<Op, P, S, Meta>
            <<<static_cast<unsigned>(launch_blocks(meta)), kBlockSize, 0, stream>>>(meta);
        error = cudaGetLastError();
        if (error != cudaSuccess) return;
        measure_tensor_kernel<Meta>
            <<<static_cast<unsigned>((meta.num_tensors + kStepBlockSize - 1) /
                                     kStepBlockSize),
               kStepBlockSize, 0, stream>>>(meta);
        error = cudaGetLastError();
      });
    }
  }
  if (args.passes == NormPasses::kMeasureOnly) return error;
  plan_launches<kN>(args, [&](const Meta& meta) {
    if (error != cudaSuccess) return;
    const unsigned blocks = static_cast<unsigned>(launch_blocks(meta));
    multi_tensor_kernel<Op, P, S, Meta>
        <<<blocks, kBlockSize, 0, stream>>>(meta);
    error = cudaGetLastError();
  });
  return error;
}

// The executor the launchers (launch.h) pass to the op dispatchers of
// ops.cuh; the host tests pass an emulator with the same interface instead.
struct CudaLauncher {
  cudaStream_t stream;

  template <typename Op, typename P, typename S, typename Hyper>
  cudaError_t run(const MultiTensorArgs<Hyper>& args) const {
    return multi_tensor_apply<Op, P, S>(args, stream);
  }
};

}  // namespace fused_optim::cuda
