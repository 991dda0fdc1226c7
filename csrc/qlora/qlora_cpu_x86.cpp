// AVX-512 and AVX2 row kernels of the CPU nf4_lora_gemv: the codes are decoded in registers by
// table permutes (nf4/nf4_simd_x86.h) straight into deq(W) values, i.e. through a 16-entry table
// already multiplied by the block's absmax (one float32 rounding, exactly the dequantized
// weight; one vector multiply per block), and FMA'd into float32 accumulators.
//
// Summation order (the contract tests/test_nf4_simd.py checks): per token, float32 vector lanes
// (16 for AVX-512, 8 for AVX2) and 1-2 accumulators (2 when few tokens, to hide the FMA latency),
// each 32-code step of a segment FMA'd into them; elements of a mid-byte head or a tail shorter
// than 32 codes go to one scalar sum; at the end of the row the accumulators are added, the lanes
// reduced as a tree and the scalar sum added. The AVX-512 chunked kernel (rows of 128-code
// chunks and at most one 64-code half chunk, below) sums x * code per lane within a chunk in 2 partial sums (1 from 3 tokens on) and
// applies the block's absmax to their sum. Deterministic (no dependence on threads); not bit-identical to the scalar path
// (8 partial sums, separate multiply and add), so each path is held to one float32 bound:
// |error| <= gamma(K + 2) * sum_i |x_i * deq(W)_i|, gamma(n) = n u / (1 - n u), u = 2^-24.
#include "qlora_cpu_x86.h"

#if defined(PK_X86)
#include <algorithm>
#include <vector>

#include "../nf4/nf4_simd_x86.h"

namespace peftkern {
namespace qlora {
namespace x86 {
namespace {

using namespace nf4::x86;

// Up to 8 tokens per pass over the weight (the registers hold TT x A accumulators). Every loop over
// a register array below is unrolled (#pragma GCC unroll 8): otherwise GCC may keep the array in
// memory (measured at 8 tokens: the chunked kernel ran 2.1x slower so).
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
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t)
#pragma GCC unroll 8
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
#pragma GCC unroll 8
        for (int t = 0; t < TT; ++t) rest[t] += x[t * K + j] * w;
        ++j;
      }
      for (; j + 32 <= end; j += 32) {
        __m512 w0, w1;
        lookup32_ps_avx512(packed + ((o * K + j) >> 1), table, w0, w1);
#pragma GCC unroll 8
        for (int t = 0; t < TT; ++t) {
          const float* xt = x + t * K + j;
          acc[t][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xt), w0, acc[t][0]);
          acc[t][A - 1] = _mm512_fmadd_ps(_mm512_loadu_ps(xt + 16), w1, acc[t][A - 1]);
        }
      }
      for (; j < end; ++j) {
        const float w = t_mem[quant::nf4_code_at(packed, o * K + j)];
#pragma GCC unroll 8
        for (int t = 0; t < TT; ++t) rest[t] += x[t * K + j] * w;
      }
      i = end;
    }
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
      __m512 sum = acc[t][0];
#pragma GCC unroll 8
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
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t)
#pragma GCC unroll 8
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
#pragma GCC unroll 8
        for (int t = 0; t < TT; ++t) rest[t] += x[t * K + j] * w;
        ++j;
      }
      for (; j + 32 <= end; j += 32) {
        __m256 w[4];
        lookup32_ps_avx2(packed + ((o * K + j) >> 1), t0, t1, w);
#pragma GCC unroll 8
        for (int t = 0; t < TT; ++t) {
          const float* xt = x + t * K + j;
#pragma GCC unroll 8
          for (int k = 0; k < 4; ++k) {
            acc[t][k % A] = _mm256_fmadd_ps(_mm256_loadu_ps(xt + 8 * k), w[k], acc[t][k % A]);
          }
        }
      }
      for (; j < end; ++j) {
        const float w = t_mem[quant::nf4_code_at(packed, o * K + j)];
#pragma GCC unroll 8
        for (int t = 0; t < TT; ++t) rest[t] += x[t * K + j] * w;
      }
      i = end;
    }
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
      __m256 sum = acc[t][0];
#pragma GCC unroll 8
      for (int k = 1; k < A; ++k) sum = _mm256_add_ps(sum, acc[t][k]);
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      dots[t * N + o] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2))) + rest[t];
    }
  }
}

// ---- The chunked AVX-512 kernel: rows whose length is a multiple of 64 and of the blocksize -----
// (every LLM projection: 576, 2048, 4096, 5632, 11008, ... with blocksize 64; a row of 128 n + 64
// codes ends in a half chunk, below). 64 packed bytes are one
// zmm of 16 dwords; dword i holds codes 8i .. 8i + 7 of the 128-code chunk, and shifting it right
// by 4s puts code 8i + kOrder[s] in the low 4 bits, all vpermps reads. So 8 shifts (integer ALU,
// not the shuffle ports) + 8 vpermps decode 128 codes, a third of the shuffles of widening the
// bytes first; x is permuted once per call into the same order (kChunkOrder), so no output needs
// reordering. The codes stay unscaled: per chunk, sum_s x_s * code_s per lane, then times the
// lane's block absmax (a 16-lane vector of the chunk's 1, 2 or 4 block scales), FMA'd into the
// row's accumulator. At 1-2 tokens a chunk's sum is split into chains (4 in all): one chain of 8
// dependent FMAs (4 cycles each) per chunk ran at 60% of the speed; at 1 token two rows go
// together and share each load of x (loads, not FMAs, are the most numerous op there).
// Measured on the 2-core EPYC (DESIGN.md "NF4", 2026-12-03): this instruction stream with its data
// in L1 runs 1.6-1.8 ns per chunk per core (73-80 us for 5632 x 2048 on two cores); streaming the
// codes from L3 the same loop takes 2.4-2.7 ns, while a plain read of them runs at ~94 GB/s/core.
constexpr int kChunk = 128;
constexpr int kChunkOrder[8] = {1, 0, 3, 2, 5, 4, 7, 6};

// A row may end in a half chunk of 64 codes (K = 128 n + 64: hidden sizes such as 576, 960,
// 1600): 32 packed bytes, loaded into lanes 0-7 (8 lanes x 8 codes); lanes 8-15 read zero bytes,
// and their x and scale are 0, so they add nothing.
int64_t padded_row(int64_t K) { return (K + kChunk - 1) / kChunk * kChunk; }

// xp[t, c + 16 s + i] = x[t, c + 8 i + kChunkOrder[s]] for each chunk c (rows of padded_row(K));
// 0 for the lanes of a half chunk that lie past the row
void permute_x_for_chunks(const float* x, int64_t tokens, int64_t K, float* xp) {
  const int64_t KP = padded_row(K);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t c = 0; c < K; c += kChunk) {
      const float* src = x + t * K + c;
      float* dst = xp + t * KP + c;
      for (int s = 0; s < 8; ++s)
        for (int i = 0; i < 16; ++i) dst[16 * s + i] = c + 8 * i < K ? src[8 * i + kChunkOrder[s]] : 0.0f;
    }
  }
}

// RR consecutive rows from o (RR x TT dot products), their block scales at `scales` (row r's
// at scales + r * blocks_per_row). The rows share each load of x.
template <int TT, int RR>
PK_TARGET_AVX512 inline void row_tile_avx512_chunked(const float* xp, const uint8_t* packed, const GemvArgs& a,
                                                     int64_t o, const float* scales, __m512i lane_block,
                                                     __mmask16 chunk_blocks, __mmask16 half_blocks, int log2_bs,
                                                     float* dots) {
  // partial sums per row and token within a chunk, enough independent FMA chains (4 with the 2 rows
  // of a 1-token pass) to cover the FMA latency; a function of TT alone, so that a row sums in the
  // same order whether it is paired or not (pairing depends on where a thread's rows begin)
  constexpr int A = TT <= 2 ? 2 : 1;
  const int64_t K = a.in_features, N = a.out_features, blocks_per_row = K >> log2_bs, KP = padded_row(K);
  const __m512 codes = _mm512_load_ps(kNf4Table);
  // Every loop over the register arrays is unrolled (#pragma GCC unroll): otherwise GCC keeps
  // acc and sum in memory at 8 tokens (measured: 3.5x slower than the FMA rate allows).
  __m512 acc[RR][TT];
#pragma GCC unroll 8
  for (int r = 0; r < RR; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < K; c += kChunk) {
    const bool half = c + kChunk > K;  // the row's last 64 codes (lanes 0-7)
    __m512i d[RR];
    __m512 sum[RR][TT][A];
#pragma GCC unroll 8
    for (int r = 0; r < RR; ++r) {
      const uint8_t* codes_at = packed + (o + r) * (K / 2) + c / 2;
      d[r] = half ? _mm512_maskz_loadu_epi32(0x00FF, codes_at) : _mm512_loadu_si512(codes_at);
#pragma GCC unroll 8
      for (int t = 0; t < TT; ++t)
#pragma GCC unroll 8
        for (int k = 0; k < A; ++k) sum[r][t][k] = _mm512_setzero_ps();
    }
#pragma GCC unroll 8
    for (int s = 0; s < 8; ++s) {
      __m512 w[RR];
#pragma GCC unroll 8
      for (int r = 0; r < RR; ++r) w[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(d[r], 4 * s), codes);
#pragma GCC unroll 8
      for (int t = 0; t < TT; ++t) {
        const __m512 xv = _mm512_loadu_ps(xp + t * KP + c + 16 * s);
#pragma GCC unroll 8
        for (int r = 0; r < RR; ++r) sum[r][t][s % A] = _mm512_fmadd_ps(xv, w[r], sum[r][t][s % A]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RR; ++r) {
      const float* row_scales = scales + r * blocks_per_row + (c >> log2_bs);
      const __m512 scale =
          _mm512_permutexvar_ps(lane_block, _mm512_maskz_loadu_ps(half ? half_blocks : chunk_blocks, row_scales));
#pragma GCC unroll 8
      for (int t = 0; t < TT; ++t) {
        __m512 chunk = sum[r][t][0];
#pragma GCC unroll 8
        for (int k = 1; k < A; ++k) chunk = _mm512_add_ps(chunk, sum[r][t][k]);
        acc[r][t] = _mm512_fmadd_ps(chunk, scale, acc[r][t]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RR; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) dots[t * N + o + r] = _mm512_reduce_add_ps(acc[r][t]);
}

template <int TT>
PK_TARGET_AVX512 void rows_avx512_chunked(const float* xp, const uint8_t* packed, const GemvArgs& a,
                                          int64_t row_begin, int64_t row_end, float* dots) {
  constexpr int RR = TT == 1 ? 2 : 1;  // rows per pass
  const int64_t K = a.in_features, bs = a.blocksize;
  const int64_t blocks_per_row = K / bs;
  const int log2_bs = __builtin_ctzll(static_cast<unsigned long long>(bs));  // a power of two (checked)
  // lane i covers codes 8i .. 8i + 7 of a chunk: block (8 i) / bs of the chunk's first block, one
  // of the chunk's 128 / bs (at most 4, blocksize >= 32) blocks
  alignas(64) int32_t lane_block_mem[16];
  for (int i = 0; i < 16; ++i) lane_block_mem[i] = static_cast<int32_t>(8 * i / bs);
  const __m512i lane_block = _mm512_load_si512(lane_block_mem);
  // the scales a chunk's lanes read: its 1, 2 or 4 blocks; 1 or 2 for a half chunk (bs <= 64 there)
  const __mmask16 chunk_blocks = static_cast<__mmask16>((1u << std::max<int64_t>(1, kChunk / bs)) - 1);
  const __mmask16 half_blocks = static_cast<__mmask16>((1u << std::max<int64_t>(1, kChunk / 2 / bs)) - 1);
  // The block scales of a tile of rows, decoded into an L1-sized buffer before the tile's codes
  // (double quantization); read in place when they are float32 already. Decoding them next to the
  // FMAs that need them put the decode's latency on every chunk's critical path.
  const bool in_place = a.scales.absmax != nullptr;
  const int64_t tile_rows = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, blocks_per_row));  // K may be 0
  std::vector<float> tile_scales(in_place ? 0 : std::min(tile_rows, row_end - row_begin) * blocks_per_row);
  for (int64_t tile = row_begin; tile < row_end; tile += tile_rows) {
    const int64_t tile_end = std::min(row_end, tile + tile_rows);
    const float* scales = a.scales.absmax + tile * blocks_per_row;
    if (!in_place) {
      block_scales_avx512(a.scales, tile * blocks_per_row, (tile_end - tile) * blocks_per_row, tile_scales.data());
      scales = tile_scales.data();
    }
    int64_t o = tile;
    for (; o + RR <= tile_end; o += RR, scales += RR * blocks_per_row) {
      row_tile_avx512_chunked<TT, RR>(xp, packed, a, o, scales, lane_block, chunk_blocks, half_blocks, log2_bs, dots);
    }
    for (; o < tile_end; ++o, scales += blocks_per_row) {
      row_tile_avx512_chunked<TT, 1>(xp, packed, a, o, scales, lane_block, chunk_blocks, half_blocks, log2_bs, dots);
    }
  }
}

// Tokens in chunks of up to kMaxTokens, each chunk one pass over the rows' weight.
// x_row: the length of x's rows (in_features, or padded_row for the chunked kernel's x).
template <template <int> class Rows>
void by_token_chunks(const float* x, int64_t x_row, const uint8_t* packed, const GemvArgs& a, int64_t row_begin,
                     int64_t row_end, float* dots) {
  for (int64_t t0 = 0; t0 < a.tokens; t0 += kMaxTokens) {
    const float* xc = x + t0 * x_row;
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
struct Avx512ChunkedRows {
  static void run(const float* x, const uint8_t* p, const GemvArgs& a, int64_t b, int64_t e, float* d) {
    rows_avx512_chunked<TT>(x, p, a, b, e, d);
  }
};
template <int TT>
struct Avx2Rows {
  static void run(const float* x, const uint8_t* p, const GemvArgs& a, int64_t b, int64_t e, float* d) {
    rows_avx2<TT>(x, p, a, b, e, d);
  }
};

}  // namespace

bool avx512_chunked_layout(const GemvArgs& a) {
  return a.in_features % (kChunk / 2) == 0 && a.in_features % a.blocksize == 0;
}

int64_t chunked_x_row(const GemvArgs& a) { return padded_row(a.in_features); }

void prepare_x_avx512(const float* x, const GemvArgs& a, float* x_chunked) {
  permute_x_for_chunks(x, a.tokens, a.in_features, x_chunked);
}

void gemv_dots_avx512(const float* x, const uint8_t* packed, const GemvArgs& a, int64_t row_begin,
                      int64_t row_end, float* dots) {
  if (avx512_chunked_layout(a)) {
    by_token_chunks<Avx512ChunkedRows>(x, padded_row(a.in_features), packed, a, row_begin, row_end, dots);
  } else {
    by_token_chunks<Avx512Rows>(x, a.in_features, packed, a, row_begin, row_end, dots);
  }
}
void gemv_dots_avx2(const float* x, const uint8_t* packed, const GemvArgs& a, int64_t row_begin,
                    int64_t row_end, float* dots) {
  by_token_chunks<Avx2Rows>(x, a.in_features, packed, a, row_begin, row_end, dots);
}

template <typename T>
PK_TARGET_AVX512 void lora_terms_avx512(const float* xa, int64_t tokens, int64_t r, const T* lora_b, int64_t row_begin,
                                        int64_t row_end, int64_t N, float* terms) {
  for (int64_t o = row_begin; o < row_end; ++o) {
    for (int64_t t = 0; t < tokens; ++t) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < r; k += 16) {
        const __mmask16 m = simd::lane_mask(r - k);
        acc = _mm512_fmadd_ps(simd::Lanes<T>::load(lora_b + o * r + k, m), _mm512_maskz_loadu_ps(m, xa + t * r + k), acc);
      }
      terms[t * N + o] = _mm512_reduce_add_ps(acc);
    }
  }
}
template void lora_terms_avx512(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float*);
template void lora_terms_avx512(const float*, int64_t, int64_t, const c10::Half*, int64_t, int64_t, int64_t, float*);
template void lora_terms_avx512(const float*, int64_t, int64_t, const c10::BFloat16*, int64_t, int64_t, int64_t,
                                float*);

}  // namespace x86
}  // namespace qlora
}  // namespace peftkern

#endif  // PK_X86
