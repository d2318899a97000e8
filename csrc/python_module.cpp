// The Python module fused_optim._C. Importing it loads this library, whose
// static initialisers register the ops with the dispatcher (op_schema.cpp,
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
//
// Note [borrowed tensor lists]
// A list of tensors is not copied into owning at::Tensors (an atomic
// reference count per tensor, and for a tensor that Python owns a Python
// reference taken and, with the GIL, given back: about a third of the
// crossing's cost): each at::Tensor borrows the one its Python object holds
// (c10::MaybeOwnedTraits), for the length of the call. The Python lists
// keep every tensor alive meanwhile: they are the caller's arguments, and
// the optimizers' lists are their own, which nothing else changes (a list
// changed by another thread while the op runs without the GIL could free a
// tensor the op reads; these functions are private, fused_optim._C).
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/MaybeOwned.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include "fused_optim/storage_table.h"
#include "op_front.h"
#include "op_inputs.h"

#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// The tensors of a Python list or tuple, borrowed (Note [borrowed tensor
// lists]).
class BorrowedTensors {
 public:
  BorrowedTensors() = default;
  BorrowedTensors(BorrowedTensors&& other) noexcept : tensors_(std::move(other.tensors_)) {
    other.tensors_.clear();
  }
  BorrowedTensors& operator=(BorrowedTensors&&) = delete;
  BorrowedTensors(const BorrowedTensors&) = delete;
  ~BorrowedTensors() { release(); }

  // Borrows every item of `sequence`; false (holding none) unless it is a
  // list or tuple of tensors.
  bool borrow(PyObject* sequence) {
    release();
    if (!PyList_Check(sequence) && !PyTuple_Check(sequence)) return false;
    const Py_ssize_t size = PySequence_Fast_GET_SIZE(sequence);
    tensors_.reserve(static_cast<size_t>(size));
    for (Py_ssize_t i = 0; i < size; ++i) {
      PyObject* item = PySequence_Fast_GET_ITEM(sequence, i);
      if (!THPVariable_Check(item)) {
        release();
        return false;
      }
      tensors_.push_back(
          c10::MaybeOwnedTraits<at::Tensor>::createBorrow(THPVariable_Unpack(item)));
    }
    return true;
  }

  const std::vector<at::Tensor>& tensors() const { return tensors_; }
  operator at::TensorList() const { return tensors_; }

 private:
  void release() {
    for (at::Tensor& t : tensors_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
    tensors_.clear();
  }

  std::vector<at::Tensor> tensors_;
};

}  // namespace

namespace pybind11::detail {
template <>
struct type_caster<BorrowedTensors> {
  PYBIND11_TYPE_CASTER(BorrowedTensors, const_name("list[Tensor]"));
  bool load(handle source, bool) { return value.borrow(source.ptr()); }
  static handle cast(const BorrowedTensors&, return_value_policy, handle) {
    pybind11_fail("fused_optim._C: borrowed tensor lists are arguments only");
  }
};
}  // namespace pybind11::detail

namespace {

// What pybind converts a schema argument type from.
template <typename T>
struct PyArg {
  using type = T;
};
template <>
struct PyArg<at::TensorList> {
  using type = BorrowedTensors;
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
template <>
struct PyArg<const c10::List<bool>&> {
  using type = std::vector<bool>;
};

// The schema argument made from what pybind converted.
template <typename Arg>
decltype(auto) to_schema_arg(const typename PyArg<Arg>::type& value) {
  if constexpr (std::is_same_v<Arg, const c10::List<bool>&>) {
    c10::List<bool> list;
    list.reserve(value.size());
    for (bool b : value) list.push_back(b);
    return list;
  } else {
    return Arg(value);
  }
}

template <typename T>
void bump_versions_if_list(const T&) {}
void bump_versions_if_list(const BorrowedTensors& tensors) {
  for (const at::Tensor& t : tensors.tensors()) t.unsafeGetTensorImpl()->bump_version();
}

// Defines m.<name>(...) calling torch.ops.fused_optim.<name> (whose C++
// signature is void(Args...)) as Note [fast op call] describes, and
// m.validate_<name>(...), the same call that only checks its arguments and
// writes nothing (Note [validate only] in op_inputs.h). `name` may name an
// overload ("adam_.tensor_lr"); the Python name then has "__" for the dot.
template <typename... Args>
void def_fast_call(pybind11::module& m, const std::string& name,
                   void (*)(Args...)) {
  // The ops are registered by this library's static initialisers, which
  // have run by the time Python initialises the module.
  const size_t dot = name.find('.');
  const std::string op_name = name.substr(0, dot);
  const std::string overload =
      dot == std::string::npos ? "" : name.substr(dot + 1);
  const std::string py_name =
      overload.empty() ? op_name : op_name + "_" + overload;
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow(("fused_optim::" + op_name).c_str(),
                                         overload.c_str())
                      .typed<void(Args...)>();
  m.def(py_name.c_str(), [op](typename PyArg<Args>::type... args) {
    {
      pybind11::gil_scoped_release no_gil;
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      op.call(to_schema_arg<Args>(args)...);
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
  m.def(("validate_" + py_name).c_str(),
        [op](typename PyArg<Args>::type... args) {
          pybind11::gil_scoped_release no_gil;
          at::AutoDispatchBelowADInplaceOrView below_autograd;
          fused_optim::ValidateOnlyGuard validate_only;
          op.call(to_schema_arg<Args>(args)...);
        });
}

// A backend that is never called: the fast call only needs the kernel's
// function type, which is the same for every backend.
void no_backend(const fused_optim::OpCall&) {}

template <typename Spec>
void def_fast_calls(pybind11::module& m) {
  using fused_optim::Kernel;
  using fused_optim::LrKind;
  def_fast_call(m, fused_optim::overload_name<Spec>(LrKind::kFloats, false),
                &Kernel<Spec, LrKind::kFloats, void, &no_backend>::call);
  def_fast_call(m, fused_optim::overload_name<Spec>(LrKind::kTensors, false),
                &Kernel<Spec, LrKind::kTensors, void, &no_backend>::call);
}

// The storage table (storage_table.h) as Python sees it: every legal
// (param dtype, state dtype, master weights, stochastic rounding), by
// dtype name.
pybind11::list storage_table() {
  using namespace fused_optim;
  pybind11::list out;
  for (Dtype param : kAllDtypes) {
    for (Dtype state : kAllDtypes) {
      for (bool master : {false, true}) {
        for (bool rounding : {false, true}) {
          if (legal_storage(param, state, /*has_state=*/true, master, rounding)) {
            out.append(pybind11::make_tuple(dtype_name(param), dtype_name(state),
                                            master, rounding));
          }
        }
      }
    }
  }
  return out;
}

}  // namespace

// One fast call (and its validate_ twin) per op and lr overload, with the
// kernel's own signature (op_front.h), so no argument list is written here.
PYBIND11_MODULE(_C, m) {
  m.doc() = "fused_optim's compiled ops (see torch.ops.fused_optim)";
#define FO_DEF_FAST_CALLS(Spec) def_fast_calls<Spec>(m);
  FO_FOR_EACH_OP(FO_DEF_FAST_CALLS)
#undef FO_DEF_FAST_CALLS
  // fused_optim::sum_of_squares (op_schema.cpp) with Note [fast op call]'s
  // cheaper crossing: clipping reads it every step, over every gradient.
  m.def("sum_of_squares", [](const BorrowedTensors& tensors,
                             const std::optional<at::Tensor>& grad_scale,
                             bool per_tensor) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fused_optim::sum_of_squares", "")
            .typed<at::Tensor(at::TensorList, const std::optional<at::Tensor>&, bool)>();
    pybind11::gil_scoped_release no_gil;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(tensors, grad_scale, per_tensor);
  });
  // The gradients of a list of params, whether all are present and whether
  // all present ones are dense (strided): what `[p.grad for p in params]`
  // gives, at about a tenth of the cost (the property access is ~0.2 us a
  // param in Python; a step over 2000 params reads them every step).
  m.def("grads_of", [](const BorrowedTensors& borrowed) {
    const std::vector<at::Tensor>& params = borrowed.tensors();
    pybind11::list grads(params.size());
    bool all_present = true;
    bool all_strided = true;
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& grad = params[i].grad();
      if (grad.defined()) {
        grads[i] = pybind11::cast(grad);
        all_strided = all_strided && grad.layout() == at::kStrided;
      } else {
        grads[i] = pybind11::none();
        all_present = false;
      }
    }
    return pybind11::make_tuple(grads, all_present, all_strided);
  });
  // views[k][i].grad = grads[i][k] for every k and i (undefined where
  // grads[i] is): the gradients of K models stacked along dim 0, handed to
  // the per-model views the optimizers step (fused_optim.sweep's lockstep).
  // Python's property setter costs ~1 us a view; this is ~0.1 us.
  m.def("set_slice_grads", [](const std::vector<std::vector<at::Tensor>>& views,
                              const std::vector<std::optional<at::Tensor>>& grads) {
    for (size_t k = 0; k < views.size(); ++k) {
      TORCH_CHECK(views[k].size() == grads.size(), "set_slice_grads: model ", k,
                  " has ", views[k].size(), " views for ", grads.size(),
                  " gradients");
      for (size_t i = 0; i < grads.size(); ++i) {
        const at::Tensor& view = views[k][i];
        if (!grads[i].has_value() || !grads[i]->defined()) {
          view.mutable_grad() = at::Tensor();
          continue;
        }
        const at::Tensor& grad = *grads[i];
        TORCH_CHECK(grad.dim() >= 1 &&
                        static_cast<size_t>(grad.size(0)) == views.size(),
                    "set_slice_grads: gradients ", i, " has shape ",
                    grad.sizes(), " for ", views.size(), " models");
        at::Tensor slice = grad.select(0, static_cast<int64_t>(k));
        TORCH_CHECK(slice.sizes() == view.sizes() &&
                        slice.scalar_type() == view.scalar_type() &&
                        slice.device() == view.device(),
                    "set_slice_grads: gradients ", i, " of model ", k,
                    " do not match its view (", slice.sizes(), " ",
                    slice.scalar_type(), " vs ", view.sizes(), " ",
                    view.scalar_type(), ")");
        view.mutable_grad() = std::move(slice);
      }
    }
  });
  // The ops' names (op_specs.h's FO_FOR_EACH_OP), for Python's call tables.
  pybind11::list op_names;
#define FO_OP_NAME(Spec) op_names.append(Spec::kName);
  FO_FOR_EACH_OP(FO_OP_NAME)
#undef FO_OP_NAME
  m.attr("OP_NAMES") = pybind11::tuple(op_names);
  m.def("storage_table", &storage_table,
        "Every legal (param dtype, state dtype, master_weights, "
        "stochastic_rounding) of an op call");
}
