// The bottleneck adapter op, device-independent part: checks, the GEMMs (ATen: MKL/oneDNN on
// CPU, cuBLAS on CUDA) and the order of work around them. The element-wise epilogues are our own
// kernels, supplied per device by an `Epilogues` policy (adapter_cpu.cpp, adapter_cuda.cu):
//
//   forward   pre = x·W_downᵀ            GEMM, written straight into the `pre` output
//             pre += b_down; a = act(pre) down epilogue: one pass, writes pre (kept for
//                                         backward) and a (a temporary, not saved)
//             out = a·W_upᵀ               GEMM, written straight into the `out` output
//             out = residual + s·(out + b_up)   up epilogue, in place
//   backward  g_a = g·W_up                GEMM
//             a = act(pre); g_pre = s·g_a ⊙ act'(pre)   one pass, recomputing act from pre
//             dW_up = s·gᵀ·a, db_up = s·Σ_rows g, dW_down = g_preᵀ·x, db_down = Σ_rows g_pre,
//             dx = g_pre·W_down (GEMMs and column sums: ATen),
//             d(scale) = scaling·(⟨W_up, gᵀ·a⟩ + ⟨b_up, Σ_rows g⟩): reuses gᵀ·a, no extra GEMM.
// with s = scaling · scale[0] (scale: an optional 1-element tensor, the learned scalar).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "../common/activations.h"
#include "../common/checks.h"
#include "../common/outputs.h"

namespace peftkern {
namespace adapter {

constexpr const char* kFwd = "adapter_bottleneck_fwd";
constexpr const char* kBwd = "adapter_bottleneck_bwd";

inline void check_shape(const at::Tensor& t, const char* op, const char* name, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " has shape ", t.sizes(), ", expected ", want);
}

// Validates x [M, d], w_down [m, d], w_up [d, m], b_up [d], scale (1 element) and the
// activation code; returns (M, d, m).
inline std::tuple<int64_t, int64_t, int64_t> check_common(const char* op, const at::Tensor& x,
                                                          const at::Tensor& w_down, const at::Tensor& w_up,
                                                          const at::Tensor& b_up,
                                                          const std::optional<at::Tensor>& scale,
                                                          int64_t activation) {
  check_dtype(x, op, "x", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [tokens, hidden], got shape ", x.sizes());
  TORCH_CHECK(w_down.dim() == 2, op, ": w_down must be 2-D [bottleneck, hidden], got shape ", w_down.sizes());
  const int64_t tokens = x.size(0), hidden = x.size(1), bottleneck = w_down.size(0);
  TORCH_CHECK(hidden > 0 && bottleneck > 0, op, ": hidden (", hidden, ") and bottleneck (", bottleneck,
              ") sizes must be positive");
  check_shape(w_down, op, "w_down", {bottleneck, hidden});
  check_shape(w_up, op, "w_up", {hidden, bottleneck});
  check_shape(b_up, op, "b_up", {hidden});
  check_like(w_down, op, "w_down", x);
  check_like(w_up, op, "w_up", x);
  check_like(b_up, op, "b_up", x);
  if (scale) {
    check_like(*scale, op, "scale", x);
    check_numel(*scale, op, "scale", 1);
  }
  TORCH_CHECK(activation >= 0 && activation < act::kNumKinds, op, ": activation code ", activation,
              " is not one of 0 (relu), 1 (gelu), 2 (gelu_tanh), 3 (silu)");
  return {tokens, hidden, bottleneck};
}

// Epilogues must provide (all tensors on the op's device, `pre`/`out`/`grad` contiguous):
//   down(pre [M, m] in/out, b_down [m], act_out [M, m], activation)
//   up(out [M, d] in/out, residual [M, d] any strides, b_up [d], scaling, scale)
//   backward(grad [M, m] in/out, pre [M, m], act_out [M, m], scaling, scale, activation)
template <typename Epilogues>
std::tuple<at::Tensor, at::Tensor> bottleneck_fwd(const at::Tensor& x, const at::Tensor& residual,
                                                  const at::Tensor& w_down, const at::Tensor& b_down,
                                                  const at::Tensor& w_up, const at::Tensor& b_up, double scaling,
                                                  const std::optional<at::Tensor>& scale, int64_t activation) {
  const auto [tokens, hidden, bottleneck] = check_common(kFwd, x, w_down, w_up, b_up, scale, activation);
  check_shape(residual, kFwd, "residual", {tokens, hidden});
  check_like(residual, kFwd, "residual", x);
  check_shape(b_down, kFwd, "b_down", {bottleneck});
  check_like(b_down, kFwd, "b_down", x);
  const at::Tensor bd = b_down.contiguous(), bu = b_up.contiguous();

  at::Tensor pre = new_output({tokens, bottleneck}, x.options());
  at::mm_out(pre, x, w_down.t());
  at::Tensor activated = new_output({tokens, bottleneck}, x.options());
  Epilogues::down(pre, bd, activated, activation);
  at::Tensor out = new_output({tokens, hidden}, x.options());
  at::mm_out(out, activated, w_up.t());
  Epilogues::up(out, residual, bu, scaling, scale);
  return {out, pre};
}

// -> (grad_x, grad_w_down, grad_b_down, grad_w_up, grad_b_up, grad_scale); grad_scale is empty
// ([0]) when there is no scale tensor. The residual's gradient is grad_out itself (Python).
template <typename Epilogues>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bottleneck_bwd(
    const at::Tensor& grad_out_in, const at::Tensor& x, const at::Tensor& pre, const at::Tensor& w_down,
    const at::Tensor& w_up, const at::Tensor& b_up, double scaling, const std::optional<at::Tensor>& scale,
    int64_t activation) {
  const auto [tokens, hidden, bottleneck] = check_common(kBwd, x, w_down, w_up, b_up, scale, activation);
  // grad_out feeds two GEMMs and a column sum; an expanded one (stride 0, e.g. from .sum()) would
  // be copied by each GEMM: copy it once (a no-op for the usual contiguous gradient)
  const at::Tensor grad_out = grad_out_in.contiguous();
  check_shape(grad_out, kBwd, "grad_out", {tokens, hidden});
  check_like(grad_out, kBwd, "grad_out", x);
  check_shape(pre, kBwd, "pre", {tokens, bottleneck});
  check_like(pre, kBwd, "pre", x);
  const at::Tensor pre_c = pre.contiguous();

  at::Tensor grad_pre = new_output({tokens, bottleneck}, x.options());
  at::mm_out(grad_pre, grad_out, w_up);  // g·W_up, turned into g_pre in place below
  at::Tensor activated = new_output({tokens, bottleneck}, x.options());
  Epilogues::backward(grad_pre, pre_c, activated, scaling, scale, activation);

  at::Tensor g_up = at::mm(grad_out.t(), activated);  // [d, m] = gᵀ·a (unscaled)
  at::Tensor col_sum = grad_out.sum(0);               // [d]
  at::Tensor grad_scale = at::empty({0}, x.options());
  if (scale) {  // d out / d scale = scaling·(a·W_upᵀ + b_up): summed against g without a GEMM
    at::Tensor dot = (w_up.to(at::kFloat) * g_up.to(at::kFloat)).sum() +
                     (b_up.to(at::kFloat) * col_sum.to(at::kFloat)).sum();
    grad_scale = (dot * scaling).to(x.scalar_type()).reshape(scale->sizes());
  }
  auto times_s = [&](at::Tensor t) { return scale ? t.mul_(*scale).mul_(scaling) : t.mul_(scaling); };
  at::Tensor grad_w_up = times_s(g_up);
  at::Tensor grad_b_up = times_s(col_sum);
  at::Tensor grad_b_down = grad_pre.sum(0);
  at::Tensor grad_w_down = at::mm(grad_pre.t(), x);
  at::Tensor grad_x = at::mm(grad_pre, w_down);
  return {grad_x, grad_w_down, grad_b_down, grad_w_up, grad_b_up, grad_scale};
}

}  // namespace adapter
}  // namespace peftkern
