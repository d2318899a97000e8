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

// ---------------------------------------------------------------------------
// Adam and AdamW
// ---------------------------------------------------------------------------
struct AdamSpec {
  static constexpr const char* kName = "adam_";
  using Hyper = AdamHyper;
  static constexpr StateList kState[] = {
      {"exp_avgs", StateList::kAlways},
      {"exp_avg_sqs", StateList::kAlways},
      {"max_exp_avg_sqs", 0}};  // amsgrad
  static constexpr const char* kHyper[] = {"beta1", "beta2", "eps",
                                           "weight_decay"};
  static constexpr const char* kModes[] = {"amsgrad"};
  static constexpr bool kDecoupledDecay = true;
  static constexpr const char* kNewState = nullptr;

  static Hyper hyper(LrSource lr, const double* h) {
    Hyper out;
    out.lr = lr;
    out.beta1 = h[0];
    out.beta2 = h[1];
    out.eps = h[2];
    out.weight_decay = h[3];
    return out;
  }

  static const char* mode_error(const CallModes&) { return nullptr; }

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
  static constexpr const char* kHyper[] = {"momentum", "dampening",
                                           "weight_decay"};
  static constexpr const char* kModes[] = {"nesterov"};
  static constexpr bool kDecoupledDecay = false;
  // Indices of the tensors whose momentum buffer is new this step: torch's
  // SGD starts a buffer as the gradient itself (hyperparams.h). A new-state
  // list always refers to the op's first state list (kState[0]): it must be
  // empty when that list is.
  static constexpr const char* kNewState = "new_momentum_buffers";

  static Hyper hyper(LrSource lr, const double* h) {
    Hyper out;
    out.lr = lr;
    out.momentum = h[0];
    out.dampening = h[1];
    out.weight_decay = h[2];
    return out;
  }
};

// ---------------------------------------------------------------------------
// Adagrad
// ---------------------------------------------------------------------------
struct AdagradSpec {
  static constexpr const char* kName = "adagrad_";
  using Hyper = AdagradHyper;
  static constexpr StateList kState[] = {{"sums", StateList::kAlways}};
  static constexpr const char* kHyper[] = {"lr_decay", "weight_decay", "eps"};
  static constexpr const char* kModes[1] = {};  // (none; see kNumModes)
  static constexpr size_t kNumModes = 0;
  static constexpr bool kDecoupledDecay = false;
  static constexpr const char* kNewState = nullptr;

  static Hyper hyper(LrSource lr, const double* h) {
    Hyper out;
    out.lr = lr;
    out.lr_decay = h[0];
    out.weight_decay = h[1];
    out.eps = h[2];
    return out;
  }

  static const char* mode_error(const CallModes&) { return nullptr; }

  template <typename Fn>
  static auto with_element_op(const CallModes&, const Fn& fn) {
    return fn(AdagradOp{});
  }
};

// ---------------------------------------------------------------------------
// RMSprop (centered, momentum)
// ---------------------------------------------------------------------------
struct RmspropSpec {
  static constexpr const char* kName = "rmsprop_";
  using Hyper = RmspropHyper;
  static constexpr StateList kState[] = {
      {"square_avgs", StateList::kAlways},
      {"grad_avgs", 0},  // centered
      {"momentum_buffers", StateList::kIfGiven}};
  static constexpr const char* kHyper[] = {"alpha", "eps", "weight_decay",
                                           "momentum"};
  static constexpr const char* kModes[] = {"centered"};
  static constexpr bool kDecoupledDecay = false;
  static constexpr const char* kNewState = nullptr;

  static Hyper hyper(LrSource lr, const double* h) {
    Hyper out;
    out.lr = lr;
    out.alpha = h[0];
    out.eps = h[1];
    out.weight_decay = h[2];
    out.momentum = h[3];
    return out;
  }

  static const char* mode_error(const CallModes&) { return nullptr; }

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
struct RadamSpec {
  static constexpr const char* kName = "radam_";
  using Hyper = RadamHyper;
  static constexpr StateList kState[] = {{"exp_avgs", StateList::kAlways},
                                         {"exp_avg_sqs", StateList::kAlways}};
  static constexpr const char* kHyper[] = {"beta1", "beta2", "eps",
                                           "weight_decay"};
  static constexpr const char* kModes[1] = {};  // (none; see kNumModes)
  static constexpr size_t kNumModes = 0;
  static constexpr bool kDecoupledDecay = true;
  static constexpr const char* kNewState = nullptr;

  static Hyper hyper(LrSource lr, const double* h) {
    Hyper out;
    out.lr = lr;
    out.beta1 = h[0];
    out.beta2 = h[1];
    out.eps = h[2];
    out.weight_decay = h[3];
    return out;
  }

  static const char* mode_error(const CallModes&) { return nullptr; }

  template <typename Fn>
  static auto with_element_op(const CallModes&, const Fn& fn) {
    return fn(RadamOp{});
  }
};

// ---------------------------------------------------------------------------
// Lion (weight decay always decoupled)
// ---------------------------------------------------------------------------
struct LionSpec {
  static constexpr const char* kName = "lion_";
  using Hyper = LionHyper;
  static constexpr StateList kState[] = {{"exp_avgs", StateList::kAlways}};
  static constexpr const char* kHyper[] = {"beta1", "beta2", "weight_decay", "max_lr"};
  static constexpr const char* kModes[1] = {};  // (none; see kNumModes)
  static constexpr size_t kNumModes = 0;
  // No per-group decoupled_weight_decay list: every group's decay is
  // decoupled (AlwaysDecoupled below), as in the paper.
  static constexpr bool kDecoupledDecay = false;
  static constexpr bool kAlwaysDecoupled = true;
  static constexpr const char* kNewState = nullptr;

  static Hyper hyper(LrSource lr, const double* h) {
    Hyper out;
    out.lr = lr;
    out.beta1 = h[0];
    out.beta2 = h[1];
    out.weight_decay = h[2];
    out.max_lr = h[3];
    return out;
  }

  static const char* mode_error(const CallModes&) { return nullptr; }

  template <typename Fn>
  static auto with_element_op(const CallModes&, const Fn& fn) {
    return fn(LionOp{});
  }
};

// ---------------------------------------------------------------------------
// NAdam (decoupled weight decay optional; per-tensor scalar state)
// ---------------------------------------------------------------------------
struct NadamSpec {
  static constexpr const char* kName = "nadam_";
  using Hyper = NadamHyper;
  static constexpr StateList kState[] = {{"exp_avgs", StateList::kAlways},
                                         {"exp_avg_sqs", StateList::kAlways}};
  static constexpr const char* kHyper[] = {"beta1", "beta2", "eps",
                                           "weight_decay", "momentum_decay"};
  static constexpr const char* kModes[1] = {};  // (none; see kNumModes)
  static constexpr size_t kNumModes = 0;
  static constexpr bool kDecoupledDecay = true;
  static constexpr const char* kNewState = nullptr;
  // The per-tensor scalar state list (Note [per-tensor scalar state] in
  // hyperparams.h): torch's state key "mu_product" plus "s".
  static constexpr const char* kScalarState = "mu_products";

  static Hyper hyper(LrSource lr, const double* h) {
    Hyper out;
    out.lr = lr;
    out.beta1 = h[0];
    out.beta2 = h[1];
    out.eps = h[2];
    out.weight_decay = h[3];
    out.momentum_decay = h[4];
    return out;
  }

  static const char* mode_error(const CallModes&) { return nullptr; }

  template <typename Fn>
  static auto with_element_op(const CallModes&, const Fn& fn) {
    return fn(NadamOp{});
  }
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
  static constexpr const char* kHyper[] = {"momentum",    "dampening",
                                           "weight_decay", "trust_coeff",
                                           "eps",          "trust_clip",
                                           "always_adapt"};
  static constexpr const char* kModes[] = {"nesterov"};
  static constexpr bool kDecoupledDecay = false;
  static constexpr const char* kNewState = "new_momentum_buffers";

  static Hyper hyper(LrSource lr, const double* h) {
    Hyper out;
    out.lr = lr;
    out.momentum = h[0];
    out.dampening = h[1];
    out.weight_decay = h[2];
    out.trust_coeff = h[3];
    out.eps = h[4];
    out.trust_clip = h[5] != 0.0;
    out.always_adapt = h[6] != 0.0;
    return out;
  }
};

// ---------------------------------------------------------------------------
// LAMB (timm's Lamb; per-tensor norms of the param and of the update)
// ---------------------------------------------------------------------------
struct LambSpec {
  static constexpr const char* kName = "lamb_";
  using Hyper = LambHyper;
  static constexpr StateList kState[] = {{"exp_avgs", StateList::kAlways},
                                         {"exp_avg_sqs", StateList::kAlways}};
  static constexpr const char* kHyper[] = {
      "beta1",           "beta2",          "eps",        "weight_decay",
      "bias_correction", "grad_averaging", "trust_clip", "always_adapt",
      "max_lr"};
  static constexpr const char* kModes[1] = {};  // (none; see kNumModes)
  static constexpr size_t kNumModes = 0;
  // decoupled_weight_decay per group: timm's decoupled_decay.
  static constexpr bool kDecoupledDecay = true;
  static constexpr const char* kNewState = nullptr;

  static Hyper hyper(LrSource lr, const double* h) {
    Hyper out;
    out.lr = lr;
    out.beta1 = h[0];
    out.beta2 = h[1];
    out.eps = h[2];
    out.weight_decay = h[3];
    out.bias_correction = h[4] != 0.0;
    out.grad_averaging = h[5] != 0.0;
    out.trust_clip = h[6] != 0.0;
    out.always_adapt = h[7] != 0.0;
    out.max_lr = h[8];
    return out;
  }

  static const char* mode_error(const CallModes&) { return nullptr; }

  template <typename Fn>
  static auto with_element_op(const CallModes&, const Fn& fn) {
    return fn(LambOp{});
  }
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
