// Portability macros and exactly-rounded float helpers shared by CPU and CUDA code.
//
// Why the *_rn helpers: nvcc contracts `a * b + c` into one FMA by default (one rounding instead
// of two), and the CPU build could do the same under -march flags. Formats that must be
// bit-identical to bitsandbytes (which rounds after every operation, as PyTorch does) spell out
// each rounding through these helpers; the host build also passes -ffp-contract=off.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PK_HOST_DEVICE inline
#endif

namespace peftkern {

PK_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

PK_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

PK_HOST_DEVICE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// IEEE round-to-nearest reciprocal, i.e. exactly `1.0f / a`.
PK_HOST_DEVICE float rcp_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(a);
#else
  return 1.0f / a;
#endif
}

// a * b + c rounded once (a fused multiply-add): what torch's vectorised CPU kernels compute for
// `add(x, y, alpha)` and `addcmul` (Vectorized::fmadd), so kernels matching them bit for bit spell it.
PK_HOST_DEVICE float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// IEEE round-to-nearest square root (nvcc's sqrtf is only that without --use_fast_math).
PK_HOST_DEVICE float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

PK_HOST_DEVICE float clamp_unit(float x) { return x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x); }  // NaN stays NaN

// max(|a|, ...) as torch.amax computes it: a NaN anywhere makes the result NaN (fmaxf and
// std::max would drop it). `m` is the running maximum, `v` the next value.
PK_HOST_DEVICE float max_propagating_nan(float m, float v) { return (v > m || v != v) ? v : m; }

}  // namespace peftkern
