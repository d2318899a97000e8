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

#include "op_inputs.h"

namespace fused_optim::cpu {

// Elements per parallel task. Why 32K: a task then moves about 1 MB for Adam
// fp32 (28 B/element), which amortises the task's setup and keeps the
// per-thread working set in L2, while a bucket of a few hundred thousand
// elements still splits over all threads.
constexpr int64_t kGrainSize = 32 * 1024;

// Gives the operands of each tensor one common dense memory layout, so the
// kernels can walk them as flat arrays in memory order.
//
// Fast path (the usual case): the param is dense (contiguous, or a permuted
// layout like a transposed weight) and every operand has its strides; the
// kernel then reads and writes the tensors themselves. Otherwise the
// mismatched operands are staged into a dense copy in the param's layout
// before the kernel and written back after it. This costs extra passes but is
// correct: a transposed param with a contiguous grad must not be updated
// element-against-wrong-element (torch's own fused CPU Adam does exactly that).
class DenseOperands {
 public:
  explicit DenseOperands(const std::vector<TensorListArg>& lists);

  // Base pointer of operand `list` of tensor `tensor`, or nullptr for an
  // unused (empty) list.
  char* data(size_t list, size_t tensor) const {
    return pointers_[list][tensor];
  }

  // Copies staged operands that the kernel wrote back into their tensors.
  void write_back();

 private:
  std::vector<std::vector<char*>> pointers_;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_backs_;  // {dst, src}
  std::vector<at::Tensor> keep_alive_;
};

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

// Memoises per-tensor scalars by (group, step): tensors of one group at one
// step share them, so a bucket of thousands of tensors derives them (pow,
// sqrt) a handful of times, not thousands.
template <typename Scalars, typename Make>
std::vector<Scalars> per_tensor_scalars(at::IntArrayRef group_index,
                                        const std::vector<double>& steps,
                                        const Make& make) {
  std::vector<Scalars> out(group_index.size());
  int64_t last_group = -1;
  double last_step = -1.0;
  for (size_t i = 0; i < group_index.size(); ++i) {
    const double step = steps.empty() ? 0.0 : steps[i];
    if (group_index[i] != last_group || step != last_step) {
      out[i] = make(group_index[i], step);
      last_group = group_index[i];
      last_step = step;
    } else {
      out[i] = out[i - 1];
    }
  }
  return out;
}

}  // namespace fused_optim::cpu
