// Each op's arguments, checked once for every backend: the CPU kernels
// (csrc/cpu) and the CUDA glue (csrc/cuda/ops_cuda.cpp) call these first, with
// their own device type, and write nothing until they return.
//
// Arguments every op shares (see ops.cpp for the schemas):
//   master_params   float32 master weights of fp16/bf16 params, or empty
//   lr_tensors      per-group learning rates as tensors (capturable), or empty
//   grad_scale, found_inf   torch.amp.GradScaler's, or undefined
//   stochastic_rounding     round bf16 param writes stochastically
// The step counters must be on the CPU for the CPU kernels and on the
// params' device for the CUDA kernels (check_state_steps).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "fused_optim/hyperparams.h"
#include "op_inputs.h"

namespace fused_optim {

// A call that passed its checks.
struct CheckedCall {
  // The op's tensor lists in schema order: params, grads, the state lists,
  // then master_params (always last; empty without master weights). Step
  // counters are not among them.
  std::vector<TensorListArg> lists;
  CallPrecision precision;
  // Index in `lists` of master_params.
  size_t master_list() const { return lists.size() - 1; }
};

// The options shared by every op, bundled for the checks.
struct SharedArgs {
  at::TensorList master_params;
  at::TensorList lr_tensors;
  const c10::optional<at::Tensor>& grad_scale;
  const c10::optional<at::Tensor>& found_inf;
  bool stochastic_rounding;
};

CheckedCall check_adam_args(
    at::DeviceType backend, at::TensorList params, at::TensorList grads,
    at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
    at::IntArrayRef group_index, at::ArrayRef<double> lr,
    at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
    at::ArrayRef<double> eps, at::ArrayRef<double> weight_decay,
    bool amsgrad, const SharedArgs& shared);

CheckedCall check_sgd_args(
    at::DeviceType backend, at::TensorList params, at::TensorList grads,
    at::TensorList momentum_buffers, at::TensorList state_steps,
    at::IntArrayRef group_index,
    at::ArrayRef<double> lr, at::ArrayRef<double> momentum,
    at::ArrayRef<double> dampening, at::ArrayRef<double> weight_decay,
    at::IntArrayRef new_momentum_buffers, bool nesterov,
    const SharedArgs& shared);

CheckedCall check_adagrad_args(
    at::DeviceType backend, at::TensorList params, at::TensorList grads,
    at::TensorList state_sums, at::TensorList state_steps,
    at::IntArrayRef group_index, at::ArrayRef<double> lr,
    at::ArrayRef<double> lr_decay, at::ArrayRef<double> weight_decay,
    at::ArrayRef<double> eps, const SharedArgs& shared);

CheckedCall check_rmsprop_args(
    at::DeviceType backend, at::TensorList params, at::TensorList grads,
    at::TensorList square_avgs, at::TensorList grad_avgs,
    at::TensorList momentum_buffers, at::TensorList state_steps,
    at::IntArrayRef group_index, at::ArrayRef<double> lr,
    at::ArrayRef<double> alpha, at::ArrayRef<double> eps,
    at::ArrayRef<double> weight_decay, at::ArrayRef<double> momentum,
    bool centered, const SharedArgs& shared);

// Note [a gradient that aliases its param]
// torch.optim's AdamW decays the param in place and then reads the
// gradient, so a gradient that is the param's own memory (p.grad = p.data:
// rare, but legal) is read decayed. Our kernels read both before writing
// either, so for such a call the aliased gradients are replaced by the
// decayed param, computed as torch computes it (param * (1 - lr * wd), in
// the param's dtype). Returns the replaced gradient list, or an empty one
// when no gradient aliases its param (the usual case, a pointer compare per
// tensor). Only for decoupled decay without maximize: with maximize torch
// negates the gradient into a new tensor before decaying.
std::vector<at::Tensor> grads_read_after_decoupled_decay(
    at::TensorList params, at::TensorList grads, at::IntArrayRef group_index,
    at::ArrayRef<double> lr, at::TensorList lr_tensors,
    at::ArrayRef<double> weight_decay);

// Each op's per-group hyperparameters (fused_optim/hyperparams.h), one per
// group, built from the op's per-group lists, for both backends. A group's
// lr is its `lr_tensors` entry when the call has them (read by the kernel
// where the tensor lives), else its float.
std::vector<AdamHyper> adam_hypers(at::ArrayRef<double> lr,
                                   at::TensorList lr_tensors,
                                   at::ArrayRef<double> beta1,
                                   at::ArrayRef<double> beta2,
                                   at::ArrayRef<double> eps,
                                   at::ArrayRef<double> weight_decay,
                                   bool maximize);

// `new_buffer` is false in every entry: it is per tensor (SGD's first
// momentum step), set by the caller.
std::vector<SgdHyper> sgd_hypers(at::ArrayRef<double> lr,
                                 at::TensorList lr_tensors,
                                 at::ArrayRef<double> momentum,
                                 at::ArrayRef<double> dampening,
                                 at::ArrayRef<double> weight_decay,
                                 bool maximize);

std::vector<AdagradHyper> adagrad_hypers(at::ArrayRef<double> lr,
                                         at::TensorList lr_tensors,
                                         at::ArrayRef<double> lr_decay,
                                         at::ArrayRef<double> weight_decay,
                                         at::ArrayRef<double> eps,
                                         bool maximize);

std::vector<RmspropHyper> rmsprop_hypers(at::ArrayRef<double> lr,
                                         at::TensorList lr_tensors,
                                         at::ArrayRef<double> alpha,
                                         at::ArrayRef<double> eps,
                                         at::ArrayRef<double> weight_decay,
                                         at::ArrayRef<double> momentum,
                                         bool maximize);

}  // namespace fused_optim
