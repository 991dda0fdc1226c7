// LoRA dropout's per-element math, shared by the CPU and CUDA kernels (host and device), so the
// two draw the same decisions and round the same way bit for bit.
//
// Element e of an [M, K] input (e = i·K + j, row-major, whatever x's strides) is kept iff
//   uniform(word e of stream (seed, offset)) < 1 − p       (common/philox.h's convention)
// and the kept elements are scaled by 1/(1 − p) (inverted dropout, as torch's and PEFT's).
// uniform = (word >> 8)·2⁻²⁴, so the test is an integer compare against a threshold computed
// once on the host: u < q  ⇔  (word >> 8) < ceil(q·2²⁴). No float compare in the kernels.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/host_device.h"
#include "../common/philox.h"

namespace peftkern {
namespace dropout {

// Exactly rounded double product and sum (common/host_device.h has the float ones): nvcc would
// contract `a * b + c` into one FMA, the host build does not (-ffp-contract=off). The float ones
// are brought in beside them so overload resolution sees both.
using peftkern::add_rn;
using peftkern::mul_rn;

PK_HOST_DEVICE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

PK_HOST_DEVICE double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// ceil((1 − p)·2²⁴): 2²⁴ at p = 0 (every element kept), 0 at p = 1 (none kept).
inline uint32_t keep_threshold(double p) {
  return static_cast<uint32_t>(std::ceil((1.0 - p) * 16777216.0));
}

PK_HOST_DEVICE bool keep(uint32_t word, uint32_t threshold) { return (word >> 8) < threshold; }

// dropout(x) for one element: x·(kept ? 1/(1−p) : 0) in Acc, rounded once to T. A dropped NaN or
// inf stays NaN (x·0), as torch's x·mask/(1−p) does: dropout never hides a non-finite input.
template <typename T, typename Acc>
PK_HOST_DEVICE T dropped(T x, uint32_t word, uint32_t threshold, Acc scale) {
  return static_cast<T>(mul_rn(static_cast<Acc>(x), keep(word, threshold) ? scale : Acc(0)));
}

// acc + dropout(x), in Acc, rounded once (backward: grad_x += (grad_xa·A) ⊙ m/(1−p)). The product
// and the sum are rounded separately (mul_rn / add_rn: nvcc would fuse them into an FMA), so
// CPU and CUDA agree bit for bit.
template <typename T, typename Acc>
PK_HOST_DEVICE T accumulated(T acc, T x, uint32_t word, uint32_t threshold, Acc scale) {
  const Acc term = mul_rn(static_cast<Acc>(x), keep(word, threshold) ? scale : Acc(0));
  return static_cast<T>(add_rn(static_cast<Acc>(acc), term));
}

}  // namespace dropout
}  // namespace peftkern
