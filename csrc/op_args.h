// Each op's arguments, checked once for every backend: the CPU kernels
// (csrc/cpu) and the CUDA glue (csrc/cuda/ops_cuda.cpp) call these first, with
// their own device type, and write nothing until they return. Each returns
// the op's tensor lists in schema order (params first), for DenseOperands and
// the launchers.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "op_inputs.h"

namespace fused_optim {

std::vector<TensorListArg> check_adam_args(
    at::DeviceType backend,
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
    at::TensorList state_steps, at::IntArrayRef group_index,
    at::ArrayRef<double> lr, at::ArrayRef<double> beta1,
    at::ArrayRef<double> beta2, at::ArrayRef<double> eps,
    at::ArrayRef<double> weight_decay, bool amsgrad);

std::vector<TensorListArg> check_sgd_args(
    at::DeviceType backend,
    at::TensorList params, at::TensorList grads,
    at::TensorList momentum_buffers, at::IntArrayRef group_index,
    at::ArrayRef<double> lr, at::ArrayRef<double> momentum,
    at::ArrayRef<double> dampening, at::ArrayRef<double> weight_decay,
    at::IntArrayRef new_momentum_buffers, bool nesterov);

std::vector<TensorListArg> check_adagrad_args(
    at::DeviceType backend,
    at::TensorList params, at::TensorList grads, at::TensorList state_sums,
    at::TensorList state_steps, at::IntArrayRef group_index,
    at::ArrayRef<double> lr, at::ArrayRef<double> lr_decay,
    at::ArrayRef<double> weight_decay, at::ArrayRef<double> eps);

std::vector<TensorListArg> check_rmsprop_args(
    at::DeviceType backend,
    at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
    at::TensorList grad_avgs, at::TensorList momentum_buffers,
    at::TensorList state_steps, at::IntArrayRef group_index,
    at::ArrayRef<double> lr, at::ArrayRef<double> alpha,
    at::ArrayRef<double> eps, at::ArrayRef<double> weight_decay,
    at::ArrayRef<double> momentum, bool centered);

}  // namespace fused_optim
