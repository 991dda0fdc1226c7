// AVX-512 and AVX2 implementations of the CPU NF4 decode primitive (nf4_cpu_decode.h), bit for
// bit the scalar one's results: per block segment the 16-entry table T(nf4_value(k) * absmax) is
// computed in one vector (one float32 rounding of each product, then the exact c10 rounding to
// bf16 / fp16), and every 16 packed bytes become 32 outputs by table permutes
// (nf4_simd_x86.h). A mid-byte head and a tail shorter than 32 codes use the same table, one
// element at a time.
#include "nf4_cpu_decode_x86.h"

#if defined(PK_X86)
#include <algorithm>
#include <type_traits>

#include "nf4_simd_x86.h"

namespace peftkern {
namespace nf4 {
namespace cpu {
namespace x86 {
namespace {

using namespace nf4::x86;

// The scalar remainder of a segment: a mid-byte head (`i` odd) or a short tail.
template <typename T>
inline T* decode_scalar_part(const uint8_t* packed, const T* table, int64_t& i, int64_t end, T* o) {
  for (; i < end; ++i) *o++ = table[quant::nf4_code_at(packed, i)];
  return o;
}

// Walks the blocks of [first, first + count), 16 at a time: their absmax decoded into one register
// (BlockScales16Avx512) and each block's broadcast from it, no division per block. The common
// case, 16 whole blocks inside the range with blocksize a multiple of 32, takes a fast path: each
// block's table made once (make_table(scale)) and its codes decoded 32 at a time
// (decode32(packed bytes, table, output offset)) with no per-block bounds, parity or tail tests.
// Any other block goes to segment(begin, end, scale), which handles mid-byte heads and short tails.
template <typename MakeTable, typename Decode32, typename Segment>
PK_TARGET_AVX512 inline void decode_blocks_avx512(const uint8_t* packed, const quant::BlockScales& scales,
                                                  int64_t blocksize, int64_t first, int64_t count,
                                                  MakeTable&& make_table, Decode32&& decode32, Segment&& segment) {
  if (count <= 0) return;
  const int64_t end = first + count;
  const int64_t first_block = first / blocksize, last_block = (end - 1) / blocksize;
  const bool whole32 = blocksize % 32 == 0;
  const BlockScales16Avx512 block_scales16(scales);
  for (int64_t b0 = first_block; b0 <= last_block; b0 += 16) {
    const int64_t blocks = std::min<int64_t>(16, last_block - b0 + 1);
    const __m512 block_scale = block_scales16(b0, blocks);
    const int64_t lo = b0 * blocksize, hi = (b0 + blocks) * blocksize;
    if (whole32 && lo >= first && hi <= end) {
      const uint8_t* p = packed + lo / 2;
      int64_t o = lo - first;
      for (int64_t k = 0; k < blocks; ++k) {
        const auto table = make_table(_mm512_permutexvar_ps(_mm512_set1_epi32(static_cast<int32_t>(k)), block_scale));
        for (int64_t j = 0; j < blocksize; j += 32, p += 16, o += 32) decode32(p, table, o);
      }
      continue;
    }
    for (int64_t k = 0; k < blocks; ++k) {
      const int64_t b = b0 + k;
      segment(std::max(first, b * blocksize), std::min(end, (b + 1) * blocksize),
              _mm512_permutexvar_ps(_mm512_set1_epi32(static_cast<int32_t>(k)), block_scale));
    }
  }
}

PK_TARGET_AVX512 void avx512_f32(const uint8_t* packed, const quant::BlockScales& scales,
                                 int64_t blocksize, int64_t first, int64_t count, float* out) {
  const __m512 nf4 = _mm512_load_ps(kNf4Table);
  const auto make_table = [&](__m512 scale) PK_TARGET_AVX512 { return _mm512_mul_ps(nf4, scale); };
  const auto decode32 = [&](const uint8_t* p, __m512 table, int64_t o) PK_TARGET_AVX512 {
    __m512 lo, hi;
    lookup32_ps_avx512(p, table, lo, hi);
    _mm512_storeu_ps(out + o, lo);
    _mm512_storeu_ps(out + o + 16, hi);
  };
  decode_blocks_avx512(packed, scales, blocksize, first, count, make_table, decode32,
                       [&](int64_t i, int64_t segment_end, __m512 scale) PK_TARGET_AVX512 {
    const __m512 table = make_table(scale);
    float* o = out + (i - first);
    alignas(64) float t[quant::kNf4Codes];
    const bool ragged = (i & 1) || ((segment_end - i) & 31);  // a mid-byte head or a short tail
    if (ragged) _mm512_store_ps(t, table);
    if (i & 1) o = decode_scalar_part(packed, t, i, i + 1, o);
    for (; i + 32 <= segment_end; i += 32, o += 32) {
      __m512 lo, hi;
      lookup32_ps_avx512(packed + (i >> 1), table, lo, hi);
      _mm512_storeu_ps(o, lo);
      _mm512_storeu_ps(o + 16, hi);
    }
    if (ragged) decode_scalar_part(packed, t, i, segment_end, o);
  });
}

// bf16 / fp16 out: the table as 16-bit values, stored twice in one zmm for vpermw.
template <typename T>
PK_TARGET_AVX512 void avx512_16(const uint8_t* packed, const quant::BlockScales& scales,
                                int64_t blocksize, int64_t first, int64_t count, T* out) {
  static_assert(sizeof(T) == 2);
  const __m512 nf4 = _mm512_load_ps(kNf4Table);
  // the table as 16-bit values, stored twice in one zmm for vpermw
  const auto make_table = [&](__m512 scale) PK_TARGET_AVX512 {
    const __m512 product = _mm512_mul_ps(nf4, scale);
    const __m256i words = std::is_same_v<T, c10::BFloat16> ? to_bf16_avx512(product) : to_fp16_avx512(product);
    return _mm512_inserti64x4(_mm512_castsi256_si512(words), words, 1);
  };
  const auto decode32 = [&](const uint8_t* p, __m512i table, int64_t o) PK_TARGET_AVX512 {
    _mm512_storeu_si512(out + o, lookup32_epi16_avx512(p, table));
  };
  decode_blocks_avx512(packed, scales, blocksize, first, count, make_table, decode32,
                       [&](int64_t i, int64_t segment_end, __m512 scale) PK_TARGET_AVX512 {
    const __m512i table = make_table(scale);
    const __m256i words = _mm512_castsi512_si256(table);
    T* o = out + (i - first);
    alignas(32) T t[quant::kNf4Codes];
    const bool ragged = (i & 1) || ((segment_end - i) & 31);
    if (ragged) _mm256_store_si256(reinterpret_cast<__m256i*>(t), words);
    if (i & 1) o = decode_scalar_part(packed, t, i, i + 1, o);
    for (; i + 32 <= segment_end; i += 32, o += 32) {
      _mm512_storeu_si512(o, lookup32_epi16_avx512(packed + (i >> 1), table));
    }
    if (ragged) decode_scalar_part(packed, t, i, segment_end, o);
  });
}

PK_TARGET_AVX2 void avx2_f32(const uint8_t* packed, const quant::BlockScales& scales,
                                      int64_t blocksize, int64_t first, int64_t count, float* out) {
  const __m256 nf4_lo = _mm256_load_ps(kNf4Table), nf4_hi = _mm256_load_ps(kNf4Table + 8);
  const int64_t end = first + count;
  float* o = out;
  for (int64_t e = first; e < end;) {
    const int64_t block = e / blocksize;
    const int64_t segment_end = std::min(end, (block + 1) * blocksize);
    const __m256 scale = _mm256_set1_ps(scales(block));
    const __m256 t0 = _mm256_mul_ps(nf4_lo, scale), t1 = _mm256_mul_ps(nf4_hi, scale);
    alignas(32) float t[quant::kNf4Codes];
    _mm256_store_ps(t, t0);
    _mm256_store_ps(t + 8, t1);
    int64_t i = e;
    o = decode_scalar_part(packed, t, i, std::min(segment_end, i + (i & 1)), o);
    for (; i + 32 <= segment_end; i += 32, o += 32) {
      __m256 v[4];
      lookup32_ps_avx2(packed + (i >> 1), t0, t1, v);
      for (int k = 0; k < 4; ++k) _mm256_storeu_ps(o + 8 * k, v[k]);
    }
    o = decode_scalar_part(packed, t, i, segment_end, o);
    e = segment_end;
  }
}

template <typename T>
PK_TARGET_AVX2 void avx2_16(const uint8_t* packed, const quant::BlockScales& scales,
                                         int64_t blocksize, int64_t first, int64_t count, T* out) {
  static_assert(sizeof(T) == 2);
  const __m256 nf4_lo = _mm256_load_ps(kNf4Table), nf4_hi = _mm256_load_ps(kNf4Table + 8);
  const int64_t end = first + count;
  T* o = out;
  for (int64_t e = first; e < end;) {
    const int64_t block = e / blocksize;
    const int64_t segment_end = std::min(end, (block + 1) * blocksize);
    const __m256 scale = _mm256_set1_ps(scales(block));
    const __m256 p0 = _mm256_mul_ps(nf4_lo, scale), p1 = _mm256_mul_ps(nf4_hi, scale);
    const __m256i words = std::is_same_v<T, c10::BFloat16>
                              ? pack_words_avx2(to_bf16_dwords_avx2(p0), to_bf16_dwords_avx2(p1))
                              : pack_words_avx2(to_fp16_dwords_avx2(p0), to_fp16_dwords_avx2(p1));
    const ByteTables tables = split_bytes_avx2(words);
    alignas(32) T t[quant::kNf4Codes];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), words);
    int64_t i = e;
    o = decode_scalar_part(packed, t, i, std::min(segment_end, i + (i & 1)), o);
    for (; i + 32 <= segment_end; i += 32, o += 32) {
      __m256i v0, v1;
      lookup32_epi16_avx2(packed + (i >> 1), tables, v0, v1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), v0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), v1);
    }
    o = decode_scalar_part(packed, t, i, segment_end, o);
    e = segment_end;
  }
}

}  // namespace

#define PK_DECODE_ENTRY(name, T, impl)                                                              \
  void name(const uint8_t* packed, const quant::BlockScales& scales, int64_t blocksize, int64_t first, \
            int64_t count, T* out) {                                                                \
    impl(packed, scales, blocksize, first, count, out);                                             \
  }
PK_DECODE_ENTRY(decode_range_avx512, float, avx512_f32)
PK_DECODE_ENTRY(decode_range_avx512, c10::Half, avx512_16)
PK_DECODE_ENTRY(decode_range_avx512, c10::BFloat16, avx512_16)
PK_DECODE_ENTRY(decode_range_avx2, float, avx2_f32)
PK_DECODE_ENTRY(decode_range_avx2, c10::Half, avx2_16)
PK_DECODE_ENTRY(decode_range_avx2, c10::BFloat16, avx2_16)
#undef PK_DECODE_ENTRY

}  // namespace x86
}  // namespace cpu
}  // namespace nf4
}  // namespace peftkern

#endif  // PK_X86
