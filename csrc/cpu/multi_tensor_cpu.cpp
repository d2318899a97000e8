#include "cpu/multi_tensor_cpu.h"

namespace fused_optim::cpu {

std::vector<int64_t> numels_of(at::TensorList tensors) {
  std::vector<int64_t> numels(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) numels[i] = tensors[i].numel();
  return numels;
}

}  // namespace fused_optim::cpu
