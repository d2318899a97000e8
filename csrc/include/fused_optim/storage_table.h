// The one table of legal storage combinations of an op call: which param
// dtypes, which state dtype for each, and when master weights and
// stochastic rounding may be used. Everything that decides a combination
// reads it: the host checks (op_inputs.cpp), the CPU and CUDA type
// dispatch (cpu/apply.h, cuda/multi_tensor_apply.cuh), and Python
// (fused_optim._C.storage_table(), for the precision policy and the
// benchmark).
//
// Plain C++17 (FO_HOST_DEVICE): no torch, no CUDA header.
#pragma once

#include <type_traits>

#include "fused_optim/macros.h"

namespace fused_optim {

// The floating-point storage dtypes of an update.
enum class Dtype { kFloat, kDouble, kHalf, kBFloat16 };

constexpr Dtype kAllDtypes[] = {Dtype::kFloat, Dtype::kDouble, Dtype::kHalf,
                                Dtype::kBFloat16};

// The state dtypes a param dtype may have: its own, float32 or bfloat16
// (narrower state for wide params; wider for narrow ones), except float64
// params, whose state stays float64 (the compute type). An op without state
// has its state dtype equal to its param dtype.
FO_HOST_DEVICE constexpr bool legal_state_dtype(Dtype param, Dtype state) {
  if (param == Dtype::kDouble) return state == Dtype::kDouble;
  return state == param || state == Dtype::kFloat || state == Dtype::kBFloat16;
}

// A float32 master copy is for float16 and bfloat16 params only.
FO_HOST_DEVICE constexpr bool legal_master_weights(Dtype param) {
  return param == Dtype::kHalf || param == Dtype::kBFloat16;
}

// Stochastic rounding is for bfloat16 params, without master weights (the
// master copy already keeps the low bits).
FO_HOST_DEVICE constexpr bool legal_stochastic_rounding(Dtype param,
                                                        bool master_weights) {
  return param == Dtype::kBFloat16 && !master_weights;
}

// The whole table, for one call.
FO_HOST_DEVICE constexpr bool legal_storage(Dtype param, Dtype state,
                                            bool has_state, bool master_weights,
                                            bool stochastic_rounding) {
  return (has_state ? legal_state_dtype(param, state) : state == param) &&
         (!master_weights || legal_master_weights(param)) &&
         (!stochastic_rounding ||
          legal_stochastic_rounding(param, master_weights));
}

// Calls fn(std::integral_constant<Dtype, d>{}) for the run-time `dtype`,
// so that code can map each Dtype to its own storage type at compile time
// (the CPU loops and the CUDA kernels use different half types).
template <typename Fn>
decltype(auto) with_dtype(Dtype dtype, const Fn& fn) {
  switch (dtype) {
    case Dtype::kDouble:
      return fn(std::integral_constant<Dtype, Dtype::kDouble>{});
    case Dtype::kHalf:
      return fn(std::integral_constant<Dtype, Dtype::kHalf>{});
    case Dtype::kBFloat16:
      return fn(std::integral_constant<Dtype, Dtype::kBFloat16>{});
    case Dtype::kFloat:
      break;
  }
  return fn(std::integral_constant<Dtype, Dtype::kFloat>{});
}

inline const char* dtype_name(Dtype dtype) {
  switch (dtype) {
    case Dtype::kFloat:
      return "float32";
    case Dtype::kDouble:
      return "float64";
    case Dtype::kHalf:
      return "float16";
    case Dtype::kBFloat16:
      return "bfloat16";
  }
  return "?";
}

}  // namespace fused_optim
