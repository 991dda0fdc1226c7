// CPU kernels of the fused masked AdamW: one pass over param, grad and the two moments, in
// place, parallel over tiles of elements (at::parallel_for). Per tile the mask factors are
// formed first (from the bits, or from Philox for F) into a small stack buffer, then one flat
// loop applies masked_adamw_math.h's update: no branch and no RNG in that loop, so it runs 8
// lanes wide (AVX2 + FMA where the CPU has them, below). Tiles are multiples of 8 and 4
// elements, so a tile never splits a mask byte or a Philox block.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../common/cpu_isa.h"
#include "../common/dispatch.h"
#include "masked_adamw_host.h"

namespace peftkern {
namespace masked_adamw {
namespace {

constexpr int64_t kTile = 512;
constexpr int64_t kGrain = 16 * kTile;  // elements per parallel task (~3 pages of each array)

// factor[i] for elements first .. first + len - 1 (first a multiple of 8).
void tile_factors(const Mask& mask, int64_t first, int64_t len, float* factor) {
  if (mask.bits != nullptr) {
    for (int64_t i = 0; i < len; ++i) factor[i] = static_cast<float>((mask.bits[(first + i) >> 3] >> ((first + i) & 7)) & 1);
  } else if (!mask.draws()) {
    std::fill(factor, factor + len, mask.keep_scale);
  } else {
    for (int64_t i = 0; i < len; i += 4) {
      const philox::Words w = philox::block_words(mask.seed, mask.offset, static_cast<uint64_t>(first + i) >> 2);
      for (int64_t j = 0; j < 4 && i + j < len; ++j) {
        factor[i + j] = keep_from_word(w.w[j], mask.reserve_p) ? mask.keep_scale : 0.0f;
      }
    }
  }
}

template <typename P>
void update_range(P* p, const P* g, float* m, float* v, const float* factor, int64_t len, const Constants& c) {
  for (int64_t i = 0; i < len; ++i) update<P>(p[i], g[i], m[i], v[i], factor[i], c);
}

#if defined(PK_X86)
// float32, 8 lanes at a time: masked_adamw_math.h's `update`, op for op (every AVX operation is
// one IEEE rounding, _mm256_fmadd_ps is fma_rn, _mm256_sqrt_ps is sqrt_rn), so the same bits;
// the tests compare it with the spec on sizes with and without a scalar tail. Compiled for
// AVX2 + FMA only here and chosen at run time by the library's CPU ISA dispatch (common/cpu_isa.h;
// PEFTKERN_CPU_ISA=scalar forces the portable loop): the baseline build has no FMA instruction,
// and a libm fmaf call per element would make the step several times slower.
PK_TARGET_AVX2 void update_range_avx2(float* p, const float* g, float* m, float* v,
                                                            const float* factor, int64_t len, const Constants& c) {
  const __m256 beta1 = _mm256_set1_ps(c.beta1), one_minus_beta1 = _mm256_set1_ps(c.one_minus_beta1);
  const __m256 beta2 = _mm256_set1_ps(c.beta2), one_minus_beta2 = _mm256_set1_ps(c.one_minus_beta2);
  const __m256 eps = _mm256_set1_ps(c.eps), neg_step = _mm256_set1_ps(c.neg_step_size);
  const __m256 decay = _mm256_set1_ps(c.decay);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256 gi = _mm256_mul_ps(_mm256_loadu_ps(g + i), _mm256_loadu_ps(factor + i));
    const __m256 mi = _mm256_fmadd_ps(gi, one_minus_beta1, _mm256_mul_ps(_mm256_loadu_ps(m + i), beta1));
    const __m256 vi = _mm256_fmadd_ps(_mm256_mul_ps(one_minus_beta2, gi), gi, _mm256_mul_ps(_mm256_loadu_ps(v + i), beta2));
    const __m256 denom = _mm256_add_ps(_mm256_sqrt_ps(vi), eps);
    __m256 pi = _mm256_add_ps(_mm256_loadu_ps(p + i), _mm256_div_ps(_mm256_mul_ps(neg_step, mi), denom));
    pi = _mm256_fmadd_ps(pi, decay, pi);
    _mm256_storeu_ps(m + i, mi);
    _mm256_storeu_ps(v + i, vi);
    _mm256_storeu_ps(p + i, pi);
  }
  update_range<float>(p + i, g + i, m + i, v + i, factor + i, len - i, c);
}

#endif

template <typename P>
void step_tiles(P* param, const P* grad, float* exp_avg, float* exp_avg_sq, const StepArgs& args) {
  at::parallel_for(0, ceil_div(args.numel, kTile), kGrain / kTile, [&](int64_t first_tile, int64_t last_tile) {
    float factor[kTile];
    for (int64_t t = first_tile; t < last_tile; ++t) {
      const int64_t first = t * kTile, len = std::min(kTile, args.numel - first);
      tile_factors(args.mask, first, len, factor);
#if defined(PK_X86)
      if constexpr (std::is_same_v<P, float>) {
        if (cpu::active_isa() != cpu::Isa::kScalar) {
          update_range_avx2(param + first, grad + first, exp_avg + first, exp_avg_sq + first, factor, len,
                            args.constants);
          continue;
        }
      }
#endif
      update_range<P>(param + first, grad + first, exp_avg + first, exp_avg_sq + first, factor, len, args.constants);
    }
  });
}

void masked_adamw_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                      const at::Tensor& exp_avg_sq, const c10::optional<at::Tensor>& mask_bits, double reserve_p,
                      int64_t seed, int64_t offset, double lr, double beta1, double beta2, double eps,
                      double weight_decay, double step_size) {
  const StepArgs args = check_step(param, grad, exp_avg, exp_avg_sq, mask_bits, reserve_p, seed, offset, lr, beta1,
                                   beta2, eps, weight_decay, step_size);
  if (args.numel == 0) return;
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(param.scalar_type(), "masked_adamw_", [&] {
    step_tiles<scalar_t>(param.mutable_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                         exp_avg.mutable_data_ptr<float>(), exp_avg_sq.mutable_data_ptr<float>(), args);
  });
}

at::Tensor masked_adamw_keep_mask_cpu(const at::Tensor& like, double reserve_p, int64_t seed, int64_t offset) {
  auto [mask, out] = check_keep_mask(like, reserve_p, seed, offset);
  bool* keep = out.mutable_data_ptr<bool>();
  at::parallel_for(0, ceil_div(out.numel(), kTile), kGrain / kTile, [&](int64_t first_tile, int64_t last_tile) {
    float factor[kTile];
    for (int64_t t = first_tile; t < last_tile; ++t) {
      const int64_t first = t * kTile, len = std::min(kTile, out.numel() - first);
      tile_factors(mask, first, len, factor);
      for (int64_t i = 0; i < len; ++i) keep[first + i] = factor[i] != 0.0f;
    }
  });
  return out;
}

}  // namespace
}  // namespace masked_adamw
}  // namespace peftkern

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("masked_adamw_", &peftkern::masked_adamw::masked_adamw_cpu);
  m.impl("masked_adamw_keep_mask", &peftkern::masked_adamw::masked_adamw_keep_mask_cpu);
}
