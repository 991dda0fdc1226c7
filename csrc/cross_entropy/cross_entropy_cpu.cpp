// CPU kernels of the fused cross-entropy ops (per-row math: cross_entropy_math.h). Parallel over
// rows; a row of a real vocabulary (32k-256k logits) stays in L2 between its two passes (max, then
// the sum of exponentials). Against PyTorch's log_softmax + nll_loss this never writes the
// [rows, vocab] log-probabilities, nor a zero-filled [rows, vocab] gradient that nll_loss's
// backward scatters into: the backward writes dlogits in one pass. Each fresh [rows, vocab] tensor
// also costs a page fault per 4 KiB on first touch (DESIGN.md, "Cross-entropy").
//
// Paths: AVX-512 (16 lanes, the vector exp below) and scalar (std::exp, the portable spec path).
// Rows where label == ignore_index are skipped (loss 0, lse 0, gradient 0): prompt and padding
// tokens cost nothing. Deterministic: a row's sums do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../common/cpu_isa.h"
#include "../common/dispatch.h"
#include "../common/simd_convert_x86.h"
#include "cross_entropy_host.h"

// GCC 12 warns that the "undefined" source operand (_mm512_undefined_ps) of unmasked AVX-512
// intrinsics (min, max, roundscale, scalef, the reductions) is used uninitialized, wherever they
// are inlined: a false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace peftkern {
namespace cross_entropy {
namespace {

// Rows per parallel_for task: ~32k logits of work at least.
int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, vocab)); }

// A row's max (a NaN is dropped here and comes back through the sum) and sum of exp(z - max).
struct MaxSum {
  float max, sum;
};

// ---- scalar ---------------------------------------------------------------------------------------

template <typename T>
MaxSum max_sum_scalar(const T* z, int64_t vocab) {
  float row_max = -INFINITY;
  for (int64_t v = 0; v < vocab; ++v) row_max = std::max(row_max, static_cast<float>(z[v]));
  double sum = 0.0;  // the spec path: exact enough for any vocabulary
  if (row_max != -INFINITY) {
    for (int64_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<float>(z[v]) - row_max);
  }
  return {row_max, static_cast<float>(sum)};
}

template <typename T>
void grad_row_scalar(const T* z, int64_t vocab, int64_t y, float lse, float g, T* o) {
  for (int64_t v = 0; v < vocab; ++v) o[v] = static_cast<T>(logit_grad(std::exp(static_cast<float>(z[v]) - lse), v == y, g));
}

// ---- AVX-512 --------------------------------------------------------------------------------------
#if defined(PK_X86)

// exp(x) for 16 lanes, ~1-2 ulp: x = n ln2 + r, |r| <= ln2 / 2 (ln2 in two parts, so r is exact),
// exp(r) by Cephes' expf polynomial, times 2^n by vscalefps (which also underflows to 0 and
// denormals correctly). Clamped to [-104, 88.38] (exp is 0 resp. finite there); NaN passes through
// (vminps / vmaxps return their second operand when one is NaN).
PK_TARGET_AVX512 inline __m512 exp_avx512(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), x);
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

template <typename T>
PK_TARGET_AVX512 MaxSum max_sum_avx512(const T* z, int64_t vocab) {
  using L = simd::Lanes<T>;
  __m512 mx0 = _mm512_set1_ps(-INFINITY), mx1 = mx0;
  int64_t v = 0;
  for (; v + 32 <= vocab; v += 32) {
    mx0 = _mm512_max_ps(mx0, L::load(z + v, 0xFFFF));
    mx1 = _mm512_max_ps(mx1, L::load(z + v + 16, 0xFFFF));
  }
  for (; v < vocab; v += 16) {
    const __mmask16 m = simd::lane_mask(vocab - v);
    mx0 = _mm512_mask_max_ps(mx0, m, mx0, L::load(z + v, m));
  }
  const float row_max = _mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1));
  if (row_max == -INFINITY) return {row_max, 0.0f};
  const __m512 shift = _mm512_set1_ps(row_max);
  __m512 s0 = _mm512_setzero_ps(), s1 = s0;
  for (v = 0; v + 32 <= vocab; v += 32) {
    s0 = _mm512_add_ps(s0, exp_avx512(_mm512_sub_ps(L::load(z + v, 0xFFFF), shift)));
    s1 = _mm512_add_ps(s1, exp_avx512(_mm512_sub_ps(L::load(z + v + 16, 0xFFFF), shift)));
  }
  for (; v < vocab; v += 16) {
    const __mmask16 m = simd::lane_mask(vocab - v);
    s0 = _mm512_mask_add_ps(s0, m, s0, exp_avx512(_mm512_sub_ps(L::load(z + v, m), shift)));
  }
  return {row_max, _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))};
}

template <typename T>
PK_TARGET_AVX512 void grad_row_avx512(const T* z, int64_t vocab, int64_t y, float lse, float g, T* o) {
  using L = simd::Lanes<T>;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 shift = _mm512_set1_ps(lse), gv = _mm512_set1_ps(g), one = _mm512_set1_ps(1.0f);
  for (int64_t v = 0; v < vocab; v += 16) {
    const __mmask16 m = simd::lane_mask(vocab - v);
    const __m512 e = exp_avx512(_mm512_sub_ps(L::load(z + v, m), shift));
    // the label's lane: y - v (clamped to -1..16, so it fits int32) equals the lane index
    const __mmask16 is_label =
        _mm512_cmpeq_epi32_mask(lane, _mm512_set1_epi32(static_cast<int32_t>(std::clamp<int64_t>(y - v, -1, 16))));
    L::store(o + v, m, _mm512_mul_ps(gv, _mm512_mask_sub_ps(e, is_label, e, one)));  // logit_grad
  }
}

#endif  // PK_X86

// ---- the row loops, shared by both paths ---------------------------------------------------------

template <typename T, typename RowMaxSum>
void forward_rows(const Args& a, int64_t first, int64_t last, float* loss, float* lse, RowMaxSum max_sum) {
  const T* logits = static_cast<const T*>(a.logits);
  for (int64_t r = first; r < last; ++r) {
    const int64_t y = a.labels[r];
    if (is_ignored(y, a.ignore_index)) {
      loss[r] = lse[r] = 0.0f;
      continue;
    }
    const T* z = logits + r * a.stride;
    const MaxSum ms = max_sum(z, a.vocab);
    lse[r] = row_lse(ms.max, ms.sum);
    loss[r] = label_in_range(y, a.vocab) ? lse[r] - static_cast<float>(z[y]) : NAN;
  }
}

template <typename T, typename GradRow>
void backward_rows(const Args& a, const float* grad, const float* lse, int64_t first, int64_t last, T* out,
                   GradRow grad_row) {
  const T* logits = static_cast<const T*>(a.logits);
  for (int64_t r = first; r < last; ++r) {
    T* o = out + r * a.vocab;
    const int64_t y = a.labels[r];
    if (is_ignored(y, a.ignore_index)) {
      std::fill(o, o + a.vocab, T(0));
      continue;
    }
    grad_row(logits + r * a.stride, a.vocab, y, lse[r], grad[r], o);
  }
}

bool use_avx512() {
#if defined(PK_X86)
  return cpu::active_isa() == cpu::Isa::kAvx512;
#else
  return false;
#endif
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                         int64_t ignore_index) {
  Forward f = check_and_allocate_fwd(logits, labels, ignore_index);
  const Args& a = f.in.args;
  if (a.rows == 0) return {f.loss, f.lse};
  float* loss = f.loss.mutable_data_ptr<float>();
  float* lse = f.lse.mutable_data_ptr<float>();
  const bool simd = use_avx512();
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(a.dtype, "cross_entropy_fwd_cpu", [&] {
    at::parallel_for(0, a.rows, grain_rows(a.vocab), [&](int64_t first, int64_t last) {
#if defined(PK_X86)
      if (simd) return forward_rows<scalar_t>(a, first, last, loss, lse, max_sum_avx512<scalar_t>);
#endif
      forward_rows<scalar_t>(a, first, last, loss, lse, max_sum_scalar<scalar_t>);
    });
  });
  return {f.loss, f.lse};
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                                 const at::Tensor& lse, int64_t ignore_index) {
  Backward b = check_and_allocate_bwd(grad_loss, logits, labels, lse, ignore_index);
  const Args& a = b.in.args;
  if (b.out.numel() == 0) return b.out;
  const float* g = b.grad_loss.const_data_ptr<float>();
  const float* l = b.lse.const_data_ptr<float>();
  const bool simd = use_avx512();
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(a.dtype, "cross_entropy_bwd_cpu", [&] {
    scalar_t* o = b.out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, a.rows, grain_rows(a.vocab), [&](int64_t first, int64_t last) {
#if defined(PK_X86)
      if (simd) return backward_rows<scalar_t>(a, g, l, first, last, o, grad_row_avx512<scalar_t>);
#endif
      backward_rows<scalar_t>(a, g, l, first, last, o, grad_row_scalar<scalar_t>);
    });
  });
  return b.out;
}

}  // namespace
}  // namespace cross_entropy
}  // namespace peftkern

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("cross_entropy_fwd", &peftkern::cross_entropy::cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &peftkern::cross_entropy::cross_entropy_bwd_cpu);
}
