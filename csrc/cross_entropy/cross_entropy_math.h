// Per-row math of the fused cross-entropy op, shared by the CPU and CUDA kernels (so the CPU tests
// check the arithmetic the GPU runs). Everything is float32, whatever the logits' dtype: a logit is
// widened exactly (bf16 / half -> float), as transformers' ForCausalLMLoss upcasts them.
//
// For a row z[0, V) with label y:
//   m   = max_v z_v                      (NaN if any z is NaN: the row's loss is NaN then)
//   lse = m + log(sum_v exp(z_v - m))
//   loss = lse - z_y                     (0 for an ignored row, y == ignore_index)
//   dz_v = g * (exp(z_v - lse) - [v == y])   (0 for an ignored row)
// exp is each device's own (the CPU's vector exp below, CUDA's expf): both within ~2 ulp.
#pragma once

#include <cstdint>

#include "../common/host_device.h"

namespace peftkern {
namespace cross_entropy {

// NaN-propagating max (std::max / fmaxf would drop a NaN).
PK_HOST_DEVICE float max_nan(float a, float b) { return (b > a || b != b) ? b : a; }

// The log-sum-exp of a row from its max and sum_v exp(z_v - max). An all -inf row has no defined
// softmax: (-inf) + log(0) = -inf, and its loss is NaN (as PyTorch's).
PK_HOST_DEVICE float row_lse(float row_max, float sum_exp) {
  if (row_max == -INFINITY) return NAN;
  return row_max + logf(sum_exp);
}

// Whether row label y counts: ignore_index rows add nothing (loss 0, gradient 0).
PK_HOST_DEVICE bool is_ignored(int64_t label, int64_t ignore_index) { return label == ignore_index; }

// A label that is neither ignore_index nor a vocabulary index makes the row's loss NaN on CUDA (no
// host sync to raise); the host check raises first wherever the labels are host memory.
PK_HOST_DEVICE bool label_in_range(int64_t label, int64_t vocab) { return label >= 0 && label < vocab; }

// dz for one logit, given e = exp(z - lse).
PK_HOST_DEVICE float logit_grad(float e, bool is_label, float g) { return g * (is_label ? e - 1.0f : e); }

}  // namespace cross_entropy
}  // namespace peftkern
