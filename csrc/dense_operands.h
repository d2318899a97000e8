// Gives the operands of each tensor of an op call one common dense memory
// layout, so that a kernel can walk them as flat arrays in memory order.
// Backend-neutral: it allocates and copies with ATen (at::empty_strided,
// Tensor::copy_), which run on the tensors' own device; on CUDA the copies
// are queued on the current stream, so call it (and write_back) behind the
// device guard of the op, before and after the kernel launches.
#pragma once

#include <ATen/ATen.h>

#include <utility>
#include <vector>

#include "op_inputs.h"

namespace fused_optim {

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
  // unused (empty) list or an empty tensor.
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

}  // namespace fused_optim
