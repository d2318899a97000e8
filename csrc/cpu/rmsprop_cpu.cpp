// CPU kernel of fused_optim::rmsprop_.
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

constexpr const char* kOp = "fused_optim.rmsprop_";
enum RmspropOperand : size_t {
  kParam,
  kGrad,
  kSquareAvg,
  kGradAvg,
  kMomentumBuffer
};

template <typename scalar_t, bool kCentered, bool kMomentum, WeightDecay kDecay>
void rmsprop_range(const DenseOperands& operands, size_t tensor, int64_t begin,
                   int64_t end,
                   const RmspropScalars<at::opmath_type<scalar_t>>& s) {
  using opmath_t = at::opmath_type<scalar_t>;
  auto at = [&](size_t list) {
    return range_start<scalar_t>(operands, list, tensor, begin);
  };
  scalar_t* param = at(kParam);
  const scalar_t* grad = at(kGrad);
  scalar_t* square_avg = at(kSquareAvg);
  scalar_t* grad_avg = kCentered ? at(kGradAvg) : nullptr;
  scalar_t* buffer = kMomentum ? at(kMomentumBuffer) : nullptr;
  vectorized_loop(end - begin, [=](int64_t i) {
    opmath_t p = to_compute(param[i]);
    opmath_t sq = to_compute(square_avg[i]);
    opmath_t ga = kCentered ? to_compute(grad_avg[i]) : opmath_t(0);
    opmath_t b = kMomentum ? to_compute(buffer[i]) : opmath_t(0);
    rmsprop_update<kCentered, kMomentum, kDecay>(p, to_compute(grad[i]), sq, ga,
                                                 b, s);
    param[i] = from_compute<scalar_t>(p);
    square_avg[i] = from_compute<scalar_t>(sq);
    if (kCentered) grad_avg[i] = from_compute<scalar_t>(ga);
    if (kMomentum) buffer[i] = from_compute<scalar_t>(b);
  });
}

void rmsprop_cpu(at::TensorList params, at::TensorList grads,
                 at::TensorList square_avgs, at::TensorList grad_avgs,
                 at::TensorList momentum_buffers, at::TensorList state_steps,
                 at::IntArrayRef group_index, at::ArrayRef<double> lr,
                 at::ArrayRef<double> alpha, at::ArrayRef<double> eps,
                 at::ArrayRef<double> weight_decay,
                 at::ArrayRef<double> momentum, bool centered, bool maximize) {
  const std::vector<TensorListArg> lists = check_rmsprop_args(
      at::kCPU, params, grads, square_avgs, grad_avgs, momentum_buffers,
      state_steps, group_index, lr, alpha, eps, weight_decay, momentum,
      centered);
  const int64_t n = params.size();
  if (n == 0) return;
  // Staging allocates and copies but writes no input: it goes before the
  // first write, so that even an allocation failure loses nothing.
  DenseOperands operands(lists);
  const bool use_momentum = !momentum_buffers.empty();
  // Every check has passed: from here on we write. RMSprop's update does not
  // depend on the step count, but torch keeps (and checkpoints) it.
  increment_state_steps(state_steps);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), kOp, [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const auto scalars = per_tensor_scalars<RmspropScalars<opmath_t>>(
            group_index, {}, [&](int64_t g, double) {
              return RmspropScalars<opmath_t>(lr[g], alpha[g], eps[g],
                                              weight_decay[g], momentum[g],
                                              maximize);
            });
        FO_BOOL_SWITCH(centered, kCentered, [&] {
          FO_BOOL_SWITCH(use_momentum, kMomentum, [&] {
            parallel_for_each_range(
                numels_of(params), [&](size_t t, int64_t begin, int64_t end) {
                  FO_L2_WEIGHT_DECAY_SWITCH(
                      weight_decay[group_index[t]] != 0.0, kDecay, [&] {
                        rmsprop_range<scalar_t, kCentered, kMomentum, kDecay>(
                            operands, t, begin, end, scalars[t]);
                      });
                });
          });
        });
      });
  operands.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("rmsprop_", &rmsprop_cpu); }

}  // namespace fused_optim::cpu
