// Software prefetch for the host passes over many tensors' metadata.
//
// Note [metadata misses]
// A step over thousands of small tensors reads, for each tensor, a chain of
// small heap objects: the Python object, its TensorImpl, for a param its
// autograd metadata and the gradient's TensorImpl, each storage's
// StorageImpl. Between two steps, backward and the step's own data stream
// evict them, so each is a cache miss, and a loop that walks the chain one
// tensor at a time waits for each miss in turn. The passes that walk the
// lists (BorrowedTensors in python_module.cpp, for every list a call
// converts, and the gradient reads of GradsOf) ask for the objects of the
// tensors a few places ahead, one link of the chain per stage, so that the
// misses of several tensors are in flight at once: on `many-small` (2,000
// tensors, every step cold) the SGD and Adam steps took 10-13% less
// (benchmarks/results/host-prefetch-cpu-2core-epyc-2026-12-05.md). Asking
// for each storage's StorageImpl too gained nothing more.
#pragma once

#include <cstddef>

namespace fused_optim {

// How many tensors ahead a pass asks for the first link of the chain; each
// later link is asked for kPrefetchAhead / 2 places later.
constexpr std::size_t kPrefetchAhead = 16;

// The first `lines` 64-byte cache lines of the object at `address`
// (nothing for a null address).
inline void prefetch_object(const void* address, int lines) {
#if defined(__GNUC__) || defined(__clang__)
  const char* p = static_cast<const char*>(address);
  if (p == nullptr) return;
  for (int k = 0; k < lines; ++k) __builtin_prefetch(p + 64 * k, 0, 3);
#else
  (void)address;
  (void)lines;
#endif
}

}  // namespace fused_optim
