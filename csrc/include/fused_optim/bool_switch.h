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
