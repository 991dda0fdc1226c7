// Grouped (mixed-adapter) kernels on CPU. See grouped_host.h for the ops, their checks and the
// adapter chunks (each call below handles one chunk of at most kMaxAdapters adapters).
//
// LoRA reads each adapter's own lora_A [r_g, K] and lora_B [N, r_g] (no stacked copies) and takes
// one of two paths, chosen per call from the rows per adapter:
// * few rows per adapter (decode batches: a token or a few per sequence): the CUDA algorithm,
//   row by row (at::parallel_for over rows): shrink xa = s·x[t]·A[g]ᵀ into a small Acc buffer,
//   then expand base[t] + B[g]·xa (a dot product of length r_g per output, along B's contiguous
//   rows), rounded once. No per-adapter ATen calls, whose fixed cost (~5 calls per adapter)
//   exceeds the arithmetic here.
// * many rows per adapter: rows are grouped with one stable counting sort (bucket 0 = rows to
//   copy, bucket l + 1 = the chunk's adapter l; each bucket's rows stay in ascending order; rows of
//   other chunks are left out). A bucket whose rows are one contiguous run is used as a slice of
//   x / base_out (a view, no gather); otherwise its rows are gathered with index_select and
//   scattered back with index_copy_. Per adapter, two ATen GEMMs (MKL / oneDNN, which parallelise
//   themselves): xa = s·x_g·A[g]ᵀ, then base_g + xa·B[g]ᵀ (addmm's beta=1 epilogue). Half /
//   bfloat16 operands (activations, and adapters when they are not float32) are widened to float32
//   first, so the sums accumulate in float32 and the result is rounded once (float64 throughout
//   for double).
//
// IA³: one pass, at::parallel_for over rows, the per-element math of grouped_math.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "grouped_host.h"
#include "grouped_math.h"

namespace peftkern {
namespace grouped {
namespace {

// Refuses any row adapter index outside [-1, adapters), naming the first offending row.
void check_row_adapter_values(const char* op, const int32_t* row_adapter, int64_t rows, int64_t adapters) {
  for (int64_t t = 0; t < rows; ++t) {
    const int32_t g = row_adapter[t];
    TORCH_CHECK(g == -1 || has_adapter(g, adapters), op, ": row_adapter[", t, "] = ", g, " is outside [-1, ",
                adapters, ") (-1 = no adapter, else an index into the ", adapters, " adapters)");
  }
}

// Rows per parallel task so that a task touches at least ~32K elements.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

// Below this many rows per adapter (averaged over the chunk's adapters that have rows), the
// row-by-row kernel; from it on, the per-adapter GEMMs. Measured on a 2-core CPU
// (bench/bench_grouped.py, 8 adapters, r=16, 1024->1024): the GEMM path's fixed cost is ~0.1 ms
// per adapter.
constexpr int64_t kMinRowsPerAdapterForGemm = 8;

// The row-by-row LoRA kernel over one chunk (see the file comment). Layouts: x, base_out any
// strides; the chunk's A [r_g, K] and B [N, r_g] contiguous, of dtype W; out contiguous [T, N].
// The shrink dot products use 8 partial sums (independent chains the compiler can vectorise);
// x's row is widened to Acc once.
template <typename T, typename W>
void lora_by_rows(const at::Tensor& base_out, const at::Tensor& x, const LoraChunk& chunk, const int32_t* ra,
                  at::Tensor& out) {
  using Acc = acc_type<T>;
  constexpr int64_t kLanes = 8;
  const int64_t rows = x.size(0), k = x.size(1), n = out.size(1);
  const int64_t count = chunk.count(), max_rank = chunk.max_rank();
  std::vector<const W*> a_of(static_cast<size_t>(count)), b_of(static_cast<size_t>(count));
  std::vector<int64_t> rank_of(static_cast<size_t>(count));
  for (int64_t l = 0; l < count; ++l) {
    a_of[l] = chunk.a[l].const_data_ptr<W>();
    b_of[l] = chunk.b[l].const_data_ptr<W>();
    rank_of[l] = chunk.rank(l);
  }
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), bs0 = base_out.stride(0), bs1 = base_out.stride(1);
  const T* xp = x.const_data_ptr<T>();
  const T* bp = base_out.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, rows, row_grain(max_rank * (k + n) + n), [&](int64_t first, int64_t last) {
    std::vector<Acc> x_row(static_cast<size_t>(k)), xa(static_cast<size_t>(max_rank));
    for (int64_t t = first; t < last; ++t) {
      const T* base_row = bp + t * bs0;
      T* out_row = op + t * n;
      const int32_t g = ra[t];
      const RowAction action = row_action(g, chunk.first, count, chunk.total);
      if (action == RowAction::kSkip) continue;  // another chunk's row
      if (action == RowAction::kCopyBase) {      // no adapter: the base output, exactly
        for (int64_t o = 0; o < n; ++o) out_row[o] = base_row[o * bs1];
        continue;
      }
      const int64_t l = g - chunk.first, rank = rank_of[l];
      const W* a = a_of[l];
      const W* b = b_of[l];
      const Acc s = static_cast<Acc>(chunk.scaling[l]);
      for (int64_t c = 0; c < k; ++c) x_row[c] = static_cast<Acc>(xp[t * xs0 + c * xs1]);
      for (int64_t j = 0; j < rank; ++j) {  // shrink: xa[j] = s·Σ_c x[c]·A[g][j, c]
        const W* a_row = a + j * k;
        Acc part[kLanes] = {};
        int64_t c = 0;
        for (; c + kLanes <= k; c += kLanes) {
          for (int64_t i = 0; i < kLanes; ++i) part[i] += x_row[c + i] * static_cast<Acc>(a_row[c + i]);
        }
        for (; c < k; ++c) part[0] += x_row[c] * static_cast<Acc>(a_row[c]);
        Acc sum = 0;
        for (int64_t i = 0; i < kLanes; ++i) sum += part[i];
        xa[j] = s * sum;
      }
      for (int64_t o = 0; o < n; ++o) {  // expand: base[o] + Σ_j xa[j]·B[g][o, j]
        const W* b_row = b + o * rank;
        Acc lora = 0;
        for (int64_t j = 0; j < rank; ++j) lora += xa[j] * static_cast<Acc>(b_row[j]);
        out_row[o] = lora_output<T, Acc>(base_row[o * bs1], lora);
      }
    }
  });
}

struct CpuKernels {
  static void lora(const at::Tensor& base_out, const at::Tensor& x, const LoraChunk& chunk,
                   const at::Tensor& row_adapter, at::Tensor& out) {
    constexpr const char* op = "lora_grouped_fwd";
    const int64_t rows = x.size(0), count = chunk.count();
    const int32_t* ra = row_adapter.const_data_ptr<int32_t>();
    if (chunk.first == 0) check_row_adapter_values(op, ra, rows, chunk.total);  // once, before anything is written

    // Stable counting sort of this chunk's rows: bucket b holds order[begin[b], begin[b + 1]);
    // b = 0: rows to copy, b = l + 1: rows of the chunk's adapter l; -1: not this chunk's row.
    auto bucket_of = [&](int64_t t) -> int64_t {
      switch (row_action(ra[t], chunk.first, count, chunk.total)) {
        case RowAction::kCopyBase: return 0;
        case RowAction::kAdapter: return ra[t] - chunk.first + 1;
        default: return -1;
      }
    };
    const int64_t buckets = count + 1;
    std::vector<int64_t> begin(static_cast<size_t>(buckets + 1), 0);
    for (int64_t t = 0; t < rows; ++t) {
      const int64_t b = bucket_of(t);
      if (b >= 0) ++begin[b + 1];  // counted into begin[b + 1], the prefix sum below makes it an offset
    }
    int64_t used = 0, adapter_rows = 0;  // adapters that have rows, and their rows
    for (int64_t b = 1; b < buckets; ++b) {
      used += begin[b + 1] > 0 ? 1 : 0;
      adapter_rows += begin[b + 1];
    }
    const at::ScalarType w_dtype = chunk.weight_dtype(x.scalar_type());
    if (adapter_rows < kMinRowsPerAdapterForGemm * used) {
      dispatch_lora_dtypes(x.scalar_type(), w_dtype, [&]<typename T, typename W>() {
        lora_by_rows<T, W>(base_out, x, chunk, ra, out);
      });
      return;
    }
    for (int64_t b = 0; b < buckets; ++b) begin[b + 1] += begin[b];
    at::Tensor order = at::empty({begin[buckets]}, x.options().dtype(at::kLong));
    int64_t* order_p = order.mutable_data_ptr<int64_t>();
    std::vector<int64_t> next(begin.begin(), begin.end() - 1);
    for (int64_t t = 0; t < rows; ++t) {
      const int64_t b = bucket_of(t);
      if (b >= 0) order_p[next[b]++] = t;
    }

    const auto acc = acc_dtype(x.scalar_type());
    for (int64_t b = 0; b < buckets; ++b) {
      const int64_t first = begin[b], size = begin[b + 1] - first;
      if (size == 0) continue;
      const int64_t* idx = order_p + first;
      // Ascending, distinct row numbers spanning exactly `size` rows: one contiguous run.
      const bool run = idx[size - 1] - idx[0] == size - 1;
      const at::Tensor index = order.narrow(0, first, size);
      auto rows_of = [&](const at::Tensor& m) { return run ? m.narrow(0, idx[0], size) : m.index_select(0, index); };

      at::Tensor result;
      if (b == 0) {
        result = rows_of(base_out);  // no adapter: the base output, exactly
      } else {
        const int64_t l = b - 1;
        at::Tensor xa = at::mm(rows_of(x).to(acc), chunk.a[l].to(acc).t());  // [size, r_g]
        xa.mul_(chunk.scaling[l]);
        result = at::addmm(rows_of(base_out).to(acc), xa, chunk.b[l].to(acc).t());  // base + s·xa·Bᵀ
      }
      if (run) {
        out.narrow(0, idx[0], size).copy_(result);  // rounds float32 -> x's dtype once
      } else {
        out.index_copy_(0, index, result.to(out.scalar_type()));
      }
    }
  }

  static void ia3(const at::Tensor& t, const at::Tensor& scales, const at::Tensor& row_adapter, at::Tensor& out) {
    const int64_t rows = t.size(0), width = t.size(1), adapters = scales.size(0);
    const int64_t s0 = t.stride(0), s1 = t.stride(1);
    const int32_t* ra = row_adapter.const_data_ptr<int32_t>();
    check_row_adapter_values("ia3_grouped_scale", ra, rows, adapters);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "ia3_grouped_scale", [&] {
      using Acc = acc_type<scalar_t>;
      const scalar_t* tp = t.const_data_ptr<scalar_t>();
      const Acc* sp = scales.const_data_ptr<Acc>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, row_grain(width), [&](int64_t first, int64_t last) {
        for (int64_t r = first; r < last; ++r) {
          const scalar_t* tr = tp + r * s0;
          scalar_t* orow = op + r * width;
          const int32_t g = ra[r];
          if (!has_adapter(g, adapters)) {  // no adapter: the row as it is
            for (int64_t f = 0; f < width; ++f) orow[f] = tr[f * s1];
            continue;
          }
          const Acc* srow = sp + g * width;
          if (s1 == 1) {  // separate loop so that the compiler vectorises it
            for (int64_t f = 0; f < width; ++f) orow[f] = ia3_scaled<scalar_t, Acc>(tr[f], srow[f]);
          } else {
            for (int64_t f = 0; f < width; ++f) orow[f] = ia3_scaled<scalar_t, Acc>(tr[f * s1], srow[f]);
          }
        }
      });
    });
  }
};

using CpuOps = Ops<CpuKernels>;

}  // namespace
}  // namespace grouped
}  // namespace peftkern

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("lora_grouped_fwd", &peftkern::grouped::CpuOps::lora_fwd);
  m.impl("ia3_grouped_scale", &peftkern::grouped::CpuOps::ia3_scale);
}
