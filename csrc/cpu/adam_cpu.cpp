// CPU kernel of fused_optim::adam_ (Adam and AdamW).
#include <torch/library.h>

#include "cpu/apply.h"

namespace fused_optim::cpu {
namespace {

void adam_cpu(at::TensorList params, at::TensorList grads,
              at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
              at::TensorList max_exp_avg_sqs, at::TensorList master_params,
              at::TensorList state_steps, at::IntArrayRef group_index,
              at::ArrayRef<double> lr, at::ArrayRef<double> beta1,
              at::ArrayRef<double> beta2, at::ArrayRef<double> eps,
              at::ArrayRef<double> weight_decay, at::TensorList lr_tensors,
              const c10::optional<at::Tensor>& grad_scale,
              const c10::optional<at::Tensor>& found_inf, bool amsgrad,
              bool decoupled_weight_decay, bool maximize,
              bool stochastic_rounding) {
  const SharedArgs shared{master_params, lr_tensors, grad_scale, found_inf,
                          stochastic_rounding};
  CheckedCall call = check_adam_args(
      at::kCPU, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
      state_steps, group_index, lr, beta1, beta2, eps, weight_decay, amsgrad,
      shared);
  if (params.empty() || validate_only() || amp_skips_step(found_inf)) return;
  std::vector<at::Tensor> decayed_grads;  // Note [a gradient that aliases its param]
  if (decoupled_weight_decay && !maximize) {
    decayed_grads = grads_read_after_decoupled_decay(
        params, grads, group_index, lr, lr_tensors, weight_decay);
    if (!decayed_grads.empty()) call.lists[1].tensors = decayed_grads;
  }
  // Staging allocates and copies but writes no input: it goes before the
  // first write, so that even an allocation failure loses nothing.
  DenseOperands operands(call.lists);
  const std::vector<AdamHyper> hypers = adam_hypers(
      lr, lr_tensors, beta1, beta2, eps, weight_decay, maximize);

  // Every check has passed: from here on we write.
  const std::vector<double> steps = increment_state_steps(state_steps);
  with_storage(call.precision, has_grad_scale(grad_scale), [&](auto storage) {
    using S = decltype(storage);
    using T = typename S::compute_t;
    const auto scalars = scalars_of<T>(hypers, group_index, steps);
    const auto inputs = element_inputs<T>(group_index, grad_scale,
                                          stochastic_rounding, steps);
    FO_BOOL_SWITCH(amsgrad, kAmsgrad, [&] {
      apply_op<AdamOp<kAmsgrad>, S>(call, operands, scalars, inputs,
                                    [&](size_t t) {
                                      return weight_decay_mode(
                                          weight_decay[group_index[t]],
                                          decoupled_weight_decay);
                                    });
    });
  });
  operands.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("adam_", &adam_cpu); }

}  // namespace fused_optim::cpu
