// x86 SIMD building blocks of the NF4 decode, shared by the CPU decode primitive
// (nf4_cpu_decode_x86.cpp) and the QLoRA decode GEMV (qlora/qlora_cpu_x86.cpp). Every function
// carries its own target attribute (common/cpu_isa.h): callers reach them only after cpuid.
//
// Nibble order: element 2i is the HIGH nibble of byte i, 2i + 1 the low one. From a byte b the
// index pair is built in one 16-bit lane as (b >> 4) | (b << 8): its low byte is the high nibble
// (element 2i), its high byte is b itself, whose low 4 bits are element 2i + 1. The table
// lookups below read only the low bits of each index (vpermps: 4, vpermw: 5 with the 16-entry
// table stored twice), so the stray high bits of b never need masking.
#pragma once

#include "../common/cpu_isa.h"

#if defined(PK_X86)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "../common/blockwise_quant.h"
#include "../common/simd_convert_x86.h"

namespace peftkern {
namespace nf4 {
namespace x86 {

using simd::to_bf16_avx512;
using simd::to_bf16_dwords_avx2;
using simd::to_fp16_avx512;
using simd::to_fp16_dwords_avx2;

// The 16 NF4 values in code order, for a vector load.
alignas(64) inline constexpr float kNf4Table[quant::kNf4Codes] = {
    quant::nf4_value(0),  quant::nf4_value(1),  quant::nf4_value(2),  quant::nf4_value(3),
    quant::nf4_value(4),  quant::nf4_value(5),  quant::nf4_value(6),  quant::nf4_value(7),
    quant::nf4_value(8),  quant::nf4_value(9),  quant::nf4_value(10), quant::nf4_value(11),
    quant::nf4_value(12), quant::nf4_value(13), quant::nf4_value(14), quant::nf4_value(15)};

// ---- AVX-512 ------------------------------------------------------------------------------------

// 32 index bytes, in element order, for the 32 codes of 16 packed bytes.
PK_TARGET_AVX512 inline __m256i index_bytes_avx512(const uint8_t* p) {
  const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_or_si256(_mm256_srli_epi16(w, 4), _mm256_slli_epi16(w, 8));
}

// 16 index bytes for the 16 codes of 8 packed bytes.
PK_TARGET_AVX512 inline __m128i index_bytes8_avx512(const uint8_t* p) {
  const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm_or_si128(_mm_srli_epi16(w, 4), _mm_slli_epi16(w, 8));
}

// The 32 codes of 16 packed bytes looked up in a 16-float table (vpermps, one per 16 codes).
PK_TARGET_AVX512 inline void lookup32_ps_avx512(const uint8_t* p, __m512 table, __m512& lo, __m512& hi) {
  const __m256i idx = index_bytes_avx512(p);
  lo = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(idx)), table);
  hi = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(idx, 1)), table);
}

PK_TARGET_AVX512 inline __m512 lookup16_ps_avx512(const uint8_t* p, __m512 table) {
  return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(index_bytes8_avx512(p)), table);
}

// The 32 codes of 16 packed bytes looked up in a table of 16 16-bit values stored twice (vpermw).
PK_TARGET_AVX512 inline __m512i lookup32_epi16_avx512(const uint8_t* p, __m512i table2x) {
  return _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(index_bytes_avx512(p)), table2x);
}

// Block absmax, 16 blocks at a time, into the low lanes of one vector (the others 0): a masked
// load, or the double-quantized ones decoded with the same roundings as
// quant::nested_absmax_value. The 256-entry code table is held in 16 registers and read by 8
// two-table permutes (index bits 0-4) and a 3-level blend on bits 5-7: 18 vector ops where one
// gather took ~25 cycles on AMD (measured: the gathers were a quarter of a 1-token GEMV). Build it
// once and call it per group. Kept in a register: per-block scalars reloaded from a masked vector
// store stall on store-to-load forwarding, which a masked store never feeds (measured: half the
// decode's time went to that reload).
struct BlockScales16Avx512 {
  const quant::BlockScales& scales;
  __m512 code_table[16];

  PK_TARGET_AVX512 explicit BlockScales16Avx512(const quant::BlockScales& s) : scales(s) {
    for (int i = 0; i < 16; ++i) {
      code_table[i] = scales.absmax != nullptr ? _mm512_setzero_ps() : _mm512_loadu_ps(scales.nested_code + 16 * i);
    }
  }

  // nested_code[code] for 16 dword codes in 0..255
  PK_TARGET_AVX512 __m512 nested_code(__m512i code) const {
    __m512 r[8];
    for (int j = 0; j < 8; ++j) r[j] = _mm512_permutex2var_ps(code_table[2 * j], code, code_table[2 * j + 1]);
    for (int bit = 5, n = 8; bit < 8; ++bit, n /= 2) {
      const __mmask16 high = _mm512_test_epi32_mask(code, _mm512_set1_epi32(1 << bit));
      for (int j = 0; j < n / 2; ++j) r[j] = _mm512_mask_blend_ps(high, r[2 * j], r[2 * j + 1]);
    }
    return r[0];
  }

  // the absmax of `count` <= 16 consecutive blocks from `first`
  PK_TARGET_AVX512 __m512 operator()(int64_t first, int64_t count) const {
    const __mmask16 valid = simd::lane_mask(count);
    if (scales.absmax != nullptr) return _mm512_maskz_loadu_ps(valid, scales.absmax + first);
    const __m512 value = nested_code(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(valid, scales.codes + first)));
    // A nested block spans >= 32 blocks (a power of two), so these <= 16 lie in one or two of
    // them: two broadcasts and a blend, not a gather.
    const int64_t nb = scales.nested_blocksize, g0 = first / nb;
    const int64_t lanes_in_g0 = (g0 + 1) * nb - first;  // >= 1
    __m512 nested = _mm512_set1_ps(scales.nested_absmax[g0]);
    if (lanes_in_g0 < count) {
      const __mmask16 in_g1 = static_cast<__mmask16>(0xFFFFu << lanes_in_g0);
      nested = _mm512_mask_blend_ps(in_g1, nested, _mm512_set1_ps(scales.nested_absmax[g0 + 1]));
    }
    return _mm512_maskz_add_ps(valid, _mm512_mul_ps(value, nested), _mm512_set1_ps(*scales.nested_offset));
  }
};

// The absmax of `count` consecutive blocks from `first`, stored to `out`.
PK_TARGET_AVX512 inline void block_scales_avx512(const quant::BlockScales& scales, int64_t first, int64_t count,
                                          float* out) {
  if (scales.absmax != nullptr) {
    std::memcpy(out, scales.absmax + first, count * sizeof(float));
    return;
  }
  const BlockScales16Avx512 block_scales16(scales);
  int64_t b = 0;
  for (; b + 16 <= count; b += 16) _mm512_storeu_ps(out + b, block_scales16(first + b, 16));
  if (b < count) {
    const int64_t n = count - b;
    _mm512_mask_storeu_ps(out + b, simd::lane_mask(n), block_scales16(first + b, n));
  }
}

// ---- AVX2 ---------------------------------------------------------------------------------------

// 32 index bytes, in element order, for the 32 codes of 16 packed bytes (high bits unmasked).
PK_TARGET_AVX2 inline __m256i index_bytes_avx2(const uint8_t* p) {
  const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_or_si256(_mm256_srli_epi16(w, 4), _mm256_slli_epi16(w, 8));
}

// 8 codes (dword indices, low 4 bits used) looked up in a 16-float table held as two halves:
// vpermps reads 3 bits, bit 3 (moved to the sign) picks the half.
PK_TARGET_AVX2 inline __m256 lookup8_ps_avx2(__m256i idx, __m256 t0, __m256 t1) {
  const __m256 lo = _mm256_permutevar8x32_ps(t0, idx);
  const __m256 hi = _mm256_permutevar8x32_ps(t1, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// The 32 codes of 16 packed bytes as four vectors of 8 floats.
PK_TARGET_AVX2 inline void lookup32_ps_avx2(const uint8_t* p, __m256 t0, __m256 t1, __m256 out[4]) {
  const __m256i idx = index_bytes_avx2(p);
  const __m128i a = _mm256_castsi256_si128(idx), b = _mm256_extracti128_si256(idx, 1);
  out[0] = lookup8_ps_avx2(_mm256_cvtepu8_epi32(a), t0, t1);
  out[1] = lookup8_ps_avx2(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(a, a)), t0, t1);
  out[2] = lookup8_ps_avx2(_mm256_cvtepu8_epi32(b), t0, t1);
  out[3] = lookup8_ps_avx2(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(b, b)), t0, t1);
}

// 16-bit table lookups with vpshufb: the table's low bytes and high bytes, each 16 bytes held in
// both 128-bit lanes. `words` holds the 16 table entries in order.
struct ByteTables {
  __m256i lo, hi;
};
PK_TARGET_AVX2 inline ByteTables split_bytes_avx2(__m256i words) {
  // per lane: low bytes of its 8 words in bytes 0-7, high bytes in 8-15
  const __m256i split = _mm256_shuffle_epi8(
      words, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1,
                              3, 5, 7, 9, 11, 13, 15));
  const __m256i both = _mm256_permute4x64_epi64(split, 0xD8);  // [lo 0-7, lo 8-15 | hi 0-7, hi 8-15]
  return {_mm256_permute2x128_si256(both, both, 0x00), _mm256_permute2x128_si256(both, both, 0x11)};
}

// The 32 codes of 16 packed bytes as 32 16-bit table entries, in two vectors of 16.
PK_TARGET_AVX2 inline void lookup32_epi16_avx2(const uint8_t* p, const ByteTables& t, __m256i& out0,
                                              __m256i& out1) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(15);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask), lo = _mm_and_si128(b, mask);
  // element order: codes 0-15 in the low lane, 16-31 in the high lane
  const __m256i idx = _mm256_setr_m128i(_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo));
  const __m256i l = _mm256_shuffle_epi8(t.lo, idx), h = _mm256_shuffle_epi8(t.hi, idx);
  const __m256i a = _mm256_unpacklo_epi8(l, h), c = _mm256_unpackhi_epi8(l, h);  // [0-7 | 16-23], [8-15 | 24-31]
  out0 = _mm256_permute2x128_si256(a, c, 0x20);
  out1 = _mm256_permute2x128_si256(a, c, 0x31);
}

// Two vectors of 8 dwords (16-bit values in the low halves) -> 16 words in order.
PK_TARGET_AVX2 inline __m256i pack_words_avx2(__m256i a, __m256i b) {
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
}

}  // namespace x86
}  // namespace nf4
}  // namespace peftkern

#endif  // PK_X86
