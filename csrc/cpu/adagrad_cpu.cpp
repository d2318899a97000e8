// CPU kernel of fused_optim::adagrad_.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cpu/convert.h"
#include "cpu/multi_tensor_cpu.h"
#include "cpu/vectorized_loop.h"
#include "fused_optim/update_rules.h"
#include "fused_optim/bool_switch.h"
#include "op_args.h"
#include "op_inputs.h"

namespace fused_optim::cpu {
namespace {

constexpr const char* kOp = "fused_optim.adagrad_";
enum AdagradOperand : size_t { kParam, kGrad, kSum };

template <typename scalar_t, WeightDecay kDecay>
void adagrad_range(const DenseOperands& operands, size_t tensor, int64_t begin,
                   int64_t end,
                   const AdagradScalars<at::opmath_type<scalar_t>>& s) {
  using opmath_t = at::opmath_type<scalar_t>;
  auto at = [&](size_t list) {
    return range_start<scalar_t>(operands, list, tensor, begin);
  };
  scalar_t* param = at(kParam);
  const scalar_t* grad = at(kGrad);
  scalar_t* sum = at(kSum);
  vectorized_loop(end - begin, [=](int64_t i) {
    opmath_t p = to_compute(param[i]);
    opmath_t acc = to_compute(sum[i]);
    adagrad_update<kDecay>(p, to_compute(grad[i]), acc, s);
    param[i] = from_compute<scalar_t>(p);
    sum[i] = from_compute<scalar_t>(acc);
  });
}

void adagrad_cpu(at::TensorList params, at::TensorList grads,
                 at::TensorList state_sums, at::TensorList state_steps,
                 at::IntArrayRef group_index, at::ArrayRef<double> lr,
                 at::ArrayRef<double> lr_decay,
                 at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps,
                 bool maximize) {
  const std::vector<TensorListArg> lists = check_adagrad_args(
      at::kCPU, params, grads, state_sums, state_steps, group_index, lr,
      lr_decay, weight_decay, eps);
  const int64_t n = params.size();
  if (n == 0) return;
  // Staging allocates and copies but writes no input: it goes before the
  // first write, so that even an allocation failure loses nothing.
  DenseOperands operands(lists);

  // Every check has passed: from here on we write.
  const std::vector<double> steps = increment_state_steps(state_steps);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), kOp, [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const auto scalars = per_tensor_scalars<AdagradScalars<opmath_t>>(
            group_index, steps, [&](int64_t g, double step) {
              return AdagradScalars<opmath_t>(lr[g], lr_decay[g], eps[g],
                                              weight_decay[g], maximize, step);
            });
        parallel_for_each_range(
            numels_of(params), [&](size_t t, int64_t begin, int64_t end) {
              FO_L2_WEIGHT_DECAY_SWITCH(
                  weight_decay[group_index[t]] != 0.0, kDecay, [&] {
                    adagrad_range<scalar_t, kDecay>(operands, t, begin, end,
                                                    scalars[t]);
                  });
            });
      });
  operands.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("adagrad_", &adagrad_cpu); }

}  // namespace fused_optim::cpu
