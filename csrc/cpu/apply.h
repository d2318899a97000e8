// The CPU element loop shared by every op: load an element's operands in
// their storage types, run the op's update rule (element_ops.h) in the
// compute type, store the results. The storage side of a call (mixed
// precision, AMP, stochastic rounding) is here, once, for every optimizer.
//
//   param    read from the float32 master copy when the call has master
//            weights (then the param is only written: rounded from the
//            master, to nearest); otherwise read, and written rounded to
//            nearest or, with stochastic rounding, stochastically;
//   grad     divided by AMP's grad scale (multiplied by its inverse) and
//            written back unscaled when the call has a grad scale; then
//            multiplied by the group's clipping factor (1 when not
//            clipped: exact), in registers only;
//   state    one storage dtype for all state tensors of the call.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/convert.h"
#include "cpu/multi_tensor_cpu.h"
#include "cpu/sum_squares.h"
#include "cpu/vectorized_loop.h"
#include "fused_optim/bool_switch.h"
#include "fused_optim/element_ops.h"
#include "fused_optim/precision.h"
#include "fused_optim/update_rules.h"
#include "fused_optim/op_specs.h"
#include "fused_optim/storage_table.h"
#include "op_front.h"

namespace fused_optim::cpu {

// The storage of one call, as types and flags.
template <typename Param, typename State, bool kMaster, bool kStochastic,
          bool kUnscale>
struct Storage {
  using param_t = Param;
  using state_t = State;
  using compute_t = at::opmath_type<Param>;
  static constexpr bool kMasterWeights = kMaster;
  static constexpr bool kStochasticRounding = kStochastic;
  static constexpr bool kUnscaleGrads = kUnscale;
};

// What a tensor's element loop needs besides its operands and scalars.
template <typename T>
struct ElementInputs {
  T inverse_grad_scale = T(1);   // used only with kUnscaleGrads
  T grad_clip = T(1);            // clip_coefficient (update_rules.h), or 1
  uint32_t rounding_key = 0;     // used only with kStochasticRounding
};

// One tensor's operands from element `begin` on, and how an element of
// them is read: the update (apply_subrange) and the measuring pass
// (measure_block) read alike. `operand[k]` points at element 0 of operand
// k of the op (element_ops.h's order), `master_base` at the master copy's
// (or nullptr).
template <typename S, int kN>
struct ElementOperands {
  using T = typename S::compute_t;
  using param_t = typename S::param_t;
  using state_t = typename S::state_t;
  param_t* param;
  param_t* grad;
  float* master;
  state_t* state[kN];  // [2, kN) used
  T inverse_grad_scale;  // used only with kUnscaleGrads
  T grad_clip;

  ElementOperands(char* const* operand, float* master_base, int64_t begin,
                  const ElementInputs<T>& in)
      : param(reinterpret_cast<param_t*>(operand[0]) + begin),
        grad(reinterpret_cast<param_t*>(operand[1]) + begin),
        master(S::kMasterWeights ? master_base + begin : nullptr),
        inverse_grad_scale(in.inverse_grad_scale),
        grad_clip(in.grad_clip) {
    for (int k = 2; k < kN; ++k) {
      state[k] = reinterpret_cast<state_t*>(operand[k]) + begin;
    }
  }

  // Element i in the compute type into x: the param (its master copy with
  // master weights), the gradient unscaled and clipped, the state. Returns
  // the unscaled, unclipped gradient (what AMP writes back).
  T load(T (&x)[kN], int64_t i) const {
    if constexpr (S::kMasterWeights) {
      x[0] = master[i];
    } else {
      x[0] = to_compute(param[i]);
    }
    x[1] = to_compute(grad[i]);
    if constexpr (S::kUnscaleGrads) x[1] = x[1] * inverse_grad_scale;
    const T unscaled = x[1];
    x[1] = x[1] * grad_clip;
    for (int k = 2; k < kN; ++k) x[k] = to_compute(state[k][i]);
    return unscaled;
  }
};

// Updates elements [begin, end) of one tensor, a range within which the
// element indices share their high 32 bits (see apply_range below).
// `operand[k]` points at element 0 of operand k of the op (element_ops.h's
// order), `master` at the master copy's (or nullptr).
template <typename Op, typename S, WeightDecay kDecay, typename Scalars>
void apply_subrange(char* const* operand, float* master_base, int64_t begin,
                    int64_t end, const Scalars& s,
                    const ElementInputs<typename S::compute_t>& in) {
  using T = typename S::compute_t;
  using param_t = typename S::param_t;
  using state_t = typename S::state_t;
  constexpr int kN = Op::kNumOperands;
  const ElementOperands<S, kN> data(operand, master_base, begin, in);
  const uint32_t key = in.rounding_key;
  const uint32_t element_low = static_cast<uint32_t>(begin);
  const uint32_t element_high = static_cast<uint32_t>(begin >> 32);
  vectorized_loop(end - begin, [=](int64_t i) FO_LOOP_BODY {
    T x[kN];
    const T unscaled_grad = data.load(x, i);
    if constexpr (S::kUnscaleGrads) data.grad[i] = from_compute<param_t>(unscaled_grad);
    Op::template update<kDecay>(x, s);
    if constexpr (S::kMasterWeights) data.master[i] = x[0];
    if constexpr (S::kStochasticRounding) {
      static_assert(std::is_same_v<param_t, c10::BFloat16>);
      data.param[i] = c10::BFloat16(
          bf16_bits_round_stochastic(
              x[0], stochastic_rounding_bits(
                        key, element_low + static_cast<uint32_t>(i),
                        element_high)),
          c10::BFloat16::from_bits());
    } else {
      data.param[i] = from_compute<param_t>(x[0]);
    }
    for (int k = 2; k < kN; ++k) data.state[k][i] = from_compute<state_t>(x[k]);
  });
}

// Updates elements [begin, end) of one tensor: apply_subrange on pieces
// that do not cross a multiple of 2^32 elements (only tensors of more than
// 2^32 elements have such a crossing).
template <typename Op, typename S, WeightDecay kDecay, typename Scalars>
void apply_range(char* const* operand, float* master, int64_t begin,
                 int64_t end, const Scalars& s,
                 const ElementInputs<typename S::compute_t>& in) {
  constexpr int64_t kLowSpan = int64_t{1} << 32;
  while (begin < end) {
    const int64_t stop = std::min(end, (begin / kLowSpan + 1) * kLowSpan);
    apply_subrange<Op, S, kDecay>(operand, master, begin, stop, s, in);
    begin = stop;
  }
}

// The lists (in call.lists) of an op's kN operands: the lists in use, in
// schema order, without the master weights.
template <typename Spec>
std::vector<size_t> operand_lists(const PreparedCall<Spec>& call, int kN) {
  std::vector<size_t> out;
  for (size_t k = 0; k < call.master_list(); ++k) {
    if (!call.lists[k].tensors.empty()) out.push_back(k);
  }
  TORCH_INTERNAL_ASSERT(out.size() == size_t(kN));
  return out;
}

// Note [norms of the update] (hyperparams.h), the CPU's measuring pass:
// elements [begin, begin + n) of one tensor, n <= kMeasureBlock, loaded as
// apply_subrange loads them (nothing is stored: the unscaled gradient is
// written back by the update pass), run through Op::direction; the squares
// of the param (as direction leaves it) and of the direction are buffered
// and summed in double (cpu/sum_squares.h). Returns {param sum, update sum}.
constexpr int64_t kMeasureBlock = 4096;

template <typename Op, typename S, WeightDecay kDecay, typename Scalars>
std::pair<double, double> measure_block(
    char* const* operand, float* master_base, int64_t begin, int64_t n,
    const Scalars& s, const ElementInputs<typename S::compute_t>& in) {
  using T = typename S::compute_t;
  constexpr int kN = Op::kNumOperands;
  const ElementOperands<S, kN> data(operand, master_base, begin, in);
  T param_square[kMeasureBlock];
  T update_square[kMeasureBlock];
  T* const ps = param_square;
  T* const us = update_square;
  vectorized_loop(n, [=](int64_t i) FO_LOOP_BODY {
    T x[kN];
    data.load(x, i);
    const T u = Op::template direction<kDecay>(x, s);
    ps[i] = x[0];
    us[i] = u;
  });
  return {sum_squares(ps, n), sum_squares(us, n)};
}

// The measuring pass over a prepared call: every tensor's {param, update}
// sums of squares as the [2n] layout of Note [per-tensor norms] (entry t
// and n + t), from fixed blocks summed per tensor in order: the same bits
// whatever the thread count.
template <typename Op, typename S, typename Spec, typename Scalars>
std::vector<double> measure_op(
    const PreparedCall<Spec>& call, const std::vector<Scalars>& scalars,
    const std::vector<ElementInputs<typename S::compute_t>>& inputs) {
  constexpr int kN = Op::kNumOperands;
  const std::vector<size_t> lists = operand_lists(call, kN);
  const DenseOperands& operands = *call.operands;
  const std::vector<int64_t> numels = numels_of(call.lists[0].tensors);
  const size_t n = numels.size();
  std::vector<std::pair<size_t, int64_t>> blocks;  // (tensor, first element)
  for (size_t t = 0; t < n; ++t) {
    for (int64_t b = 0; b < numels[t]; b += kMeasureBlock) blocks.push_back({t, b});
  }
  std::vector<std::pair<double, double>> block_sums(blocks.size());
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  // A few blocks run on this thread: waking the pool would cost more.
  const int64_t grain = num_blocks < 8 ? std::max<int64_t>(num_blocks, 1) : 1;
  at::parallel_for(0, num_blocks, grain, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const auto [t, begin] = blocks[b];
      char* operand[kN];
      for (int k = 0; k < kN; ++k) operand[k] = operands.data(lists[k], t);
      float* master =
          S::kMasterWeights
              ? reinterpret_cast<float*>(operands.data(call.master_list(), t))
              : nullptr;
      const int64_t count = std::min(kMeasureBlock, numels[t] - begin);
      const bool ran = with_decay_mode<Op>(call.decay[call.set_of[t]], [&](auto decay) {
        block_sums[b] = measure_block<Op, S, decltype(decay)::value>(
            operand, master, begin, count, scalars[t], inputs[t]);
      });
      TORCH_INTERNAL_ASSERT(ran, "decoupled decay for an L2-only op");
    }
  });
  std::vector<double> sums(2 * n, 0.0);
  for (size_t b = 0; b < blocks.size(); ++b) {
    sums[blocks[b].first] += block_sums[b].first;
    sums[n + blocks[b].first] += block_sums[b].second;
  }
  return sums;
}

// The storage type of each Dtype.
template <Dtype>
struct StorageType;
template <>
struct StorageType<Dtype::kFloat> { using type = float; };
template <>
struct StorageType<Dtype::kDouble> { using type = double; };
template <>
struct StorageType<Dtype::kHalf> { using type = at::Half; };
template <>
struct StorageType<Dtype::kBFloat16> { using type = at::BFloat16; };

// Calls fn(Storage<...>{}) for a call's precision. Only the combinations of
// the storage table (storage_table.h) are instantiated; ops without state
// only with the state dtype equal to the param dtype.
template <bool kHasState, typename Fn>
void with_storage(const CallPrecision& p, bool unscale, const Fn& fn) {
  const Dtype param = *storage_dtype(p.param_dtype);
  const Dtype state = kHasState ? *storage_dtype(p.state_dtype) : param;
  with_dtype(param, [&](auto param_tag) {
    with_dtype(state, [&](auto state_tag) {
      constexpr Dtype kParam = decltype(param_tag)::value;
      constexpr Dtype kState = decltype(state_tag)::value;
      using Param = typename StorageType<kParam>::type;
      using State = typename StorageType<kState>::type;
      FO_BOOL_SWITCH(p.master_weights, kMaster, [&] {
        FO_BOOL_SWITCH(p.stochastic_rounding, kStochastic, [&] {
          FO_BOOL_SWITCH(unscale, kUnscale, [&] {
            if constexpr (legal_storage(kParam, kState, kHasState, kMaster,
                                        kStochastic)) {
              fn(Storage<Param, State, kMaster, kStochastic, kUnscale>{});
            } else {
              TORCH_INTERNAL_ASSERT(false, "unchecked precision");
            }
          });
        });
      });
    });
  });
}

// Runs Op over every element of every tensor of a prepared call, in
// parallel. `scalars[t]` and `inputs[t]` are tensor t's.
template <typename Op, typename S, typename Spec, typename Scalars>
void apply_op(const PreparedCall<Spec>& call,
              const std::vector<Scalars>& scalars,
              const std::vector<ElementInputs<typename S::compute_t>>& inputs) {
  constexpr int kN = Op::kNumOperands;
  const std::vector<size_t> lists = operand_lists(call, kN);
  const DenseOperands& operands = *call.operands;
  parallel_for_each_range(
      numels_of(call.lists[0].tensors),
      [&](size_t t, int64_t begin, int64_t end) {
        char* operand[kN];
        for (int k = 0; k < kN; ++k) {
          operand[k] = operands.data(lists[k], t);
        }
        float* master = S::kMasterWeights
                            ? reinterpret_cast<float*>(
                                  operands.data(call.master_list(), t))
                            : nullptr;
        const bool ran = with_decay_mode<Op>(call.decay[call.set_of[t]], [&](auto decay) {
          apply_range<Op, S, decltype(decay)::value>(
              operand, master, begin, end, scalars[t], inputs[t]);
        });
        TORCH_INTERNAL_ASSERT(ran, "decoupled decay for an L2-only op");
      });
}

// The AMP, clipping and rounding inputs of each tensor of a call. `steps`
// are the counters after this step's increment (empty: 0 for every tensor).
template <typename T, typename Spec>
std::vector<ElementInputs<T>> element_inputs(const PreparedCall<Spec>& call,
                                             const std::vector<double>& steps) {
  const size_t num_tensors = call.group_index.size();
  ElementInputs<T> common;
  if (call.has_grad_scale()) {
    common.inverse_grad_scale =
        T(inverse_grad_scale((*call.grad_scale)->template item<float>()));
  }
  std::vector<ElementInputs<T>> out(num_tensors, common);
  if (call.has_grad_norm()) {
    const T norm = T((*call.grad_norm)->template item<double>());
    std::vector<T> clip_of_set(call.sets.size());
    for (size_t k = 0; k < call.sets.size(); ++k) {
      clip_of_set[k] = clip_coefficient<T>(norm, call.sets[k].max_grad_norm);
    }
    for (size_t t = 0; t < num_tensors; ++t) {
      out[t].grad_clip = clip_of_set[call.set_of[t]];
    }
  }
  if (call.precision.stochastic_rounding) {
    for (size_t t = 0; t < num_tensors; ++t) {
      out[t].rounding_key = stochastic_rounding_key(
          call.rounding_streams[t], steps.empty() ? 0.0 : steps[t]);
    }
  }
  return out;
}

// Each tensor's scalars: its hyperparameter set (hyperparams.h) at its step
// count, memoised by (set, step) as per_tensor_scalars does.
template <typename T, typename Spec>
auto scalars_of(const PreparedCall<Spec>& call,
                const std::vector<double>& steps) {
  using Scalars = decltype(call.sets[0].template scalars<T>(0.0, 0.0));
  return per_tensor_scalars<Scalars>(
      call.set_of, steps, [&](int32_t set, double step) {
        const auto& h = call.sets[set];
        return h.template scalars<T>(h.lr.read(), step);
      });
}

// Advances every tensor's scalar state (Note [per-tensor scalar state]):
// new = advance_scalar_state(lr, step, old) in the tensor's dtype, written
// back. Returns the new values. Call only after every check has passed.
template <typename Spec>
std::vector<double> advance_scalar_state(const PreparedCall<Spec>& call,
                                         const std::vector<double>& steps) {
  std::vector<double> out(call.scalar_state.size());
  for (size_t t = 0; t < out.size(); ++t) {
    const auto& h = call.sets[call.set_of[t]];
    const double lr = h.lr.read();
    const double step = steps.empty() ? 0.0 : steps[t];
    const at::Tensor& value = call.scalar_state[t];
    if (value.scalar_type() == at::kFloat) {
      float* v = value.data_ptr<float>();
      *v = h.advance_scalar_state(lr, step, *v);
      out[t] = *v;
    } else {
      double* v = value.data_ptr<double>();
      *v = h.advance_scalar_state(lr, step, *v);
      out[t] = *v;
    }
  }
  return out;
}

// Each tensor's scalars from its hyperparameter set, step and (new) scalar
// state, memoised when consecutive tensors share all three.
template <typename T, typename Spec>
auto scalars_with_state(const PreparedCall<Spec>& call,
                        const std::vector<double>& steps,
                        const std::vector<double>& scalar_state) {
  using Scalars = decltype(scalars_for<T>(call.sets[0], 0.0, 0.0, 0.0));
  const size_t n = call.set_of.size();
  std::vector<Scalars> out(n);
  for (size_t t = 0; t < n; ++t) {
    const double step = steps.empty() ? 0.0 : steps[t];
    if (t > 0 && call.set_of[t] == call.set_of[t - 1] &&
        step == (steps.empty() ? 0.0 : steps[t - 1]) &&
        scalar_state[t] == scalar_state[t - 1]) {
      out[t] = out[t - 1];
      continue;
    }
    const auto& h = call.sets[call.set_of[t]];
    out[t] = scalars_for<T>(h, h.lr.read(), step, scalar_state[t]);
  }
  return out;
}

// Each tensor's scalars from its hyperparameter set and its norms (Note
// [per-tensor norms]): from `sum`, the [2n] sums of squares (the call's
// tensor_sums, or a measuring pass's: Note [norms of the update]), with a
// gradient's norm made that of the unscaled, clipped gradient by the same
// factors the loop applies (`inputs`).
template <typename T, typename Spec, typename Inputs>
auto scalars_with_norms(const PreparedCall<Spec>& call,
                        const std::vector<double>& steps, const Inputs& inputs,
                        bool unscale, const double* sum) {
  using Hyper = typename Spec::Hyper;
  using Scalars = decltype(scalars_for<T>(call.sets[0], 0.0, 0.0, 0.0));
  const size_t n = call.set_of.size();
  std::vector<Scalars> out(n);
  for (size_t t = 0; t < n; ++t) {
    const double step = steps.empty() ? 0.0 : steps[t];
    const auto& h = call.sets[call.set_of[t]];
    const TensorNorms norms = norms_from_sums<Hyper>(
        sum[t], sum[n + t],
        unscale ? static_cast<double>(inputs[t].inverse_grad_scale) : 1.0,
        static_cast<double>(inputs[t].grad_clip));
    out[t] = scalars_for<T>(h, h.lr.read(), step, 0.0, norms);
  }
  return out;
}

// Each tensor's scalars for the measuring pass (Note [norms of the update]):
// those of zero norms, whose trust ratio is 1 and unused by direction().
template <typename T, typename Spec>
auto scalars_for_measuring(const PreparedCall<Spec>& call,
                           const std::vector<double>& steps) {
  using Scalars = decltype(scalars_for<T>(call.sets[0], 0.0, 0.0, 0.0));
  return per_tensor_scalars<Scalars>(
      call.set_of, steps, [&](int32_t set, double step) {
        const auto& h = call.sets[set];
        return scalars_for<T>(h, h.lr.read(), step, 0.0, TensorNorms{});
      });
}

// Whether AMP found an inf or NaN in the gradients: then the call is
// skipped whole (torch's fused optimizers do the same). On the CPU reading
// the flag costs nothing.
inline bool amp_skips_step(const c10::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->defined() &&
         found_inf->item<float>() != 0.0f;
}

// Calls fn(op, storage) with a prepared call's element op
// (Spec::with_element_op) and storage types (with_storage).
template <typename Spec, typename Fn>
void with_op_and_storage(const PreparedCall<Spec>& call, const Fn& fn) {
  Spec::with_element_op(call.modes, [&](auto op) {
    with_storage<(decltype(op)::kNumOperands > 2)>(
        call.precision, call.has_grad_scale(),
        [&](auto storage) { fn(op, storage); });
    return 0;
  });
}

// The CPU kernel of op Spec (op_front.h registers it for both lr
// overloads): the shared front, then the element loop.
template <typename Spec>
void run(const OpCall& args) {
  using Hyper = typename Spec::Hyper;
  std::optional<PreparedCall<Spec>> call = prepare<Spec>(at::kCPU, args);
  if (!call || amp_skips_step(*call->found_inf)) return;
  // Every check has passed: from here on we write.
  const std::vector<double> steps = increment_state_steps(call->state_steps);
  std::vector<double> scalar_state;
  if constexpr (HasScalarState<Hyper>::value) {
    scalar_state = advance_scalar_state(*call, steps);
  }
  with_op_and_storage(*call, [&](auto op, auto storage) {
    using Op = decltype(op);
    using S = decltype(storage);
    using T = typename S::compute_t;
    const auto inputs = element_inputs<T>(*call, steps);
    const auto scalars = [&] {
      if constexpr (HasScalarState<Hyper>::value) {
        return scalars_with_state<T>(*call, steps, scalar_state);
      } else if constexpr (HasTensorNorms<Hyper>::value) {
        // The sums: the front's (LARS), the caller's (Note [norms
        // across shards]), or this call's measuring pass (LAMB).
        at::Tensor sums = call->tensor_sums;
        if constexpr (NormsOfUpdate<Hyper>::value) {
          if (!sums.defined()) {
            sums = at::tensor(
                measure_op<Op, S>(*call, scalars_for_measuring<T>(*call, steps),
                                  inputs),
                at::kDouble);
          }
        }
        sums = sums.to(at::kDouble).contiguous();
        return scalars_with_norms<T>(*call, steps, inputs,
                                     call->has_grad_scale(),
                                     sums.data_ptr<double>());
      } else {
        return scalars_of<T>(*call, steps);
      }
    }();
    apply_op<Op, S>(*call, scalars, inputs);
  });
  call->operands->write_back();
}

// The `measure` overloads' CPU kernel (Note [norms across shards] in
// op_front.h): the sums of squares run<Spec> would read, at the step it
// would use, nothing written. Zeros when AMP skips the step.
template <typename Spec>
at::Tensor measure(const OpCall& args) {
  std::optional<PreparedCall<Spec>> call = prepare<Spec>(at::kCPU, args);
  if (std::optional<at::Tensor> sums = sums_from_front(call)) return *sums;
  const int64_t n = static_cast<int64_t>(call->set_of.size());
  if (amp_skips_step(*call->found_inf)) return at::zeros({2 * n}, at::kDouble);
  const std::vector<double> steps = incremented_state_steps(call->state_steps);
  at::Tensor out;
  with_op_and_storage(*call, [&](auto op, auto storage) {
    using Op = decltype(op);
    using S = decltype(storage);
    using T = typename S::compute_t;
    if constexpr (NormsOfUpdate<typename Spec::Hyper>::value) {
      out = at::tensor(measure_op<Op, S>(*call, scalars_for_measuring<T>(*call, steps),
                                         element_inputs<T>(*call, steps)),
                       at::kDouble);
    }
  });
  return out;
}

}  // namespace fused_optim::cpu
