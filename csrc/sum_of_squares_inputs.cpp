#include "sum_of_squares_inputs.h"

#include "op_inputs.h"

namespace fused_optim {

at::Tensor checked_sum_of_squares_output(at::TensorList tensors,
                                         const std::optional<at::Tensor>& grad_scale,
                                         bool per_tensor) {
  const char* op = "fused_optim.sum_of_squares";
  const at::Device device =
      tensors.empty() ? at::Device(at::kCPU) : tensors[0].device();
  bool any_double = false;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), op, ": tensors[", i, "] is undefined");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": tensors[", i,
                "] has layout ", t.layout(), "; only dense tensors are supported");
    const at::ScalarType real = c10::toRealValueType(t.scalar_type());
    TORCH_CHECK(storage_dtype(real).has_value(), op, ": tensors[", i,
                "] has dtype ", t.scalar_type(),
                "; expected float32, float64, float16 or bfloat16 (or complex)");
    TORCH_CHECK(t.device() == device, op, ": tensors[", i, "] is on ", t.device(),
                " but tensors[0] is on ", device);
    any_double = any_double || real == at::kDouble;
  }
  check_amp_args(op, grad_scale, std::nullopt, device);
  const auto options =
      at::TensorOptions().dtype(any_double ? at::kDouble : at::kFloat).device(device);
  return per_tensor ? at::zeros({static_cast<int64_t>(tensors.size())}, options)
                    : at::zeros({}, options);
}

std::vector<at::Tensor> dense_inputs(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (at::Tensor t : tensors) {
    // A complex tensor counts as the real tensor of its parts (|z|^2 =
    // re^2 + im^2).
    if (t.is_complex()) t = at::view_as_real(t.resolve_conj());
    out.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
  }
  return out;
}

}  // namespace fused_optim
