// The float32 CPU GEMMs of our layers' frozen bases (LoRA on dense bases, QLoRA's dequantize +
// GEMM), y = x·wᵀ (+ bias), through the library that is faster on this CPU:
//   * oneDNN (PyTorch's own copy, reached through its op mkldnn::_linear_pointwise) on AMD CPUs,
//     where MKL, which ATen uses for float32 matmul, takes its generic code path: measured on a
//     Zen 5 EPYC (DESIGN.md "CPU GEMM library"), oneDNN ran the shapes of a LoRA / QLoRA training
//     step 1.3-2.6x faster than MKL;
//   * ATen (MKL) elsewhere, and always for other dtypes, devices, empty shapes, or a PyTorch
//     without that op.
// PEFTKERN_CPU_GEMM=aten|onednn forces one (the tests run both). Both accumulate in float32 (not
// bf16 or tf32: oneDNN follows torch.backends.mkldnn's fp32 precision, "ieee" by default); they
// sum in different orders, so results differ by float32 rounding.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace peftkern {
namespace cpu {

enum class GemmLibrary { kAten = 0, kOneDnn = 1 };

// The choice now: PEFTKERN_CPU_GEMM if set (checked at first use), else by CPU vendor.
GemmLibrary active_gemm();
// Forces one ("aten" or "onednn"; oneDNN only where PyTorch has the op).
void set_gemm(const std::string& name);
const char* gemm_name(GemmLibrary library);

// x [M, K], w [N, K] (any strides), bias [N] or none -> [M, N] contiguous.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);
// The same, written into `out` ([M, N], e.g. a column band of a wider output).
void linear_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);

}  // namespace cpu
}  // namespace peftkern
