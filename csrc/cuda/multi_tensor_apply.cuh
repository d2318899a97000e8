// The CUDA multi-tensor apply: one kernel launch updates many tensors, each
// with its own hyperparameters (multi_tensor_plan.h explains the metadata).
//
// The per-element math is NOT here: an op (ops.cuh) loads nothing and stores
// nothing, it only calls its update rule from update_rules.h on values in
// registers. This file moves the bytes:
//   - aligned tensors (every operand 16-byte aligned): 16-byte vector loads
//     and stores (4 fp32, 8 fp16/bf16, 2 fp64 elements), then a scalar tail;
//   - misaligned tensors (e.g. views at an odd storage offset): scalar
//     accesses, still coalesced across the threads of a warp.
// Compute type: float for fp16/bf16/fp32, double for fp64, as on the CPU.
// Indexing is int64 everywhere: a tensor may have more than 2^31 elements.
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
#include <stdexcept>
#include <type_traits>

#include "cuda/multi_tensor_plan.h"
#include "fused_optim/macros.h"
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

// One 16-byte vector of elements. alignas(16) makes a load/store of the
// whole struct a single 128-bit access (LDG.E.128 / STG.E.128).
template <typename scalar_t>
struct alignas(kVectorBytes) Vec {
  static constexpr int kSize = static_cast<int>(kVectorBytes / sizeof(scalar_t));
  scalar_t v[kSize];
};
static_assert(sizeof(Vec<float>) == 16 && Vec<float>::kSize == 4);
static_assert(sizeof(Vec<double>) == 16 && Vec<double>::kSize == 2);
static_assert(sizeof(Vec<__half>) == 16 && Vec<__half>::kSize == 8);
static_assert(sizeof(Vec<__nv_bfloat16>) == 16 &&
              Vec<__nv_bfloat16>::kSize == 8);
static_assert(kChunkSize % Vec<__half>::kSize == 0);

// Calls fn(TypeTag<scalar_t>{}) for the storage type `dtype` of a call whose
// scalars are computed in T (float: fp32/fp16/bf16; double: fp64), and
// returns its result.
template <typename T>
struct TypeTag {
  using type = T;
};
template <typename T, typename Fn>
cudaError_t with_storage_type(ScalarType dtype, const Fn& fn) {
  if constexpr (std::is_same_v<T, double>) {
    if (dtype == ScalarType::kDouble) return fn(TypeTag<double>{});
  } else {
    static_assert(std::is_same_v<T, float>);
    switch (dtype) {
      case ScalarType::kFloat:
        return fn(TypeTag<float>{});
      case ScalarType::kHalf:
        return fn(TypeTag<__half>{});
      case ScalarType::kBFloat16:
        return fn(TypeTag<__nv_bfloat16>{});
      case ScalarType::kDouble:
        break;
    }
  }
  throw std::invalid_argument(
      "fused_optim CUDA launch: the params' dtype does not match the "
      "compute type of the scalars");
}

// ---------------------------------------------------------------------------
// The block body
// ---------------------------------------------------------------------------

// Updates elements [begin, end) of tensor `tensor` of `meta` (one chunk, so
// end - begin <= kChunkSize) with the threads `thread` of `num_threads` of
// one block.
//
// Offsets: the chunk's start `begin` is int64 (a tensor may have more than
// 2^31 elements) and is added to each operand's base address once per chunk;
// offsets inside the chunk are below kChunkSize and use int32, which saves
// the registers of 64-bit index arithmetic in the loops.
//
// An op (ops.cuh) provides:
//   kNumOperands             operands per element (param first, grad second)
//   is_written(k)            whether operand k is stored back (grad is not)
//   update<kDecay>(x, s)     the update rule on x[kNumOperands] in registers
template <typename Op, typename scalar_t, WeightDecay kDecay, typename Meta>
FO_HOST_DEVICE FO_FORCE_INLINE void update_range(const Meta& meta,
                                                 int32_t tensor, int64_t begin,
                                                 int64_t end, int32_t thread,
                                                 int32_t num_threads) {
  static_assert(kChunkSize <= (int64_t{1} << 30),
                "offsets inside a chunk must fit int32");
  using T = compute_t<scalar_t>;
  using V = Vec<scalar_t>;
  constexpr int kN = Op::kNumOperands;
  constexpr int kVec = V::kSize;
  const auto& s = meta.scalars[meta.slot[tensor]];
  // ptr[k][i] is element begin + i of operand k.
  scalar_t* ptr[kN];
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    ptr[k] = static_cast<scalar_t*>(meta.data[k][tensor]) + begin;
  }
  const int32_t count = static_cast<int32_t>(end - begin);  // <= kChunkSize

  int32_t scalar_begin = 0;
  if (meta.aligned[tensor]) {
    // Every operand base is 16-byte aligned and `begin` is a multiple of
    // kChunkSize (a multiple of kVec), so each ptr[k] + j * kVec starts a
    // 16-byte vector. Vector j covers chunk elements [j * kVec, (j+1) * kVec);
    // consecutive threads take consecutive vectors, so a warp moves 512
    // contiguous bytes per operand.
    const int32_t num_vecs = count / kVec;
#pragma unroll 1
    for (int32_t j = thread; j < num_vecs; j += num_threads) {
      V x[kN];
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        x[k] = *reinterpret_cast<const V*>(ptr[k] + j * kVec);
      }
#pragma unroll
      for (int l = 0; l < kVec; ++l) {
        T r[kN];
#pragma unroll
        for (int k = 0; k < kN; ++k) r[k] = to_compute(x[k].v[l]);
        Op::template update<kDecay>(r, s);
#pragma unroll
        for (int k = 0; k < kN; ++k) {
          if (Op::is_written(k)) x[k].v[l] = from_compute<scalar_t>(r[k]);
        }
      }
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        if (Op::is_written(k)) *reinterpret_cast<V*>(ptr[k] + j * kVec) = x[k];
      }
    }
    // The tail (fewer than kVec elements, only in a tensor's last chunk).
    scalar_begin = num_vecs * kVec;
  }

  // Scalar path: the tail of an aligned chunk, or all of a misaligned one.
#pragma unroll 1
  for (int32_t i = scalar_begin + thread; i < count; i += num_threads) {
    T r[kN];
#pragma unroll
    for (int k = 0; k < kN; ++k) r[k] = to_compute(ptr[k][i]);
    Op::template update<kDecay>(r, s);
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      if (Op::is_written(k)) ptr[k][i] = from_compute<scalar_t>(r[k]);
    }
  }
}

// The work of block `block` of `num_blocks`: chunks block, block +
// num_blocks, ... of the launch. The weight-decay mode is per tensor (it
// comes from the tensor's param group) and selects one of the compiled
// variants per chunk: uniform across the block, so no divergence, and one
// launch serves groups with and without decay.
template <typename Op, typename scalar_t, typename Meta>
FO_HOST_DEVICE FO_FORCE_INLINE void run_block(const Meta& meta, int64_t block,
                                              int64_t num_blocks,
                                              int32_t thread,
                                              int32_t num_threads) {
  for (int64_t chunk = block; chunk < meta.num_chunks; chunk += num_blocks) {
    const ChunkRange r = locate_chunk(meta, chunk);
    switch (static_cast<WeightDecay>(meta.decay[meta.slot[r.tensor]])) {
      case WeightDecay::kNone:
        update_range<Op, scalar_t, WeightDecay::kNone>(
            meta, r.tensor, r.begin, r.end, thread, num_threads);
        break;
      case WeightDecay::kL2:
        update_range<Op, scalar_t, WeightDecay::kL2>(
            meta, r.tensor, r.begin, r.end, thread, num_threads);
        break;
      case WeightDecay::kDecoupled:
        // check_multi_tensor_args rejects this mode for ops without it.
        if constexpr (Op::kAllowsDecoupledDecay) {
          update_range<Op, scalar_t, WeightDecay::kDecoupled>(
              meta, r.tensor, r.begin, r.end, thread, num_threads);
        }
        break;
    }
  }
}

// Blocks per SM that ptxas must fit (the second __launch_bounds__
// argument), which caps the registers per thread at 65536 / (256 * blocks).
// Why 4 for fp32/fp16/bf16: 64 registers, the budget torch's fused AdamW
// was brought down to (pytorch#117872); every float kernel fits without
// spilling (README.md has the numbers). Why 2 for fp64: doubles take two
// registers each and IEEE fp64 div/sqrt need more temporaries; at 64 the
// fp64 kernels spill, at 128 they do not, and 2 x 256 threads with five
// 16-byte loads in flight each still cover the memory latency of an SM.
template <typename scalar_t>
constexpr int kMinBlocksPerSm =
    std::is_same_v<compute_t<scalar_t>, double> ? 2 : 4;

// Why __grid_constant__: the metadata is indexed with run-time tensor
// numbers; without it nvcc copies the whole (4 KB) parameter struct to each
// thread's local memory to take its address. With it, the accesses read the
// parameter space (constant bank) directly. Needs sm_70+.
template <typename Op, typename scalar_t, typename Meta>
__global__ void __launch_bounds__(kBlockSize, kMinBlocksPerSm<scalar_t>)
    multi_tensor_kernel(const __grid_constant__ Meta meta) {
  run_block<Op, scalar_t>(meta, blockIdx.x, gridDim.x,
                          static_cast<int32_t>(threadIdx.x),
                          static_cast<int32_t>(blockDim.x));
}

// Launches Op over all tensors of `args` on `stream`: as many launches as the
// metadata needs, no allocation, no host-device synchronisation. Returns the
// first launch error (cudaSuccess if none). Throws std::invalid_argument on
// malformed args (a bug of the caller).
template <typename Op, typename scalar_t, typename Scalars>
cudaError_t multi_tensor_apply(const MultiTensorArgs<Scalars>& args,
                               cudaStream_t stream) {
  constexpr int kN = Op::kNumOperands;
  using Meta = TensorListMeta<kN, Scalars>;
  check_multi_tensor_args(args, kN, Op::kAllowsDecoupledDecay);
  cudaError_t error = cudaSuccess;
  plan_launches<kN>(args, [&](const Meta& meta) {
    if (error != cudaSuccess) return;
    const unsigned blocks = static_cast<unsigned>(launch_blocks(meta));
    multi_tensor_kernel<Op, scalar_t, Meta>
        <<<blocks, kBlockSize, 0, stream>>>(meta);
    error = cudaGetLastError();
  });
  return error;
}

// The executor the launchers (launch.h) pass to the op dispatchers of
// ops.cuh; the host tests pass an emulator with the same interface instead.
struct CudaLauncher {
  cudaStream_t stream;

  template <typename Op, typename scalar_t, typename Scalars>
  cudaError_t run(const MultiTensorArgs<Scalars>& args) const {
    return multi_tensor_apply<Op, scalar_t>(args, stream);
  }
};


}  // namespace fused_optim::cuda
