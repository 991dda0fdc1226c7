// Scaled-LoRA fused kernels on CPU (the GEMMs around them are ATen's, see scaled_lora_host.h).
// Each kernel is one pass over its contiguous [M, W] operands, parallel over rows with
// at::parallel_for, the inner loop over a row (vectorisable). The per-element math is
// scaled_lora_math.h, shared with scaled_lora_cuda.cu.
//
// The column reduction dl = Σ_rows a ⊙ b (dλ_b, dλ_d, dE) is deterministic: rows are cut into
// fixed blocks of kCpuRowsPerBlock, each block sums its rows in order into its own partial row
// of a [blocks, W] scratch buffer, then each column's partials are added in block order. The
// thread count changes who computes a block, never the order of the additions.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "scaled_lora_host.h"
#include "scaled_lora_math.h"

namespace peftkern {
namespace scaled_lora {
namespace {

// Rows per parallel task so that a task touches at least ~32K elements.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

struct CpuKernels {
  // out[i, j] = alpha·src[i, j]·l[j]; out may be src (each element read, then written, by one thread).
  static void scale_columns(const at::Tensor& src, const at::Tensor& l, double alpha, at::Tensor& out) {
    const int64_t m = src.size(0), w = src.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "scaled_lora_scale_columns", [&] {
      using Acc = acc_type<scalar_t>;
      const scalar_t* sp = src.const_data_ptr<scalar_t>();
      const Acc* lp = l.const_data_ptr<Acc>();
      scalar_t* op = out.data_ptr<scalar_t>();
      const Acc a = static_cast<Acc>(alpha);
      at::parallel_for(0, m, row_grain(w), [&](int64_t first, int64_t last) {
        for (int64_t i = first; i < last; ++i) {
          for (int64_t j = 0; j < w; ++j) op[i * w + j] = static_cast<scalar_t>(a * column_scaled<Acc>(sp[i * w + j], lp, j));
        }
      });
    });
  }

  // out[i, j] = out[i, j] + scaling·v[i, j]·l[j].
  static void epilogue(at::Tensor& out, const at::Tensor& v, double scaling, const at::Tensor& l) {
    const int64_t m = out.size(0), w = out.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "scaled_lora_epilogue", [&] {
      using Acc = acc_type<scalar_t>;
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const scalar_t* vp = v.const_data_ptr<scalar_t>();
      const Acc* lp = l.const_data_ptr<Acc>();
      const Acc s = static_cast<Acc>(scaling);
      at::parallel_for(0, m, row_grain(w), [&](int64_t first, int64_t last) {
        for (int64_t i = first; i < last; ++i) {
          scalar_t* orow = op + i * w;
          const scalar_t* vrow = vp + i * w;
          for (int64_t j = 0; j < w; ++j) orow[j] = static_cast<scalar_t>(add_scaled_term<Acc>(orow[j], vrow[j], s, lp[j]));
        }
      });
    });
  }

  // out[i, j] = out_alpha·a[i, j]·l[j] and dl[j] = sum_alpha·Σ_i a[i, j]·b[i, j]; out may be a.
  static void scale_reduce(const at::Tensor& a, const at::Tensor& b, const at::Tensor& l, double out_alpha,
                           double sum_alpha, at::Tensor& out, at::Tensor& dl) {
    const int64_t m = a.size(0), w = a.size(1);
    const int64_t blocks = ceil_div(m, kCpuRowsPerBlock);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "scaled_lora_scale_reduce", [&] {
      using Acc = acc_type<scalar_t>;
      const scalar_t* ap = a.const_data_ptr<scalar_t>();
      const scalar_t* bp = b.const_data_ptr<scalar_t>();
      const Acc* lp = l.const_data_ptr<Acc>();
      scalar_t* op = out.data_ptr<scalar_t>();  // may alias ap
      Acc* dlp = dl.mutable_data_ptr<Acc>();
      const Acc oa = static_cast<Acc>(out_alpha), sa = static_cast<Acc>(sum_alpha);
      std::vector<Acc> partial(static_cast<size_t>(blocks * w));
      const int64_t block_grain = std::max<int64_t>(1, row_grain(w) / kCpuRowsPerBlock);
      at::parallel_for(0, blocks, block_grain, [&](int64_t first, int64_t last) {
        for (int64_t blk = first; blk < last; ++blk) {
          Acc* sum = partial.data() + blk * w;
          for (int64_t j = 0; j < w; ++j) sum[j] = Acc(0);
          const int64_t row_end = std::min(m, (blk + 1) * kCpuRowsPerBlock);
          for (int64_t i = blk * kCpuRowsPerBlock; i < row_end; ++i) {
            for (int64_t j = 0; j < w; ++j) {
              const Acc av = ap[i * w + j];
              sum[j] = reduce_term<Acc>(sum[j], av, bp[i * w + j]);
              op[i * w + j] = static_cast<scalar_t>(oa * column_scaled<Acc>(av, lp, j));
            }
          }
        }
      });
      // Second stage: each column's partials in block order (deterministic).
      at::parallel_for(0, w, std::max<int64_t>(1, 4096 / std::max<int64_t>(blocks, 1)), [&](int64_t first, int64_t last) {
        for (int64_t j = first; j < last; ++j) {
          Acc total = 0;
          for (int64_t blk = 0; blk < blocks; ++blk) total += partial[blk * w + j];
          dlp[j] = sa * total;
        }
      });
    });
  }
};

using CpuOps = Ops<CpuKernels>;

}  // namespace
}  // namespace scaled_lora
}  // namespace peftkern

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("scaled_lora_linear_fwd", &peftkern::scaled_lora::CpuOps::fwd);
  m.impl("scaled_lora_linear_bwd", &peftkern::scaled_lora::CpuOps::bwd);
}
