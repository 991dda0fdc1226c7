// IA³ fused kernels on CPU (the GEMMs around them are ATen's, see ia3_host.h). Every kernel is
// one pass over its [M, W] operands, parallel over rows with at::parallel_for; the inner loops
// run over a contiguous row of the output (and of the input when its column stride is 1, a
// separate loop the compiler vectorises).
//
// The per-column reduction dl = Σ_rows a ⊙ b is deterministic: rows are cut into fixed blocks
// of kCpuRowsPerBlock, each block sums its rows in order into its own partial row of a
// [blocks, W] scratch buffer, and a second pass adds the partials of each column in block
// order. The thread count changes who computes a block, never the order of the additions.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ia3_host.h"
#include "ia3_math.h"

namespace peftkern {
namespace ia3 {
namespace {

// Rows per parallel task so that a task touches at least ~32K elements.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

struct CpuKernels {
  // out[i, j] = x[i, j] * l[j]; x strided, out contiguous [M, W].
  static void scale_columns(const at::Tensor& x, const at::Tensor& l, at::Tensor& out) {
    const int64_t m = x.size(0), w = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ia3_scale_columns", [&] {
      using Acc = acc_type<scalar_t>;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const Acc* lp = l.const_data_ptr<Acc>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, m, row_grain(w), [&](int64_t first, int64_t last) {
        for (int64_t i = first; i < last; ++i) {
          const scalar_t* xr = xp + i * s0;
          scalar_t* orow = op + i * w;
          if (s1 == 1) {
            for (int64_t j = 0; j < w; ++j) orow[j] = static_cast<scalar_t>(scaled<Acc>(xr[j], lp[j]));
          } else {
            for (int64_t j = 0; j < w; ++j) orow[j] = static_cast<scalar_t>(scaled<Acc>(xr[j * s1], lp[j]));
          }
        }
      });
    });
  }

  // acc[i, j] <- acc[i, j] + bias[j] (when given; acc becomes the saved pre-scale output) and
  // out[i, j] = acc[i, j] * l[j]; both contiguous [M, W].
  static void bias_scale(at::Tensor& acc, const at::Tensor& bias, const at::Tensor& l, at::Tensor& out) {
    const int64_t m = acc.size(0), w = acc.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acc.scalar_type(), "ia3_bias_scale", [&] {
      using Acc = acc_type<scalar_t>;
      scalar_t* ap = acc.mutable_data_ptr<scalar_t>();
      const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
      const Acc* lp = l.const_data_ptr<Acc>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, m, row_grain(w), [&](int64_t first, int64_t last) {
        for (int64_t i = first; i < last; ++i) {
          scalar_t* arow = ap + i * w;
          scalar_t* orow = op + i * w;
          if (bp == nullptr) {  // pre is the GEMM's output as it stands
            for (int64_t j = 0; j < w; ++j) orow[j] = static_cast<scalar_t>(scaled<Acc>(arow[j], lp[j]));
            continue;
          }
          for (int64_t j = 0; j < w; ++j) {
            const scalar_t pre = pre_scale_output<scalar_t, Acc>(arow[j], bp, j);
            arow[j] = pre;
            orow[j] = static_cast<scalar_t>(scaled<Acc>(pre, lp[j]));
          }
        }
      });
    });
  }

  // out[i, j] = a[i, j] * l[j] and dl[j] = Σ_i a[i, j] * b[i, j]. a, b strided; out contiguous
  // and possibly the same memory as a (each element is read before it is overwritten, by the
  // same thread); dl [W] in the accumulation dtype.
  static void scale_reduce(const at::Tensor& a, const at::Tensor& b, const at::Tensor& l, at::Tensor& out,
                           at::Tensor& dl) {
    const int64_t m = a.size(0), w = a.size(1);
    const int64_t as0 = a.stride(0), as1 = a.stride(1), bs0 = b.stride(0), bs1 = b.stride(1);
    const int64_t blocks = ceil_div(m, kCpuRowsPerBlock);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "ia3_scale_reduce", [&] {
      using Acc = acc_type<scalar_t>;
      const scalar_t* ap = a.const_data_ptr<scalar_t>();
      const scalar_t* bp = b.const_data_ptr<scalar_t>();
      const Acc* lp = l.const_data_ptr<Acc>();
      scalar_t* op = out.data_ptr<scalar_t>();  // may alias ap
      Acc* dlp = dl.mutable_data_ptr<Acc>();
      std::vector<Acc> partial(static_cast<size_t>(blocks * w));
      const int64_t block_grain = std::max<int64_t>(1, row_grain(w) / kCpuRowsPerBlock);
      at::parallel_for(0, blocks, block_grain, [&](int64_t first, int64_t last) {
        for (int64_t blk = first; blk < last; ++blk) {
          Acc* sum = partial.data() + blk * w;
          for (int64_t j = 0; j < w; ++j) sum[j] = Acc(0);
          const int64_t row_end = std::min(m, (blk + 1) * kCpuRowsPerBlock);
          for (int64_t i = blk * kCpuRowsPerBlock; i < row_end; ++i) {
            const scalar_t* arow = ap + i * as0;
            const scalar_t* brow = bp + i * bs0;
            scalar_t* orow = op + i * w;
            if (as1 == 1 && bs1 == 1) {
              for (int64_t j = 0; j < w; ++j) {
                const Acc av = arow[j];
                sum[j] = reduce_term<Acc>(sum[j], av, brow[j]);
                orow[j] = static_cast<scalar_t>(scaled<Acc>(av, lp[j]));
              }
            } else {
              for (int64_t j = 0; j < w; ++j) {
                const Acc av = arow[j * as1];
                sum[j] = reduce_term<Acc>(sum[j], av, brow[j * bs1]);
                orow[j] = static_cast<scalar_t>(scaled<Acc>(av, lp[j]));
              }
            }
          }
        }
      });
      // Second stage: each column's partials in block order (deterministic).
      at::parallel_for(0, w, std::max<int64_t>(1, 4096 / std::max<int64_t>(blocks, 1)), [&](int64_t first, int64_t last) {
        for (int64_t j = first; j < last; ++j) {
          Acc total = 0;
          for (int64_t blk = 0; blk < blocks; ++blk) total += partial[blk * w + j];
          dlp[j] = total;
        }
      });
    });
  }
};

using CpuOps = Ops<CpuKernels>;

}  // namespace
}  // namespace ia3
}  // namespace peftkern

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("ia3_input_linear_fwd", &peftkern::ia3::CpuOps::input_fwd);
  m.impl("ia3_input_linear_bwd", &peftkern::ia3::CpuOps::input_bwd);
  m.impl("ia3_output_linear_fwd", &peftkern::ia3::CpuOps::output_fwd);
  m.impl("ia3_output_linear_bwd", &peftkern::ia3::CpuOps::output_bwd);
}
