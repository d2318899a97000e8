// The Python module fused_optim._C. Importing it loads this library, whose
// static initialisers register the ops with the dispatcher (ops.cpp,
// csrc/cpu, csrc/cuda): torch.ops.fused_optim.* is the public, traceable
// entry (opcheck, torch.compile). The module also has one function per op,
// with the op's schema, that the optimizer classes call every step.
//
// Note [fast op call]
// A call through torch.ops converts each tensor to an IValue with the GIL
// released, and each extra C++ reference to a tensor that Python owns takes
// the GIL to update the Python object's reference count: for a step over
// 2000 tensors, ~10000 GIL round trips, about 0.5 us per tensor. Here pybind
// converts the lists while holding the GIL, the op runs without it, and the
// lists are released with it held again. The call goes to the backend kernel
// directly (below the autograd and ADInplaceOrView keys, which for a step
// under no_grad would only bump version counters), so we bump the version
// counters of the written tensors ourselves, as in-place torch ops do.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/extension.h>

#include "op_inputs.h"

#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// What pybind converts a schema argument type from.
template <typename T>
struct PyArg {
  using type = T;
};
template <>
struct PyArg<at::TensorList> {
  using type = std::vector<at::Tensor>;
};
template <>
struct PyArg<at::IntArrayRef> {
  using type = std::vector<int64_t>;
};
template <>
struct PyArg<at::ArrayRef<double>> {
  using type = std::vector<double>;
};
template <>
struct PyArg<const std::optional<at::Tensor>&> {
  using type = std::optional<at::Tensor>;
};

template <typename T>
void bump_versions_if_list(const T&) {}
void bump_versions_if_list(const std::vector<at::Tensor>& tensors) {
  for (const at::Tensor& t : tensors) t.unsafeGetTensorImpl()->bump_version();
}

// Defines m.<name>(...) calling torch.ops.fused_optim.<name> (whose C++
// signature is void(Args...)) as Note [fast op call] describes, and
// m.validate_<name>(...), the same call that only checks its arguments and
// writes nothing (Note [validate only] in op_inputs.h).
template <typename... Args>
void def_fast_call(pybind11::module& m, const char* name) {
  // The ops are registered by this library's static initialisers, which
  // have run by the time Python initialises the module.
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow(
                          (std::string("fused_optim::") + name).c_str(), "")
                      .typed<void(Args...)>();
  m.def(name, [op](typename PyArg<Args>::type... args) {
    {
      pybind11::gil_scoped_release no_gil;
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      op.call(Args(args)...);
    }
    // Written lists get their versions bumped, except `grads`, which the op
    // writes only to store AMP's unscaled gradients (when grad_scale is
    // given): torch.optim never bumps a gradient's version otherwise, and an
    // autograd graph that saved a gradient must survive a step.
    const auto& arguments = op.schema().arguments();
    bool writes_grads = false;
    size_t index = 0;
    auto note_grad_scale = [&](const auto& arg) {
      if constexpr (std::is_same_v<std::decay_t<decltype(arg)>,
                                   std::optional<at::Tensor>>) {
        if (arguments[index].name() == "grad_scale")
          writes_grads = arg.has_value();
      }
      ++index;
    };
    (note_grad_scale(args), ...);
    index = 0;
    auto bump_if_written = [&](const auto& arg) {
      const auto& argument = arguments[index++];
      const auto& alias = argument.alias_info();
      if (!alias || !alias->isWrite()) return;
      if (argument.name() == "grads" && !writes_grads) return;
      bump_versions_if_list(arg);
    };
    (bump_if_written(args), ...);
  });
  m.def(("validate_" + std::string(name)).c_str(),
        [op](typename PyArg<Args>::type... args) {
          pybind11::gil_scoped_release no_gil;
          at::AutoDispatchBelowADInplaceOrView below_autograd;
          fused_optim::ValidateOnlyGuard validate_only;
          op.call(Args(args)...);
        });
}

using TL = at::TensorList;
using Ints = at::IntArrayRef;
using Floats = at::ArrayRef<double>;
using OptT = const std::optional<at::Tensor>&;

}  // namespace

// Argument lists as in ops.cpp: every op ends with
// (..., lr_tensors, grad_scale, found_inf, <mode flags>, stochastic_rounding).
PYBIND11_MODULE(_C, m) {
  m.doc() = "fused_optim's compiled ops (see torch.ops.fused_optim)";
  def_fast_call<TL, TL, TL, TL, TL, TL, TL, Ints, Floats, Floats, Floats,
                Floats, Floats, TL, OptT, OptT, bool, bool, bool, bool>(
      m, "adam_");
  def_fast_call<TL, TL, TL, TL, TL, Ints, Floats, Floats, Floats, Floats, Ints,
                TL, OptT, OptT, bool, bool, bool>(m, "sgd_");
  def_fast_call<TL, TL, TL, TL, TL, Ints, Floats, Floats, Floats, Floats, TL,
                OptT, OptT, bool, bool>(m, "adagrad_");
  def_fast_call<TL, TL, TL, TL, TL, TL, TL, Ints, Floats, Floats, Floats,
                Floats, Floats, TL, OptT, OptT, bool, bool, bool>(
      m, "rmsprop_");
}
