// Grouped (mixed-adapter) inference ops: host code shared by CPU and CUDA (argument checks,
// output allocation, the split into adapter chunks, the calls into the device's kernels). A batch
// holds rows of different adapters; row_adapter int32 [T] gives each row's adapter in [-1, G),
// -1 = none.
//
//   lora_grouped_fwd(base_out [T, N], x [T, K], lora_a: G x [r_g, K], lora_b: G x [N, r_g],
//                    scaling: G doubles, row_adapter) -> out [T, N]
//     out[t] = base_out[t] + scaling[g]·(x[t]·A[g]ᵀ)·B[g]ᵀ, g = row_adapter[t] >= 0; else base_out[t].
//   ia3_grouped_scale(t [T, F], scales [G, F] float32 (float64 for double t), row_adapter) -> out [T, F]
//     out[r] = t[r] ⊙ scales[g], g = row_adapter[r] >= 0; else t[r].
//
// LoRA adapters come as lists, each adapter's own lora_A / lora_B weights as nn.Linear holds them
// (no stacking, no transpose, no padding: each its own rank r_g, 0 allowed). Their dtype W is one
// for all of them, either x's dtype or float32 (PEFT keeps adapters in float32 on a half model);
// the kernels read W and accumulate in float32 (float64 for double x).
//
// Layouts: x, base_out and t may have any strides (the kernels read them through their strides;
// no copy). Adapter tensors are made contiguous here (a no-op for nn.Linear weights, a copy for a
// strided view); scales and row_adapter likewise. Outputs are new, contiguous, and every element
// is written exactly once.
//
// Adapter chunks: a CUDA launch takes the adapters' pointers, ranks and scalings by value in a
// kernel-argument struct of kMaxAdapters entries, so lora_fwd calls the kernels once per chunk of
// at most kMaxAdapters adapters (CPU too: one code path, tested here). A chunk computes the rows
// of its own adapters, out[t] = base_out[t] + its term, reading base_out (never out), and the
// first chunk also copies the rows without an adapter; rows of other chunks are left alone. Every
// row has one adapter, so it is written by exactly one chunk and rounded once: G > kMaxAdapters
// costs extra launches (and passes over row_adapter) but no extra rounding.
//
// `Kernels` is the device's set (grouped_cpu.cpp, grouped_cuda.cu):
//   lora(base_out, x, chunk, row_adapter, out)   [T > 0 and N > 0; once per chunk, chunk.first ascending]
//   ia3(t, scales, row_adapter, out)             [T > 0 and F > 0]
// Checking the row_adapter VALUES is the kernels' job: the CPU kernels refuse out-of-range
// values; on CUDA they are trusted (reading them would cost a device sync), with a device-side
// assert, and a value outside [-1, G) is never used as an index.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "../common/accumulate.h"
#include "../common/checks.h"
#include "../common/outputs.h"

namespace peftkern {
namespace grouped {

// Adapters per kernel call (the CUDA kernel-argument struct's capacity; see grouped_cuda.cu).
constexpr int64_t kMaxAdapters = 32;

// One kernel call's adapters: global indices [first, first + count) of the op's `total` adapters.
// a[l], b[l] (l = g - first) are contiguous [r_g, K] and [N, r_g] tensors of the adapter dtype.
struct LoraChunk {
  at::TensorList a;
  at::TensorList b;
  c10::ArrayRef<double> scaling;
  int64_t first = 0;
  int64_t total = 0;

  int64_t count() const { return static_cast<int64_t>(a.size()); }
  int64_t rank(int64_t l) const { return a[l].size(0); }
  int64_t max_rank() const {
    int64_t r = 0;
    for (int64_t l = 0; l < count(); ++l) r = std::max(r, rank(l));
    return r;
  }
  // The adapter dtype W (x's dtype when the chunk is empty: nothing is read then).
  at::ScalarType weight_dtype(at::ScalarType x_dtype) const { return a.empty() ? x_dtype : a[0].scalar_type(); }
};

// row_adapter: int32, 1-D, one entry per row, on `ref`'s device.
inline void check_row_adapter(const at::Tensor& row_adapter, const char* op, int64_t rows, const at::Tensor& ref,
                              const char* ref_name) {
  check_dtype(row_adapter, op, "row_adapter", {at::kInt});
  check_device(row_adapter, op, "row_adapter", ref, ref_name);
  TORCH_CHECK(row_adapter.dim() == 1 && row_adapter.size(0) == rows, op, ": row_adapter must be [", rows,
              "] (one adapter index per row of ", ref_name, "), got shape ", row_adapter.sizes());
}

// The adapter lists: one lora_A [r_g, K] and lora_B [N, r_g] per adapter, all of one dtype W
// (x's or float32), on x's device. Returns W.
inline at::ScalarType check_lora_adapters(const char* op, at::TensorList lora_a, at::TensorList lora_b,
                                          c10::ArrayRef<double> scaling, const at::Tensor& x, int64_t k, int64_t n) {
  TORCH_CHECK(lora_b.size() == lora_a.size() && scaling.size() == lora_a.size(), op, ": lora_a has ", lora_a.size(),
              " tensors, lora_b ", lora_b.size(), " and scaling ", scaling.size(), " values (one each per adapter)");
  if (lora_a.empty()) return x.scalar_type();
  const at::ScalarType w = lora_a[0].scalar_type();
  TORCH_CHECK(w == x.scalar_type() || w == at::kFloat, op, ": the adapter weights are ", w, " but x is ",
              x.scalar_type(), " (adapters must be x's dtype or float32)");
  for (size_t g = 0; g < lora_a.size(); ++g) {
    const at::Tensor& a = lora_a[g];
    const at::Tensor& b = lora_b[g];
    TORCH_CHECK(a.dim() == 2 && a.size(1) == k, op, ": lora_a[", g, "] must be [rank, ", k,
                "] (adapter ", g, "'s lora_A weight), got shape ", a.sizes());
    const int64_t rank = a.size(0);
    TORCH_CHECK(b.dim() == 2 && b.size(0) == n && b.size(1) == rank, op, ": lora_b[", g, "] must be [", n, ", ",
                rank, "] (adapter ", g, "'s lora_B weight, its rank as lora_a[", g, "]), got shape ", b.sizes());
    TORCH_CHECK(a.scalar_type() == w && b.scalar_type() == w, op, ": lora_a[", g, "] is ", a.scalar_type(),
                " and lora_b[", g, "] is ", b.scalar_type(), " but lora_a[0] is ", w,
                " (all adapter weights must share one dtype)");
    TORCH_CHECK(a.device() == x.device() && b.device() == x.device(), op, ": adapter ", g, "'s weights are on ",
                a.device(), " / ", b.device(), " but x is on ", x.device());
  }
  return w;
}

template <class Kernels>
struct Ops {
  static at::Tensor lora_fwd(const at::Tensor& base_out, const at::Tensor& x, at::TensorList lora_a,
                             at::TensorList lora_b, c10::ArrayRef<double> scaling, const at::Tensor& row_adapter) {
    constexpr const char* op = "lora_grouped_fwd";
    check_dtype(x, op, "x", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
    TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [tokens, in_features], got shape ", x.sizes());
    TORCH_CHECK(base_out.dim() == 2 && base_out.size(0) == x.size(0), op, ": base_out must be [", x.size(0),
                ", out_features] (one row per row of x), got shape ", base_out.sizes());
    const int64_t rows = x.size(0), k = x.size(1), n = base_out.size(1);
    check_like(base_out, op, "base_out", x, "x");
    check_lora_adapters(op, lora_a, lora_b, scaling, x, k, n);
    check_row_adapter(row_adapter, op, rows, x, "x");

    at::Tensor out = new_output({rows, n}, x.options());
    if (rows == 0 || n == 0) return out;  // nothing to write
    const int64_t adapters = static_cast<int64_t>(lora_a.size());
    std::vector<at::Tensor> a, b;
    a.reserve(lora_a.size());
    b.reserve(lora_b.size());
    for (size_t g = 0; g < lora_a.size(); ++g) {
      a.push_back(lora_a[g].contiguous());
      b.push_back(lora_b[g].contiguous());
    }
    const at::Tensor ra = row_adapter.contiguous();
    // At least one call, even for G = 0: the first chunk writes the rows without an adapter.
    int64_t first = 0;
    do {
      const int64_t count = std::min(kMaxAdapters, adapters - first);
      const LoraChunk chunk{at::TensorList(a).slice(first, count), at::TensorList(b).slice(first, count),
                            scaling.slice(first, count), first, adapters};
      Kernels::lora(base_out, x, chunk, ra, out);
      first += count;
    } while (first < adapters);
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

// Calls f.template operator()<T, W>() for x's dtype T (float, half, bfloat16, double) and the
// adapter dtype W (T, or float): the seven (T, W) pairs the LoRA kernels are compiled for.
template <class F>
void dispatch_lora_dtypes(at::ScalarType x_dtype, at::ScalarType w_dtype, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_dtype, "lora_grouped_fwd", [&] {
    if (w_dtype == x_dtype) {
      f.template operator()<scalar_t, scalar_t>();
    } else {
      TORCH_CHECK(w_dtype == at::kFloat, "lora_grouped_fwd: adapter dtype ", w_dtype, " is neither ", x_dtype,
                  " nor float32");
      f.template operator()<scalar_t, float>();
    }
  });
}

}  // namespace grouped
}  // namespace peftkern
