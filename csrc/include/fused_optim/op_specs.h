// Each optimizer op, described once. From a spec come:
//   - the op's schema (csrc/op_schema.cpp): its name, tensor lists,
//     per-group hyperparameters, per-group flags and mode keywords;
//   - the C++ signature of its kernels and of the Python fast call
//     (csrc/op_front.h builds the function type from the same counts, and
//     torch checks at load time that it matches the schema);
//   - its checks, staging and per-group hyperparameters (op_front.h), the
//     same for every backend;
//   - which element op (element_ops.h) a call runs, on the CPU
//     (cpu/apply.h) and on CUDA (cuda/ops.cuh) alike.
//
// Every op's schema has this shape (names from the spec in <>):
//   <kName>(Tensor(a!)[] params, Tensor(b!)[] grads,
//           Tensor(.!)[] <kState[0].name>, ...,        one per state list
//           Tensor(.!)[] master_params, Tensor(.!)[] state_steps,
//           int[] group_index, float[] lr,            (or Tensor[] lr: the
//                                                      `tensor_lr` overload)
//           float[] <kHyper[0]>, ...,                  one entry per group
//           bool[] maximize[, bool[] decoupled_weight_decay],  per group
//           float[] max_grad_norm,                     per group (clipping)
//           [int[] <kNewState>,]
//           Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm,
//           *, bool <kModes[0]>, ..., bool stochastic_rounding) -> ()
// csrc/op_schema.cpp documents each argument.
//
// Adding an optimizer: docs/adding-an-optimizer.md.
//
// Plain C++17 (FO_HOST_DEVICE): no torch, no CUDA header.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "fused_optim/bool_switch.h"
#include "fused_optim/element_ops.h"
#include "fused_optim/hyperparams.h"

namespace fused_optim {

// When a call uses a state list: always, only when given (non-empty: the
// mode that needs it is on, e.g. momentum), or only when mode keyword k is
// on (then it must be given, and must be empty otherwise).
struct StateList {
  static constexpr int kAlways = -1;
  static constexpr int kIfGiven = -2;
  const char* name;
  int used;  // kAlways, kIfGiven, or the index k in kModes
};

constexpr int kMaxStateLists = 4;
// The most per-group hyperparameter lists of any op (LAMB); a spec with
// more fails to compile where its kernel fills OpCall::hyper.
constexpr size_t kMaxHyperLists = 9;
constexpr int kMaxModes = 4;

// The flags of one call that choose its element op: the mode keywords, in
// kModes order, and which state lists are given.
struct CallModes {
  bool mode[kMaxModes] = {};
  bool has_state[kMaxStateLists] = {};
};

template <typename T, size_t N>
constexpr size_t count_of(const T (&)[N]) {
  return N;
}

// One per-group hyperparameter of an op: its schema name (a `float[]`
// argument, one value per group) and the field of the op's Hyper it fills.
// A bool field (LARS's trust_clip, ...) is filled from 0 or 1: the schema's
// only per-group bool lists are the flags (maximize, decoupled decay).
template <typename Hyper>
struct HyperField {
  const char* name;
  double Hyper::*number = nullptr;
  bool Hyper::*flag = nullptr;

  constexpr HyperField(const char* n, double Hyper::*field)
      : name(n), number(field) {}
  constexpr HyperField(const char* n, bool Hyper::*field)
      : name(n), flag(field) {}

  void set(Hyper& hyper, double value) const {
    if (number != nullptr) {
      hyper.*number = value;
    } else {
      hyper.*flag = value != 0.0;
    }
  }
};

// One group's Hyper: its lr and its values of the op's float[] lists
// (`values[k]` is `kHyper[k]`'s). The front sets maximize and
// max_grad_norm.
template <typename Spec>
typename Spec::Hyper make_hyper(LrSource lr, const double* values) {
  typename Spec::Hyper out;
  out.lr = lr;
  for (size_t k = 0; k < count_of(Spec::kHyper); ++k) {
    Spec::kHyper[k].set(out, values[k]);
  }
  return out;
}

// A spec whose every combination of modes is valid: mode_error() gives the
// reason a call's modes are refused, or nullptr (MomentumModes refuses one).
struct ModesAlwaysValid {
  static const char* mode_error(const CallModes&) { return nullptr; }
};

// What a spec whose op has no mode keyword says of its modes: none (a C++
// array cannot be empty, hence kNumModes), and one element op.
template <typename Op>
struct WithoutModes : ModesAlwaysValid {
  static constexpr const char* kModes[1] = {};  // (none; see kNumModes)
  static constexpr size_t kNumModes = 0;

  template <typename Fn>
  static auto with_element_op(const CallModes&, const Fn& fn) {
    return fn(Op{});
  }
};

// ---------------------------------------------------------------------------
// Adam and AdamW
// ---------------------------------------------------------------------------
struct AdamSpec : ModesAlwaysValid {
  static constexpr const char* kName = "adam_";
  using Hyper = AdamHyper;
  static constexpr StateList kState[] = {
      {"exp_avgs", StateList::kAlways},
      {"exp_avg_sqs", StateList::kAlways},
      {"max_exp_avg_sqs", 0}};  // amsgrad
  static constexpr HyperField<Hyper> kHyper[] = {
      {"beta1", &Hyper::beta1}, {"beta2", &Hyper::beta2}, {"eps", &Hyper::eps},
      {"weight_decay", &Hyper::weight_decay}};
  static constexpr const char* kModes[] = {"amsgrad"};
  static constexpr bool kDecoupledDecay = true;
  static constexpr const char* kNewState = nullptr;

  template <typename Fn>
  static auto with_element_op(const CallModes& m, const Fn& fn) {
    return FO_BOOL_SWITCH(m.mode[0], kAmsgrad,
                          [&] { return fn(AdamOp<kAmsgrad>{}); });
  }
};

// ---------------------------------------------------------------------------
// The modes of SGD, shared by LARS (SGD with a trust ratio): the momentum
// buffers (given or not) and the `nesterov` keyword pick Op<kMomentum,
// kNesterov>; nesterov without buffers is refused; a tensor whose buffer is
// new this step gets a hyperparameter set of its own (torch's SGD starts a
// buffer as the gradient itself: hyperparams.h).
// ---------------------------------------------------------------------------
template <typename Spec, template <bool, bool> class Op>
struct MomentumModes {
  template <typename Hyper>
  static void mark_new_state(Hyper& h) {
    h.new_buffer = true;
  }

  static const char* mode_error(const CallModes& m) {
    return m.mode[0] && !m.has_state[0] ? "nesterov=True needs momentum buffers"
                                        : nullptr;
  }

  template <typename Fn>
  static auto with_element_op(const CallModes& m, const Fn& fn) {
    if (mode_error(m) != nullptr) {
      throw std::invalid_argument(std::string(Spec::kName) + ": " + mode_error(m));
    }
    return FO_BOOL_SWITCH(m.has_state[0], kMomentum, [&] {
      return FO_BOOL_SWITCH(m.mode[0], kNesterov, [&] {
        return fn(Op<kMomentum, kMomentum && kNesterov>{});
      });
    });
  }
};

// ---------------------------------------------------------------------------
// SGD (momentum, Nesterov)
// ---------------------------------------------------------------------------
struct SgdSpec : MomentumModes<SgdSpec, SgdOp> {
  static constexpr const char* kName = "sgd_";
  using Hyper = SgdHyper;
  static constexpr StateList kState[] = {
      {"momentum_buffers", StateList::kIfGiven}};
  static constexpr HyperField<Hyper> kHyper[] = {
      {"momentum", &Hyper::momentum}, {"dampening", &Hyper::dampening},
      {"weight_decay", &Hyper::weight_decay}};
  static constexpr const char* kModes[] = {"nesterov"};
  static constexpr bool kDecoupledDecay = false;
  // Indices of the tensors whose momentum buffer is new this step: torch's
  // SGD starts a buffer as the gradient itself (hyperparams.h). A new-state
  // list always refers to the op's first state list (kState[0]): it must be
  // empty when that list is.
  static constexpr const char* kNewState = "new_momentum_buffers";
};

// ---------------------------------------------------------------------------
// Adagrad
// ---------------------------------------------------------------------------
struct AdagradSpec : WithoutModes<AdagradOp> {
  static constexpr const char* kName = "adagrad_";
  using Hyper = AdagradHyper;
  static constexpr StateList kState[] = {{"sums", StateList::kAlways}};
  static constexpr HyperField<Hyper> kHyper[] = {
      {"lr_decay", &Hyper::lr_decay}, {"weight_decay", &Hyper::weight_decay},
      {"eps", &Hyper::eps}};
  static constexpr bool kDecoupledDecay = false;
  static constexpr const char* kNewState = nullptr;
};

// ---------------------------------------------------------------------------
// RMSprop (centered, momentum)
// ---------------------------------------------------------------------------
struct RmspropSpec : ModesAlwaysValid {
  static constexpr const char* kName = "rmsprop_";
  using Hyper = RmspropHyper;
  static constexpr StateList kState[] = {
      {"square_avgs", StateList::kAlways},
      {"grad_avgs", 0},  // centered
      {"momentum_buffers", StateList::kIfGiven}};
  static constexpr HyperField<Hyper> kHyper[] = {
      {"alpha", &Hyper::alpha}, {"eps", &Hyper::eps},
      {"weight_decay", &Hyper::weight_decay}, {"momentum", &Hyper::momentum}};
  static constexpr const char* kModes[] = {"centered"};
  static constexpr bool kDecoupledDecay = false;
  static constexpr const char* kNewState = nullptr;

  template <typename Fn>
  static auto with_element_op(const CallModes& m, const Fn& fn) {
    return FO_BOOL_SWITCH(m.mode[0], kCentered, [&] {
      return FO_BOOL_SWITCH(m.has_state[2], kMomentum, [&] {
        return fn(RmspropOp<kCentered, kMomentum>{});
      });
    });
  }
};

// ---------------------------------------------------------------------------
// RAdam (decoupled weight decay optional)
// ---------------------------------------------------------------------------
struct RadamSpec : WithoutModes<RadamOp> {
  static constexpr const char* kName = "radam_";
  using Hyper = RadamHyper;
  static constexpr StateList kState[] = {{"exp_avgs", StateList::kAlways},
                                         {"exp_avg_sqs", StateList::kAlways}};
  static constexpr HyperField<Hyper> kHyper[] = {
      {"beta1", &Hyper::beta1}, {"beta2", &Hyper::beta2}, {"eps", &Hyper::eps},
      {"weight_decay", &Hyper::weight_decay}};
  static constexpr bool kDecoupledDecay = true;
  static constexpr const char* kNewState = nullptr;
};

// ---------------------------------------------------------------------------
// Lion (weight decay always decoupled)
// ---------------------------------------------------------------------------
struct LionSpec : WithoutModes<LionOp> {
  static constexpr const char* kName = "lion_";
  using Hyper = LionHyper;
  static constexpr StateList kState[] = {{"exp_avgs", StateList::kAlways}};
  static constexpr HyperField<Hyper> kHyper[] = {
      {"beta1", &Hyper::beta1}, {"beta2", &Hyper::beta2},
      {"weight_decay", &Hyper::weight_decay}, {"max_lr", &Hyper::max_lr}};
  // No per-group decoupled_weight_decay list: every group's decay is
  // decoupled (AlwaysDecoupled below), as in the paper.
  static constexpr bool kDecoupledDecay = false;
  static constexpr bool kAlwaysDecoupled = true;
  static constexpr const char* kNewState = nullptr;
};

// ---------------------------------------------------------------------------
// NAdam (decoupled weight decay optional; per-tensor scalar state)
// ---------------------------------------------------------------------------
struct NadamSpec : WithoutModes<NadamOp> {
  static constexpr const char* kName = "nadam_";
  using Hyper = NadamHyper;
  static constexpr StateList kState[] = {{"exp_avgs", StateList::kAlways},
                                         {"exp_avg_sqs", StateList::kAlways}};
  static constexpr HyperField<Hyper> kHyper[] = {
      {"beta1", &Hyper::beta1}, {"beta2", &Hyper::beta2}, {"eps", &Hyper::eps},
      {"weight_decay", &Hyper::weight_decay},
      {"momentum_decay", &Hyper::momentum_decay}};
  static constexpr bool kDecoupledDecay = true;
  static constexpr const char* kNewState = nullptr;
  // The per-tensor scalar state list (Note [per-tensor scalar state] in
  // hyperparams.h): torch's state key "mu_product" plus "s".
  static constexpr const char* kScalarState = "mu_products";
};

// The number of mode keywords of a spec (Adagrad has none; a C++ array
// cannot be empty, so it says so with kNumModes).
template <typename Spec, typename = void>
struct ModeCount {
  static constexpr size_t value = count_of(Spec::kModes);
};
template <typename Spec>
struct ModeCount<Spec, std::void_t<decltype(Spec::kNumModes)>> {
  static constexpr size_t value = Spec::kNumModes;
};

// ---------------------------------------------------------------------------
// LARS (timm's Lars): SGD with a per-tensor trust ratio, Note [per-tensor
// norms] in hyperparams.h. trust_clip and always_adapt are per-group bools
// passed as float lists (0 or 1): the schema has no other per-group bools.
// ---------------------------------------------------------------------------
struct LarsSpec : MomentumModes<LarsSpec, LarsOp> {
  static constexpr const char* kName = "lars_";
  using Hyper = LarsHyper;
  static constexpr StateList kState[] = {
      {"momentum_buffers", StateList::kIfGiven}};
  static constexpr HyperField<Hyper> kHyper[] = {
      {"momentum", &Hyper::momentum}, {"dampening", &Hyper::dampening},
      {"weight_decay", &Hyper::weight_decay},
      {"trust_coeff", &Hyper::trust_coeff}, {"eps", &Hyper::eps},
      {"trust_clip", &Hyper::trust_clip},
      {"always_adapt", &Hyper::always_adapt}};
  static constexpr const char* kModes[] = {"nesterov"};
  static constexpr bool kDecoupledDecay = false;
  static constexpr const char* kNewState = "new_momentum_buffers";
};

// ---------------------------------------------------------------------------
// LAMB (timm's Lamb; per-tensor norms of the param and of the update)
// ---------------------------------------------------------------------------
struct LambSpec : WithoutModes<LambOp> {
  static constexpr const char* kName = "lamb_";
  using Hyper = LambHyper;
  static constexpr StateList kState[] = {{"exp_avgs", StateList::kAlways},
                                         {"exp_avg_sqs", StateList::kAlways}};
  static constexpr HyperField<Hyper> kHyper[] = {
      {"beta1", &Hyper::beta1}, {"beta2", &Hyper::beta2}, {"eps", &Hyper::eps},
      {"weight_decay", &Hyper::weight_decay},
      {"bias_correction", &Hyper::bias_correction},
      {"grad_averaging", &Hyper::grad_averaging},
      {"trust_clip", &Hyper::trust_clip},
      {"always_adapt", &Hyper::always_adapt}, {"max_lr", &Hyper::max_lr}};
  // decoupled_weight_decay per group: timm's decoupled_decay.
  static constexpr bool kDecoupledDecay = true;
  static constexpr const char* kNewState = nullptr;
};

// Whether every group's weight decay is decoupled, without a per-group
// decoupled_weight_decay list (`kAlwaysDecoupled`; Lion): then the front
// chooses kDecoupled (or kNone for a zero decay) for every group.
template <typename Spec, typename = void>
struct AlwaysDecoupled {
  static constexpr bool value = false;
};
template <typename Spec>
struct AlwaysDecoupled<Spec, std::void_t<decltype(Spec::kAlwaysDecoupled)>> {
  static constexpr bool value = Spec::kAlwaysDecoupled;
};

// The name of a spec's per-tensor scalar state list (`kScalarState`), or
// nullptr: Note [per-tensor scalar state] in hyperparams.h.
template <typename Spec, typename = void>
struct ScalarStateList {
  static constexpr const char* name = nullptr;
};
template <typename Spec>
struct ScalarStateList<Spec, std::void_t<decltype(Spec::kScalarState)>> {
  static constexpr const char* name = Spec::kScalarState;
  static_assert(HasScalarState<typename Spec::Hyper>::value,
                "a spec with kScalarState needs a Hyper with kHasScalarState");
};

// Every op, for code that registers or instantiates all of them.
#define FO_FOR_EACH_OP(X) \
  X(::fused_optim::AdamSpec)    \
  X(::fused_optim::SgdSpec)     \
  X(::fused_optim::AdagradSpec) \
  X(::fused_optim::RmspropSpec) \
  X(::fused_optim::RadamSpec)   \
  X(::fused_optim::LionSpec)    \
  X(::fused_optim::NadamSpec)   \
  X(::fused_optim::LarsSpec)    \
  X(::fused_optim::LambSpec)

}  // namespace fused_optim
