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
//
// Note [gradients read in C++]
// A list argument may also be given as `GradsOf(params)`: the gradients of
// those params, read here from each param (`param.grad()`) when the call
// is made (the ops' fast calls, and sum_of_squares for the clipping norm). A gradient that autograd made has no Python object until
// Python reads `p.grad`; a list of them makes one per gradient (a Python
// object allocated, counted by the cyclic garbage collector, and freed
// after the step) that the op does not need. Measured over whole training
// iterations (zero_grad, backward, step), the C++ read was 0-5% faster on
// 2,000 tensors and 0.2-0.6% on 4; the step alone, within noise
// (benchmarks/results/host-prefetch-cpu-2core-epyc-2026-12-05.md;
// benchmarks/step_after_backward.py, "ours, grads in Python", is the A/B
// of the step). These tensors are owned, not borrowed, for the length of the
// call: nothing but the params holds them, and another thread may set
// `p.grad = None` while the op runs without the GIL. An undefined gradient
// would stay undefined in the list, but a call given a GradsOf with a
// missing or sparse (not strided) gradient is not made: the fast call
// returns False instead of True, having written nothing, and the caller
// (the kept step) takes the general path, which finds what to do with such
// gradients. Before it first builds a call, the kept step asks
// `grads_presence` (the same read, no call), so that a model whose
// gradients are always sparse or partial builds no call it cannot make.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/MaybeOwned.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include "fused_optim/storage_table.h"
#include "launch_capacity.h"
#include "prefetch.h"
#include "op_front.h"
#include "op_inputs.h"

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// Whether every gradient noted is defined, and every defined one strided.
struct GradPresence {
  bool all_present = true;
  bool all_strided = true;
  void note(const at::Tensor& grad) {
    if (!grad.defined()) {
      all_present = false;
    } else if (grad.layout() != at::kStrided) {
      all_strided = false;
    }
  }
};

// Calls fn(param.grad()) for each of `params`, in order (Note [metadata
// misses]: the TensorImpl, then its autograd metadata, then the gradient's
// TensorImpl of the params ahead are asked for first).
template <typename Fn>
void for_each_grad(const std::vector<at::Tensor>& params, const Fn& fn) {
  const size_t n = params.size();
  constexpr size_t kAhead = fused_optim::kPrefetchAhead;
  auto meta = [&](size_t i) { return params[i].unsafeGetTensorImpl()->autograd_meta(); };
  for (size_t i = 0; i < n; ++i) {
    if (i + kAhead < n) fused_optim::prefetch_object(params[i + kAhead].unsafeGetTensorImpl(), 2);
    if (i + kAhead / 2 < n) fused_optim::prefetch_object(meta(i + kAhead / 2), 2);
    if (i + kAhead / 4 < n) {
      const c10::AutogradMetaInterface* m = meta(i + kAhead / 4);
      if (m != nullptr && m->grad().defined()) {
        fused_optim::prefetch_object(m->grad().unsafeGetTensorImpl(), 4);
      }
    }
    fn(params[i].grad());
  }
}

// GradsOf(params): the gradients of `params`, a list of tensors, read when
// a call that takes it is made (Note [gradients read in C++]).
struct GradsOf {
  explicit GradsOf(pybind11::list params_) : params(std::move(params_)) {}
  pybind11::list params;
};

// The tensors of a Python list or tuple, borrowed (Note [borrowed tensor
// lists]), or the gradients a GradsOf names, owned.
class BorrowedTensors {
 public:
  BorrowedTensors() = default;
  BorrowedTensors(BorrowedTensors&& other) noexcept
      : tensors_(std::move(other.tensors_)), owned_(other.owned_), presence_(other.presence_) {
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
    constexpr Py_ssize_t kAhead = fused_optim::kPrefetchAhead;
    for (Py_ssize_t i = 0; i < size; ++i) {
      // (Note [metadata misses]: the Python object, then its TensorImpl)
      if (i + kAhead < size) fused_optim::prefetch_object(PySequence_Fast_GET_ITEM(sequence, i + kAhead), 1);
      if (i + kAhead / 2 < size) {
        PyObject* next = PySequence_Fast_GET_ITEM(sequence, i + kAhead / 2);
        if (THPVariable_Check(next)) {
          fused_optim::prefetch_object(THPVariable_Unpack(next).unsafeGetTensorImpl(), 4);
        }
      }
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

  // Takes the gradient of every param of `grads` (an owned reference each,
  // undefined where a param has none); false (holding none) unless every
  // param is a tensor.
  bool take_grads(const GradsOf& grads) {
    release();
    owned_ = true;
    BorrowedTensors params;
    if (!params.borrow(grads.params.ptr())) return false;
    tensors_.reserve(params.tensors().size());
    for_each_grad(params.tensors(), [&](const at::Tensor& grad) {
      presence_.note(grad);
      tensors_.push_back(grad);
    });
    return true;
  }

  const std::vector<at::Tensor>& tensors() const { return tensors_; }
  // False when these are a GradsOf's gradients and one is missing or not
  // strided (Note [gradients read in C++]).
  bool complete() const { return presence_.all_present && presence_.all_strided; }
  operator at::TensorList() const { return tensors_; }

 private:
  void release() {
    if (!owned_) {
      for (at::Tensor& t : tensors_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
    }
    tensors_.clear();
    owned_ = false;
    presence_ = GradPresence{};
  }

  std::vector<at::Tensor> tensors_;
  bool owned_ = false;  // tensors_ holds references of its own (take_grads)
  GradPresence presence_;  // of the gradients take_grads took
};

}  // namespace

namespace pybind11::detail {
template <>
struct type_caster<BorrowedTensors> {
  PYBIND11_TYPE_CASTER(BorrowedTensors, const_name("list[Tensor]"));
  bool load(handle source, bool) {
    PyObject* object = source.ptr();
    if (PyList_Check(object) || PyTuple_Check(object)) return value.borrow(object);
    // (after the lists: pybind's isinstance looks the class up by name)
    return isinstance<GradsOf>(source) && value.take_grads(source.cast<const GradsOf&>());
  }
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
struct PyArg<at::OptionalIntArrayRef> {
  using type = std::optional<std::vector<int64_t>>;
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
  } else if constexpr (std::is_same_v<Arg, at::OptionalIntArrayRef>) {
    return value.has_value() ? at::OptionalIntArrayRef(*value)
                             : at::OptionalIntArrayRef();
  } else {
    return Arg(value);
  }
}

// Whether an argument lets the call be made: false only for a GradsOf
// list with a missing or sparse gradient (Note [gradients read in C++]).
template <typename T>
bool gradients_complete(const T&) { return true; }
bool gradients_complete(const BorrowedTensors& tensors) { return tensors.complete(); }

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
// Both return True, or False having called nothing when a GradsOf argument
// has a missing or sparse gradient (Note [gradients read in C++]).
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
    if (!(gradients_complete(args) && ...)) return false;
    {
      pybind11::gil_scoped_release no_gil;
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      op.call(to_schema_arg<Args>(args)...);
    }
    // A call made under validate_<op> wrote nothing (the DTensor handler
    // makes this call on the local tensors for either: fused_optim/_dtensor.py).
    if (fused_optim::validate_only()) return true;
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
    return true;
  });
  m.def(("validate_" + py_name).c_str(),
        [op](typename PyArg<Args>::type... args) {
          if (!(gradients_complete(args) && ...)) return false;
          pybind11::gil_scoped_release no_gil;
          at::AutoDispatchBelowADInplaceOrView below_autograd;
          fused_optim::ValidateOnlyGuard validate_only;
          op.call(to_schema_arg<Args>(args)...);
          return true;
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
  // None, having summed nothing, for a GradsOf with a gradient missing or
  // sparse (Note [gradients read in C++]).
  m.def("sum_of_squares", [](const BorrowedTensors& tensors,
                             const std::optional<at::Tensor>& grad_scale,
                             bool per_tensor) -> pybind11::object {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fused_optim::sum_of_squares", "")
            .typed<at::Tensor(at::TensorList, const std::optional<at::Tensor>&, bool)>();
    if (!tensors.complete()) return pybind11::none();
    at::Tensor sum;
    {
      pybind11::gil_scoped_release no_gil;
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      sum = op.call(tensors, grad_scale, per_tensor);
    }
    return pybind11::cast(std::move(sum));
  });
  // Whether every tensor is on the device of the first (True for none):
  // what grouping a list by `t.device` in Python finds, without making a
  // device object per tensor (~0.2 us each; clipping asks every step).
  m.def("on_one_device", [](const BorrowedTensors& tensors) {
    const std::vector<at::Tensor>& list = tensors.tensors();
    return std::all_of(list.begin(), list.end(), [&](const at::Tensor& t) {
      return t.device() == list.front().device();
    });
  });
  // The gradients of a list of params, whether all are present and whether
  // all present ones are dense (strided): what `[p.grad for p in params]`
  // gives, at about a tenth of the cost (the property access is ~0.2 us a
  // param in Python; a step over 2000 params reads them every step).
  m.def("grads_of", [](const BorrowedTensors& borrowed) {
    const std::vector<at::Tensor>& params = borrowed.tensors();
    pybind11::list grads(params.size());
    GradPresence presence;
    size_t i = 0;
    for_each_grad(params, [&](const at::Tensor& grad) {
      presence.note(grad);
      grads[i++] = grad.defined() ? pybind11::cast(grad) : pybind11::none();
    });
    return pybind11::make_tuple(grads, presence.all_present, presence.all_strided);
  });
  // grads_of's two flags alone, making no Python object for a gradient
  // (Note [gradients read in C++]).
  m.def("grads_presence", [](const BorrowedTensors& borrowed) {
    GradPresence presence;
    for_each_grad(borrowed.tensors(), [&](const at::Tensor& grad) { presence.note(grad); });
    return pybind11::make_tuple(presence.all_present, presence.all_strided);
  });
  pybind11::class_<GradsOf>(
      m, "GradsOf",
      "The gradients of a list of params, as a list argument of the ops' "
      "fast calls: read in C++ when the call is made (Note [gradients read "
      "in C++] in csrc/python_module.cpp)")
      .def(pybind11::init<pybind11::list>(), pybind11::arg("params"))
      .def_readonly("params", &GradsOf::params);
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
  m.def(
      "launch_capacities",
      [] {
        pybind11::list rows;
        for (const fused_optim::LaunchCapacity& r : fused_optim::launch_capacities()) {
          rows.append(pybind11::dict(
              pybind11::arg("op") = r.op, pybind11::arg("state_lists") = r.state_lists,
              pybind11::arg("operands") = r.operands,
              pybind11::arg("hyper_bytes") = r.hyper_bytes, pybind11::arg("slots") = r.slots,
              pybind11::arg("tensors") = r.tensors, pybind11::arg("meta_bytes") = r.meta_bytes));
        }
        return rows;
      },
      "What one CUDA launch of each op carries, per set of state lists a call "
      "gives (csrc/launch_capacity.h): the same numbers in a CPU-only build");
}
