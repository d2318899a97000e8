#include "dense_operands.h"

namespace fused_optim {

namespace {

bool has_strides(const at::Tensor& t, at::IntArrayRef strides) {
  return t.is_non_overlapping_and_dense() && t.strides() == strides;
}

}  // namespace

DenseOperands::DenseOperands(const std::vector<TensorListArg>& lists)
    : pointers_(lists.size()) {
  const at::TensorList params = lists[0].tensors;
  for (size_t k = 0; k < lists.size(); ++k) {
    pointers_[k].assign(params.size(), nullptr);
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    if (param.numel() == 0) continue;
    // The layout every operand of tensor i is brought to.
    const at::Tensor layout = param.is_non_overlapping_and_dense()
                                  ? param
                                  : at::empty_like(param, at::MemoryFormat::Contiguous);
    for (size_t k = 0; k < lists.size(); ++k) {
      if (lists[k].tensors.empty()) continue;
      const at::Tensor& t = lists[k].tensors[i];
      if (has_strides(t, layout.strides())) {
        pointers_[k][i] = static_cast<char*>(t.data_ptr());
        continue;
      }
      // Each operand keeps its own dtype (state and master weights may
      // differ from the params').
      at::Tensor staged = at::empty_strided(
          layout.sizes(), layout.strides(), t.options());
      staged.copy_(t);
      pointers_[k][i] = static_cast<char*>(staged.data_ptr());
      if (lists[k].written) write_backs_.emplace_back(t, staged);
      keep_alive_.push_back(std::move(staged));
    }
  }
}

void DenseOperands::write_back() {
  for (auto& [dst, src] : write_backs_) dst.copy_(src);
  write_backs_.clear();
}

}  // namespace fused_optim
