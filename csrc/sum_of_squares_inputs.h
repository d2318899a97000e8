// fused_optim::sum_of_squares (schema: op_schema.cpp): the reduction behind
// clipping by the global gradient norm (and the per-tensor norms of
// trust-ratio optimizers). What every backend shares: the checks, the
// output, and the dense view of each input.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace fused_optim {

// Checks the inputs (floating or complex tensors, strided, on one device; grad_scale
// undefined or a one-element float32 tensor there) and returns the output,
// zero-filled: float64 if any input is, else float32; shape [n] when
// `per_tensor`, else []; on the inputs' device (the CPU for none).
at::Tensor checked_sum_of_squares_output(at::TensorList tensors,
                                         const std::optional<at::Tensor>& grad_scale,
                                         bool per_tensor);

// Each input in a layout whose `numel()` elements lie densely from its
// data_ptr (itself when it is non-overlapping and dense, whatever its
// strides: a sum does not care about element order; else a contiguous
// copy); complex tensors as real views.
std::vector<at::Tensor> dense_inputs(at::TensorList tensors);

}  // namespace fused_optim
