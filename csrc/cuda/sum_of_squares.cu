// The CUDA launcher of fused_optim::sum_of_squares (sum_of_squares.h); the
// kernels are in sum_of_squares.cuh.
#include "cuda/sum_of_squares.cuh"

namespace fused_optim::cuda {

__global__ void __launch_bounds__(kReduceBlockSize)
    tensor_kernel(const __grid_constant__ ReduceListMeta meta,
                  const double* partials, double* tensor_sums) {
  for (int32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < meta.num_tensors;
       t += gridDim.x * blockDim.x) {
    sum_tensor_partials(meta, partials, tensor_sums, t);
  }
}

__global__ void __launch_bounds__(kReduceBlockSize)
    finish_kernel(const double* tensor_sums, int64_t n, void* out,
                  bool out_is_double, bool per_tensor) {
  if (per_tensor) {
    for (int64_t t = threadIdx.x; t < n; t += blockDim.x) {
      if (out_is_double) {
        static_cast<double*>(out)[t] = tensor_sums[t];
      } else {
        static_cast<float*>(out)[t] = static_cast<float>(tensor_sums[t]);
      }
    }
    return;
  }
  __shared__ double values[kReduceBlockSize];
  values[threadIdx.x] = strided_sum(tensor_sums, n,
                                    static_cast<int32_t>(threadIdx.x),
                                    kReduceBlockSize);
  __syncthreads();
  for (int stride = kReduceBlockSize / 2; stride > 0; stride /= 2) {
    tree_level(values, stride, static_cast<int>(threadIdx.x));
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (out_is_double) {
      *static_cast<double*>(out) = values[0];
    } else {
      *static_cast<float*>(out) = static_cast<float>(values[0]);
    }
  }
}

cudaError_t launch_sum_of_squares(const SumOfSquaresArgs& args,
                                  cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(args.numels.size());
  cudaError_t error = cudaSuccess;
  // Tensors with no elements sum to 0: tensor_sums starts zeroed.
  if (n > 0) {
    error = cudaMemsetAsync(args.tensor_sums, 0, n * sizeof(double), stream);
  }
  int64_t next_partial = 0;
  for (Dtype dtype : kAllDtypes) {
    with_dtype(dtype, [&](auto tag) {
      using P = typename DeviceType<decltype(tag)::value>::type;
      plan_reduce_launches(args, dtype, &next_partial,
                           [&](const ReduceListMeta& meta) {
        if (error != cudaSuccess) return;
        const unsigned blocks = static_cast<unsigned>(
            std::min(meta.num_chunks, kMaxBlocksPerLaunch));
        partial_kernel<P><<<blocks, kReduceBlockSize, 0, stream>>>(meta, args.partials);
        error = cudaGetLastError();
        if (error != cudaSuccess) return;
        const unsigned tensor_blocks = static_cast<unsigned>(
            (meta.num_tensors + kReduceBlockSize - 1) / kReduceBlockSize);
        tensor_kernel<<<tensor_blocks, kReduceBlockSize, 0, stream>>>(
            meta, args.partials, args.tensor_sums);
        error = cudaGetLastError();
      });
    });
  }
  if (error != cudaSuccess) return error;
  finish_kernel<<<1, kReduceBlockSize, 0, stream>>>(
      args.tensor_sums, n, args.out, args.out_is_double, args.per_tensor);
  return cudaGetLastError();
}

}  // namespace fused_optim::cuda
