// AVX-512 and AVX2 row kernels of the CPU nf4_lora_gemv: the codes are decoded in registers by
// table permutes (nf4/nf4_simd_x86.h) straight into deq(W) values, i.e. through a 16-entry table
// already multiplied by the block's absmax (one float32 rounding, exactly the dequantized
// weight; one vector multiply per block), and FMA'd into float32 accumulators.
//
// Summation order (the contract tests/test_qlora_gemv.py checks): per token, L lanes (16 for
// AVX-512, 8 for AVX2) times A accumulators (more when few tokens, to hide the FMA latency),
// element i of a row going to lane i mod L of accumulator (i / L) mod A while the row is
// 32-element aligned; elements of a mid-byte head or a tail shorter than 32 codes go to one
// scalar sum. At the end of the row the accumulators are added, the lanes reduced as a tree and
// the scalar sum added. Deterministic (no dependence on threads); not bit-identical to the scalar
// path (8 partial sums, separate multiply and add), so each path is held to the same float32
// bound: |error| <= gamma(K) * sum_i |x_i * deq(W)_i|, gamma(n) = n u / (1 - n u), u = 2^-24.
#include "qlora_cpu_x86.h"

#if defined(PK_X86)
#include <algorithm>

#include "../nf4/nf4_simd_x86.h"

namespace peftkern {
namespace qlora {
namespace x86 {
namespace {

using namespace nf4::x86;

// Up to 8 tokens per pass over the weight (the registers hold TT x A accumulators).
constexpr int kMaxTokens = 8;

template <int TT>
PK_TARGET_AVX512 void rows_avx512(const float* x, const uint8_t* packed, const GemvArgs& a,
                                  int64_t row_begin, int64_t row_end, float* dots) {
  constexpr int A = TT <= 2 ? 2 : 1;  // the two vectors of a 32-code step go to accumulators 0 and A - 1
  const int64_t K = a.in_features, N = a.out_features;
  const __m512 nf4 = _mm512_load_ps(kNf4Table);
  for (int64_t o = row_begin; o < row_end; ++o) {
    __m512 acc[TT][A];
    float rest[TT] = {};
    for (int t = 0; t < TT; ++t)
      for (int k = 0; k < A; ++k) acc[t][k] = _mm512_setzero_ps();
    for (int64_t i = 0; i < K;) {
      const int64_t e = o * K + i;
      const int64_t block = e / a.blocksize;
      const int64_t end = std::min(K, (block + 1) * a.blocksize - o * K);
      const __m512 table = _mm512_mul_ps(nf4, _mm512_set1_ps(a.scales(block)));
      alignas(64) float t_mem[16];
      _mm512_store_ps(t_mem, table);
      int64_t j = i;
      if (e & 1) {  // a row starting mid-byte
        const float w = t_mem[packed[e >> 1] & 15];
        for (int t = 0; t < TT; ++t) rest[t] += x[t * K + j] * w;
        ++j;
      }
      for (; j + 32 <= end; j += 32) {
        __m512 w0, w1;
        lookup32_ps_avx512(packed + ((o * K + j) >> 1), table, w0, w1);
        for (int t = 0; t < TT; ++t) {
          const float* xt = x + t * K + j;
          acc[t][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xt), w0, acc[t][0]);
          acc[t][A - 1] = _mm512_fmadd_ps(_mm512_loadu_ps(xt + 16), w1, acc[t][A - 1]);
        }
      }
      for (; j < end; ++j) {
        const float w = t_mem[quant::nf4_code_at(packed, o * K + j)];
        for (int t = 0; t < TT; ++t) rest[t] += x[t * K + j] * w;
      }
      i = end;
    }
    for (int t = 0; t < TT; ++t) {
      __m512 sum = acc[t][0];
      for (int k = 1; k < A; ++k) sum = _mm512_add_ps(sum, acc[t][k]);
      dots[t * N + o] = _mm512_reduce_add_ps(sum) + rest[t];
    }
  }
}

template <int TT>
PK_TARGET_AVX2 void rows_avx2(const float* x, const uint8_t* packed, const GemvArgs& a,
                              int64_t row_begin, int64_t row_end, float* dots) {
  constexpr int A = TT == 1 ? 4 : TT == 2 ? 2 : 1;
  const int64_t K = a.in_features, N = a.out_features;
  const __m256 nf4_lo = _mm256_load_ps(kNf4Table), nf4_hi = _mm256_load_ps(kNf4Table + 8);
  for (int64_t o = row_begin; o < row_end; ++o) {
    __m256 acc[TT][A];
    float rest[TT] = {};
    for (int t = 0; t < TT; ++t)
      for (int k = 0; k < A; ++k) acc[t][k] = _mm256_setzero_ps();
    for (int64_t i = 0; i < K;) {
      const int64_t e = o * K + i;
      const int64_t block = e / a.blocksize;
      const int64_t end = std::min(K, (block + 1) * a.blocksize - o * K);
      const __m256 scale = _mm256_set1_ps(a.scales(block));
      const __m256 t0 = _mm256_mul_ps(nf4_lo, scale), t1 = _mm256_mul_ps(nf4_hi, scale);
      alignas(32) float t_mem[16];
      _mm256_store_ps(t_mem, t0);
      _mm256_store_ps(t_mem + 8, t1);
      int64_t j = i;
      if (e & 1) {
        const float w = t_mem[packed[e >> 1] & 15];
        for (int t = 0; t < TT; ++t) rest[t] += x[t * K + j] * w;
        ++j;
      }
      for (; j + 32 <= end; j += 32) {
        __m256 w[4];
        lookup32_ps_avx2(packed + ((o * K + j) >> 1), t0, t1, w);
        for (int t = 0; t < TT; ++t) {
          const float* xt = x + t * K + j;
          for (int k = 0; k < 4; ++k) {
            acc[t][k % A] = _mm256_fmadd_ps(_mm256_loadu_ps(xt + 8 * k), w[k], acc[t][k % A]);
          }
        }
      }
      for (; j < end; ++j) {
        const float w = t_mem[quant::nf4_code_at(packed, o * K + j)];
        for (int t = 0; t < TT; ++t) rest[t] += x[t * K + j] * w;
      }
      i = end;
    }
    for (int t = 0; t < TT; ++t) {
      __m256 sum = acc[t][0];
      for (int k = 1; k < A; ++k) sum = _mm256_add_ps(sum, acc[t][k]);
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      dots[t * N + o] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2))) + rest[t];
    }
  }
}

// Tokens in chunks of up to kMaxTokens, each chunk one pass over the rows' weight.
template <template <int> class Rows>
void by_token_chunks(const float* x, const uint8_t* packed, const GemvArgs& a, int64_t row_begin,
                     int64_t row_end, float* dots) {
  for (int64_t t0 = 0; t0 < a.tokens; t0 += kMaxTokens) {
    const float* xc = x + t0 * a.in_features;
    float* dc = dots + t0 * a.out_features;
    switch (std::min<int64_t>(kMaxTokens, a.tokens - t0)) {
      case 1: Rows<1>::run(xc, packed, a, row_begin, row_end, dc); break;
      case 2: Rows<2>::run(xc, packed, a, row_begin, row_end, dc); break;
      case 3: Rows<3>::run(xc, packed, a, row_begin, row_end, dc); break;
      case 4: Rows<4>::run(xc, packed, a, row_begin, row_end, dc); break;
      case 5: Rows<5>::run(xc, packed, a, row_begin, row_end, dc); break;
      case 6: Rows<6>::run(xc, packed, a, row_begin, row_end, dc); break;
      case 7: Rows<7>::run(xc, packed, a, row_begin, row_end, dc); break;
      default: Rows<8>::run(xc, packed, a, row_begin, row_end, dc); break;
    }
  }
}

template <int TT>
struct Avx512Rows {
  static void run(const float* x, const uint8_t* p, const GemvArgs& a, int64_t b, int64_t e, float* d) {
    rows_avx512<TT>(x, p, a, b, e, d);
  }
};
template <int TT>
struct Avx2Rows {
  static void run(const float* x, const uint8_t* p, const GemvArgs& a, int64_t b, int64_t e, float* d) {
    rows_avx2<TT>(x, p, a, b, e, d);
  }
};

}  // namespace

void gemv_dots_avx512(const float* x, const uint8_t* packed, const GemvArgs& a, int64_t row_begin,
                      int64_t row_end, float* dots) {
  by_token_chunks<Avx512Rows>(x, packed, a, row_begin, row_end, dots);
}
void gemv_dots_avx2(const float* x, const uint8_t* packed, const GemvArgs& a, int64_t row_begin,
                    int64_t row_end, float* dots) {
  by_token_chunks<Avx2Rows>(x, packed, a, row_begin, row_end, dots);
}

}  // namespace x86
}  // namespace qlora
}  // namespace peftkern

#endif  // PK_X86
