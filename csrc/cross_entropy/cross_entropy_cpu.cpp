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

namespace peftkern {
namespace cross_entropy {
namespace {

// Rows per parallel_for task: ~32k logits of work at least.
int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, vocab)); }

// ---- scalar ---------------------------------------------------------------------------------------

template <typename T>
void forward_rows_scalar(const Args& a, int64_t first, int64_t last, float* loss, float* lse) {
  const T* logits = static_cast<const T*>(a.logits);
  for (int64_t r = first; r < last; ++r) {
    const int64_t y = a.labels[r];
    if (is_ignored(y, a.ignore_index)) {
      loss[r] = lse[r] = 0.0f;
      continue;
    }
    const T* z = logits + r * a.stride;
    float row_max = -INFINITY;
    for (int64_t v = 0; v < a.vocab; ++v) row_max = std::max(row_max, static_cast<float>(z[v]));  // NaN: see the sum
    double sum = 0.0;  // the spec path: exact enough for any vocabulary
    if (row_max != -INFINITY) {
      for (int64_t v = 0; v < a.vocab; ++v) sum += std::exp(static_cast<float>(z[v]) - row_max);
    }
    lse[r] = row_lse(row_max, static_cast<float>(sum));
    loss[r] = label_in_range(y, a.vocab) ? lse[r] - static_cast<float>(z[y]) : NAN;
  }
}

template <typename T>
void backward_rows_scalar(const Args& a, const float* grad, const float* lse, int64_t first, int64_t last, T* out) {
  const T* logits = static_cast<const T*>(a.logits);
  for (int64_t r = first; r < last; ++r) {
    T* o = out + r * a.vocab;
    const int64_t y = a.labels[r];
    if (is_ignored(y, a.ignore_index)) {
      std::fill(o, o + a.vocab, T(0));
      continue;
    }
    const T* z = logits + r * a.stride;
    for (int64_t v = 0; v < a.vocab; ++v) {
      o[v] = static_cast<T>(logit_grad(std::exp(static_cast<float>(z[v]) - lse[r]), v == y, grad[r]));
    }
  }
}

// ---- AVX-512 --------------------------------------------------------------------------------------
#if defined(PK_X86)
// GCC 12 warns that the "undefined" source operand (_mm512_undefined_ps) of the unmasked
// min / max / roundscale / scalef intrinsics may be used uninitialized: a false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

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
PK_TARGET_AVX512 void forward_rows_avx512(const Args& a, int64_t first, int64_t last, float* loss, float* lse) {
  using L = simd::Lanes<T>;
  const T* logits = static_cast<const T*>(a.logits);
  for (int64_t r = first; r < last; ++r) {
    const int64_t y = a.labels[r];
    if (is_ignored(y, a.ignore_index)) {
      loss[r] = lse[r] = 0.0f;
      continue;
    }
    const T* z = logits + r * a.stride;
    // max over the row (a NaN is dropped here and comes back through the sum)
    __m512 mx0 = _mm512_set1_ps(-INFINITY), mx1 = mx0;
    int64_t v = 0;
    for (; v + 32 <= a.vocab; v += 32) {
      mx0 = _mm512_max_ps(mx0, L::load(z + v, 0xFFFF));
      mx1 = _mm512_max_ps(mx1, L::load(z + v + 16, 0xFFFF));
    }
    for (; v < a.vocab; v += 16) {
      const __mmask16 m = simd::lane_mask(a.vocab - v);
      mx0 = _mm512_mask_max_ps(mx0, m, mx0, L::load(z + v, m));
    }
    const float row_max = _mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1));
    float sum = 0.0f;
    if (row_max != -INFINITY) {
      const __m512 shift = _mm512_set1_ps(row_max);
      __m512 s0 = _mm512_setzero_ps(), s1 = s0;
      for (v = 0; v + 32 <= a.vocab; v += 32) {
        s0 = _mm512_add_ps(s0, exp_avx512(_mm512_sub_ps(L::load(z + v, 0xFFFF), shift)));
        s1 = _mm512_add_ps(s1, exp_avx512(_mm512_sub_ps(L::load(z + v + 16, 0xFFFF), shift)));
      }
      for (; v < a.vocab; v += 16) {
        const __mmask16 m = simd::lane_mask(a.vocab - v);
        s0 = _mm512_mask_add_ps(s0, m, s0, exp_avx512(_mm512_sub_ps(L::load(z + v, m), shift)));
      }
      sum = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    }
    lse[r] = row_lse(row_max, sum);
    loss[r] = label_in_range(y, a.vocab) ? lse[r] - static_cast<float>(z[y]) : NAN;
  }
}

template <typename T>
PK_TARGET_AVX512 void backward_rows_avx512(const Args& a, const float* grad, const float* lse, int64_t first,
                                           int64_t last, T* out) {
  using L = simd::Lanes<T>;
  const T* logits = static_cast<const T*>(a.logits);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t r = first; r < last; ++r) {
    T* o = out + r * a.vocab;
    const int64_t y = a.labels[r];
    if (is_ignored(y, a.ignore_index)) {
      std::fill(o, o + a.vocab, T(0));
      continue;
    }
    const T* z = logits + r * a.stride;
    const __m512 shift = _mm512_set1_ps(lse[r]), g = _mm512_set1_ps(grad[r]), one = _mm512_set1_ps(1.0f);
    // the label's lane: (y - v) == lane index; y fits int32 for any vocabulary this op takes
    for (int64_t v = 0; v < a.vocab; v += 16) {
      const __mmask16 m = simd::lane_mask(a.vocab - v);
      const __m512 e = exp_avx512(_mm512_sub_ps(L::load(z + v, m), shift));
      const __mmask16 is_label = _mm512_cmpeq_epi32_mask(lane, _mm512_set1_epi32(static_cast<int32_t>(
                                                                   std::clamp<int64_t>(y - v, -1, 16))));
      L::store(o + v, m, _mm512_mul_ps(g, _mm512_mask_sub_ps(e, is_label, e, one)));  // logit_grad
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif  // PK_X86

bool use_avx512() {
#if defined(PK_X86)
  return cpu::active_isa() == cpu::Isa::kAvx512;
#else
  return false;
#endif
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                         int64_t ignore_index) {
  const Inputs in = check_inputs(logits, labels, ignore_index, "cross_entropy_fwd");
  const Args& a = in.args;
  auto loss = new_output({a.rows}, logits.options().dtype(at::kFloat));
  auto lse = new_output({a.rows}, logits.options().dtype(at::kFloat));
  if (a.rows == 0) return {loss, lse};
  float* loss_p = loss.mutable_data_ptr<float>();
  float* lse_p = lse.mutable_data_ptr<float>();
  const bool simd = use_avx512();
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(a.dtype, "cross_entropy_fwd_cpu", [&] {
    at::parallel_for(0, a.rows, grain_rows(a.vocab), [&](int64_t first, int64_t last) {
#if defined(PK_X86)
      if (simd) return forward_rows_avx512<scalar_t>(a, first, last, loss_p, lse_p);
#endif
      forward_rows_scalar<scalar_t>(a, first, last, loss_p, lse_p);
    });
  });
  return {loss, lse};
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                                 const at::Tensor& lse, int64_t ignore_index) {
  constexpr const char* op = "cross_entropy_bwd";
  const Inputs in = check_inputs(logits, labels, ignore_index, op);
  const Args& a = in.args;
  check_row_values(grad_loss, op, "grad_loss", a, logits);
  check_row_values(lse, op, "lse", a, logits);
  const at::Tensor g = grad_loss.contiguous(), l = lse.contiguous();
  auto out = new_output({a.rows, a.vocab}, logits.options());
  if (out.numel() == 0) return out;
  const bool simd = use_avx512();
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(a.dtype, "cross_entropy_bwd_cpu", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, a.rows, grain_rows(a.vocab), [&](int64_t first, int64_t last) {
#if defined(PK_X86)
      if (simd) return backward_rows_avx512<scalar_t>(a, g.const_data_ptr<float>(), l.const_data_ptr<float>(), first, last, o);
#endif
      backward_rows_scalar<scalar_t>(a, g.const_data_ptr<float>(), l.const_data_ptr<float>(), first, last, o);
    });
  });
  return out;
}

}  // namespace
}  // namespace cross_entropy
}  // namespace peftkern

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("cross_entropy_fwd", &peftkern::cross_entropy::cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &peftkern::cross_entropy::cross_entropy_bwd_cpu);
}
