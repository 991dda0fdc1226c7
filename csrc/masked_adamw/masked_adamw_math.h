// Per-element math of the fused masked AdamW (Child-Tuning's optimizer step), shared by the CPU
// and CUDA kernels so that both compute the same bits, and the CPU tests prove the arithmetic.
//
// One element, exactly the reference ChildTuningAdamW's sequence of torch ops, each rounded as
// torch's vectorised CPU kernels round it (fmadd for add-with-alpha and addcmul):
//   g  = grad · factor              factor = mask ? 1 : 0 (D), keep ? 1/p : 0 (F)   grad.mul_(M)
//   m  = fma(g, 1-β1, m·β1)                                  exp_avg.mul_(β1).add_(g, alpha=1-β1)
//   v  = fma((1-β2)·g, g, v·β2)                       exp_avg_sq.mul_(β2).addcmul_(g, g, 1-β2)
//   d  = sqrt(v) + eps                                              exp_avg_sq.sqrt().add_(eps)
//   p  = p + (-step_size·m) / d                          p.addcdiv_(m, d, value=-step_size)
//   p  = fma(p, -lr·wd, p)                                  p.add_(p, alpha=-lr·wd), after the update
// Every constant is the float32 rounding of the double the reference computes in Python.
// sqrt is correctly rounded (IEEE; CUDA's sqrtf), which torch's vectorised CPU sqrt is not (about
// 1 in 6 values 1 ulp off on AVX-512): there, and only there, the result can differ from the
// reference run on a CPU, by one rounding of the update (docs/child-tuning.md).
// The moments are float32; a bf16/fp16 parameter (and gradient) is widened, updated in float32
// and rounded once when stored.
#pragma once

#include <cstdint>

#include "../common/host_device.h"
#include "../common/philox.h"

namespace peftkern {
namespace masked_adamw {

struct Constants {
  float beta1, one_minus_beta1;  // β1, 1-β1
  float beta2, one_minus_beta2;  // β2, 1-β2
  float eps;
  float neg_step_size;  // -lr·sqrt(1-β2^t)/(1-β1^t) (bias-corrected), or -lr
  float decay;          // -lr·weight_decay (0: no decay)
};

// Which gradient entries survive, and the factor they are multiplied by.
//   D: bit e of `bits` (byte e / 8, bit e % 8, little-endian) is the fixed mask, factor 1;
//   F: keep = uniform(seed, offset, e) < reserve_p (Philox4x32-10, common/philox.h's stream
//      convention), factor 1/reserve_p; reserve_p == 1 keeps everything (plain AdamW).
struct Mask {
  const uint8_t* bits;  // [ceil(n / 8)] or null (F)
  float reserve_p;      // F only, in (0, 1]
  float keep_scale;     // 1 (D) or 1/reserve_p (F), rounded as the reference's `keep / reserve_p`
  uint64_t seed, offset;

  PK_HOST_DEVICE bool draws() const { return bits == nullptr && reserve_p < 1.0f; }
};

PK_HOST_DEVICE bool bit_at(const uint8_t* bits, int64_t e) { return (bits[e >> 3] >> (e & 7)) & 1; }

// F's decision for element e from its Philox word.
PK_HOST_DEVICE bool keep_from_word(uint32_t word, float reserve_p) {
  return philox::word_to_uniform(word) < reserve_p;
}

// One element's update, in place. P is the parameter's (and gradient's) storage type.
template <typename P>
PK_HOST_DEVICE void update(P& param, P grad, float& exp_avg, float& exp_avg_sq, float factor, const Constants& c) {
  const float g = mul_rn(static_cast<float>(grad), factor);
  const float m = fma_rn(g, c.one_minus_beta1, mul_rn(exp_avg, c.beta1));
  const float v = fma_rn(mul_rn(c.one_minus_beta2, g), g, mul_rn(exp_avg_sq, c.beta2));
  const float denom = add_rn(sqrt_rn(v), c.eps);
  float p = add_rn(static_cast<float>(param), div_rn(mul_rn(c.neg_step_size, m), denom));
  p = fma_rn(p, c.decay, p);
  exp_avg = m;
  exp_avg_sq = v;
  param = static_cast<P>(p);
}

}  // namespace masked_adamw
}  // namespace peftkern
