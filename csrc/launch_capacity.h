// What one CUDA launch of each op carries (csrc/cuda/README.md, "Tensors per
// launch"): for every set of state lists a call can give, the operands per
// element, the hyperparameter slots and the tensors of TensorListMeta, and
// its size. Host code (multi_tensor_plan.h compiles without CUDA), so the
// CPU build reports it too: the README's table and the GPU timing script
// read these numbers instead of copies of them.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace fused_optim {

struct LaunchCapacity {
  std::string op;                        // e.g. "adam_"
  std::vector<std::string> state_lists;  // the lists given, in schema order
  int operands;                          // param, grad and those lists
  size_t hyper_bytes;                    // sizeof(Hyper)
  int slots;                             // hyperparameter sets per launch
  int tensors;                           // tensors per launch
  size_t meta_bytes;                     // sizeof(TensorListMeta)
};

std::vector<LaunchCapacity> launch_capacities();

}  // namespace fused_optim
