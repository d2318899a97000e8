// The host side of every op, shared by every backend: the kernel's C++
// signature (from the op's spec), the checks, the staging and the per-group
// hyperparameters. A backend's kernel is `run<Spec>(const OpCall&)`: it calls
// prepare<Spec>(), which returns a PreparedCall (or nothing to do), and then
// only applies the update its own way (csrc/cpu/apply.h, csrc/cuda/ops_cuda.cpp).
// The shape of ATen's fused optimizer stubs: one front, one apply per device.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "dense_operands.h"
#include "fused_optim/op_specs.h"
#include "fused_optim/update_rules.h"
#include "op_inputs.h"

namespace fused_optim {

// How a call gives its learning rates: `float[] lr` (the default overload) or
// `Tensor[] lr` (the `tensor_lr` overload: one-element tensors read by the
// kernel where they live, so a CUDA step needs no host sync and a captured
// graph sees a scheduler's `lr.fill_()`).
enum class LrKind { kFloats, kTensors };

template <LrKind kLr>
using LrArg = std::conditional_t<kLr == LrKind::kFloats, at::ArrayRef<double>,
                                 at::TensorList>;

// One call of any op, its arguments by role (the schema's, op_specs.h).
struct OpCall {
  const char* op = "";  // e.g. "fused_optim.adam_", for messages
  at::TensorList params, grads;
  std::array<at::TensorList, kMaxStateLists> state{};  // kState order
  at::TensorList master_params, state_steps;
  at::TensorList scalar_state;  // Note [per-tensor scalar state], or empty
  at::IntArrayRef group_index;
  at::ArrayRef<double> lr_values;  // one of lr_values / lr_tensors is used
  at::TensorList lr_tensors;
  bool lr_is_tensor = false;
  std::array<at::ArrayRef<double>, kMaxHyperLists> hyper{};  // kHyper order
  const c10::List<bool>* maximize = nullptr;
  const c10::List<bool>* decoupled_weight_decay = nullptr;  // or null
  at::ArrayRef<double> max_grad_norm;
  at::IntArrayRef new_state;
  const std::optional<at::Tensor>* grad_scale = nullptr;
  const std::optional<at::Tensor>* found_inf = nullptr;
  const std::optional<at::Tensor>* grad_norm = nullptr;
  // An op that reads per-tensor norms (kHasTensorNorms): the [2n] sums of
  // squares the update reads, given by the caller (Note [norms across
  // shards]), or none (the op computes them). Null for the other ops.
  const std::optional<at::Tensor>* tensor_sums = nullptr;
  // The `measure` overloads: return the sums instead of updating.
  bool measure_only = false;
  CallModes modes;  // mode keywords; has_state is filled in by prepare()
  bool stochastic_rounding = false;
  at::OptionalIntArrayRef rounding_ids;  // (precision.h), or none
};

template <typename T, size_t>
using Repeat = T;

// The kernel of op Spec for one lr overload, with the schema's C++
// signature, built from the spec's counts: it gathers its arguments into an
// OpCall and hands it to `kRun` (a backend's run<Spec>, which returns
// nothing, or its measure<Spec>, which returns the sums: Note [norms across
// shards]).
template <typename Spec, LrKind kLr, typename Result,
          Result (*kRun)(const OpCall&),
          typename States = std::make_index_sequence<count_of(Spec::kState)>,
          typename Hypers = std::make_index_sequence<count_of(Spec::kHyper)>,
          typename Decoupled =
              std::make_index_sequence<Spec::kDecoupledDecay ? 1 : 0>,
          typename NewState =
              std::make_index_sequence<Spec::kNewState != nullptr ? 1 : 0>,
          typename Modes = std::make_index_sequence<ModeCount<Spec>::value>,
          typename Scalar = std::make_index_sequence<
              ScalarStateList<Spec>::name != nullptr ? 1 : 0>,
          typename Sums = std::make_index_sequence<
              HasTensorNorms<typename Spec::Hyper>::value ? 1 : 0>>
struct Kernel;

template <typename Spec, LrKind kLr, typename Result,
          Result (*kRun)(const OpCall&), size_t... S, size_t... H,
          size_t... D, size_t... N, size_t... M, size_t... C, size_t... T>
struct Kernel<Spec, kLr, Result, kRun, std::index_sequence<S...>,
              std::index_sequence<H...>, std::index_sequence<D...>,
              std::index_sequence<N...>, std::index_sequence<M...>,
              std::index_sequence<C...>, std::index_sequence<T...>> {
  static Result call(at::TensorList params, at::TensorList grads,
                   Repeat<at::TensorList, S>... state,
                   at::TensorList master_params, at::TensorList state_steps,
                   Repeat<at::TensorList, C>... scalar_state,
                   at::IntArrayRef group_index, LrArg<kLr> lr,
                   Repeat<at::ArrayRef<double>, H>... hyper,
                   const c10::List<bool>& maximize,
                   Repeat<const c10::List<bool>&, D>... decoupled,
                   at::ArrayRef<double> max_grad_norm,
                   Repeat<at::IntArrayRef, N>... new_state,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& grad_norm,
                   Repeat<const std::optional<at::Tensor>&, T>... tensor_sums,
                   Repeat<bool, M>... modes, bool stochastic_rounding,
                   at::OptionalIntArrayRef rounding_ids) {
    OpCall call;
    call.op = op_name();
    call.params = params;
    call.grads = grads;
    call.state = {state...};
    call.master_params = master_params;
    call.state_steps = state_steps;
    ((call.scalar_state = scalar_state), ...);
    call.group_index = group_index;
    if constexpr (kLr == LrKind::kFloats) {
      call.lr_values = lr;
    } else {
      call.lr_tensors = lr;
      call.lr_is_tensor = true;
    }
    call.hyper = {hyper...};
    call.maximize = &maximize;
    ((call.decoupled_weight_decay = &decoupled), ...);
    call.max_grad_norm = max_grad_norm;
    ((call.new_state = new_state), ...);
    call.grad_scale = &grad_scale;
    call.found_inf = &found_inf;
    call.grad_norm = &grad_norm;
    ((call.tensor_sums = &tensor_sums), ...);
    call.measure_only = !std::is_void_v<Result>;
    const bool mode_values[] = {modes..., false};
    for (size_t k = 0; k < sizeof...(M); ++k) call.modes.mode[k] = mode_values[k];
    call.stochastic_rounding = stochastic_rounding;
    call.rounding_ids = rounding_ids;
    return kRun(call);
  }

  static const char* op_name() {
    static const std::string name = std::string("fused_optim.") + Spec::kName;
    return name.c_str();
  }
};

// The overload names of op Spec's kernels (op_schema.cpp defines them):
// the update with float or tensor lr, and, for an op that reads per-tensor
// norms, the measuring call with either (Note [norms across shards]).
template <typename Spec>
std::string overload_name(LrKind lr, bool measure) {
  std::string out = Spec::kName;
  if (measure) out += ".measure";
  if (lr == LrKind::kTensors) out += measure ? "_tensor_lr" : ".tensor_lr";
  return out;
}

// Registers a backend's kernels of op Spec: `kRun` for both lr overloads of
// the update and, for an op with tensor norms, `kMeasure` for both of its
// `measure` overloads.
template <typename Spec, void (*kRun)(const OpCall&),
          at::Tensor (*kMeasure)(const OpCall&)>
void impl_op(torch::Library& m) {
  m.impl(overload_name<Spec>(LrKind::kFloats, false).c_str(),
         &Kernel<Spec, LrKind::kFloats, void, kRun>::call);
  m.impl(overload_name<Spec>(LrKind::kTensors, false).c_str(),
         &Kernel<Spec, LrKind::kTensors, void, kRun>::call);
  if constexpr (HasTensorNorms<typename Spec::Hyper>::value) {
    m.impl(overload_name<Spec>(LrKind::kFloats, true).c_str(),
           &Kernel<Spec, LrKind::kFloats, at::Tensor, kMeasure>::call);
    m.impl(overload_name<Spec>(LrKind::kTensors, true).c_str(),
           &Kernel<Spec, LrKind::kTensors, at::Tensor, kMeasure>::call);
  }
}

// Registers the kernels `backend::run<Spec>` and `backend::measure<Spec>`
// of a backend namespace (see impl_op).
#define FO_IMPL_OP(m, Spec, backend) \
  ::fused_optim::impl_op<Spec, &backend::run<Spec>, &backend::measure<Spec>>(m)

// A call that passed every check, staged, with its hyperparameters.
template <typename Spec>
struct PreparedCall {
  using Hyper = typename Spec::Hyper;
  // The tensor lists in schema order: params, grads, each state list (empty
  // when unused), then master_params (empty without master weights).
  std::vector<TensorListArg> lists;
  CallPrecision precision;
  CallModes modes;
  std::optional<DenseOperands> operands;
  // Hyperparameter sets: tensors of one group share one (SGD: one per group
  // and new-buffer flag). sets[set_of[t]] is tensor t's, with its weight
  // decay mode in decay[set_of[t]].
  std::vector<Hyper> sets;
  std::vector<WeightDecay> decay;
  std::vector<int32_t> set_of;
  at::IntArrayRef group_index;
  // With stochastic rounding, each tensor's random stream
  // (stochastic_rounding_stream of its rounding id); empty otherwise.
  std::vector<uint32_t> rounding_streams;
  at::TensorList state_steps;
  at::TensorList scalar_state;  // Note [per-tensor scalar state], or empty
  const std::optional<at::Tensor>* grad_scale = nullptr;
  const std::optional<at::Tensor>* found_inf = nullptr;
  const std::optional<at::Tensor>* grad_norm = nullptr;  // clipping, or none
  // Note [per-tensor norms] (hyperparams.h): for an op whose Hyper has
  // kHasTensorNorms, the [2n] sums of squares of the params (or master
  // weights) and then the grads, on the params' device; undefined otherwise,
  // and for an op with kNormsOfUpdate, whose backend measures its own
  // (Note [norms of the update]). Or the sums the caller gave (Note [norms
  // across shards]), for either kind.
  at::Tensor tensor_sums;
  bool measure_only = false;  // the `measure` overloads
  // Gradients replaced for the call (Note [a gradient that aliases its
  // param]), kept alive.
  std::vector<at::Tensor> replaced_grads;

  size_t master_list() const { return lists.size() - 1; }
  bool has_grad_scale() const {
    return grad_scale->has_value() && (*grad_scale)->defined();
  }
  bool has_grad_norm() const {
    return grad_norm->has_value() && (*grad_norm)->defined();
  }
};

// ---- the non-template parts (op_front.cpp) --------------------------------

// Checks the arguments every op has (tensor lists, precision, AMP, lr,
// group lists, step counters) and returns the checked lists and precision.
// `lists` holds params, grads and the state lists; master_params is
// appended. `hyper_names` name call.hyper's entries.
struct CommonChecks {
  std::vector<TensorListArg> lists;
  CallPrecision precision;
};
CommonChecks check_common(at::DeviceType backend, const OpCall& call,
                          std::vector<TensorListArg> lists,
                          const std::vector<const char*>& hyper_names,
                          bool steps_optional);

// Note [a gradient that aliases its param]
// torch.optim's AdamW decays the param in place and then reads the
// gradient, so a gradient that is the param's own memory (p.grad = p.data:
// rare, but legal) is read decayed. Our kernels read both before writing
// either, so for such a call the aliased gradients are replaced by the
// decayed param, computed as torch computes it (param * (1 - lr * wd), in
// the param's dtype). Returns the replaced gradient list, or an empty one
// when no gradient aliases its param (the usual case, a pointer compare per
// tensor). Only for groups with decoupled decay and without maximize: with
// maximize torch negates the gradient into a new tensor before decaying.
// A call without a decoupled_weight_decay list (an op whose decay is always
// decoupled, AlwaysDecoupled) decays every group.
std::vector<at::Tensor> grads_read_after_decoupled_decay(
    const OpCall& call, size_t weight_decay_index);

// Checks an op's per-tensor scalar state list `name` (Note [per-tensor
// scalar state]): as state_steps, a one-element float32/float64 tensor per
// param on the device the kernel reads it on.
void check_scalar_state(at::DeviceType backend, const OpCall& call,
                        const char* name);

// Note [per-tensor norms]: the sums of squares of each of `params` and then
// of each of `grads` (shape [2n]), in one pass (the sum_of_squares op with
// per_tensor=True, through the dispatcher: the backend of the tensors).
at::Tensor per_tensor_sums(at::TensorList params, at::TensorList grads);

// Note [norms across shards]
// A sharded param (FSDP2, tensor parallelism: a DTensor with a Shard
// placement) is not pointwise for an op that reads per-tensor norms (LARS,
// LAMB): the norm of a shard is not the param's. The whole tensor's sum of
// squares is the sum of its shards' sums, so the call is made in two:
//   1. the op's `measure` overload (same arguments, returns a float64 [2n]
//      tensor, writes nothing): the sums of squares the update would read,
//      of the local shards (LARS: of params/master weights and grads, as
//      given; LAMB: a measuring pass at the step the update will use, the
//      counters read, not advanced);
//   2. the caller sums each tensor's two entries over the ranks that hold
//      its shards (fused_optim/_dtensor.py: one all-reduce per mesh
//      dimension the tensors are sharded on) and calls the update with
//      `tensor_sums` = those sums, which the op then reads instead of
//      computing its own.
// Plain calls leave tensor_sums None. A given tensor_sums is checked here
// (1-D, 2n entries, float32/float64, contiguous, on the params' device for
// CUDA and on the CPU for the CPU kernels); `measure` refuses one.
void check_tensor_sums(at::DeviceType backend, const OpCall& call);

// Each tensor's stochastic-rounding stream (precision.h): of its
// `rounding_ids` entry, or of (group_index << 32) | its position in the call.
std::vector<uint32_t> rounding_streams(const OpCall& call);

// Group g's learning rate: its tensor (read by the kernel) or its float.
LrSource lr_source(const OpCall& call, size_t g);

// The number of groups: the length of the lr list.
inline size_t num_groups(const OpCall& call) {
  return call.lr_is_tensor ? call.lr_tensors.size() : call.lr_values.size();
}

// ---- the front ------------------------------------------------------------

// What a backend's measure<Spec> (Note [norms across shards]) returns
// without measuring: an empty tensor for a call with no tensors (or a
// validate-only one), the front's own sums for an op whose norms are of
// its inputs (LARS). Nothing when the backend must run its measuring pass
// (kNormsOfUpdate: LAMB).
template <typename Spec>
std::optional<at::Tensor> sums_from_front(
    const std::optional<PreparedCall<Spec>>& call) {
  using Hyper = typename Spec::Hyper;
  if (!call) return at::empty({0}, at::TensorOptions().dtype(at::kDouble));
  if constexpr (!HasTensorNorms<Hyper>::value) {
    TORCH_INTERNAL_ASSERT(false, "measure of an op without tensor norms");
  } else if constexpr (!NormsOfUpdate<Hyper>::value) {
    return call->tensor_sums.to(at::kDouble);
  }
  return std::nullopt;
}

template <typename Spec>
std::vector<const char*> hyper_names() {
  std::vector<const char*> names;
  for (const auto& field : Spec::kHyper) names.push_back(field.name);
  return names;
}

constexpr bool same_name(const char* a, const char* b) {
  return *a == *b && (*a == '\0' || same_name(a + 1, b + 1));
}

// The position of "weight_decay" in the spec's hyperparameters (every op has
// one: hyperparams.h).
template <typename Spec>
constexpr size_t weight_decay_index() {
  constexpr size_t kCount = count_of(Spec::kHyper);
  size_t k = 0;
  while (k < kCount && !same_name(Spec::kHyper[k].name, "weight_decay")) ++k;
  return k;
}

// Checks everything, then (unless there is nothing to do: no tensors, or a
// validate-only call, Note [validate only]) stages the operands and builds
// the hyperparameter sets. Writes no input: staging allocates and copies but
// goes before the first write, so that even an allocation failure loses
// nothing. The caller then increments the step counters (CPU) or lets the
// device do it (CUDA), applies, and writes back the staged operands.
template <typename Spec>
std::optional<PreparedCall<Spec>> prepare(at::DeviceType backend,
                                          OpCall call) {
  constexpr size_t kNumState = count_of(Spec::kState);
  std::vector<TensorListArg> lists = {
      {"params", call.params, /*written=*/true, /*optional=*/false,
       ListDtype::kParam},
      // The grads are written (unscaled, in place) only when AMP scaled them.
      {"grads", call.grads,
       /*written=*/call.grad_scale->has_value() && (*call.grad_scale)->defined(),
       /*optional=*/false, ListDtype::kParam}};
  for (size_t k = 0; k < kNumState; ++k) {
    const StateList& s = Spec::kState[k];
    const bool required =
        s.used == StateList::kAlways || (s.used >= 0 && call.modes.mode[s.used]);
    TORCH_CHECK(s.used < 0 || call.modes.mode[s.used] || call.state[k].empty(),
                call.op, ": ", s.name, " must be empty when ",
                Spec::kModes[s.used < 0 ? 0 : s.used], "=False");
    lists.push_back({s.name, call.state[k], /*written=*/true,
                     /*optional=*/!required, ListDtype::kState});
    call.modes.has_state[k] = !call.state[k].empty();
  }
  CommonChecks checked =
      check_common(backend, call, std::move(lists), hyper_names<Spec>(),
                   Spec::Hyper::kStepsOptional);
  const size_t n = call.params.size();
  // A combination of modes the op has no kernel for (SGD: Nesterov without
  // momentum); the element-op dispatch of both backends refuses it too.
  const char* mode_error = Spec::mode_error(call.modes);
  TORCH_CHECK(mode_error == nullptr || n == 0, call.op, ": ", mode_error);
  if constexpr (ScalarStateList<Spec>::name != nullptr) {
    check_scalar_state(backend, call, ScalarStateList<Spec>::name);
  }
  if constexpr (Spec::kNewState != nullptr) {
    check_tensor_indices(call.op, Spec::kNewState, call.new_state,
                         call.modes.has_state[0] ? n : 0);
  }
  if (call.tensor_sums != nullptr) check_tensor_sums(backend, call);
  if (n == 0 || validate_only()) return std::nullopt;

  using Hyper = typename Spec::Hyper;
  PreparedCall<Spec> out;
  out.measure_only = call.measure_only;
  out.precision = checked.precision;
  out.modes = call.modes;
  out.group_index = call.group_index;
  if (out.precision.stochastic_rounding) out.rounding_streams = rounding_streams(call);
  out.state_steps = call.state_steps;
  out.scalar_state = call.scalar_state;
  out.grad_scale = call.grad_scale;
  out.found_inf = call.found_inf;
  out.grad_norm = call.grad_norm;
  out.lists = std::move(checked.lists);
  if constexpr (Spec::kDecoupledDecay || AlwaysDecoupled<Spec>::value) {
    static_assert(weight_decay_index<Spec>() < count_of(Spec::kHyper),
                  "an op with decoupled decay needs a weight_decay hyperparameter");
    out.replaced_grads =
        grads_read_after_decoupled_decay(call, weight_decay_index<Spec>());
    if (!out.replaced_grads.empty()) out.lists[1].tensors = out.replaced_grads;
  }
  out.operands.emplace(out.lists);
  if (call.tensor_sums != nullptr && call.tensor_sums->has_value() &&
      (*call.tensor_sums)->defined()) {
    out.tensor_sums = **call.tensor_sums;  // Note [norms across shards]
  } else if constexpr (HasTensorNorms<Hyper>::value &&
                       !NormsOfUpdate<Hyper>::value) {
    // (An op with norms of its update measures them in the backend's own
    // first pass instead: Note [norms of the update].)
    // Of the master weights when the call has them (the values the update
    // reads), else of the params; of the grads as given (staging copies
    // nothing for a dense grad, and sum_of_squares reads any layout).
    out.tensor_sums = per_tensor_sums(
        out.precision.master_weights ? call.master_params : call.params,
        out.lists[1].tensors);
  }

  // Hyperparameter sets: one per group, and per (group, new state) for ops
  // with a new-state list.
  const size_t groups = num_groups(call);
  const bool decoupled_by_group = call.decoupled_weight_decay != nullptr;
  std::vector<Hyper> group_hypers(groups);
  std::vector<WeightDecay> group_decay(groups);
  constexpr size_t kNumHyper = count_of(Spec::kHyper);
  for (size_t g = 0; g < groups; ++g) {
    double values[kNumHyper];
    for (size_t k = 0; k < kNumHyper; ++k) values[k] = call.hyper[k][g];
    group_hypers[g] = make_hyper<Spec>(lr_source(call, g), values);
    group_hypers[g].maximize = call.maximize->get(g);
    group_hypers[g].max_grad_norm = call.max_grad_norm[g];
    group_decay[g] = weight_decay_mode(
        group_hypers[g].weight_decay,
        AlwaysDecoupled<Spec>::value ||
            (decoupled_by_group && call.decoupled_weight_decay->get(g)));
  }
  std::vector<int32_t> set_of_key(2 * groups, -1);
  std::vector<bool> is_new(n, false);
  for (int64_t i : call.new_state) is_new[i] = true;
  out.set_of.resize(n);
  for (size_t t = 0; t < n; ++t) {
    const int64_t g = call.group_index[t];
    int32_t& set = set_of_key[2 * g + (is_new[t] ? 1 : 0)];
    if (set < 0) {
      set = static_cast<int32_t>(out.sets.size());
      out.sets.push_back(group_hypers[g]);
      if constexpr (Spec::kNewState != nullptr) {
        if (is_new[t]) Spec::mark_new_state(out.sets.back());
      }
      out.decay.push_back(group_decay[g]);
    }
    out.set_of[t] = set;
  }
  return out;
}

}  // namespace fused_optim
