// The CUDA kernels of fused_optim::sum_of_squares (op_schema.cpp): the sum
// of the squares of every element of many tensors, per tensor or in all, in
// one pass over their elements, with no host synchronisation.
//
//   1. partial_kernel: one block per chunk (kChunkSize elements, as the
//      update kernels: multi_tensor_plan.h), each thread summing its
//      elements in double, the block's threads summed by a fixed tree;
//      one double per chunk in `partials`;
//   2. tensor_kernel: one thread per tensor of a launch sums its chunks'
//      partials in order, into tensor_sums[its position in the call];
//   3. finish_kernel: one block writes the output: each tensor's sum
//      (per_tensor), or their total by a fixed tree.
// Fixed orders throughout: the same bits on every run.
//
// Like multi_tensor_apply.cuh, the block bodies are __host__ __device__ and
// take their indices as arguments, so the host tests emulate them
// (csrc/cuda/tests/multi_tensor_test.cu); the tree sums emulate
// __syncthreads by running each level for every thread in turn.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "cuda/multi_tensor_apply.cuh"
#include "cuda/multi_tensor_plan.h"
#include "cuda/sum_of_squares.h"
#include "fused_optim/precision.h"

namespace fused_optim::cuda {

// Threads per block of the partial and finish kernels; a power of two for
// the tree sums.
constexpr int kReduceBlockSize = 256;

// One launch of the partial and tensor kernels: up to kMaxTensors tensors
// of one dtype.
struct ReduceListMeta {
  static constexpr int kMaxTensors = static_cast<int>(
      (kMaxKernelParamBytes - 64) /
      (sizeof(void*) + 2 * sizeof(int64_t) + sizeof(int32_t)));
  const void* data[kMaxTensors];
  int64_t numel[kMaxTensors];        // > 0
  int64_t first_chunk[kMaxTensors];  // strictly increasing
  int32_t index[kMaxTensors];        // position in the call
  const float* grad_scale;           // or null
  int64_t num_chunks;
  int64_t first_partial;  // this launch's chunk 0 writes partials[first_partial]
  int32_t num_tensors;
};
static_assert(sizeof(ReduceListMeta) <= kMaxKernelParamBytes);

// The tensors of `args` of dtype `dtype`, split into launches; calls
// launch(meta) for each, numbering the chunks of all launches one after the
// other from *next_partial (advanced past them).
template <typename Launch>
void plan_reduce_launches(const SumOfSquaresArgs& args, Dtype dtype,
                          int64_t* next_partial, const Launch& launch) {
  ReduceListMeta meta{};
  auto flush = [&] {
    if (meta.num_tensors == 0) return;
    launch(static_cast<const ReduceListMeta&>(meta));
    *next_partial += meta.num_chunks;
    meta = ReduceListMeta{};
  };
  for (size_t i = 0; i < args.numels.size(); ++i) {
    if (args.dtypes[i] != dtype || args.numels[i] == 0) continue;
    if (meta.num_tensors == ReduceListMeta::kMaxTensors) flush();
    const int32_t t = meta.num_tensors++;
    meta.grad_scale = args.grad_scale;
    meta.first_partial = *next_partial;
    meta.data[t] = args.data[i];
    meta.numel[t] = args.numels[i];
    meta.first_chunk[t] = meta.num_chunks;
    meta.index[t] = static_cast<int32_t>(i);
    meta.num_chunks += (args.numels[i] + kChunkSize - 1) / kChunkSize;
  }
  flush();
}

// (tree_level: multi_tensor_apply.cuh)

// Thread `thread`'s share of chunk `chunk` of `meta`: the sum of the
// squares of its elements (thread, thread + num_threads, ...), each first
// unscaled in its compute type, as the update kernels unscale.
template <typename P>
FO_HOST_DEVICE FO_FORCE_INLINE double chunk_thread_sum(
    const ReduceListMeta& meta, int64_t chunk, int32_t thread,
    int32_t num_threads, float inverse_scale) {
  using T = compute_t<P>;
  const ChunkRange r = locate_chunk(meta, chunk);
  const P* x = static_cast<const P*>(meta.data[r.tensor]) + r.begin;
  const int32_t count = static_cast<int32_t>(r.end - r.begin);
  const T scale = static_cast<T>(inverse_scale);
  double sum = 0.0;
  for (int32_t i = thread; i < count; i += num_threads) {
    const double v = static_cast<double>(to_compute(x[i]) * scale);
    sum += v * v;
  }
  return sum;
}

// Tensor t of `meta`: its chunks' partials summed in order.
FO_HOST_DEVICE FO_FORCE_INLINE void sum_tensor_partials(
    const ReduceListMeta& meta, const double* partials, double* tensor_sums,
    int32_t t) {
  const int64_t first = meta.first_partial + meta.first_chunk[t];
  const int64_t last = meta.first_partial +
                       (t + 1 < meta.num_tensors ? meta.first_chunk[t + 1]
                                                 : meta.num_chunks);
  double sum = 0.0;
  for (int64_t k = first; k < last; ++k) sum += partials[k];
  tensor_sums[meta.index[t]] = sum;
}

template <typename P>
__global__ void __launch_bounds__(kReduceBlockSize)
    partial_kernel(const __grid_constant__ ReduceListMeta meta, double* partials) {
  __shared__ double values[kReduceBlockSize];
  const float inverse_scale =
      meta.grad_scale != nullptr ? inverse_grad_scale(*meta.grad_scale) : 1.0f;
  for (int64_t chunk = blockIdx.x; chunk < meta.num_chunks; chunk += gridDim.x) {
    values[threadIdx.x] = chunk_thread_sum<P>(
        meta, chunk, static_cast<int32_t>(threadIdx.x), kReduceBlockSize,
        inverse_scale);
    __syncthreads();
    for (int stride = kReduceBlockSize / 2; stride > 0; stride /= 2) {
      tree_level(values, stride, static_cast<int>(threadIdx.x));
      __syncthreads();
    }
    if (threadIdx.x == 0) partials[meta.first_partial + chunk] = values[0];
    __syncthreads();  // values[] is reused by the next chunk
  }
}

__global__ void __launch_bounds__(kReduceBlockSize)
    tensor_kernel(const __grid_constant__ ReduceListMeta meta,
                  const double* partials, double* tensor_sums);

// The output: tensor_sums as they are (per_tensor) or their total, as
// float32 or float64.
__global__ void __launch_bounds__(kReduceBlockSize)
    finish_kernel(const double* tensor_sums, int64_t n, void* out,
                  bool out_is_double, bool per_tensor);

// Thread `thread`'s share of the total: tensor_sums[thread], [thread +
// num_threads], ... in order.
FO_HOST_DEVICE FO_FORCE_INLINE double strided_sum(const double* values,
                                                  int64_t n, int32_t thread,
                                                  int32_t num_threads) {
  double sum = 0.0;
  for (int64_t i = thread; i < n; i += num_threads) sum += values[i];
  return sum;
}

}  // namespace fused_optim::cuda
