// CPU implementation of the fused NF4 dequant + GEMM ops of QLoRA training and prefill (schemas
// in op_schemas.h, checks in qlora_host.h):
//
//   nf4_lora_linear_fwd:        out    = x·deq(W)ᵀ + b + s·xa·Bᵀ      W [N, K]
//   nf4_lora_linear_bwd_input:  grad_x = grad_out·deq(W) + grad_xa·A
//
// The dense weight is never materialised: each thread decodes one tile of W at a time into its own
// buffer (nf4::cpu::decode_range) and hands that tile to ATen's GEMM (MKL / oneDNN) with a column
// slice of the output as the destination (a strided out= view, leading dimension N or K: no copy).
// The LoRA term is a rank-r product (csrc/rank_product/) accumulated into the same output slice
// while it is hot in cache.
//
// Tiles: forward takes whole rows of W (contiguous in the flat NF4 layout: one decode call per
// tile; rows may start and end mid-block), so a tile is out[:, rows]; backward reduces over N, so
// a tile is a column band W[:, k0:k1] (one decode call per row) and writes grad_x[:, k0:k1] alone:
// tiles never write the same output element, no reduction across threads, deterministic.
//
// Threading: tiles in sequence, each decoded by all threads (at::parallel_for) and multiplied by
// ATen's multithreaded GEMM, rather than at::parallel_for over tiles with a single-threaded GEMM
// per thread. The latter was measured 5-15x slower on the shared 2-core machine: MKL called inside
// an OpenMP parallel region spun in libgomp (perf: ~40% of cycles), burning the CPU time the other
// thread needed (user time 15x that of one thread; OMP_WAIT_POLICY=PASSIVE removed it, but that is
// the user's setting, not ours). Tile size: see tile_extent.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/cpu_gemm.h"
#include "../common/dispatch.h"
#include "../nf4/nf4_cpu_decode.h"
#include "../rank_product/rank_product.h"
#include "qlora_host.h"

namespace peftkern {
namespace qlora {
namespace {

// The decode buffer, in bytes, when the caller passes tile_bytes = 0: an L3-resident tile (the
// CPUs here have 32 MiB of L3, 1 MiB of L2 per core). MKL packs the tile into its own L2-sized
// panels anyway, so an L2-sized tile buys nothing and costs narrow GEMMs (N = 16..64 columns lose
// MKL's blocking) and more parallel regions. Measured 256 KiB .. 8 MiB (bench/bench_qlora.py,
// DESIGN.md "QLoRA"): 256 KiB up to 6x slower than 4 MiB, 1 MiB 0-40% slower, 8 MiB within noise.
// A weight that fits the budget is one tile: one decode and one GEMM, as dequantize-whole does but
// into the reused buffer. The fused path's memory cost is this budget per thread, whatever the
// model (an earlier policy capped tiles at an eighth of the weight to keep the buffer a small
// fraction of it; on SmolLM2's 0.4-3.5 MB weights that cost 6-24% per call at 256 tokens on the
// quiet 2-core EPYC, 2 threads, for at most 3 MB of memory: DESIGN.md "QLoRA").
constexpr int64_t kDefaultTileBytes = 4 * 1024 * 1024;
// Elements one thread decodes at least (smaller pieces are not worth waking another thread).
constexpr int64_t kDecodeGrain = 16384;

// The decode buffer of the calling thread, grown on demand and kept between calls, as `count`
// elements of `options`' dtype. Allocating it per call cost more than the decode on these
// machines: a buffer of 0.5-4 MiB comes from mmap, and each of its pages faults on first touch
// (~1.7 µs a page measured on the 2-core VM: 0.2-1.8 ms a call, 420 calls a SmolLM2 step).
// Bounded by the tile budget (4 MiB by default) per thread that runs these ops.
at::Tensor decode_buffer(int64_t count, const at::TensorOptions& options) {
  thread_local at::Tensor bytes;
  const int64_t need = count * static_cast<int64_t>(options.dtype().itemsize());
  if (!bytes.defined() || bytes.numel() < need) bytes = at::empty({need}, at::TensorOptions().dtype(at::kByte));
  return at::from_blob(bytes.data_ptr(), {count}, options);
}

// Rows (forward) or columns (backward) per tile: as many as fit the budget given the other
// extent, at least `min_extent` (narrower GEMMs lose MKL's blocking), rounded to a multiple of 64
// (so that a column band of a row whose length is a multiple of the NF4 blocksize starts and
// ends on block boundaries: the decode then has no scalar head or tail).
// Default budget: kDefaultTileBytes. The peak-memory saving of the fused path against
// dequantize-whole is the dense weight minus this buffer (none for a weight under the budget).
int64_t tile_extent(int64_t tile_bytes, int64_t other, int64_t element_size, int64_t total, int64_t min_extent) {
  const int64_t budget = tile_bytes > 0 ? tile_bytes : kDefaultTileBytes;
  int64_t extent = budget / std::max<int64_t>(1, other * element_size);
  extent = std::max<int64_t>(min_extent, extent >= 64 ? extent / 64 * 64 : extent);
  return std::max<int64_t>(1, std::min(extent, total));
}

// `t` as BLAS can read it (one unit stride, the other at least the row length), else a contiguous
// copy: made once here, where ATen's GEMM would otherwise copy it again for every tile (an
// expanded grad_out from loss.sum().backward() has strides (0, 0)).
at::Tensor blas_ready(const at::Tensor& t) {
  const bool rows = t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1));
  const bool cols = t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, t.size(0));
  return rows || cols ? t : t.contiguous();
}

template <typename T>
void fwd_tiles(const at::Tensor& x, const uint8_t* packed, const GemmArgs& a, const std::optional<at::Tensor>& bias,
               const std::optional<at::Tensor>& xa, const std::optional<at::Tensor>& lora_b, double scaling,
               at::Tensor& out) {
  const int64_t K = a.in_features, N = a.out_features;
  // A tile of 1 row when tests pass a tiny tile_bytes: every boundary case (rows starting
  // mid-block, mid-byte) gets exercised.
  const int64_t rows = tile_extent(a.tile_bytes, K, sizeof(T), N, a.tile_bytes > 0 ? 1 : 64);
  at::Tensor buffer = decode_buffer(rows * K, x.options()).view({rows, K});  // one tile of W, reused
  T* w_ptr = buffer.mutable_data_ptr<T>();
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n = std::min(rows, N - n0);
    // The tile's rows are one contiguous stretch of the flat weight: each thread decodes a part.
    at::parallel_for(0, n * K, kDecodeGrain, [&](int64_t begin, int64_t end) {
      nf4::cpu::decode_range(packed, a.scales, a.blocksize, n0 * K + begin, end - begin, w_ptr + begin);
    });
    const at::Tensor w = buffer.narrow(0, 0, n);  // [n, K]
    at::Tensor o = out.narrow(1, n0, n);          // [M, n], leading dimension N
    if (n == N) {  // one tile (the usual case): the whole output, written by the GEMM directly
      out = cpu::linear(x, w, bias);
      o = out;
    } else {
      cpu::linear_out(o, x, w, bias.has_value() ? std::optional<at::Tensor>(bias->narrow(0, n0, n)) : std::nullopt);
    }
    if (a.rank > 0) rank::add_expand_(o, *xa, lora_b->narrow(0, n0, n), scaling);  // o += s·xa·B[n0:n0+n]ᵀ
  }
}

template <typename T>
void bwd_input_tiles(const at::Tensor& grad_out, const uint8_t* packed, const GemmArgs& a,
                     const std::optional<at::Tensor>& grad_xa, const std::optional<at::Tensor>& lora_a,
                     at::Tensor& grad_x) {
  const int64_t K = a.in_features, N = a.out_features;
  const int64_t cols = tile_extent(a.tile_bytes, N, sizeof(T), K, a.tile_bytes > 0 ? 1 : 64);
  at::Tensor buffer = decode_buffer(N * cols, grad_out.options());
  T* w_ptr = buffer.mutable_data_ptr<T>();
  for (int64_t k0 = 0; k0 < K; k0 += cols) {
    const int64_t k = std::min(cols, K - k0);
    // W[:, k0:k0+k] -> buffer [N, k] contiguous, one decode call per row, rows split over threads.
    at::parallel_for(0, N, std::max<int64_t>(1, kDecodeGrain / k), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        nf4::cpu::decode_range(packed, a.scales, a.blocksize, row * K + k0, k, w_ptr + row * k);
      }
    });
    const at::Tensor w = buffer.narrow(0, 0, N * k).view({N, k});
    at::Tensor g = grad_x.narrow(1, k0, k);  // [M, k], leading dimension K
    if (k == K) {  // one tile: the whole gradient, written by the GEMM directly
      grad_x = cpu::linear(grad_out, w.t(), std::nullopt);
      g = grad_x;
    } else {
      cpu::linear_out(g, grad_out, w.t(), std::nullopt);
    }
    if (a.rank > 0) rank::add_expand_(g, *grad_xa, lora_a->narrow(1, k0, k).t(), 1.0);  // g += grad_xa·A[:, k0:k0+k]
  }
}

at::Tensor nf4_lora_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                   const std::optional<at::Tensor>& nested_absmax,
                                   const std::optional<at::Tensor>& nested_code,
                                   const std::optional<at::Tensor>& nested_offset, int64_t blocksize,
                                   int64_t nested_blocksize, int64_t out_features,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& xa,
                                   const std::optional<at::Tensor>& lora_b, double scaling, int64_t tile_bytes) {
  const GemmArgs args = check_nf4_lora_linear_fwd(x, packed, absmax, nested_absmax, nested_code, nested_offset,
                                                  blocksize, nested_blocksize, out_features, bias, xa, lora_b,
                                                  tile_bytes);
  at::Tensor out = new_output({args.tokens, out_features}, x.options());
  if (out.numel() == 0) return out;
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(x.scalar_type(), "nf4_lora_linear_fwd_cpu", [&] {
    fwd_tiles<scalar_t>(blas_ready(x), packed.const_data_ptr<uint8_t>(), args, bias, xa, lora_b, scaling, out);
  });
  return out;
}

at::Tensor nf4_lora_linear_bwd_input_cpu(const at::Tensor& grad_out, const at::Tensor& packed,
                                         const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                                         const std::optional<at::Tensor>& nested_code,
                                         const std::optional<at::Tensor>& nested_offset, int64_t blocksize,
                                         int64_t nested_blocksize, int64_t in_features,
                                         const std::optional<at::Tensor>& grad_xa,
                                         const std::optional<at::Tensor>& lora_a, int64_t tile_bytes) {
  const GemmArgs args = check_nf4_lora_linear_bwd_input(grad_out, packed, absmax, nested_absmax, nested_code,
                                                        nested_offset, blocksize, nested_blocksize, in_features,
                                                        grad_xa, lora_a, tile_bytes);
  at::Tensor grad_x = new_output({args.tokens, in_features}, grad_out.options());
  if (grad_x.numel() == 0) return grad_x;
  if (args.out_features == 0) {  // an empty reduction: only the LoRA term (or zero)
    if (args.rank > 0) return at::mm_out(grad_x, *grad_xa, *lora_a);
    return grad_x.zero_();
  }
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(grad_out.scalar_type(), "nf4_lora_linear_bwd_input_cpu", [&] {
    bwd_input_tiles<scalar_t>(blas_ready(grad_out), packed.const_data_ptr<uint8_t>(), args, grad_xa, lora_a,
                              grad_x);
  });
  return grad_x;
}

}  // namespace
}  // namespace qlora
}  // namespace peftkern

// CPU only: on CUDA, QLoRA training keeps dequantize + cuBLAS (DESIGN.md, QLoRA).
TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("nf4_lora_linear_fwd", &peftkern::qlora::nf4_lora_linear_fwd_cpu);
  m.impl("nf4_lora_linear_bwd_input", &peftkern::qlora::nf4_lora_linear_bwd_input_cpu);
}
