// Per-element math of Proxy-tuning's decode-step op, shared by the CPU and CUDA kernels (the CPU
// tests then test the arithmetic the GPU runs). The exact semantics are in peftkern/ops/proxy.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common/host_device.h"

namespace peftkern {
namespace proxy {

// z = (b + alpha·(e − a)) / T in float32, one rounding per operation and no FMA: the value
// PyTorch's `(b + (e - a) * alpha) / T` gives on float32 tensors.
PK_HOST_DEVICE float combine(float b, float e, float a, float alpha, float temperature) {
  return div_rn(add_rn(b, mul_rn(add_rn(e, -a), alpha)), temperature);
}

// A row that cannot be sampled from: NaN, or +inf (whose softmax is NaN).
PK_HOST_DEVICE bool unusable(float z) { return z != z || z == INFINITY; }

// An unsigned key with the order of the floats (ties equal): -0.0 is folded onto +0.0, negative
// values have all bits flipped, non-negative ones the sign bit set. -inf maps to 0x007FFFFF, so
// key 0 never occurs for a usable value. The CUDA kernel bisects over these keys.
PK_HOST_DEVICE uint32_t order_key(float z) {
  z = z == 0.0f ? 0.0f : z;
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(z);
#else
  std::memcpy(&bits, &z, sizeof bits);
#endif
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// exp(z − max) in float64: the unnormalised probability top-p sums (float64, so that where the
// kernels and the reference add in different orders they differ only far below float32 rounding).
PK_HOST_DEVICE double weight(float z, float row_max) {
#if defined(__CUDA_ARCH__)
  return exp(static_cast<double>(z) - static_cast<double>(row_max));
#else
  return std::exp(static_cast<double>(z) - static_cast<double>(row_max));
#endif
}

// The filters of one call, resolved once on the host.
struct Filter {
  float alpha;
  float temperature;
  int64_t top_k;        // effective k = max(top_k, min_tokens_to_keep), 0 when off or >= V
  double top_p;         // in (0, 1]
  bool use_top_p;       // top_p < 1
  int64_t max_removed;  // V − min_tokens_to_keep (top-p never removes more), may be negative
};

// How many tokens top-p removes, from the first of the group of `count` tied tokens of weight
// `w` that follows `removed_before` removed tokens whose weights add up to `cumulative`: the
// group's tokens, in index order, stay removed while the cumulative sum is <= threshold.
PK_HOST_DEVICE int64_t removed_in_group(double cumulative, double w, int64_t count, double threshold) {
  int64_t j = 0;
  while (j < count) {
    cumulative += w;
    if (!(cumulative <= threshold)) break;
    ++j;
  }
  return j;
}

}  // namespace proxy
}  // namespace peftkern
