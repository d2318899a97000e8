// The launcher of fused_optim::sum_of_squares on CUDA, as the torch glue
// (ops_cuda.cpp) calls it: addresses, element counts and dtypes in; the
// device buffers it needs are allocated by the caller (num_partials says
// how large). No torch type crosses this line (plain nvcc builds it).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "cuda/multi_tensor_plan.h"
#include "fused_optim/storage_table.h"

namespace fused_optim::cuda {

struct SumOfSquaresArgs {
  std::vector<const void*> data;  // per tensor, dense
  std::vector<int64_t> numels;    // per tensor (0: sums to 0)
  std::vector<Dtype> dtypes;      // per tensor
  const float* grad_scale = nullptr;  // device address, or null
  double* partials = nullptr;     // device, num_partials(numels) doubles
  double* tensor_sums = nullptr;  // device, one double per tensor
  void* out = nullptr;            // device: [n] (per_tensor) or one value
  bool out_is_double = false;
  bool per_tensor = false;
};

// The length of the partials buffer: one double per chunk of every tensor.
inline int64_t num_partials(const std::vector<int64_t>& numels) {
  int64_t n = 0;
  for (int64_t numel : numels) n += (numel + kChunkSize - 1) / kChunkSize;
  return n;
}

// Launches the reduction on `stream`; returns the first launch error.
cudaError_t launch_sum_of_squares(const SumOfSquaresArgs& args,
                                  cudaStream_t stream);

}  // namespace fused_optim::cuda
