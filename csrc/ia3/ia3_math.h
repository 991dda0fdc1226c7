// Per-element math of the IA³ kernels, shared by the CPU and CUDA code (so the CPU tests check
// the arithmetic the GPU runs). Every value is widened to the accumulation type Acc (float for
// float/half/bfloat16, double for double), combined there, and rounded once to the storage
// type T when written — which is exactly what PEFT's `(x.to(l.dtype) * l).to(x.dtype)` does for
// a float32 l, so l's learned deviation from 1 is never lost to a half/bfloat16 rounding of l.
#pragma once

#include "../common/accumulate.h"
#include "../common/host_device.h"

namespace peftkern {
namespace ia3 {

// Rows folded into one partial sum of the per-column reduction (dl). A fixed constant, never
// the thread count: the order of the additions, hence the result, is the same on every run and
// every machine size.
constexpr int64_t kCpuRowsPerBlock = 64;
constexpr int64_t kCudaRowsPerBlock = 128;

// v * l: the IA³ scaling of one element (input side: x ⊙ l; output side: y ⊙ l; backward:
// g ⊙ l and dy ⊙ l).
template <typename Acc>
PK_HOST_DEVICE Acc scaled(Acc v, Acc l) {
  return v * l;
}

// One output element of the output-side epilogue: pre = T(acc + b), rounded to T first so the
// saved pre-scale output is bit-for-bit what a separate `addmm` + `mul` would have produced
// before the scaling. No bias (bias == nullptr): pre = acc.
template <typename T, typename Acc>
PK_HOST_DEVICE T pre_scale_output(T acc, const T* bias, int64_t j) {
  return bias == nullptr ? acc : static_cast<T>(static_cast<Acc>(acc) + static_cast<Acc>(bias[j]));
}

// One term of dl[j] = Σ_rows a ⊙ b.
template <typename Acc>
PK_HOST_DEVICE Acc reduce_term(Acc sum, Acc a, Acc b) {
  return sum + a * b;
}

}  // namespace ia3
}  // namespace peftkern
