// CPU kernel of fused_optim::adam_ (Adam and AdamW).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cpu/convert.h"
#include "cpu/multi_tensor_cpu.h"
#include "cpu/vectorized_loop.h"
#include "fused_optim/bool_switch.h"
#include "fused_optim/update_rules.h"
#include "op_args.h"
#include "op_inputs.h"

namespace fused_optim::cpu {
namespace {

constexpr const char* kOp = "fused_optim.adam_";
enum AdamOperand : size_t { kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq };

template <typename scalar_t, bool kAmsgrad, WeightDecay kDecay>
void adam_range(const DenseOperands& operands, size_t tensor, int64_t begin,
                int64_t end, const AdamScalars<at::opmath_type<scalar_t>>& s) {
  using opmath_t = at::opmath_type<scalar_t>;
  auto at = [&](size_t list) {
    return range_start<scalar_t>(operands, list, tensor, begin);
  };
  scalar_t* param = at(kParam);
  const scalar_t* grad = at(kGrad);
  scalar_t* exp_avg = at(kExpAvg);
  scalar_t* exp_avg_sq = at(kExpAvgSq);
  scalar_t* max_exp_avg_sq = kAmsgrad ? at(kMaxExpAvgSq) : nullptr;
  vectorized_loop(end - begin, [=](int64_t i) {
    opmath_t p = to_compute(param[i]);
    opmath_t m = to_compute(exp_avg[i]);
    opmath_t v = to_compute(exp_avg_sq[i]);
    opmath_t v_max = kAmsgrad ? to_compute(max_exp_avg_sq[i]) : opmath_t(0);
    adam_update<kAmsgrad, kDecay>(p, to_compute(grad[i]), m, v, v_max, s);
    param[i] = from_compute<scalar_t>(p);
    exp_avg[i] = from_compute<scalar_t>(m);
    exp_avg_sq[i] = from_compute<scalar_t>(v);
    if (kAmsgrad) max_exp_avg_sq[i] = from_compute<scalar_t>(v_max);
  });
}

void adam_cpu(at::TensorList params, at::TensorList grads,
              at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
              at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
              at::IntArrayRef group_index, at::ArrayRef<double> lr,
              at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
              at::ArrayRef<double> eps, at::ArrayRef<double> weight_decay,
              bool amsgrad, bool decoupled_weight_decay, bool maximize) {
  const std::vector<TensorListArg> lists = check_adam_args(
      at::kCPU, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
      state_steps, group_index, lr, beta1, beta2, eps, weight_decay,
      amsgrad);
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
        const auto scalars = per_tensor_scalars<AdamScalars<opmath_t>>(
            group_index, steps, [&](int64_t g, double step) {
              return AdamScalars<opmath_t>(
                  make_adam_scalars(lr[g], beta1[g], beta2[g], eps[g],
                                    weight_decay[g], maximize, step));
            });
        FO_BOOL_SWITCH(amsgrad, kAmsgrad, [&] {
          parallel_for_each_range(
              numels_of(params), [&](size_t t, int64_t begin, int64_t end) {
                FO_WEIGHT_DECAY_SWITCH(
                    weight_decay[group_index[t]] != 0.0, decoupled_weight_decay,
                    kDecay, [&] {
                      adam_range<scalar_t, kAmsgrad, kDecay>(
                          operands, t, begin, end, scalars[t]);
                    });
              });
        });
      });
  operands.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("adam_", &adam_cpu); }

}  // namespace fused_optim::cpu
