// CPU kernel of fused_optim::sgd_.
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

constexpr const char* kOp = "fused_optim.sgd_";
enum SgdOperand : size_t { kParam, kGrad, kMomentumBuffer };

template <typename scalar_t, bool kMomentum, bool kNesterov, WeightDecay kDecay>
void sgd_range(const DenseOperands& operands, size_t tensor, int64_t begin,
               int64_t end, const SgdScalars<at::opmath_type<scalar_t>>& s) {
  using opmath_t = at::opmath_type<scalar_t>;
  auto at = [&](size_t list) {
    return range_start<scalar_t>(operands, list, tensor, begin);
  };
  scalar_t* param = at(kParam);
  const scalar_t* grad = at(kGrad);
  scalar_t* buffer = kMomentum ? at(kMomentumBuffer) : nullptr;
  vectorized_loop(end - begin, [=](int64_t i) {
    opmath_t p = to_compute(param[i]);
    opmath_t b = kMomentum ? to_compute(buffer[i]) : opmath_t(0);
    sgd_update<kMomentum, kNesterov, kDecay>(p, to_compute(grad[i]), b, s);
    param[i] = from_compute<scalar_t>(p);
    if (kMomentum) buffer[i] = from_compute<scalar_t>(b);
  });
}

void sgd_cpu(at::TensorList params, at::TensorList grads,
             at::TensorList momentum_buffers, at::IntArrayRef group_index,
             at::ArrayRef<double> lr, at::ArrayRef<double> momentum,
             at::ArrayRef<double> dampening, at::ArrayRef<double> weight_decay,
             at::IntArrayRef new_momentum_buffers, bool nesterov,
             bool maximize) {
  const std::vector<TensorListArg> lists = check_sgd_args(
      at::kCPU, params, grads, momentum_buffers, group_index, lr,
      momentum, dampening, weight_decay, new_momentum_buffers, nesterov);
  const int64_t n = params.size();
  if (n == 0) return;
  // Staging allocates and copies but writes no input: it goes before the
  // first write, so that even an allocation failure loses nothing.
  DenseOperands operands(lists);

  const bool use_momentum = !momentum_buffers.empty();
  std::vector<bool> is_new(n, false);
  for (int64_t i : new_momentum_buffers) is_new[i] = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), kOp, [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        FO_BOOL_SWITCH(use_momentum, kMomentum, [&] {
          FO_BOOL_SWITCH(nesterov, kNesterov, [&] {
            parallel_for_each_range(
                numels_of(params), [&](size_t t, int64_t begin, int64_t end) {
                  const int64_t g = group_index[t];
                  const SgdScalars<opmath_t> s(lr[g], momentum[g], dampening[g],
                                               weight_decay[g], maximize,
                                               is_new[t]);
                  FO_L2_WEIGHT_DECAY_SWITCH(weight_decay[g] != 0.0, kDecay, [&] {
                    sgd_range<scalar_t, kMomentum, kMomentum && kNesterov,
                              kDecay>(operands, t, begin, end, s);
                  });
                });
          });
        });
      });
  operands.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("sgd_", &sgd_cpu); }

}  // namespace fused_optim::cpu
