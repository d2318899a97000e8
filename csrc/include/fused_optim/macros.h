// Portability macros shared by the C++ (CPU) and CUDA translation units.
//
// This header, like everything under csrc/include/fused_optim/, includes no
// torch header: the CUDA kernels are compile-checked in CI with plain nvcc
// against a CPU-only torch wheel whose c10/cuda headers are incomplete.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FO_HOST_DEVICE __host__ __device__
#define FO_FORCE_INLINE __forceinline__
#else
#define FO_HOST_DEVICE
#define FO_FORCE_INLINE inline __attribute__((always_inline))
#endif
