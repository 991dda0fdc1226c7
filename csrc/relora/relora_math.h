// Per-element math of ReLoRA's fused NF4 merge, shared by the CPU and CUDA kernels.
//
// The merged element (o, i) of W' = deq(W) + s·B·A is defined exactly, so that every
// implementation (these kernels, the PyTorch reference, bitsandbytes quantizing the dense sum)
// gives the same float32 value and so the same NF4 bytes:
//   deq(W)[o, i] = nf4_value(code) * absmax          float32, rounded once (bitsandbytes' rule)
//   delta[o, i]  = float(s * Σ_k B[o, k] * A[k, i])  in float64, rounded once to float32
//   W'[o, i]     = deq + delta                        float32, rounded once
// Products of two float32 values are exact in float64, so the sum's order (or an FMA) changes
// the float64 sum by at most a few float64 ulps, which the final rounding to float32 absorbs
// except in a vanishingly rare tie. The k loop runs in increasing order, as a naive matmul.
#pragma once

#include "../common/blockwise_quant.h"
#include "../common/host_device.h"

namespace peftkern {
namespace relora {

struct LowRank {
  const float* lora_a;  // [r, in] row-major
  const float* lora_b;  // [out, r] row-major
  int64_t rank;
  int64_t in_features;
  double scaling;

  // s·(B·A)[o, i] rounded to float32 (see the file comment).
  PK_HOST_DEVICE float delta(int64_t o, int64_t i) const {
    double acc = 0.0;
    const float* b_row = lora_b + o * rank;
    for (int64_t k = 0; k < rank; ++k) {
      acc += static_cast<double>(b_row[k]) * static_cast<double>(lora_a[k * in_features + i]);
    }
    return static_cast<float>(scaling * acc);
  }

  // W'[e] for flat element e = o * in + i of the weight, from its NF4 code and block absmax.
  PK_HOST_DEVICE float merged(int code, float absmax, int64_t e) const {
    return add_rn(mul_rn(quant::nf4_value(code), absmax), delta(e / in_features, e % in_features));
  }
};

}  // namespace relora
}  // namespace peftkern
