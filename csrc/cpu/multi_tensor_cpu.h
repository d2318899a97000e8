// The CPU "multi-tensor apply": one parallel pass over the elements of all
// tensors of a call.
//
// Work is split by ELEMENTS across the virtual concatenation of all tensors,
// not by tensor, so 2000 tiny tensors and one huge tensor both spread evenly
// over the threads of at::parallel_for (which honours torch.set_num_threads).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <vector>

#include "dense_operands.h"
#include "op_inputs.h"

namespace fused_optim::cpu {

// Elements per parallel task. Why 32K: a task then moves about 1 MB for Adam
// fp32 (28 B/element), which amortises the task's setup and keeps the
// per-thread working set in L2, while a bucket of a few hundred thousand
// elements still splits over all threads.
constexpr int64_t kGrainSize = 32 * 1024;

// The dense-layout staging of the operands is backend-neutral
// (csrc/dense_operands.h); the CPU kernels name it unqualified.
using ::fused_optim::DenseOperands;

// Calls `fn(tensor, begin, end)` for disjoint element ranges [begin, end) of
// each tensor, covering every element once, from the threads of
// at::parallel_for. `numels[i]` is tensor i's element count.
template <typename Fn>
void parallel_for_each_range(const std::vector<int64_t>& numels, const Fn& fn) {
  std::vector<int64_t> offsets(numels.size() + 1, 0);
  for (size_t i = 0; i < numels.size(); ++i) {
    offsets[i + 1] = offsets[i] + numels[i];
  }
  const int64_t total = offsets.back();
  if (total == 0) return;
  at::parallel_for(0, total, kGrainSize, [&](int64_t begin, int64_t end) {
    // The tensor holding element `begin`: the last offset <= begin.
    size_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) -
               offsets.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, offsets[t + 1]);
      if (stop > begin) fn(t, begin - offsets[t], stop - offsets[t]);
      begin = stop;
      ++t;
    }
  });
}

std::vector<int64_t> numels_of(at::TensorList tensors);

// Where the range [begin, ...) of tensor `tensor` starts in operand list
// `list`, typed; nullptr for a list the call does not use.
template <typename scalar_t>
scalar_t* range_start(const DenseOperands& operands, size_t list,
                      size_t tensor, int64_t begin) {
  char* base = operands.data(list, tensor);
  return base == nullptr ? nullptr
                         : reinterpret_cast<scalar_t*>(base) + begin;
}

// Memoises per-tensor scalars by (hyperparameter set, step): tensors of one
// group at one step share them, so a call of thousands of tensors derives
// them (pow, sqrt) a handful of times, not thousands.
template <typename Scalars, typename Make>
std::vector<Scalars> per_tensor_scalars(const std::vector<int32_t>& set_of,
                                        const std::vector<double>& steps,
                                        const Make& make) {
  std::vector<Scalars> out(set_of.size());
  int32_t last_set = -1;
  double last_step = -1.0;
  for (size_t i = 0; i < set_of.size(); ++i) {
    const double step = steps.empty() ? 0.0 : steps[i];
    if (set_of[i] != last_set || step != last_step) {
      out[i] = make(set_of[i], step);
      last_set = set_of[i];
      last_step = step;
    } else {
      out[i] = out[i - 1];
    }
  }
  return out;
}

}  // namespace fused_optim::cpu
