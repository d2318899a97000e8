// The CPU kernels of fused_optim::radam_ (both lr overloads): the shared
// front and the CPU element loop (cpu/apply.h), instantiated in a unit of
// its own so that the ops compile in parallel.
#include <torch/library.h>

#include "cpu/apply.h"

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  FO_IMPL_OP(m, fused_optim::RadamSpec, fused_optim::cpu);
}
