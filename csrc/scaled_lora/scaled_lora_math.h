// Per-element math of the scaled-LoRA kernels, shared by the CPU and CUDA code (so the CPU tests
// check the arithmetic the GPU runs). Values are widened to the accumulation type Acc (float for
// float/half/bfloat16, double for double), combined there, and rounded once to the storage type
// T when written. The scales (rank_scale, out_scale) are read in Acc whatever their dtype: a
// float32 λ or E of a bfloat16 model is never rounded to bfloat16 first.
#pragma once

#include "../common/accumulate.h"
#include "../common/host_device.h"

namespace peftkern {
namespace scaled_lora {

// Rows folded into one partial sum of a per-column reduction (dλ, dE). Fixed constants, never
// the thread count: the order of the additions, hence the result, is the same on every run and
// every machine size (as the IA³ reductions).
constexpr int64_t kCpuRowsPerBlock = 64;
constexpr int64_t kCudaRowsPerBlock = 128;

// v·l (l == nullptr: v): one element scaled by its column's scale.
template <typename Acc>
PK_HOST_DEVICE Acc column_scaled(Acc v, const Acc* l, int64_t j) {
  return l == nullptr ? v : v * l[j];
}

// The forward epilogue on one output element: base + s·v·out_scale[j], where base is the base
// GEMM's output (bias included) and v = ((xd·Aᵀ) ⊙ rank_scale)·Bᵀ.
template <typename Acc>
PK_HOST_DEVICE Acc add_scaled_term(Acc base, Acc v, Acc scaling, Acc out_scale_j) {
  return base + scaling * (v * out_scale_j);
}

// One term of a column reduction Σ_rows a ⊙ b.
template <typename Acc>
PK_HOST_DEVICE Acc reduce_term(Acc sum, Acc a, Acc b) {
  return sum + a * b;
}

}  // namespace scaled_lora
}  // namespace peftkern
