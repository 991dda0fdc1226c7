// LoRA on a dense base: forward and hand-written backward.
//
//   out = x·Wᵀ + b + s·(xd·Aᵀ)·Bᵀ,   xd = x ⊙ m/(1−p)  (dropout; xd = x without it)
//
// Shapes: x [M, K], W [N, K] (any strides: a transposed view serves fan_in_fan_out bases),
// b [N], A [r, K], B [N, r]. Python flattens leading dims into M. The dropout decisions m are
// drawn from (seed, offset) by csrc/dropout/ and drawn again in backward: no mask exists.
//
// What this version fuses (the base GEMMs are the vendor BLAS — on CPU float32 oneDNN or MKL, the
// faster on this CPU (common/cpu_gemm.h), cuBLAS(Lt) on CUDA, ATen's choice otherwise; the rank-r products are
// csrc/rank_product/'s AVX-512 kernels on CPU float32, ATen's GEMMs elsewhere):
//   * the bias rides in the base GEMM's epilogue (addmm), the LoRA-B product is accumulated into
//     the same output buffer (no [M, N] temporary, no extra add);
//   * backward reads grad_out once for grad_xa and grad_B, and x once for grad_x's LoRA term and
//     grad_A (rank::out_grads, rank::input_grads_dropout_);
//   * forward's xa = xd·Aᵀ is `lora_dropout_project`: on CPU (AVX-512) one pass that draws the
//     decisions where it reads x, xd never written; elsewhere the dropout pass, then the GEMM;
//   * backward stores only x (an alias, no copy) and xa [M, r]; xd is one pass that
//     draws the decisions again, freed after the GEMM that reads it (no [M, K] saved);
//   * dx accumulates the LoRA term into the base term's buffer the same way.
// Not yet: one GEMM over W stacked with A (reads x once) and custom GEMM kernels with the
// dropout in their prologue: see DESIGN.md ("LoRA dropout without a mask").
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/checks.h"
#include "../common/cpu_gemm.h"
#include "../dropout/dropout_host.h"
#include "../rank_product/rank_product.h"

namespace peftkern {
namespace lora {
namespace {

constexpr const char* kFwd = "lora_linear_fwd";
constexpr const char* kBwd = "lora_linear_bwd";

// Validates shapes; returns (M, K, N, r).
std::tuple<int64_t, int64_t, int64_t, int64_t> check_lora_args(
    const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, double dropout_p) {
  check_dtype(x, op, "x", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [tokens, in_features], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && lora_a.dim() == 2 && lora_b.dim() == 2, op,
              ": weight, lora_a and lora_b must be 2-D");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0), r = lora_a.size(0);
  TORCH_CHECK(weight.size(1) == k, op, ": weight is ", weight.sizes(), " but x has ", k,
              " features (expected [out_features, ", k, "])");
  TORCH_CHECK(lora_a.size(1) == k, op, ": lora_a is ", lora_a.sizes(), ", expected [r, ", k, "]");
  TORCH_CHECK(lora_b.size(0) == n && lora_b.size(1) == r, op, ": lora_b is ", lora_b.sizes(),
              ", expected [", n, ", ", r, "]");
  check_like(weight, op, "weight", x);
  check_like(lora_a, op, "lora_a", x);
  check_like(lora_b, op, "lora_b", x);
  dropout::check_p(op, dropout_p);
  return {m, k, n, r};
}

// -> (out [M, N], xa [M, r]); xa is what backward needs besides x.
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   const at::Tensor& lora_a,
                                                   const at::Tensor& lora_b, double scaling,
                                                   double dropout_p, int64_t seed, int64_t offset) {
  const auto [m, k, n, r] = check_lora_args(kFwd, x, weight, lora_a, lora_b, dropout_p);
  if (bias) {
    check_like(*bias, kFwd, "bias", x);
    check_numel(*bias, kFwd, "bias", n);
  }
  at::Tensor out = cpu::linear(x, weight, bias);  // x·Wᵀ + b (oneDNN or ATen on CPU float32, common/cpu_gemm.h)
  at::Tensor xa = dropout::project(x, lora_a, dropout_p, seed, offset);  // dropout(x)·Aᵀ, xd never kept
  rank::add_expand_(out, xa, lora_b, scaling);  // out += s·xa·Bᵀ
  return {out, xa};
}

// -> (dx [M, K], dA [r, K], dB [N, r]) for grad_out [M, N]; W, b are frozen (no gradient).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd(
    const at::Tensor& grad_out_in, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& xa, double scaling,
    double dropout_p, int64_t seed, int64_t offset) {
  const auto [m, k, n, r] = check_lora_args(kBwd, x, weight, lora_a, lora_b, dropout_p);
  // grad_out feeds three GEMMs; an expanded one (stride 0, e.g. from .sum()) would be copied by
  // each of them: copy it once (a no-op for the usual contiguous gradient)
  const at::Tensor grad_out = grad_out_in.contiguous();
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == m && grad_out.size(1) == n, kBwd,
              ": grad_out is ", grad_out.sizes(), ", expected [", m, ", ", n, "]");
  check_like(grad_out, kBwd, "grad_out", x);
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == m && xa.size(1) == r, kBwd, ": xa is ", xa.sizes(),
              ", expected [", m, ", ", r, "]");
  // grad_xa = s·grad_out·B [M, r] and grad_B = s·grad_outᵀ·xa [N, r], one read of grad_out
  auto [grad_xa, grad_b] = rank::out_grads(grad_out, xa, lora_b, scaling);
  at::Tensor grad_x = cpu::linear(grad_out, weight.t(), std::nullopt);  // grad_out·W [M, K]
  // grad_x += (grad_xa·A) ⊙ m/(1−p) and grad_A = grad_xaᵀ·(x ⊙ m/(1−p)), the decisions m drawn again
  at::Tensor grad_a = rank::input_grads_dropout_(grad_x, x, grad_xa, lora_a, dropout_p, seed, offset);
  return {grad_x, grad_a, grad_b};
}

// ---- Autograd: the backward formula in C++ -------------------------------------------------------
// Registered for the Autograd key, so a training step runs no Python per LoRA layer beyond the
// module's own forward (a Python formula via torch.library.register_autograd cost ~70 µs more per
// layer, forward + backward, measured with 8-token calls: 130 vs 35 µs for the two ops alone).
// Forward and backward reach the ops through the dispatcher, never the kernels directly, so
// tracing (torch.compile, opcheck's fake tensors) sees ops it can record.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                  const at::Tensor&, const at::Tensor&, double, double, int64_t, int64_t);
using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                               double, double, int64_t, int64_t);
class LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                               const at::Tensor& lora_b, double scaling, double dropout_p, int64_t seed,
                               int64_t offset) {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("peftkern::lora_linear_fwd", "").typed<FwdSig>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, xa] = op.call(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, offset);
    ctx->save_for_backward({x, weight, lora_a, lora_b, xa});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->set_materialize_grads(false);  // xa is rarely used downstream: no zero gradient, no wasted GEMMs
    return {out, xa};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = c10::Dispatcher::singleton().findSchemaOrThrow("peftkern::lora_linear_bwd", "").typed<BwdSig>();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &lora_a = saved[2], &lora_b = saved[3], &xa = saved[4];
    const double scaling = ctx->saved_data["scaling"].toDouble(), p = ctx->saved_data["dropout_p"].toDouble();
    const int64_t seed = ctx->saved_data["seed"].toInt(), offset = ctx->saved_data["offset"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros({x.size(0), weight.size(0)}, x.options());
    at::Tensor grad_x, grad_a, grad_b;
    // Edges: x, weight, bias (when given), lora_a, lora_b. A frozen base (LoRA's case) gets none.
    if (ctx->needs_input_grad(0)) {
      std::tie(grad_x, grad_a, grad_b) = bwd.call(grad_out, x, weight, lora_a, lora_b, xa, scaling, p, seed, offset);
      if (grads[1].defined()) {
        // xa was used downstream too (unusual): its gradient goes through the same dropped
        // projection, grad_x += (grad_xa·A) ⊙ m/(1−p) and grad_A += grad_xaᵀ·dropout(x)
        grad_a = grad_a + rank::input_grads_op_(grad_x, x, grads[1].contiguous(), lora_a, p, seed, offset);
      }
    } else {
      // x needs no gradient (the first layer of a frozen base: its input comes from a frozen
      // embedding): skip the base GEMM grad_out·W. grad_A still needs dropout(x), so its pass runs
      // on a zero scratch gradient; the same kernels as lora_linear_bwd, so the same grad_A, grad_B.
      at::Tensor grad_xa;
      std::tie(grad_xa, grad_b) = rank::out_grads_op(grad_out.contiguous(), xa, lora_b, scaling);
      if (grads[1].defined()) grad_xa = grad_xa + grads[1];
      at::Tensor scratch = at::zeros({x.size(0), x.size(1)}, x.options());
      grad_a = rank::input_grads_op_(scratch, x, grad_xa.contiguous(), lora_a, p, seed, offset);
    }
    const at::Tensor grad_weight = ctx->needs_input_grad(1) ? grad_out.t().mm(x) : at::Tensor();
    const at::Tensor grad_bias = has_bias && ctx->needs_input_grad(2) ? grad_out.sum(0) : at::Tensor();
    return {grad_x, grad_weight, grad_bias, grad_a, grad_b, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias,
                                                            const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                            double scaling, double dropout_p, int64_t seed,
                                                            int64_t offset) {
  variable_list outs = LoraLinearFunction::apply(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, offset);
  return {outs[0], outs[1]};
}

}  // namespace
}  // namespace lora
}  // namespace peftkern

TORCH_LIBRARY_IMPL(peftkern, Autograd, m) { m.impl("lora_linear_fwd", &peftkern::lora::lora_linear_fwd_autograd); }

// The same ATen code serves both devices (its GEMMs dispatch to the device's BLAS), so it is
// registered for CPU and CUDA alike; a CPU-only build of peftkern still runs it on GPU tensors.
TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("lora_linear_fwd", &peftkern::lora::lora_linear_fwd);
  m.impl("lora_linear_bwd", &peftkern::lora::lora_linear_bwd);
}
TORCH_LIBRARY_IMPL(peftkern, CUDA, m) {
  m.impl("lora_linear_fwd", &peftkern::lora::lora_linear_fwd);
  m.impl("lora_linear_bwd", &peftkern::lora::lora_linear_bwd);
}
