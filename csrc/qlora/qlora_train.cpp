// The QLoRA layer's training step on CPU as one op, `nf4_lora_linear_train`, with its backward in
// C++ (Autograd key): the same ops and formulas as peftkern/ops/qlora.py's `_NF4LoraLinear` on its
// fused path, without a Python autograd.Function per layer (~100 µs a layer, forward + backward,
// measured at 8 tokens: 186 µs through the Function, 86 µs for its ops called bare).
//
//   forward:  xa = dropout(x)·Aᵀ                        lora_dropout_project (decisions from (seed, offset))
//             out = x·deq(W)ᵀ + b + s·xa·Bᵀ              nf4_lora_linear_fwd (W decoded tile by tile)
//   backward: grad_xa = s·grad_out·B, grad_B = s·grad_outᵀ·xa      lora_out_grads (one read of grad_out)
//             grad_x = grad_out·deq(W)                           nf4_lora_linear_bwd_input
//             grad_x += (grad_xa·A) ⊙ m/(1−p), grad_A = grad_xaᵀ·dropout(x)   lora_input_grads_
//             grad_b = Σ_tokens grad_out (a trainable bias only)
//
// Saved for backward: x (an alias), A, B, xa [M, r] and the NF4 weight's own tensors; no dense
// weight, no mask. Every op is reached through the dispatcher, so tracing (torch.compile,
// opcheck) records ops it has fakes for. When x needs no gradient (the first layer's input of a
// frozen base) the base term of grad_x (a whole decode and GEMM) is skipped; grad_A still needs
// the dropped x, so its pass runs on a zero scratch gradient.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../dropout/dropout_host.h"
#include "../rank_product/rank_product.h"

namespace peftkern {
namespace qlora {
namespace {

using OptTensor = std::optional<at::Tensor>;

using FwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                          const OptTensor&, int64_t, int64_t, int64_t, const OptTensor&, const OptTensor&,
                          const OptTensor&, double, int64_t);
using BwdInputSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                               const OptTensor&, const OptTensor&, int64_t, int64_t, int64_t, const OptTensor&,
                               const OptTensor&, int64_t);
using TrainSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const OptTensor&, const OptTensor&, const OptTensor&, int64_t,
                                                    int64_t, int64_t, const OptTensor&, const at::Tensor&,
                                                    const at::Tensor&, double, double, int64_t, int64_t);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The CPU kernel: the forward's two ops. x [M, K]; lora_a [r, K], lora_b [N, r] (r may be 0: a
// plain NF4 linear); the NF4 arguments as nf4_lora_linear_fwd takes them (it checks them).
std::tuple<at::Tensor, at::Tensor> nf4_lora_linear_train_cpu(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& nested_absmax,
    const OptTensor& nested_code, const OptTensor& nested_offset, int64_t blocksize, int64_t nested_blocksize,
    int64_t out_features, const OptTensor& bias, const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
    double dropout_p, int64_t seed, int64_t offset) {
  static const auto fwd = op_handle<FwdSig>("peftkern::nf4_lora_linear_fwd");
  at::Tensor xa = dropout::project(x, lora_a, dropout_p, seed, offset);  // [M, r], xd never written
  const bool has_lora = lora_a.size(0) > 0;
  at::Tensor out = fwd.call(x, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
                            out_features, bias, has_lora ? OptTensor(xa) : std::nullopt,
                            has_lora ? OptTensor(lora_b) : std::nullopt, scaling, 0);
  return {out, xa};
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class Nf4LoraLinearFunction : public torch::autograd::Function<Nf4LoraLinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                               const at::Tensor& absmax, const OptTensor& nested_absmax, const OptTensor& nested_code,
                               const OptTensor& nested_offset, int64_t blocksize, int64_t nested_blocksize,
                               int64_t out_features, const OptTensor& bias, const at::Tensor& lora_a,
                               const at::Tensor& lora_b, double scaling, double dropout_p, int64_t seed,
                               int64_t offset) {
    static const auto train = op_handle<TrainSig>("peftkern::nf4_lora_linear_train");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, xa] = train.call(x, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                                nested_blocksize, out_features, bias, lora_a, lora_b, scaling, dropout_p, seed, offset);
    const at::Tensor none;
    ctx->save_for_backward({x, lora_a, lora_b, xa, packed, absmax, nested_absmax.value_or(none),
                            nested_code.value_or(none), nested_offset.value_or(none)});
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["nested_blocksize"] = nested_blocksize;
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->set_materialize_grads(false);  // xa is rarely used downstream: no zero gradient for it
    return {out, xa};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd_input = op_handle<BwdInputSig>("peftkern::nf4_lora_linear_bwd_input");
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &lora_a = s[1], &lora_b = s[2], &xa = s[3], &packed = s[4], &absmax = s[5];
    const auto optional = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; };
    const double scaling = ctx->saved_data["scaling"].toDouble(), p = ctx->saved_data["dropout_p"].toDouble();
    const int64_t seed = ctx->saved_data["seed"].toInt(), offset = ctx->saved_data["offset"].toInt();
    const int64_t m = x.size(0), k = x.size(1), n = lora_b.size(0);
    // grad_out feeds three ops: an expanded one (stride 0, from .sum()) is copied once
    const at::Tensor grad_out = grads[0].defined() ? grads[0].contiguous() : at::zeros({m, n}, x.options());
    auto [grad_xa, grad_b] = rank::out_grads_op(grad_out, xa, lora_b, scaling);
    if (grads[1].defined()) grad_xa = grad_xa + grads[1];  // xa used downstream too: the same projection's gradient
    // Edges: x, packed, absmax, the three nested tensors (when given), bias (when given), A, B.
    const int64_t bias_edge = s[6].defined() ? 6 : 3;
    at::Tensor grad_x;
    if (ctx->needs_input_grad(0)) {
      grad_x = bwd_input.call(grad_out, packed, absmax, optional(s[6]), optional(s[7]), optional(s[8]),
                              ctx->saved_data["blocksize"].toInt(), ctx->saved_data["nested_blocksize"].toInt(), k,
                              std::nullopt, std::nullopt, 0);
    }
    at::Tensor scratch = grad_x.defined() ? grad_x : at::zeros({m, k}, x.options());
    const at::Tensor grad_a = rank::input_grads_op_(scratch, x, grad_xa, lora_a, p, seed, offset);
    const bool bias_grad = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(bias_edge);
    const at::Tensor grad_bias = bias_grad ? grad_out.sum(0) : at::Tensor();
    const at::Tensor none;
    return {grad_x, none, none, none, none, none, none, none, none, grad_bias, grad_a, grad_b, none, none, none, none};
  }
};

std::tuple<at::Tensor, at::Tensor> nf4_lora_linear_train_autograd(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& nested_absmax,
    const OptTensor& nested_code, const OptTensor& nested_offset, int64_t blocksize, int64_t nested_blocksize,
    int64_t out_features, const OptTensor& bias, const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
    double dropout_p, int64_t seed, int64_t offset) {
  variable_list outs = Nf4LoraLinearFunction::apply(x, packed, absmax, nested_absmax, nested_code, nested_offset,
                                                    blocksize, nested_blocksize, out_features, bias, lora_a, lora_b,
                                                    scaling, dropout_p, seed, offset);
  return {outs[0], outs[1]};
}

}  // namespace
}  // namespace qlora
}  // namespace peftkern

// CPU only, as the fused ops it calls (CUDA keeps dequantize + cuBLAS: DESIGN.md, QLoRA).
TORCH_LIBRARY_IMPL(peftkern, CPU, m) { m.impl("nf4_lora_linear_train", &peftkern::qlora::nf4_lora_linear_train_cpu); }
TORCH_LIBRARY_IMPL(peftkern, Autograd, m) {
  m.impl("nf4_lora_linear_train", &peftkern::qlora::nf4_lora_linear_train_autograd);
}
