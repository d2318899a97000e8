// CPU kernel of fused_optim::sgd_.
#include <torch/library.h>

#include "cpu/apply.h"

namespace fused_optim::cpu {
namespace {

void sgd_cpu(at::TensorList params, at::TensorList grads,
             at::TensorList momentum_buffers, at::TensorList master_params,
             at::TensorList state_steps, at::IntArrayRef group_index,
             at::ArrayRef<double> lr, at::ArrayRef<double> momentum,
             at::ArrayRef<double> dampening, at::ArrayRef<double> weight_decay,
             at::IntArrayRef new_momentum_buffers, at::TensorList lr_tensors,
             const c10::optional<at::Tensor>& grad_scale,
             const c10::optional<at::Tensor>& found_inf, bool nesterov,
             bool maximize, bool stochastic_rounding) {
  const SharedArgs shared{master_params, lr_tensors, grad_scale, found_inf,
                          stochastic_rounding};
  const CheckedCall call = check_sgd_args(
      at::kCPU, params, grads, momentum_buffers, state_steps, group_index, lr,
      momentum, dampening, weight_decay, new_momentum_buffers, nesterov,
      shared);
  const size_t n = params.size();
  if (n == 0 || validate_only() || amp_skips_step(found_inf)) return;
  // Staging allocates and copies but writes no input: it goes before the
  // first write, so that even an allocation failure loses nothing.
  DenseOperands operands(call.lists);
  const std::vector<SgdHyper> hypers =
      sgd_hypers(lr, lr_tensors, momentum, dampening, weight_decay, maximize);
  const bool use_momentum = !momentum_buffers.empty();
  std::vector<bool> is_new(n, false);
  for (int64_t i : new_momentum_buffers) is_new[i] = true;

  // Every check has passed: from here on we write. SGD's counters exist
  // only for stochastic rounding's random bits.
  const std::vector<double> steps = increment_state_steps(state_steps);
  with_storage(call.precision, has_grad_scale(grad_scale), [&](auto storage) {
    using S = decltype(storage);
    using T = typename S::compute_t;
    std::vector<SgdScalars<T>> scalars(n);
    for (size_t t = 0; t < n; ++t) {
      SgdHyper h = hypers[group_index[t]];
      h.new_buffer = is_new[t];  // (per tensor, not per group)
      scalars[t] = h.template scalars<T>(h.lr.read(), 0.0);
    }
    const auto inputs =
        element_inputs<T>(group_index, grad_scale, stochastic_rounding, steps);
    const auto decay_of = [&](size_t t) {
      return weight_decay_mode(weight_decay[group_index[t]], false);
    };
    FO_BOOL_SWITCH(use_momentum, kMomentum, [&] {
      FO_BOOL_SWITCH(nesterov && use_momentum, kNesterov, [&] {
        if constexpr (kMomentum || !kNesterov) {
          apply_op<SgdOp<kMomentum, kNesterov>, S>(call, operands, scalars,
                                                   inputs, decay_of);
        }
      });
    });
  });
  operands.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("sgd_", &sgd_cpu); }

}  // namespace fused_optim::cpu
