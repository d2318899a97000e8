// CPU kernel of fused_optim::rmsprop_.
#include <torch/library.h>

#include "cpu/apply.h"

namespace fused_optim::cpu {
namespace {

void rmsprop_cpu(at::TensorList params, at::TensorList grads,
                 at::TensorList square_avgs, at::TensorList grad_avgs,
                 at::TensorList momentum_buffers, at::TensorList master_params,
                 at::TensorList state_steps, at::IntArrayRef group_index,
                 at::ArrayRef<double> lr, at::ArrayRef<double> alpha,
                 at::ArrayRef<double> eps, at::ArrayRef<double> weight_decay,
                 at::ArrayRef<double> momentum, at::TensorList lr_tensors,
                 const c10::optional<at::Tensor>& grad_scale,
                 const c10::optional<at::Tensor>& found_inf, bool centered,
                 bool maximize, bool stochastic_rounding) {
  const SharedArgs shared{master_params, lr_tensors, grad_scale, found_inf,
                          stochastic_rounding};
  const CheckedCall call = check_rmsprop_args(
      at::kCPU, params, grads, square_avgs, grad_avgs, momentum_buffers,
      state_steps, group_index, lr, alpha, eps, weight_decay, momentum,
      centered, shared);
  if (params.empty() || validate_only() || amp_skips_step(found_inf)) return;
  // Staging allocates and copies but writes no input: it goes before the
  // first write, so that even an allocation failure loses nothing.
  DenseOperands operands(call.lists);
  const std::vector<RmspropHyper> hypers = rmsprop_hypers(
      lr, lr_tensors, alpha, eps, weight_decay, momentum, maximize);
  const bool use_momentum = !momentum_buffers.empty();

  // Every check has passed: from here on we write. RMSprop's update does not
  // depend on the step count, but torch keeps (and checkpoints) it, and
  // stochastic rounding draws its bits by it.
  const std::vector<double> steps = increment_state_steps(state_steps);
  with_storage(call.precision, has_grad_scale(grad_scale), [&](auto storage) {
    using S = decltype(storage);
    using T = typename S::compute_t;
    // (memoised per group: the scalars do not depend on the step)
    const auto scalars = scalars_of<T>(hypers, group_index, {});
    const auto inputs = element_inputs<T>(group_index, grad_scale,
                                          stochastic_rounding, steps);
    FO_BOOL_SWITCH(centered, kCentered, [&] {
      FO_BOOL_SWITCH(use_momentum, kMomentum, [&] {
        apply_op<RmspropOp<kCentered, kMomentum>, S>(
            call, operands, scalars, inputs, [&](size_t t) {
              return weight_decay_mode(weight_decay[group_index[t]], false);
            });
      });
    });
  });
  operands.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("rmsprop_", &rmsprop_cpu); }

}  // namespace fused_optim::cpu
