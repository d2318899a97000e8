// CPU kernel of fused_optim::adagrad_.
#include <torch/library.h>

#include "cpu/apply.h"

namespace fused_optim::cpu {
namespace {

void adagrad_cpu(at::TensorList params, at::TensorList grads,
                 at::TensorList state_sums, at::TensorList master_params,
                 at::TensorList state_steps, at::IntArrayRef group_index,
                 at::ArrayRef<double> lr, at::ArrayRef<double> lr_decay,
                 at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps,
                 at::TensorList lr_tensors,
                 const c10::optional<at::Tensor>& grad_scale,
                 const c10::optional<at::Tensor>& found_inf, bool maximize,
                 bool stochastic_rounding) {
  const SharedArgs shared{master_params, lr_tensors, grad_scale, found_inf,
                          stochastic_rounding};
  const CheckedCall call = check_adagrad_args(
      at::kCPU, params, grads, state_sums, state_steps, group_index, lr,
      lr_decay, weight_decay, eps, shared);
  if (params.empty() || validate_only() || amp_skips_step(found_inf)) return;
  // Staging allocates and copies but writes no input: it goes before the
  // first write, so that even an allocation failure loses nothing.
  DenseOperands operands(call.lists);
  const std::vector<AdagradHyper> hypers = adagrad_hypers(
      lr, lr_tensors, lr_decay, weight_decay, eps, maximize);

  // Every check has passed: from here on we write.
  const std::vector<double> steps = increment_state_steps(state_steps);
  with_storage(call.precision, has_grad_scale(grad_scale), [&](auto storage) {
    using S = decltype(storage);
    using T = typename S::compute_t;
    const auto scalars = scalars_of<T>(hypers, group_index, steps);
    const auto inputs = element_inputs<T>(group_index, grad_scale,
                                          stochastic_rounding, steps);
    apply_op<AdagradOp, S>(call, operands, scalars, inputs, [&](size_t t) {
      return weight_decay_mode(weight_decay[group_index[t]], false);
    });
  });
  operands.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("adagrad_", &adagrad_cpu); }

}  // namespace fused_optim::cpu
