// Turns a run-time bool into a compile-time constant for the code in its
// body, so mode flags (amsgrad, nesterov, centered, ...) select a lean kernel
// instead of branching per element. Usable from C++ and CUDA.
//
//   FO_BOOL_SWITCH(amsgrad, kAmsgrad, [&] { run<kAmsgrad>(...); });
#pragma once

#define FO_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                       \
    if (COND) {                               \
      constexpr static bool CONST_NAME = true; \
      return __VA_ARGS__();                   \
    } else {                                  \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                   \
    }                                         \
  }()

// The same for the weight-decay mode (fused_optim::WeightDecay, declared in
// update_rules.h): kNone when the decay is zero, else kDecoupled or kL2.
#define FO_WEIGHT_DECAY_SWITCH(HAS_DECAY, DECOUPLED, CONST_NAME, ...)      \
  [&] {                                                                    \
    if (!(HAS_DECAY)) {                                                    \
      constexpr static ::fused_optim::WeightDecay CONST_NAME =             \
          ::fused_optim::WeightDecay::kNone;                               \
      return __VA_ARGS__();                                                \
    } else if (DECOUPLED) {                                                \
      constexpr static ::fused_optim::WeightDecay CONST_NAME =             \
          ::fused_optim::WeightDecay::kDecoupled;                          \
      return __VA_ARGS__();                                                \
    } else {                                                               \
      constexpr static ::fused_optim::WeightDecay CONST_NAME =             \
          ::fused_optim::WeightDecay::kL2;                                 \
      return __VA_ARGS__();                                                \
    }                                                                      \
  }()

// For optimizers whose decay is always L2 (SGD, Adagrad, RMSprop): kNone or
// kL2, without instantiating a decoupled variant.
#define FO_L2_WEIGHT_DECAY_SWITCH(HAS_DECAY, CONST_NAME, ...)              \
  [&] {                                                                    \
    if (!(HAS_DECAY)) {                                                    \
      constexpr static ::fused_optim::WeightDecay CONST_NAME =             \
          ::fused_optim::WeightDecay::kNone;                               \
      return __VA_ARGS__();                                                \
    } else {                                                               \
      constexpr static ::fused_optim::WeightDecay CONST_NAME =             \
          ::fused_optim::WeightDecay::kL2;                                 \
      return __VA_ARGS__();                                                \
    }                                                                      \
  }()
