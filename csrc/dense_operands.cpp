#include "dense_operands.h"

#include <c10/util/strides.h>

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
    // The layout every operand of tensor i is brought to: the param's own
    // when it is dense (then the param needs no check), else contiguous.
    const bool param_is_dense = param.is_non_overlapping_and_dense();
    c10::DimVector contiguous;
    if (!param_is_dense) contiguous = c10::contiguous_strides(param.sizes());
    const at::IntArrayRef strides =
        param_is_dense ? param.strides() : at::IntArrayRef(contiguous);
    for (size_t k = 0; k < lists.size(); ++k) {
      if (lists[k].tensors.empty()) continue;
      const at::Tensor& t = lists[k].tensors[i];
      if ((k == 0 && param_is_dense) || has_strides(t, strides)) {
        pointers_[k][i] = static_cast<char*>(t.data_ptr());
        continue;
      }
      // Each operand keeps its own dtype (state and master weights may
      // differ from the params').
      at::Tensor staged = at::empty_strided(param.sizes(), strides, t.options());
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
