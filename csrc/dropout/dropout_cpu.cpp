// LoRA dropout kernels on CPU (host code and checks: dropout_host.h; math: dropout_math.h).
//
// Every kernel walks the flat element range [0, n) of its tensor in tasks of whole Philox
// blocks (at::parallel_for over blocks of 4 elements), and each task in chunks of kChunkBlocks
// blocks: first the chunk's words (fill_words: 16 Philox blocks per AVX-512 step, 8 per AVX2 step,
// or kLanes side by side that the compiler vectorises on the portable path), then the chunk's
// elements (AVX-512 rows where x's rows are contiguous, else a branch-free loop). The CPU ISA
// dispatch (common/cpu_isa.h) picks the path; PEFTKERN_CPU_ISA forces one, and the tests run each.
// Which thread or path draws a block never changes the word: the result is the same for any
// thread count and ISA, and the same as the CUDA kernels'.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common/accumulate.h"
#include "../common/cpu_isa.h"
#include "../common/simd_convert_x86.h"
#include "dropout_host.h"
#include "dropout_math.h"

namespace peftkern {
namespace dropout {
namespace {

constexpr int64_t kChunkBlocks = 256;            // 1,024 elements: 4 KiB of words, in L1
constexpr int64_t kGrainBlocks = 16 * kChunkBlocks;  // ~16K elements per parallel task
// Each row loop prefetches the elements one chunk ahead (the next chunk's x and output). A chunk
// first computes its words, then touches memory, so without it the hardware prefetcher restarts
// cold at every chunk: right after a GEMM has evicted x from L2 (every call in a training step),
// lora_dropout_backward_ on [256, 576] float32 took 310-440 µs on one thread and 160-240 µs on
// two (quiet 2-core EPYC); with it, 140-180 and 90-140 µs (DESIGN.md "LoRA dropout").
constexpr int64_t kPrefetchAhead = 4 * kChunkBlocks;

// (Integer arithmetic: the address may lie past the tensor's end, which a prefetch may name but
// C++ pointer arithmetic may not.)
template <typename T>
inline void prefetch_ahead(const T* p) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + kPrefetchAhead * sizeof(T)), 0, 3);
}

constexpr int kLanes = 8;  // Philox blocks evaluated side by side

// words[4·b + l] = word l of block first_block + b, for b in [0, blocks).
// Philox's rounds are a chain of dependent 32×32→64-bit products per block: one block at a time
// the CPU waits on each product. Here kLanes blocks run lane-parallel (structure of arrays), the
// same rounds as philox::single_round, so the compiler can turn each round into vector multiplies
// (pmuludq). This is the portable path; AVX2 and AVX-512 have explicit ones below, which the CPU
// ISA dispatch (common/cpu_isa.h) picks and PEFTKERN_CPU_ISA forces, so the tests run all three.
// Integer arithmetic only: the words are those of philox::block_words on every path (the tests
// hold the masks to the plain-PyTorch Philox bit for bit, every path and the tails alike).
inline void fill_words_portable(uint64_t seed, uint64_t offset, uint64_t first_block, int64_t blocks,
                                uint32_t* words) {
  int64_t b = 0;
  for (; b + kLanes <= blocks; b += kLanes) {
    uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t g = first_block + static_cast<uint64_t>(b + l);
      c0[l] = static_cast<uint32_t>(g);
      c1[l] = static_cast<uint32_t>(g >> 32);
      c2[l] = static_cast<uint32_t>(offset);
      c3[l] = static_cast<uint32_t>(offset >> 32);
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      for (int l = 0; l < kLanes; ++l) {
        const uint64_t p0 = static_cast<uint64_t>(philox::kRoundMultiplier0) * c0[l];
        const uint64_t p1 = static_cast<uint64_t>(philox::kRoundMultiplier1) * c2[l];
        const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
        const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
        c1[l] = static_cast<uint32_t>(p1);
        c3[l] = static_cast<uint32_t>(p0);
        c0[l] = n0;
        c2[l] = n2;
      }
      k0 += philox::kWeylKey0;
      k1 += philox::kWeylKey1;
    }
    for (int l = 0; l < kLanes; ++l) {
      uint32_t* w = words + 4 * (b + l);
      w[0] = c0[l];
      w[1] = c1[l];
      w[2] = c2[l];
      w[3] = c3[l];
    }
  }
  for (; b < blocks; ++b) {  // the chunk's last blocks, fewer than kLanes
    const philox::Words w = philox::block_words(seed, offset, first_block + static_cast<uint64_t>(b));
    for (int l = 0; l < 4; ++l) words[4 * b + l] = w.w[l];
  }
}

#if defined(PK_X86)
// 8 lanes' 32×32→64-bit products (as mulhilo_avx512 below, with blends for the in-pair moves).
PK_TARGET_AVX2 inline void mulhilo_avx2(__m256i a, __m256i multiplier, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, multiplier);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), multiplier);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// 8 Philox blocks at once, one per 32-bit lane, then a 4×8 transpose into element order; the
// tail (< 8 blocks) takes the portable loop.
PK_TARGET_AVX2 void fill_words_avx2(uint64_t seed, uint64_t offset, uint64_t first_block, int64_t blocks,
                                    uint32_t* words) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(philox::kRoundMultiplier0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(philox::kRoundMultiplier1));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i offset_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  const __m256i offset_hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  int64_t b = 0;
  for (; b + 8 <= blocks; b += 8) {
    const uint64_t g = first_block + static_cast<uint64_t>(b);
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g))), lane);
    // a lane whose low word wrapped (c0 < lane, unsigned: compared with the sign bits flipped)
    // carries into the high word; the compare gives -1 there
    const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(lane, sign), _mm256_xor_si256(c0, sign));
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32))), carry);
    __m256i c2 = offset_lo, c3 = offset_hi;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo_avx2(c0, m0, hi0, lo0);
      mulhilo_avx2(c2, m1, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += philox::kWeylKey0;
      k1 += philox::kWeylKey1;
    }
    // 4×8 words -> 8 blocks of 4: after the unpacks u_j's 128-bit lane q holds block 4q + j
    const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
    const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    __m256i* w = reinterpret_cast<__m256i*>(words + 4 * b);
    _mm256_storeu_si256(w, _mm256_permute2x128_si256(u0, u1, 0x20));
    _mm256_storeu_si256(w + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
    _mm256_storeu_si256(w + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
    _mm256_storeu_si256(w + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
  }
  if (b < blocks) fill_words_portable(seed, offset, first_block + static_cast<uint64_t>(b), blocks - b, words + 4 * b);
}
#endif

#if defined(PK_X86)
// 16 lanes' 32×32→64-bit products with `multiplier`: (high words, low words), lane order kept.
// vpmuludq multiplies the even lanes; the odd ones are moved down first, and one masked
// in-pair swap (vpshufd CDAB) per result puts each half back in its lane.
PK_TARGET_AVX512 inline void mulhilo_avx512(__m512i a, __m512i multiplier, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, multiplier);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), multiplier);
  hi = _mm512_mask_shuffle_epi32(odd, __mmask16(0x5555), even, _MM_PERM_CDAB);
  lo = _mm512_mask_shuffle_epi32(even, __mmask16(0xAAAA), odd, _MM_PERM_CDAB);
}

// 16 Philox blocks at once, one per 32-bit lane (structure of arrays: c0..c3 hold word 0..3 of
// 16 consecutive blocks), then transposed to the words' element order with unpacks and 128-bit
// lane shuffles. The same rounds as philox::single_round; the tail (< 16 blocks) takes the
// portable loop.
PK_TARGET_AVX512 void fill_words_avx512(uint64_t seed, uint64_t offset, uint64_t first_block, int64_t blocks,
                                        uint32_t* words) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(philox::kRoundMultiplier0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(philox::kRoundMultiplier1));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i offset_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  const __m512i offset_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  int64_t b = 0;
  for (; b + 16 <= blocks; b += 16) {
    const uint64_t g = first_block + static_cast<uint64_t>(b);
    // group = g + lane as 64 bits: the low word wraps into the high one within these 16 lanes
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g))), lane);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, lane);
    const __m512i g_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32)));
    __m512i c1 = _mm512_mask_add_epi32(g_hi, carry, g_hi, _mm512_set1_epi32(1));
    __m512i c2 = offset_lo, c3 = offset_hi;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo_avx512(c0, m0, hi0, lo0);
      mulhilo_avx512(c2, m1, hi1, lo1);
      c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // three-way xor
      c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
      c1 = lo1;
      c3 = lo0;
      k0 += philox::kWeylKey0;
      k1 += philox::kWeylKey1;
    }
    // 4×16 words -> 16 blocks of 4 in order. After the unpacks, u_j's 128-bit lane q holds block
    // 4q + j; the lane shuffles gather blocks 0-3, 4-7, 8-11, 12-15.
    const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
    const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
    const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
    const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
    const __m512i v0 = _mm512_shuffle_i32x4(u0, u1, 0x44), v1 = _mm512_shuffle_i32x4(u2, u3, 0x44);
    const __m512i v2 = _mm512_shuffle_i32x4(u0, u1, 0xEE), v3 = _mm512_shuffle_i32x4(u2, u3, 0xEE);
    uint32_t* w = words + 4 * b;
    _mm512_storeu_si512(w, _mm512_shuffle_i32x4(v0, v1, 0x88));
    _mm512_storeu_si512(w + 16, _mm512_shuffle_i32x4(v0, v1, 0xDD));
    _mm512_storeu_si512(w + 32, _mm512_shuffle_i32x4(v2, v3, 0x88));
    _mm512_storeu_si512(w + 48, _mm512_shuffle_i32x4(v2, v3, 0xDD));
  }
  if (b < blocks) fill_words_portable(seed, offset, first_block + static_cast<uint64_t>(b), blocks - b, words + 4 * b);
}
#endif

void fill_words(uint64_t seed, uint64_t offset, uint64_t first_block, int64_t blocks, uint32_t* words) {
#if defined(PK_X86)
  switch (cpu::active_isa()) {
    case cpu::Isa::kAvx512:
      return fill_words_avx512(seed, offset, first_block, blocks, words);
    case cpu::Isa::kAvx2:
      return fill_words_avx2(seed, offset, first_block, blocks, words);
    default:
      break;
  }
#endif
  fill_words_portable(seed, offset, first_block, blocks, words);
}

// Calls body(e0, count, words) over [0, n) in chunks, in parallel; words[t] is element e0 + t's.
template <class Body>
void for_each_chunk(int64_t n, uint64_t seed, uint64_t offset, const Body& body) {
  const int64_t blocks = ceil_div(n, 4);
  at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t first, int64_t last) {
    alignas(64) uint32_t words[4 * kChunkBlocks];
    for (int64_t b = first; b < last; b += kChunkBlocks) {
      const int64_t nb = std::min(kChunkBlocks, last - b);
      fill_words(seed, offset, static_cast<uint64_t>(b), nb, words);
      const int64_t e0 = 4 * b;
      body(e0, std::min(4 * nb, n - e0), words);
    }
  });
}

// Calls row_body(i, j0, t0, len) for the row segments of the flat range [e0, e0 + count) of an
// [M, K] tensor: elements (i, j0 .. j0+len) are flat e0 + t0 .. e0 + t0 + len.
template <class RowBody>
void for_each_row_segment(int64_t e0, int64_t count, int64_t k, const RowBody& row_body) {
  int64_t i = e0 / k, j = e0 % k, t = 0;
  while (t < count) {
    const int64_t len = std::min(k - j, count - t);
    row_body(i, j, t, len);
    t += len;
    ++i;
    j = 0;
  }
}

#if defined(PK_X86)
using simd::Lanes;  // 16 elements of T as float lanes and back (common/simd_convert_x86.h)

// One contiguous row segment: o = dropout(x), or o += dropout(x) (kAccumulate), 16 elements per
// step. The same math as dropped / accumulated (dropout_math.h), Acc = float: the factor is
// scale or 0 (a multiply, so a dropped NaN stays NaN), product and sum rounded separately.
template <bool kAccumulate, typename T>
PK_TARGET_AVX512 void dropout_row_avx512(const T* x, T* o, const uint32_t* words, int64_t len, uint32_t threshold,
                                         float scale) {
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(threshold));
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t t = 0; t < len; t += 16) {
    prefetch_ahead(x + t);
    prefetch_ahead(o + t);
    const __mmask16 m = len - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - t)) - 1);
    const __m512i w = _mm512_srli_epi32(_mm512_maskz_loadu_epi32(m, words + t), 8);
    const __m512 factor = _mm512_maskz_mov_ps(_mm512_mask_cmplt_epu32_mask(m, w, thr), sc);
    __m512 v = _mm512_mul_ps(Lanes<T>::load(x + t, m), factor);
    if constexpr (kAccumulate) v = _mm512_add_ps(Lanes<T>::load(o + t, m), v);
    Lanes<T>::store(o + t, m, v);
  }
}
#endif

template <typename T>
constexpr bool kHasAvx512Rows =
    std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// One row segment of len elements: o = dropout(x) or o += dropout(x) (kAccumulate); x with
// element stride s1, o contiguous, words[t] element t's word.
template <bool kAccumulate, typename T, typename Acc>
inline void dropout_row(const T* x, int64_t s1, T* o, const uint32_t* words, int64_t len, uint32_t threshold,
                        Acc scale, bool avx512_rows) {
#if defined(PK_X86)
  if constexpr (kHasAvx512Rows<T>) {
    if (avx512_rows && s1 == 1) return dropout_row_avx512<kAccumulate>(x, o, words, len, threshold, scale);
  }
#endif
  const auto one = [&](T xv, int64_t t) {
    o[t] = kAccumulate ? accumulated<T, Acc>(o[t], xv, words[t], threshold, scale)
                       : dropped<T, Acc>(xv, words[t], threshold, scale);
  };
  if (s1 == 1) {
    for (int64_t t0 = 0; t0 < len; t0 += 16) {
      prefetch_ahead(x + t0);
      prefetch_ahead(o + t0);
      const int64_t t1 = std::min(len, t0 + 16);
      for (int64_t t = t0; t < t1; ++t) one(x[t], t);
    }
  } else {
    for (int64_t t = 0; t < len; ++t) one(x[t * s1], t);
  }
}

bool use_avx512_rows() {
#if defined(PK_X86)
  return cpu::active_isa() == cpu::Isa::kAvx512;
#else
  return false;
#endif
}

// out = dropout(x), or out += dropout(x) (kAccumulate), over x's flat row-major range; out is
// contiguous, x any 2-D strides.
template <bool kAccumulate>
void apply_dropout(const at::Tensor& x, at::Tensor& out, uint64_t seed, uint64_t offset, uint32_t threshold,
                   double scale) {
  const int64_t k = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
  const bool avx512_rows = use_avx512_rows();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout", [&] {
    using Acc = acc_type<scalar_t>;
    const Acc sc = static_cast<Acc>(scale);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_each_chunk(out.numel(), seed, offset, [&](int64_t e0, int64_t count, const uint32_t* words) {
      for_each_row_segment(e0, count, k, [&](int64_t i, int64_t j0, int64_t t0, int64_t len) {
        dropout_row<kAccumulate, scalar_t, Acc>(xp + i * s0 + j0 * s1, s1, op + e0 + t0, words + t0, len, threshold,
                                                sc, avx512_rows);
      });
    });
  });
}

// The backward's one draw: xd = dropout(x) and grad_x += dropout(grad_xd), row segment by row
// segment with the same words.
void apply_dropout_backward(at::Tensor& grad_x, const at::Tensor& grad_xd, const at::Tensor& x, at::Tensor& xd,
                            uint64_t seed, uint64_t offset, uint32_t threshold, double scale) {
  const int64_t k = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
  const int64_t g0 = grad_xd.stride(0), g1 = grad_xd.stride(1);
  const bool avx512_rows = use_avx512_rows();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_dropout_backward_", [&] {
    using Acc = acc_type<scalar_t>;
    const Acc sc = static_cast<Acc>(scale);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad_xd.const_data_ptr<scalar_t>();
    scalar_t* xdp = xd.mutable_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    for_each_chunk(xd.numel(), seed, offset, [&](int64_t e0, int64_t count, const uint32_t* words) {
      for_each_row_segment(e0, count, k, [&](int64_t i, int64_t j0, int64_t t0, int64_t len) {
        const int64_t e = e0 + t0;
        dropout_row<false, scalar_t, Acc>(xp + i * s0 + j0 * s1, s1, xdp + e, words + t0, len, threshold, sc,
                                          avx512_rows);
        dropout_row<true, scalar_t, Acc>(gp + i * g0 + j0 * g1, g1, gxp + e, words + t0, len, threshold, sc,
                                         avx512_rows);
      });
    });
  });
}

// --- lora_dropout_project: xa = dropout(x)·Aᵀ in one pass (AVX-512; float, bf16, fp16) -----------
#if defined(PK_X86)
// Rows per group: each k step broadcasts one xd value per row against one 16-lane register of Aᵀ,
// so 8 rows keep 8 independent FMA chains in flight (the FMA latency is 4 cycles, 2 issue per cycle).
constexpr int64_t kProjectRows = 8;

// Rows [row0, row0 + rows) of xa, rows ≤ kProjectRows. at: Aᵀ as float [K, rp] (r padded with
// zeros to rp, a multiple of 16). xd: scratch of kProjectRows·K floats; xd_t: of K elements of T;
// words: of K + 8 words (a row may start mid Philox block). Each row's xd is exactly
// lora_dropout's element (dropout_row, rounded to T), widened to float; the dot products
// accumulate in float, k in order. x: any strides (s0, s1).
template <typename T>
PK_TARGET_AVX512 void project_rows_avx512(const T* xp, int64_t s0, int64_t s1, int64_t k, const float* at, int64_t r,
                                          int64_t rp, int64_t row0, int64_t rows, uint64_t seed, uint64_t offset,
                                          uint32_t threshold, float scale, float* xd, T* xd_t, uint32_t* words,
                                          T* out) {
  for (int64_t g = 0; g < rows; ++g) {
    const int64_t i = row0 + g;
    const int64_t e0 = i * k, first_block = e0 / 4, lead = e0 - 4 * first_block;
    fill_words(seed, offset, static_cast<uint64_t>(first_block), ceil_div(lead + k, 4), words);
    dropout_row<false, T, float>(xp + i * s0, s1, xd_t, words + lead, k, threshold, scale, /*avx512_rows=*/true);
    float* dst = xd + g * k;
    for (int64_t j = 0; j < k; j += 16) {
      const __mmask16 m = k - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - j)) - 1);
      _mm512_mask_storeu_ps(dst + j, m, Lanes<T>::load(xd_t + j, m));
    }
  }
  for (int64_t c = 0; c < rp; c += 16) {
    // Every loop over acc is fully unrolled (#pragma GCC unroll): otherwise GCC keeps acc in memory
    // and stores all 8 accumulators to the stack on every j (rank_product_cpu.cpp says the same).
    __m512 acc[kProjectRows];
#pragma GCC unroll 8
    for (int64_t g = 0; g < kProjectRows; ++g) acc[g] = _mm512_setzero_ps();
    const float* a = at + c;
    for (int64_t j = 0; j < k; ++j) {
      const __m512 av = _mm512_loadu_ps(a + j * rp);
#pragma GCC unroll 8
      for (int64_t g = 0; g < kProjectRows; ++g) {  // a short group's missing rows read row 0 again, never stored
        acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(xd[(g < rows ? g : 0) * k + j]), av, acc[g]);
      }
    }
    const __mmask16 m = r - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (r - c)) - 1);
#pragma GCC unroll 8
    for (int64_t g = 0; g < kProjectRows; ++g) {
      if (g < rows) Lanes<T>::store(out + (row0 + g) * r + c, m, acc[g]);
    }
  }
}

template <typename T>
void project_avx512(const at::Tensor& x, const at::Tensor& lora_a, uint64_t seed, uint64_t offset, uint32_t threshold,
                    float scale, at::Tensor& out) {
  const int64_t m = x.size(0), k = x.size(1), r = lora_a.size(0), rp = ceil_div(r, 16) * 16;
  at::Tensor at_t = at::zeros({k, rp}, x.options().dtype(at::kFloat));  // Aᵀ, float, zero-padded lanes
  at_t.narrow(1, 0, r).copy_(lora_a.t());
  const float* at_p = at_t.const_data_ptr<float>();
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  const int64_t groups = ceil_div(m, kProjectRows);
  // ~16K elements of x per task, as the other dropout kernels
  const int64_t grain = std::max<int64_t>(1, 16 * kChunkBlocks * 4 / std::max<int64_t>(1, k * kProjectRows));
  at::parallel_for(0, groups, grain, [&](int64_t first, int64_t last) {
    std::vector<float> xd(static_cast<size_t>(kProjectRows * k));
    std::vector<T> xd_t(static_cast<size_t>(k));
    std::vector<uint32_t> words(static_cast<size_t>(4 * (ceil_div(k + 3, 4) + 16)));
    for (int64_t grp = first; grp < last; ++grp) {
      const int64_t row0 = grp * kProjectRows;
      project_rows_avx512<T>(xp, s0, s1, k, at_p, r, rp, row0, std::min(kProjectRows, m - row0), seed, offset,
                             threshold, scale, xd.data(), xd_t.data(), words.data(), op);
    }
  });
}
#endif

// The fused pass where it pays: with dropout, on the AVX-512 path, float / bf16 / fp16 on CPU.
// Elsewhere lora_dropout then rank::project: without dropout that is x·Aᵀ by the rank-r kernel
// (float32, AVX-512; this pass lost to MKL there by 10-40% after other work, as it widens x into a
// float buffer first), else ATen's GEMM (on the AVX2 and portable paths MKL's rank-r product beats
// a loop of ours; CUDA keeps cuBLAS).
// Measured on the quiet 2-core EPYC, 2 threads, [256, K]·[K, 16], p = 0.05, right after a GEMM:
// K = 576 163 vs 234 µs, K = 1536 265 vs 393 µs (DESIGN.md "LoRA dropout without a mask").
bool project_fused(const at::Tensor& x, const at::Tensor& lora_a, double p) {
#if defined(PK_X86)
  const auto dt = x.scalar_type();
  return p > 0.0 && x.is_cpu() && use_avx512_rows() && lora_a.size(0) > 0 && x.size(0) > 0 &&
         (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf);
#else
  (void)x;
  (void)lora_a;
  (void)p;
  return false;
#endif
}

at::Tensor lora_dropout_project(const at::Tensor& x, const at::Tensor& lora_a, double p, int64_t seed,
                                int64_t offset) {
  constexpr const char* op = "lora_dropout_project";
  check_x(op, x);
  check_p(op, p);
  check_like(lora_a, op, "lora_a", x);
  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(1) == x.size(1), op, ": lora_a is ", lora_a.sizes(),
              ", expected [r, ", x.size(1), "]");
#if defined(PK_X86)
  if (project_fused(x, lora_a, p)) {
    at::Tensor out = new_output({x.size(0), lora_a.size(0)}, x.options().memory_format(at::MemoryFormat::Contiguous));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
      if constexpr (kHasAvx512Rows<scalar_t>) {
        project_avx512<scalar_t>(x, lora_a, as_u64(seed), as_u64(offset), keep_threshold(p),
                                 static_cast<float>(1.0 / (1.0 - p)), out);
      }
    });
    return out;
  }
#endif
  return rank::project(lora_input(x, p, seed, offset), lora_a);  // the dropout pass (none at p = 0), then x·Aᵀ
}

struct CpuKernels {
  static void dropout(const at::Tensor& x, at::Tensor& out, uint64_t seed, uint64_t offset, uint32_t threshold,
                      double scale) {
    apply_dropout<false>(x, out, seed, offset, threshold, scale);
  }

  static void accumulate(at::Tensor& out, const at::Tensor& x, uint64_t seed, uint64_t offset, uint32_t threshold,
                         double scale) {
    apply_dropout<true>(x, out, seed, offset, threshold, scale);
  }

  static void backward(at::Tensor& grad_x, const at::Tensor& grad_xd, const at::Tensor& x, at::Tensor& xd,
                       uint64_t seed, uint64_t offset, uint32_t threshold, double scale) {
    apply_dropout_backward(grad_x, grad_xd, x, xd, seed, offset, threshold, scale);
  }

  static void mask(at::Tensor& out, uint64_t seed, uint64_t offset, uint32_t threshold) {
    bool* op = out.mutable_data_ptr<bool>();
    for_each_chunk(out.numel(), seed, offset, [&](int64_t e0, int64_t count, const uint32_t* words) {
      for (int64_t t = 0; t < count; ++t) op[e0 + t] = keep(words[t], threshold);
    });
  }

  static void uniform(at::Tensor& out, uint64_t seed, uint64_t offset) {
    float* op = out.mutable_data_ptr<float>();
    for_each_chunk(out.numel(), seed, offset, [&](int64_t e0, int64_t count, const uint32_t* words) {
      for (int64_t t = 0; t < count; ++t) op[e0 + t] = philox::word_to_uniform(words[t]);
    });
  }

  // Arbitrary counters, one block at a time; a run of 16 consecutive ones goes through fill_words,
  // so the tests reach the vector paths' counter arithmetic (a run across 2³² carries into the
  // counter's high word, which no tensor of realistic size reaches).
  static void words(const at::Tensor& groups, at::Tensor& out, uint64_t seed, uint64_t offset) {
    const int64_t* gp = groups.const_data_ptr<int64_t>();
    int64_t* op = out.mutable_data_ptr<int64_t>();
    const int64_t n = groups.numel();
    for (int64_t b = 0; b < n;) {
      int64_t run = 1;
      while (run < 16 && b + run < n &&
             static_cast<uint64_t>(gp[b + run]) == static_cast<uint64_t>(gp[b]) + static_cast<uint64_t>(run)) {
        ++run;
      }
      uint32_t w[4 * 16];
      if (run == 16) {
        fill_words(seed, offset, static_cast<uint64_t>(gp[b]), 16, w);
      } else {
        run = 1;
        const philox::Words one = philox::block_words(seed, offset, static_cast<uint64_t>(gp[b]));
        for (int l = 0; l < 4; ++l) w[l] = one.w[l];
      }
      for (int64_t t = 0; t < 4 * run; ++t) op[4 * b + t] = static_cast<int64_t>(w[t]);
      b += run;
    }
  }
};

using CpuOps = Ops<CpuKernels>;

at::Tensor lora_dropout(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  return CpuOps::dropout(x, p, seed, offset);
}
void lora_dropout_accumulate(at::Tensor& out, const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  CpuOps::accumulate(out, x, p, seed, offset);
}
at::Tensor lora_dropout_backward(at::Tensor& grad_x, const at::Tensor& grad_xd, const at::Tensor& x, double p,
                                 int64_t seed, int64_t offset) {
  return CpuOps::backward(grad_x, grad_xd, x, p, seed, offset);
}
at::Tensor lora_dropout_mask(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  return CpuOps::mask(x, p, seed, offset);
}
at::Tensor philox_uniform(const at::Tensor& x, int64_t seed, int64_t offset) { return CpuOps::uniform(x, seed, offset); }
at::Tensor philox_words(const at::Tensor& groups, int64_t seed, int64_t offset) {
  return CpuOps::words(groups, seed, offset);
}

}  // namespace
}  // namespace dropout
}  // namespace peftkern

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("lora_dropout", &peftkern::dropout::lora_dropout);
  m.impl("lora_dropout_accumulate_", &peftkern::dropout::lora_dropout_accumulate);
  m.impl("lora_dropout_backward_", &peftkern::dropout::lora_dropout_backward);
  m.impl("lora_dropout_mask", &peftkern::dropout::lora_dropout_mask);
  m.impl("philox_uniform", &peftkern::dropout::philox_uniform);
  m.impl("philox_words", &peftkern::dropout::philox_words);
  m.impl("lora_dropout_project", &peftkern::dropout::lora_dropout_project);
}
// CUDA: the same function, which takes lora_dropout's CUDA kernel (through the dispatcher) and
// cuBLAS there (registered here so that a CPU-only build of peftkern also serves GPU tensors).
TORCH_LIBRARY_IMPL(peftkern, CUDA, m) {
  m.impl("lora_dropout_project", &peftkern::dropout::lora_dropout_project);
}
