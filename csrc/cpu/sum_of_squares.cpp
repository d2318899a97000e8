// The CPU kernel of fused_optim::sum_of_squares: one parallel pass over the
// elements of all tensors, in blocks of a fixed size, each summed in double
// in 32 lanes (cpu/sum_squares.h); block sums are added per tensor in
// order, and tensor sums in order. The result is the same bits whatever the
// thread count and the instruction set.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/convert.h"
#include "cpu/sum_squares.h"
#include "fused_optim/precision.h"
#include "fused_optim/storage_table.h"
#include "op_inputs.h"
#include "sum_of_squares_inputs.h"

namespace fused_optim::cpu {
namespace {

// Elements per block: big enough to amortise a block's setup, small enough
// that a bucket of a few hundred thousand elements splits over the threads.
constexpr int64_t kBlock = 32 * 1024;

template <typename Fn>
void with_storage_type(at::ScalarType dtype, const Fn& fn) {
  switch (*storage_dtype(dtype)) {
    case Dtype::kFloat: return fn(float{});
    case Dtype::kDouble: return fn(double{});
    case Dtype::kHalf: return fn(c10::Half{});
    case Dtype::kBFloat16: return fn(c10::BFloat16{});
  }
}

at::Tensor sum_of_squares(at::TensorList tensors,
                          const std::optional<at::Tensor>& grad_scale,
                          bool per_tensor) {
  at::Tensor out = checked_sum_of_squares_output(tensors, grad_scale, per_tensor);
  const std::vector<at::Tensor> dense = dense_inputs(tensors);
  const float inverse_scale =
      grad_scale.has_value() && grad_scale->defined()
          ? inverse_grad_scale(grad_scale->item<float>())
          : 1.0f;
  // Blocks: (tensor, first element); a tensor's blocks are consecutive.
  std::vector<std::pair<size_t, int64_t>> blocks;
  int64_t total_elements = 0;
  for (size_t t = 0; t < dense.size(); ++t) {
    total_elements += dense[t].numel();
    for (int64_t b = 0; b < dense[t].numel(); b += kBlock) blocks.push_back({t, b});
  }
  std::vector<double> block_sums(blocks.size());
  // A call of fewer than two blocks' worth of elements runs on this thread
  // (waking the pool would cost more than the sum).
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  const int64_t grain = total_elements < 2 * kBlock ? std::max<int64_t>(num_blocks, 1) : 1;
  at::parallel_for(0, num_blocks, grain,
                   [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const auto [t, first] = blocks[k];
      const at::Tensor& x = dense[t];
      const int64_t n = std::min(kBlock, x.numel() - first);
      with_storage_type(x.scalar_type(), [&](auto tag) {
        using scalar_t = decltype(tag);
        block_sums[k] = sum_squares(static_cast<const scalar_t*>(x.data_ptr()) + first,
                                    n, inverse_scale);
      });
    }
  });
  std::vector<double> tensor_sums(dense.size(), 0.0);
  for (size_t k = 0; k < blocks.size(); ++k) tensor_sums[blocks[k].first] += block_sums[k];
  auto write = [&](auto* data) {
    using out_t = std::remove_pointer_t<decltype(data)>;
    if (per_tensor) {
      for (size_t t = 0; t < dense.size(); ++t) data[t] = static_cast<out_t>(tensor_sums[t]);
    } else {
      double total = 0.0;
      for (double s : tensor_sums) total += s;
      data[0] = static_cast<out_t>(total);
    }
  };
  if (out.scalar_type() == at::kDouble) {
    write(out.data_ptr<double>());
  } else {
    write(out.data_ptr<float>());
  }
  return out;
}

}  // namespace
}  // namespace fused_optim::cpu

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("sum_of_squares", &fused_optim::cpu::sum_of_squares);
}
