// Exact float -> bfloat16 / half conversions in AVX-512 and AVX2, rounding as c10's scalar
// conversions do (so a SIMD kernel matches its scalar spec bit for bit), shared by the CPU kernels
// that have SIMD paths (the NF4 decode, LoRA dropout, the rank-r products, the QLoRA GEMV), with the
// masked 16-lane loads and stores of float / bf16 / half built on them. Each function carries its target attribute:
// callers reach them only after the CPU ISA dispatch (common/cpu_isa.h) said the CPU has it.
#pragma once

#include "cpu_isa.h"

#if defined(PK_X86)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

namespace peftkern {
namespace simd {

// float -> bfloat16 bits exactly as c10::BFloat16(float): round to nearest even, NaN -> 0x7FC0.
PK_TARGET_AVX512 inline __m256i to_bf16_avx512(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// float -> half bits exactly as c10::Half(float) in this build (the portable
// fp16_ieee_from_fp32_value): IEEE round to nearest even (vcvtps2ph), but every NaN becomes
// sign | 0x7E00 where vcvtps2ph would keep payload bits.
PK_TARGET_AVX512 inline __m256i to_fp16_avx512(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  __m512i r = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m512i nan = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x8000)),
                                      _mm512_set1_epi32(0x7E00));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), nan);
  return _mm512_cvtepi32_epi16(r);
}

// float -> bfloat16 bits as c10::BFloat16(float), in the low 16 bits of each dword.
PK_TARGET_AVX2 inline __m256i to_bf16_dwords_avx2(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)),
                                              _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

// float -> half bits as c10::Half(float) (see to_fp16_avx512), in the low 16 bits of each dword.
PK_TARGET_AVX2 inline __m256i to_fp16_dwords_avx2(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i r = _mm256_cvtepu16_epi32(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m256i nan = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x8000)),
                                      _mm256_set1_epi32(0x7E00));
  return _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(nan), _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

// The low min(n, 16) lanes.
PK_TARGET_AVX512 inline __mmask16 lane_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// 16 elements of T as float lanes and back, masked (a row's tail). bf16 and half widen exactly;
// the narrowing rounds as c10's conversions (above).
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  PK_TARGET_AVX512 static __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
  PK_TARGET_AVX512 static void store(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
};
template <>
struct Lanes<c10::BFloat16> {
  PK_TARGET_AVX512 static __m512 load(const c10::BFloat16* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  }
  PK_TARGET_AVX512 static void store(c10::BFloat16* p, __mmask16 m, __m512 v) {
    _mm256_mask_storeu_epi16(p, m, to_bf16_avx512(v));
  }
};
template <>
struct Lanes<c10::Half> {
  PK_TARGET_AVX512 static __m512 load(const c10::Half* p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
  PK_TARGET_AVX512 static void store(c10::Half* p, __mmask16 m, __m512 v) {
    _mm256_mask_storeu_epi16(p, m, to_fp16_avx512(v));
  }
};

}  // namespace simd
}  // namespace peftkern

#endif  // PK_X86
