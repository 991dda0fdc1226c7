// IA³ on a linear base: host code shared by CPU and CUDA (checks, GEMMs through ATen, the
// calls into the device's fused kernels). Shapes: x [M, K], weight [N, K] (any strides: a
// transposed view serves fan_in_fan_out bases), bias [N], ia3_l with K elements (input scaling)
// or N elements (output scaling), any shape ([1, K] / [N, 1] in PEFT).
//
//   input scaling  (feedforward): out = (x ⊙ l)·Wᵀ + b
//     fwd: prologue kernel xs = x ⊙ l (one pass, reads strided x), then addmm.
//     bwd: g = dy·W (GEMM), then ONE kernel reading g and x: dx = g ⊙ l (in place in g) and
//          dl = Σ_rows x ⊙ g. No second base GEMM.
//   output scaling (attention k/v): out = (x·Wᵀ + b) ⊙ l
//     fwd: mm, then ONE epilogue kernel: pre = acc + b (in place, in the GEMM's buffer) and
//          out = pre ⊙ l. pre is returned and saved for backward.
//     bwd: ONE kernel reading dy and pre: gs = dy ⊙ l and dl = Σ_rows dy ⊙ pre; dx = gs·W.
// Both backwards are the same kernel, `scale_reduce(a, b, l) -> (a ⊙ l, Σ_rows a ⊙ b)`.
//
// `Kernels` is the device's set of fused kernels (ia3_cpu.cpp, ia3_cuda.cu), each taking:
//   scale_columns(x [M, W] strided, l [W] acc, out [M, W] contiguous)
//   bias_scale(acc [M, W] contiguous, in/out, bias [W] contiguous or undefined, l, out)
//   scale_reduce(a [M, W] strided, b [M, W] strided, l, out [M, W] contiguous (may be a
//                itself), dl [W] acc dtype)
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "../common/accumulate.h"
#include "../common/checks.h"
#include "../common/outputs.h"

namespace peftkern {
namespace ia3 {

// Validates x [M, K], weight [N, K], ia3_l (`scaled` elements: K or N); returns (M, K, N).
inline std::tuple<int64_t, int64_t, int64_t> check_args(const char* op, const at::Tensor& x,
                                                         const at::Tensor& weight,
                                                         const at::Tensor& ia3_l,
                                                         bool scale_input) {
  check_dtype(x, op, "x", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [tokens, in_features], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out_features, in_features], got shape ",
              weight.sizes());
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(weight.size(1) == k, op, ": weight is ", weight.sizes(), " but x has ", k,
              " features (expected [out_features, ", k, "])");
  check_like(weight, op, "weight", x);
  check_dtype(ia3_l, op, "ia3_l", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  check_device(ia3_l, op, "ia3_l", x, "x");
  check_numel(ia3_l, op, "ia3_l", scale_input ? k : n);
  return {m, k, n};
}

// l flattened, contiguous, in the accumulation dtype (a copy of K or N numbers at most).
inline at::Tensor l_acc(const at::Tensor& ia3_l, const at::Tensor& x) {
  return ia3_l.reshape(-1).to(acc_dtype(x.scalar_type())).contiguous();
}

inline void check_grad(const char* op, const char* name, const at::Tensor& t, int64_t m,
                       int64_t n, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == m && t.size(1) == n, op, ": ", name, " is ", t.sizes(),
              ", expected [", m, ", ", n, "]");
  check_like(t, op, name, x);
}

template <class Kernels>
struct Ops {
  // out = (x ⊙ l)·Wᵀ + b.
  static at::Tensor input_fwd(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& ia3_l) {
    constexpr const char* op = "ia3_input_linear_fwd";
    const auto [m, k, n] = check_args(op, x, weight, ia3_l, /*scale_input=*/true);
    if (bias) {
      check_like(*bias, op, "bias", x);
      check_numel(*bias, op, "bias", n);
    }
    at::Tensor xs = new_output({m, k}, x.options());
    Kernels::scale_columns(x, l_acc(ia3_l, x), xs);
    return bias ? at::addmm(bias->reshape(-1), xs, weight.t()) : at::mm(xs, weight.t());
  }

  // -> (dx [M, K], dl like ia3_l).
  static std::tuple<at::Tensor, at::Tensor> input_bwd(const at::Tensor& grad_out,
                                                      const at::Tensor& x,
                                                      const at::Tensor& weight,
                                                      const at::Tensor& ia3_l) {
    constexpr const char* op = "ia3_input_linear_bwd";
    const auto [m, k, n] = check_args(op, x, weight, ia3_l, /*scale_input=*/true);
    check_grad(op, "grad_out", grad_out, m, n, x);
    at::Tensor g = at::mm(grad_out, weight);  // [M, K] = d(out)/d(x ⊙ l); ours, so dx overwrites it
    at::Tensor dl = new_output({k}, x.options().dtype(acc_dtype(x.scalar_type())));
    Kernels::scale_reduce(g, x, l_acc(ia3_l, x), g, dl);
    return {g, dl.to(ia3_l.scalar_type()).view(ia3_l.sizes())};
  }

  // -> (out = (x·Wᵀ + b) ⊙ l, pre = x·Wᵀ + b), both [M, N].
  static std::tuple<at::Tensor, at::Tensor> output_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& ia3_l) {
    constexpr const char* op = "ia3_output_linear_fwd";
    const auto [m, k, n] = check_args(op, x, weight, ia3_l, /*scale_input=*/false);
    at::Tensor bias_c;
    if (bias) {
      check_like(*bias, op, "bias", x);
      check_numel(*bias, op, "bias", n);
      bias_c = bias->reshape(-1).contiguous();
    }
    at::Tensor pre = at::mm(x, weight.t());  // contiguous [M, N]; the epilogue adds b in place
    at::Tensor out = new_output({m, n}, x.options());
    Kernels::bias_scale(pre, bias_c, l_acc(ia3_l, x), out);
    return {out, pre};
  }

  // -> (dx [M, K], dl like ia3_l), from the saved pre-scale output `pre` [M, N].
  static std::tuple<at::Tensor, at::Tensor> output_bwd(const at::Tensor& grad_out,
                                                       const at::Tensor& pre,
                                                       const at::Tensor& weight,
                                                       const at::Tensor& ia3_l) {
    constexpr const char* op = "ia3_output_linear_bwd";
    // grad_out plays x's part in the checks (the dtype and device every tensor must share).
    check_dtype(grad_out, op, "grad_out", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
    TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D, got shape ", weight.sizes());
    TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(1) == weight.size(0), op, ": grad_out is ",
                grad_out.sizes(), ", expected [tokens, ", weight.size(0), "]");
    const int64_t m = grad_out.size(0), n = weight.size(0);
    check_like(weight, op, "weight", grad_out, "grad_out");
    check_grad(op, "pre", pre, m, n, grad_out);
    check_dtype(ia3_l, op, "ia3_l", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
    check_device(ia3_l, op, "ia3_l", grad_out, "grad_out");
    check_numel(ia3_l, op, "ia3_l", n);
    at::Tensor gs = new_output({m, n}, grad_out.options());
    at::Tensor dl = new_output({n}, grad_out.options().dtype(acc_dtype(grad_out.scalar_type())));
    Kernels::scale_reduce(grad_out, pre, l_acc(ia3_l, grad_out), gs, dl);
    return {at::mm(gs, weight), dl.to(ia3_l.scalar_type()).view(ia3_l.sizes())};
  }
};

}  // namespace ia3
}  // namespace peftkern
