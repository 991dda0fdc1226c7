// Grouped (mixed-adapter) inference ops: host code shared by CPU and CUDA (argument checks,
// output allocation, the calls into the device's kernels). A batch holds rows of different
// adapters; row_adapter int32 [T] gives each row's adapter in [-1, G), -1 = none.
//
//   lora_grouped_fwd(base_out [T, N], x [T, K], lora_a [G, R, K], lora_b_t [G, R, N],
//                    scaling float32 [G], row_adapter) -> out [T, N]
//     out[t] = base_out[t] + scaling[g]·(x[t]·A[g]ᵀ)·B_t[g], g = row_adapter[t] >= 0; else base_out[t].
//   ia3_grouped_scale(t [T, F], scales [G, F] float32 (float64 for double t), row_adapter) -> out [T, F]
//     out[r] = t[r] ⊙ scales[g], g = row_adapter[r] >= 0; else t[r].
//
// Layouts: x, base_out and t may have any strides (the kernels read them through their strides;
// no copy). The adapter tensors, scaling and row_adapter are made contiguous here (a no-op for
// the usual stacked parameters). Outputs are new, contiguous, and every element is written.
//
// `Kernels` is the device's set (grouped_cpu.cpp, grouped_cuda.cu):
//   lora(base_out, x, lora_a, lora_b_t, scaling, row_adapter, out)   [T > 0 and N > 0]
//   ia3(t, scales, row_adapter, out)                                 [T > 0 and F > 0]
// Checking the row_adapter VALUES is the kernels' job: the CPU kernels refuse out-of-range
// values; on CUDA they are trusted (reading them would cost a device sync), with a device-side
// assert, and a value outside [-1, G) is never used as an index.
#pragma once

#include <ATen/ATen.h>

#include "../common/checks.h"
#include "../common/outputs.h"

namespace peftkern {
namespace grouped {

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_like(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " is ", t.scalar_type(), " but ", ref_name,
              " is ", ref.scalar_type(), " (cast them to one dtype first)");
  check_device(t, op, name, ref, ref_name);
}

// row_adapter: int32, 1-D, one entry per row, on `ref`'s device.
inline void check_row_adapter(const at::Tensor& row_adapter, const char* op, int64_t rows, const at::Tensor& ref,
                              const char* ref_name) {
  check_dtype(row_adapter, op, "row_adapter", {at::kInt});
  check_device(row_adapter, op, "row_adapter", ref, ref_name);
  TORCH_CHECK(row_adapter.dim() == 1 && row_adapter.size(0) == rows, op, ": row_adapter must be [", rows,
              "] (one adapter index per row of ", ref_name, "), got shape ", row_adapter.sizes());
}

template <class Kernels>
struct Ops {
  static at::Tensor lora_fwd(const at::Tensor& base_out, const at::Tensor& x, const at::Tensor& lora_a,
                             const at::Tensor& lora_b_t, const at::Tensor& scaling, const at::Tensor& row_adapter) {
    constexpr const char* op = "lora_grouped_fwd";
    check_dtype(x, op, "x", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
    TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [tokens, in_features], got shape ", x.sizes());
    TORCH_CHECK(base_out.dim() == 2 && base_out.size(0) == x.size(0), op, ": base_out must be [", x.size(0),
                ", out_features] (one row per row of x), got shape ", base_out.sizes());
    const int64_t rows = x.size(0), k = x.size(1), n = base_out.size(1);
    check_like(base_out, op, "base_out", x, "x");
    TORCH_CHECK(lora_a.dim() == 3 && lora_a.size(2) == k, op, ": lora_a must be [adapters, rank, ", k,
                "] (stacked lora_A weights), got shape ", lora_a.sizes());
    const int64_t adapters = lora_a.size(0), rank = lora_a.size(1);
    TORCH_CHECK(lora_b_t.dim() == 3 && lora_b_t.size(0) == adapters && lora_b_t.size(1) == rank &&
                    lora_b_t.size(2) == n,
                op, ": lora_b_t must be [", adapters, ", ", rank, ", ", n,
                "] (stacked, transposed lora_B weights, as lora_a's adapters and rank), got shape ",
                lora_b_t.sizes());
    check_like(lora_a, op, "lora_a", x, "x");
    check_like(lora_b_t, op, "lora_b_t", x, "x");
    check_dtype(scaling, op, "scaling", {at::kFloat});
    check_device(scaling, op, "scaling", x, "x");
    TORCH_CHECK(scaling.dim() == 1 && scaling.size(0) == adapters, op, ": scaling must be [", adapters,
                "] (one per adapter), got shape ", scaling.sizes());
    check_row_adapter(row_adapter, op, rows, x, "x");

    at::Tensor out = new_output({rows, n}, x.options());
    if (rows == 0 || n == 0) return out;  // nothing to write
    Kernels::lora(base_out, x, lora_a.contiguous(), lora_b_t.contiguous(), scaling.contiguous(),
                  row_adapter.contiguous(), out);
    return out;
  }

  static at::Tensor ia3_scale(const at::Tensor& t, const at::Tensor& scales, const at::Tensor& row_adapter) {
    constexpr const char* op = "ia3_grouped_scale";
    check_dtype(t, op, "t", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
    TORCH_CHECK(t.dim() == 2, op, ": t must be 2-D [tokens, features], got shape ", t.sizes());
    const int64_t rows = t.size(0), width = t.size(1);
    const auto acc = acc_dtype(t.scalar_type());
    TORCH_CHECK(scales.scalar_type() == acc, op, ": scales must be ", acc, " for ", t.scalar_type(),
                " t (the stacked IA³ vectors are read in the accumulation dtype), got ", scales.scalar_type());
    check_device(scales, op, "scales", t, "t");
    TORCH_CHECK(scales.dim() == 2 && scales.size(1) == width, op, ": scales must be [adapters, ", width,
                "] (one IA³ vector per adapter), got shape ", scales.sizes());
    check_row_adapter(row_adapter, op, rows, t, "t");

    at::Tensor out = new_output({rows, width}, t.options());
    if (rows == 0 || width == 0) return out;
    Kernels::ia3(t, scales.contiguous(), row_adapter.contiguous(), out);
    return out;
  }
};

}  // namespace grouped
}  // namespace peftkern
