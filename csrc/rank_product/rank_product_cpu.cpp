// The rank-r products of LoRA on CPU (rank_product.h says what each computes and when the kernels
// apply), and the two ops that expose the backward's fused pairs to Python (QLoRA's backward).
//
// Two kernel shapes, both float32 AVX-512, both reading the big matrix once:
//
//   row_block  vectors along r. For ROWS rows t of a big matrix a [M, D] at once, walks d in
//              order: broadcasts a[t, d] against the panel row p[d, :r] (1-4 vectors, masked at
//              r) into ROWS·RV register accumulators c[t, :r] = Σ_d a[t, d]·p[d, :r]. With kGradB
//              the same broadcast also updates gb[d, :r] += Σ_t a[t, d]·y[t, :r], the product
//              reduced over t (grad_B next to grad_xa: one read of grad_out for both).
//   col_block  vectors along D. For 16 columns k of the big matrices and all rows t:
//              c[t, k] (+)= alpha·Σ_j y[t, j]·z[j, k] (grad_x += grad_xa·A, out += s·xa·Bᵀ) and/or
//              g[j, k] = Σ_t y[t, j]·x[t, k] (grad_A next to grad_x: one read of x for both); the
//              16 accumulators of g stay in registers while t runs, j in chunks of 16.
//
// Summation order (fixed, independent of the thread count): row_block sums d in order within a
// fixed split of D into blocks (out_grads: at most kOutBlocks of them, summed in block order);
// col_block sums t in order, and the j terms of c as two interleaved chains (even j, odd j).
// Threads: out_grads splits D (each block owns its rows of gb), project splits rows, col_block
// splits column blocks; no two threads write the same element.
#include "rank_product.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../common/checks.h"
#include "../common/cpu_isa.h"
#include "../common/simd_convert_x86.h"
#include "../dropout/dropout_host.h"

#if defined(PK_X86)
#include <immintrin.h>
#endif

namespace peftkern {
namespace rank {
namespace {

constexpr int64_t kMaxRank = 64;
// out_grads splits grad_out's columns into at most this many blocks of at least kOutBlockCols
// (grad_xa summed over blocks from per-block partials: at most kOutBlocks·M·r floats of scratch).
constexpr int64_t kOutBlocks = 8;
constexpr int64_t kOutBlockCols = 64;

#if defined(PK_X86)
using simd::lane_mask;

// Rows per row_block call by vectors of r: ROWS·RV accumulators (+ RV of y with kGradB) stay
// within the 32 zmm registers with room for the panel row and the broadcasts.
constexpr int64_t rows_for(int64_t rv) { return rv == 1 ? 8 : rv == 2 ? 4 : 2; }
template <int RV>
constexpr int kRowsFor = static_cast<int>(rows_for(RV));

// a: row t0 of the big matrix (row stride lda, unit column stride); p: the panel [D, r] (row
// stride r); y: row t0 of y [M, r]; c: row t0 of the output [M, r]; d in [d0, d1). gb: rows d of
// gb [D, r], written when `first` (the first row group of this d range), else accumulated.
template <int RV, int ROWS, bool kGradB>
PK_TARGET_AVX512 void row_block(const float* a, int64_t lda, const float* p, const float* y, int64_t r, int64_t d0,
                                int64_t d1, bool first, float* gb, float* c) {
  const __mmask16 tail = lane_mask(r - 16 * (RV - 1));
  __m512 acc[ROWS][RV];
  __m512 yv[kGradB ? ROWS : 1][RV];
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < RV; ++v) {
      acc[i][v] = _mm512_setzero_ps();
      if constexpr (kGradB) yv[i][v] = _mm512_maskz_loadu_ps(v == RV - 1 ? tail : 0xFFFF, y + i * r + 16 * v);
    }
  }
  for (int64_t d = d0; d < d1; ++d) {
    __m512 pv[RV], b0[RV], b1[RV];
#pragma GCC unroll 4
    for (int v = 0; v < RV; ++v) {
      const __mmask16 m = v == RV - 1 ? tail : 0xFFFF;
      pv[v] = _mm512_maskz_loadu_ps(m, p + d * r + 16 * v);
      if constexpr (kGradB) {
        b0[v] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, gb + d * r + 16 * v);
        b1[v] = _mm512_setzero_ps();
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * lda + d]);
#pragma GCC unroll 4
      for (int v = 0; v < RV; ++v) {
        acc[i][v] = _mm512_fmadd_ps(av, pv[v], acc[i][v]);
        if constexpr (kGradB) {  // two chains over the rows (even, odd), added once per d
          if (i & 1) {
            b1[v] = _mm512_fmadd_ps(av, yv[i][v], b1[v]);
          } else {
            b0[v] = _mm512_fmadd_ps(av, yv[i][v], b0[v]);
          }
        }
      }
    }
    if constexpr (kGradB) {
#pragma GCC unroll 4
      for (int v = 0; v < RV; ++v) {
        _mm512_mask_storeu_ps(gb + d * r + 16 * v, v == RV - 1 ? tail : 0xFFFF, _mm512_add_ps(b0[v], b1[v]));
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < RV; ++v) _mm512_mask_storeu_ps(c + i * r + 16 * v, v == RV - 1 ? tail : 0xFFFF, acc[i][v]);
  }
}

// project's pass: rows [t0, t1) of c = a·p over all D, groups of kRowsFor<RV> rows, then single rows.
template <int RV>
PK_TARGET_AVX512 void project_rows(const float* a, int64_t lda, const float* p, int64_t r, int64_t D, int64_t t0,
                                   int64_t t1, float* c) {
  constexpr int kRows = kRowsFor<RV>;
  int64_t t = t0;
  for (; t + kRows <= t1; t += kRows) row_block<RV, kRows, false>(a + t * lda, lda, p, nullptr, r, 0, D, false, nullptr, c + t * r);
  for (; t < t1; ++t) row_block<RV, 1, false>(a + t * lda, lda, p, nullptr, r, 0, D, false, nullptr, c + t * r);
}

// out_grads' pass for the column blocks [b0, b1) of `blocks` (block b: columns [N·b/blocks,
// N·(b+1)/blocks)), all M rows: row groups outer, blocks inner, so a thread reads each row's
// columns of its blocks as one stream. Block b writes its rows of gb and its partial [M, r].
template <int RV>
PK_TARGET_AVX512 void out_grads_blocks(const float* a, int64_t lda, const float* p, const float* y, int64_t r,
                                       int64_t M, int64_t N, int64_t blocks, int64_t b0, int64_t b1, float* gb,
                                       float* partial) {
  constexpr int kRows = kRowsFor<RV>;
  int64_t t = 0;
  for (; t + kRows <= M; t += kRows) {
    for (int64_t b = b0; b < b1; ++b) {
      row_block<RV, kRows, true>(a + t * lda, lda, p, y + t * r, r, N * b / blocks, N * (b + 1) / blocks, t == 0, gb,
                                 partial + b * M * r + t * r);
    }
  }
  for (; t < M; ++t) {
    for (int64_t b = b0; b < b1; ++b) {
      row_block<RV, 1, true>(a + t * lda, lda, p, y + t * r, r, N * b / blocks, N * (b + 1) / blocks, t == 0, gb,
                             partial + b * M * r + t * r);
    }
  }
}


// col_block prefetches (into L2) the lines of x and c this many rows ahead of its column walk:
// each row is a new line K floats on, and from DRAM the walk was latency-bound. Measured with both
// matrices flushed from the caches (64 MB written between calls), grad_x += grad_xa·A with grad_A,
// 2 threads: 0.54-0.77x MKL at 256 x 576 / 1536 without it, 1.21-1.66x with it; 512 x 4096
// 1.18-1.40x -> 1.71-2.10x. Hot it costs up to ~25% at 256 x 1536 (still 1.6x MKL). An L1 hint
// (T0) thrashed the L1 set that rows 16 KB apart share (512 x 4096 hot: 1.5x slower).
constexpr int64_t kPrefetchRows = 16;

// What col_block does to c: nothing, c = alpha·Σ, or c += alpha·Σ.
enum class COut { kNone, kWrite, kAccumulate };

// c = alpha·(even + odd), or c += that, on lanes km.
PK_TARGET_AVX512 inline void store_c(float* c, __mmask16 km, bool accumulate, __m512 alpha, __m512 even, __m512 odd) {
  const __m512 s = _mm512_add_ps(even, odd);
  _mm512_mask_storeu_ps(c, km, accumulate ? _mm512_fmadd_ps(alpha, s, _mm512_maskz_loadu_ps(km, c)) : _mm512_mul_ps(alpha, s));
}

// Columns [k0, k0 + 16) (lanes `km`) of: c[t, :] per `mode` with Σ_j y[t, j]·z[j, :], and with
// kG g[j, :] = Σ_t y[t, j]·x[t, :] (the rows before t_begin already summed into g), rows
// [t_begin, M). y [M, r] (row stride r); z [r, *] (row
// stride ldz); x, c, g with row strides ldx, ldc, ldg.
template <bool kC, bool kG>
PK_TARGET_AVX512 void col_block(const float* y, int64_t r, int64_t t_begin, int64_t M, const float* z, int64_t ldz,
                                const float* x, int64_t ldx, float* c, int64_t ldc, COut mode, float alpha, float* g,
                                int64_t ldg, int64_t k0, __mmask16 km) {
  const __m512 alpha_v = _mm512_set1_ps(alpha);
  for (int64_t j0 = 0; j0 < r; j0 += 16) {
    const int jn = static_cast<int>(std::min<int64_t>(16, r - j0));
    const bool accumulate = mode == COut::kAccumulate || j0 > 0;  // later j chunks add to the first's
    __m512 acc[16];  // g's rows j0.. of these columns: zero at the first row chunk, else the sums so far
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      acc[j] = kG && t_begin > 0 && j < jn ? _mm512_maskz_loadu_ps(km, g + (j0 + j) * ldg + k0) : _mm512_setzero_ps();
    }
    // z's rows of this chunk, these columns: held in registers for every t when the 16 registers of
    // acc are not taken (kC alone), else loaded per use from L1 (acc + zv would spill)
    constexpr bool kHoldZ = kC && !kG;
    __m512 zv[kHoldZ ? 16 : 1];
    if constexpr (kHoldZ) {
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) zv[j] = j < jn ? _mm512_maskz_loadu_ps(km, z + (j0 + j) * ldz + k0) : _mm512_setzero_ps();
    }
    auto z_at = [&](int j) PK_TARGET_AVX512 {
      if constexpr (kHoldZ) {
        return zv[j];
      } else {
        return _mm512_maskz_loadu_ps(km, z + (j0 + j) * ldz + k0);
      }
    };
    int64_t t = t_begin;
    for (; t + 2 <= M; t += 2) {
      const float* y0 = y + t * r + j0;
      const float* y1 = y0 + r;
      if (t + kPrefetchRows + 2 <= M) {  // the column walk's rows ahead: one line of each a row
        if constexpr (kG) {
          _mm_prefetch(reinterpret_cast<const char*>(x + (t + kPrefetchRows) * ldx + k0), _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(x + (t + kPrefetchRows + 1) * ldx + k0), _MM_HINT_T1);
        }
        if constexpr (kC) {
          _mm_prefetch(reinterpret_cast<const char*>(c + (t + kPrefetchRows) * ldc + k0), _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(c + (t + kPrefetchRows + 1) * ldc + k0), _MM_HINT_T1);
        }
      }
      __m512 x0 = _mm512_setzero_ps(), x1 = _mm512_setzero_ps();
      if constexpr (kG) {
        x0 = _mm512_maskz_loadu_ps(km, x + t * ldx + k0);
        x1 = _mm512_maskz_loadu_ps(km, x + (t + 1) * ldx + k0);
      }
      __m512 e0 = _mm512_setzero_ps(), o0 = _mm512_setzero_ps(), e1 = _mm512_setzero_ps(), o1 = _mm512_setzero_ps();
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        if (j < jn) {
          const __m512 b0 = _mm512_set1_ps(y0[j]), b1 = _mm512_set1_ps(y1[j]);
          if constexpr (kC) {
            const __m512 zj = z_at(j);
            if (j & 1) {
              o0 = _mm512_fmadd_ps(b0, zj, o0);
              o1 = _mm512_fmadd_ps(b1, zj, o1);
            } else {
              e0 = _mm512_fmadd_ps(b0, zj, e0);
              e1 = _mm512_fmadd_ps(b1, zj, e1);
            }
          }
          if constexpr (kG) acc[j] = _mm512_fmadd_ps(b1, x1, _mm512_fmadd_ps(b0, x0, acc[j]));
        }
      }
      if constexpr (kC) {
        store_c(c + t * ldc + k0, km, accumulate, alpha_v, e0, o0);
        store_c(c + (t + 1) * ldc + k0, km, accumulate, alpha_v, e1, o1);
      }
    }
    for (; t < M; ++t) {
      const float* y0 = y + t * r + j0;
      __m512 x0 = _mm512_setzero_ps();
      if constexpr (kG) x0 = _mm512_maskz_loadu_ps(km, x + t * ldx + k0);
      __m512 e0 = _mm512_setzero_ps(), o0 = _mm512_setzero_ps();
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        if (j < jn) {
          const __m512 b0 = _mm512_set1_ps(y0[j]);
          if constexpr (kC) {
            if (j & 1) {
              o0 = _mm512_fmadd_ps(b0, z_at(j), o0);
            } else {
              e0 = _mm512_fmadd_ps(b0, z_at(j), e0);
            }
          }
          if constexpr (kG) acc[j] = _mm512_fmadd_ps(b0, x0, acc[j]);
        }
      }
      if constexpr (kC) store_c(c + t * ldc + k0, km, accumulate, alpha_v, e0, o0);
    }
    if constexpr (kG) {
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        if (j < jn) _mm512_mask_storeu_ps(g + (j0 + j) * ldg + k0, km, acc[j]);
      }
    }
  }
}

// Rows per pass over a thread's column blocks. A column block reads one 64-byte piece of every
// row: over all rows of a wide matrix (11008 floats: 44 KB a row) that is a new page and a new
// stream per row, and the pass ran at 0.73x MKL; in chunks of 32 rows the next column block finds
// the same 32 rows' pages and lines (the 16 sums of g stored and reloaded once per chunk): 1.1-1.3x.
// Rows of at most kWholeColumnMax floats (16 KB, 4 pages) keep whole columns: chunks cost up to
// 1.5x there (256 x 576: 27-29 µs whole, 34-40 µs in chunks of 32 or 16, 83 in chunks of 8).
constexpr int64_t kColRows = 32;
constexpr int64_t kWholeColumnMax = 4096;

// col_block over all column blocks of D: each thread a range of blocks, row chunks outer.
template <bool kC, bool kG>
void cols_all(const float* y, int64_t r, int64_t M, int64_t D, const float* z, int64_t ldz, const float* x,
              int64_t ldx, float* c, int64_t ldc, COut mode, float alpha, float* g, int64_t ldg) {
  const int64_t blocks = ceil_div(D, 16);
  // ~64K FMAs per task at least: small products stay on one thread
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, M * r * ((kC ? 1 : 0) + (kG ? 1 : 0))));
  const int64_t rows = D <= kWholeColumnMax ? M : kColRows;
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t t0 = 0; t0 < M; t0 += rows) {
      const int64_t t1 = std::min(M, t0 + rows);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t k0 = b * 16;
        col_block<kC, kG>(y, r, t0, t1, z, ldz, x, ldx, c, ldc, mode, alpha, g, ldg, k0, lane_mask(D - k0));
      }
    }
  });
}
#endif  // PK_X86


}  // namespace

bool use_kernels(const at::Tensor& big, int64_t r) {
#if defined(PK_X86)
  return big.is_cpu() && big.scalar_type() == at::kFloat && big.dim() == 2 && r >= 1 && r <= kMaxRank &&
         big.size(0) > 0 && big.size(1) > 0 && big.stride(1) == 1 && big.stride(0) >= big.size(1) &&
         cpu::active_isa() == cpu::Isa::kAvx512;
#else
  (void)big;
  (void)r;
  return false;
#endif
}

// Each product: the kernel where use_kernels() says it applies, else (and in non-x86 builds, where
// use_kernels() is false) ATen's GEMMs with the same formula after the #endif.

at::Tensor project(const at::Tensor& x, const at::Tensor& lora_a) {
  const int64_t r = lora_a.size(0);
#if defined(PK_X86)
  if (use_kernels(x, r)) {
    const int64_t M = x.size(0), K = x.size(1);
    const at::Tensor panel = lora_a.t().contiguous();  // Aᵀ [K, r]: one row per step of the reduction
    at::Tensor out = at::empty({M, r}, x.options().memory_format(at::MemoryFormat::Contiguous));
    const float* xp = x.const_data_ptr<float>();
    const float* pp = panel.const_data_ptr<float>();
    float* op = out.mutable_data_ptr<float>();
    const int64_t rv = ceil_div(r, 16), rows = rows_for(rv);
    const int64_t groups = ceil_div(M, rows);
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, rows * K * r));
    at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
      const int64_t t0 = g0 * rows, t1 = std::min(M, g1 * rows);
      switch (rv) {
        case 1: return project_rows<1>(xp, x.stride(0), pp, r, K, t0, t1, op);
        case 2: return project_rows<2>(xp, x.stride(0), pp, r, K, t0, t1, op);
        case 3: return project_rows<3>(xp, x.stride(0), pp, r, K, t0, t1, op);
        default: return project_rows<4>(xp, x.stride(0), pp, r, K, t0, t1, op);
      }
    });
    return out;
  }
#endif
  return at::mm(x, lora_a.t());
}

void add_expand_(at::Tensor& out, const at::Tensor& xa, const at::Tensor& lora_b, double alpha) {
  const int64_t r = xa.size(1);
#if defined(PK_X86)
  if (use_kernels(out, r) && xa.scalar_type() == at::kFloat && lora_b.scalar_type() == at::kFloat) {
    const at::Tensor y = xa.contiguous();  // rows of stride r, as the kernels read the thin side
    const at::Tensor z = lora_b.t().contiguous();  // Bᵀ [r, N]: rows along the output's columns
    cols_all<true, false>(y.const_data_ptr<float>(), r, out.size(0), out.size(1), z.const_data_ptr<float>(),
                          z.stride(0), nullptr, 0, out.mutable_data_ptr<float>(), out.stride(0), COut::kAccumulate,
                          static_cast<float>(alpha), nullptr, 0);
    return;
  }
#endif
  out.addmm_(xa, lora_b.t(), /*beta=*/1, /*alpha=*/alpha);
}

at::Tensor expand(const at::Tensor& grad_xa, const at::Tensor& lora_a) {
  const int64_t M = grad_xa.size(0), r = grad_xa.size(1), K = lora_a.size(1);
  at::Tensor out = at::empty({M, K}, grad_xa.options().memory_format(at::MemoryFormat::Contiguous));
#if defined(PK_X86)
  if (use_kernels(out, r) && lora_a.scalar_type() == at::kFloat) {
    const at::Tensor y = grad_xa.contiguous();
    const at::Tensor z = lora_a.contiguous();
    cols_all<true, false>(y.const_data_ptr<float>(), r, M, K, z.const_data_ptr<float>(), K, nullptr, 0,
                          out.mutable_data_ptr<float>(), K, COut::kWrite, 1.0f, nullptr, 0);
    return out;
  }
#endif
  return at::mm_out(out, grad_xa, lora_a);
}

std::pair<at::Tensor, at::Tensor> out_grads(const at::Tensor& grad_out, const at::Tensor& xa,
                                            const at::Tensor& lora_b, double scaling) {
  const int64_t r = xa.size(1);
#if defined(PK_X86)
  if (use_kernels(grad_out, r) && xa.scalar_type() == at::kFloat && lora_b.scalar_type() == at::kFloat) {
    const int64_t M = grad_out.size(0), N = grad_out.size(1), rv = ceil_div(r, 16);
    const at::Tensor y = xa.mul(scaling).contiguous();  // grad_B = grad_outᵀ·(s·xa): scaled once, [M, r]
    const at::Tensor panel = lora_b.contiguous();       // B [N, r]
    at::Tensor grad_b = at::empty({N, r}, xa.options().memory_format(at::MemoryFormat::Contiguous));
    const int64_t blocks = std::max<int64_t>(1, std::min(kOutBlocks, N / kOutBlockCols));
    at::Tensor partial = at::empty({blocks, M, r}, xa.options().memory_format(at::MemoryFormat::Contiguous));
    const float* gp = grad_out.const_data_ptr<float>();
    const float* yp = y.const_data_ptr<float>();
    const float* pp = panel.const_data_ptr<float>();
    float* gbp = grad_b.mutable_data_ptr<float>();
    float* partp = partial.mutable_data_ptr<float>();
    const int64_t lda = grad_out.stride(0);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      switch (rv) {
        case 1: return out_grads_blocks<1>(gp, lda, pp, yp, r, M, N, blocks, b0, b1, gbp, partp);
        case 2: return out_grads_blocks<2>(gp, lda, pp, yp, r, M, N, blocks, b0, b1, gbp, partp);
        case 3: return out_grads_blocks<3>(gp, lda, pp, yp, r, M, N, blocks, b0, b1, gbp, partp);
        default: return out_grads_blocks<4>(gp, lda, pp, yp, r, M, N, blocks, b0, b1, gbp, partp);
      }
    });
    // grad_xa = s·Σ_b partial[b], blocks summed in order
    at::Tensor grad_xa = at::empty({M, r}, xa.options().memory_format(at::MemoryFormat::Contiguous));
    float* gxp = grad_xa.mutable_data_ptr<float>();
    const float s = static_cast<float>(scaling);
    at::parallel_for(0, M * r, 16384, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        float sum = partp[e];
        for (int64_t b = 1; b < blocks; ++b) sum += partp[b * M * r + e];
        gxp[e] = s * sum;
      }
    });
    return {grad_xa, grad_b};
  }
#endif
  // d(out)/d(B) = s·xa, d(out)/d(xa) = s·B: scale the thin [·, r] results, not the big ones
  return {at::mm(grad_out, lora_b).mul_(scaling), at::mm(grad_out.t(), xa).mul_(scaling)};
}

at::Tensor input_grads_(at::Tensor grad_x, const at::Tensor& x, const at::Tensor& grad_xa, const at::Tensor& lora_a) {
  const int64_t r = grad_xa.size(1);
  const bool with_c = grad_x.defined();
#if defined(PK_X86)
  if (use_kernels(x, r) && grad_xa.scalar_type() == at::kFloat && lora_a.scalar_type() == at::kFloat &&
      (!with_c || use_kernels(grad_x, r))) {
    const int64_t M = x.size(0), K = x.size(1);
    const at::Tensor y = grad_xa.contiguous();
    at::Tensor grad_a = at::empty({r, K}, x.options().memory_format(at::MemoryFormat::Contiguous));
    if (with_c) {
      const at::Tensor z = lora_a.contiguous();
      cols_all<true, true>(y.const_data_ptr<float>(), r, M, K, z.const_data_ptr<float>(), K,
                           x.const_data_ptr<float>(), x.stride(0), grad_x.mutable_data_ptr<float>(), grad_x.stride(0),
                           COut::kAccumulate, 1.0f, grad_a.mutable_data_ptr<float>(), K);
    } else {
      cols_all<false, true>(y.const_data_ptr<float>(), r, M, K, nullptr, 0, x.const_data_ptr<float>(), x.stride(0),
                            nullptr, 0, COut::kNone, 1.0f, grad_a.mutable_data_ptr<float>(), K);
    }
    return grad_a;
  }
#endif
  if (with_c) grad_x.addmm_(grad_xa, lora_a);
  return at::mm(grad_xa.t(), x);
}

at::Tensor input_grads_dropout_(at::Tensor grad_x, const at::Tensor& x, const at::Tensor& grad_xa,
                                const at::Tensor& lora_a, double p, int64_t seed, int64_t offset) {
  if (p == 0.0) return input_grads_(grad_x, x, grad_xa, lora_a);
  // one draw of the decisions: grad_x += (grad_xa·A) ⊙ m/(1−p), and xd = x ⊙ m/(1−p) for grad_A
  const at::Tensor xd = dropout::backward_lora_grad(grad_x, expand(grad_xa, lora_a), x, p, seed, offset);
  return input_grads_(at::Tensor(), xd, grad_xa, lora_a);
}

namespace {

// --- The ops (schemas in op_schemas.h) ------------------------------------------------------------

void check_rank_args(const char* op, const at::Tensor& big, const char* big_name, const at::Tensor& thin,
                     const char* thin_name, const at::Tensor& factor, const char* factor_name) {
  check_dtype(big, op, big_name, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK(big.dim() == 2 && thin.dim() == 2 && factor.dim() == 2, op, ": ", big_name, ", ", thin_name, " and ",
              factor_name, " must be 2-D, got ", big.sizes(), ", ", thin.sizes(), " and ", factor.sizes());
  check_like(thin, op, thin_name, big);
  check_like(factor, op, factor_name, big);
  TORCH_CHECK(thin.size(0) == big.size(0), op, ": ", thin_name, " is ", thin.sizes(), " but ", big_name, " has ",
              big.size(0), " rows");
}

std::tuple<at::Tensor, at::Tensor> lora_out_grads(const at::Tensor& grad_out, const at::Tensor& xa,
                                                  const at::Tensor& lora_b, double scaling) {
  constexpr const char* op = "lora_out_grads";
  check_rank_args(op, grad_out, "grad_out", xa, "xa", lora_b, "lora_b");
  TORCH_CHECK(lora_b.size(0) == grad_out.size(1) && lora_b.size(1) == xa.size(1), op, ": lora_b is ",
              lora_b.sizes(), ", expected [", grad_out.size(1), ", ", xa.size(1), "]");
  auto [grad_xa, grad_b] = out_grads(grad_out, xa, lora_b, scaling);
  return {grad_xa, grad_b};
}

at::Tensor lora_input_grads_(at::Tensor& grad_x, const at::Tensor& x, const at::Tensor& grad_xa,
                             const at::Tensor& lora_a, double p, int64_t seed, int64_t offset) {
  constexpr const char* op = "lora_input_grads_";
  check_rank_args(op, x, "x", grad_xa, "grad_xa", lora_a, "lora_a");
  check_like(grad_x, op, "grad_x", x);
  TORCH_CHECK(lora_a.size(0) == grad_xa.size(1) && lora_a.size(1) == x.size(1), op, ": lora_a is ", lora_a.sizes(),
              ", expected [", grad_xa.size(1), ", ", x.size(1), "]");
  TORCH_CHECK(grad_x.sizes() == x.sizes(), op, ": grad_x is ", grad_x.sizes(), ", expected x's shape ", x.sizes());
  TORCH_CHECK(p == 0.0 || grad_x.is_contiguous(), op, ": with dropout, grad_x must be contiguous");
  dropout::check_p(op, p);
  return input_grads_dropout_(grad_x, x, grad_xa, lora_a, p, seed, offset);
}

}  // namespace
}  // namespace rank
}  // namespace peftkern

// One function for both devices: off the AVX-512 CPU path every product is ATen's GEMM.
TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("lora_out_grads", &peftkern::rank::lora_out_grads);
  m.impl("lora_input_grads_", &peftkern::rank::lora_input_grads_);
}
TORCH_LIBRARY_IMPL(peftkern, CUDA, m) {
  m.impl("lora_out_grads", &peftkern::rank::lora_out_grads);
  m.impl("lora_input_grads_", &peftkern::rank::lora_input_grads_);
}
