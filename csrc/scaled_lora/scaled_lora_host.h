// Scaled LoRA on a dense base: host code shared by CPU and CUDA (checks, GEMMs through ATen, the
// calls into the device's fused kernels).
//
//   out = x·Wᵀ + b + s·((xd·Aᵀ ⊙ rank_scale)·Bᵀ) ⊙ out_scale,   xd = x ⊙ m/(1−p)
//
// m: LoRA dropout's keep decisions, drawn from (seed, offset) by csrc/dropout/ in forward and
// drawn again in backward (no mask exists; xd lives only for the GEMM that reads it).
//
// Shapes: x [M, K], W [N, K] (any strides: a transposed view serves fan_in_fan_out bases), b [N],
// A [r, K], B [N, r] (any strides: VeRA passes slices of its shared matrices), rank_scale with r
// elements and out_scale with N elements (any shape: AdaLoRA's E is [r, 1]), both optional and
// read in the accumulation dtype. LoRA is the case with neither scale; VeRA is rank_scale = λ_d,
// out_scale = λ_b over frozen A and B; AdaLoRA is rank_scale = E.
//
//   fwd: out = addmm(b, x, Wᵀ); xa = xd·Aᵀ (GEMM); u = xa ⊙ rank_scale (one pass over [M, r]);
//        with out_scale: v = u·Bᵀ (GEMM) and ONE epilogue pass out += s·v ⊙ out_scale in place;
//        without: out += s·u·Bᵀ by the GEMM's beta=1 epilogue (no [M, N] temporary).
//        Saved for backward: x (an alias) and xa [M, r]; u, v and xd are recomputed.
//   bwd: with out_scale, ONE pass over g: gs = g ⊙ out_scale and dλ_b = s·Σ_rows g ⊙ v (v
//        recomputed by one GEMM only when dλ_b is wanted); raw = gs·B (GEMM); with rank_scale,
//        ONE pass over raw: dxa = s·raw ⊙ rank_scale (in place) and dλ_d = s·Σ_rows raw ⊙ xa;
//        dB = s·gsᵀ·u, dA = dxaᵀ·xd (each only when asked: frozen A / B skip their GEMMs);
//        dx = g·W + (dxa·A) ⊙ m/(1−p) (one pass drawing m again).
//
// `Kernels` is the device's set of fused kernels (scaled_lora_cpu.cpp, scaled_lora_cuda.cu):
//   scale_columns(src [M, W], l [W] acc, alpha, out [M, W])   out = alpha·src ⊙ l (out may be src)
//   epilogue(out [M, W] in/out, v [M, W], scaling, l [W] acc)  out += scaling·v ⊙ l
//   scale_reduce(a [M, W], b [M, W], l [W] acc, out_alpha, sum_alpha, out [M, W], dl [W] acc)
//       out = out_alpha·a ⊙ l (out may be a) and dl = sum_alpha·Σ_rows a ⊙ b, deterministic
// every [M, W] operand contiguous.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "../common/accumulate.h"
#include "../common/checks.h"
#include "../common/outputs.h"
#include "../dropout/dropout_host.h"

namespace peftkern {
namespace scaled_lora {

struct Sizes {
  int64_t m, k, n, r;
};

inline Sizes check_args(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
                        const at::Tensor& lora_b, const std::optional<at::Tensor>& rank_scale,
                        const std::optional<at::Tensor>& out_scale) {
  check_dtype(x, op, "x", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [tokens, in_features], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && lora_a.dim() == 2 && lora_b.dim() == 2, op,
              ": weight, lora_a and lora_b must be 2-D");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0), r = lora_a.size(0);
  TORCH_CHECK(weight.size(1) == k, op, ": weight is ", weight.sizes(), " but x has ", k,
              " features (expected [out_features, ", k, "])");
  TORCH_CHECK(lora_a.size(1) == k, op, ": lora_a is ", lora_a.sizes(), ", expected [r, ", k, "]");
  TORCH_CHECK(lora_b.size(0) == n && lora_b.size(1) == r, op, ": lora_b is ", lora_b.sizes(), ", expected [", n,
              ", ", r, "]");
  check_like(weight, op, "weight", x);
  check_like(lora_a, op, "lora_a", x);
  check_like(lora_b, op, "lora_b", x);
  if (rank_scale) {
    check_dtype(*rank_scale, op, "rank_scale", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
    check_device(*rank_scale, op, "rank_scale", x, "x");
    check_numel(*rank_scale, op, "rank_scale", r);
  }
  if (out_scale) {
    check_dtype(*out_scale, op, "out_scale", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
    check_device(*out_scale, op, "out_scale", x, "x");
    check_numel(*out_scale, op, "out_scale", n);
  }
  return {m, k, n, r};
}

// A scale flattened, contiguous, in the accumulation dtype (a copy of r or N numbers at most).
inline at::Tensor scale_acc(const at::Tensor& scale, const at::Tensor& x) {
  return scale.reshape(-1).to(acc_dtype(x.scalar_type())).contiguous();
}

template <class Kernels>
struct Ops {
  static constexpr const char* kFwd = "scaled_lora_linear_fwd";
  static constexpr const char* kBwd = "scaled_lora_linear_bwd";

  // u = xa ⊙ rank_scale (a new [M, r] tensor), or xa itself without a rank scale.
  static at::Tensor rank_scaled(const at::Tensor& xa, const at::Tensor& rs_acc) {
    if (!rs_acc.defined()) return xa;
    at::Tensor u = new_output(xa.sizes(), xa.options());
    Kernels::scale_columns(xa, rs_acc, 1.0, u);
    return u;
  }

  // -> (out [M, N], xa = xd·Aᵀ [M, r]).
  static std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                const at::Tensor& lora_b, const std::optional<at::Tensor>& rank_scale,
                                                const std::optional<at::Tensor>& out_scale, double scaling,
                                                double dropout_p, int64_t seed, int64_t offset) {
    const Sizes s = check_args(kFwd, x, weight, lora_a, lora_b, rank_scale, out_scale);
    dropout::check_p(kFwd, dropout_p);
    if (bias) {
      check_like(*bias, kFwd, "bias", x);
      check_numel(*bias, kFwd, "bias", s.n);
    }
    at::Tensor out = bias ? at::addmm(bias->reshape(-1), x, weight.t()) : at::mm(x, weight.t());
    out = out.contiguous();  // a no-op for ATen's GEMM outputs; the epilogue writes it in place
    at::Tensor xa = dropout::project(x, lora_a, dropout_p, seed, offset).contiguous();
    const at::Tensor u = rank_scaled(xa, rank_scale ? scale_acc(*rank_scale, x) : at::Tensor());
    if (out_scale) {
      const at::Tensor v = at::mm(u, lora_b.t()).contiguous();
      Kernels::epilogue(out, v, scaling, scale_acc(*out_scale, x));
    } else {
      out.addmm_(u, lora_b.t(), /*beta=*/1, /*alpha=*/scaling);
    }
    return {out, xa};
  }

  // -> (dx [M, K], dA [r, K], dB [N, r], d rank_scale, d out_scale); output_mask says which of
  // dA, dB, d rank_scale, d out_scale to compute (the others are empty [0] tensors). The scale
  // gradients have their scale's shape and dtype.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
      const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
      const at::Tensor& lora_b, const at::Tensor& xa, const std::optional<at::Tensor>& rank_scale,
      const std::optional<at::Tensor>& out_scale, double scaling, double dropout_p,
      int64_t seed, int64_t offset, std::array<bool, 4> output_mask) {
    const Sizes s = check_args(kBwd, x, weight, lora_a, lora_b, rank_scale, out_scale);
    dropout::check_p(kBwd, dropout_p);
    TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == s.m && grad_out.size(1) == s.n, kBwd, ": grad_out is ",
                grad_out.sizes(), ", expected [", s.m, ", ", s.n, "]");
    check_like(grad_out, kBwd, "grad_out", x);
    TORCH_CHECK(xa.dim() == 2 && xa.size(0) == s.m && xa.size(1) == s.r, kBwd, ": xa is ", xa.sizes(), ", expected [",
                s.m, ", ", s.r, "]");
    check_like(xa, kBwd, "xa", x);
    const auto [need_a, need_b, need_rs, need_os] = output_mask;
    TORCH_CHECK(!need_rs || rank_scale, kBwd, ": output_mask asks for grad_rank_scale but there is no rank_scale");
    TORCH_CHECK(!need_os || out_scale, kBwd, ": output_mask asks for grad_out_scale but there is no out_scale");
    const auto none = [&] { return at::empty({0}, x.options()); };  // a fresh one per output: no aliasing
    const at::Tensor xa_c = xa.contiguous();
    const at::Tensor rs_acc = rank_scale ? scale_acc(*rank_scale, x) : at::Tensor();
    const at::Tensor u = rank_scaled(xa_c, rs_acc);  // recomputed: [M, r], cheap

    at::Tensor gs = grad_out;  // d(out)/d(v)/s
    at::Tensor grad_os = none();
    if (out_scale) {
      const at::Tensor g = grad_out.contiguous();
      const at::Tensor os_acc = scale_acc(*out_scale, x);
      gs = new_output({s.m, s.n}, x.options());
      if (need_os) {
        const at::Tensor v = at::mm(u, lora_b.t()).contiguous();
        at::Tensor dl = new_output({s.n}, x.options().dtype(acc_dtype(x.scalar_type())));
        Kernels::scale_reduce(g, v, os_acc, 1.0, scaling, gs, dl);
        grad_os = dl.to(out_scale->scalar_type()).view(out_scale->sizes());
      } else {
        Kernels::scale_columns(g, os_acc, 1.0, gs);
      }
    }
    at::Tensor grad_xa = at::mm(gs, lora_b).contiguous();  // [M, r]: raw, scaled in place below
    at::Tensor grad_rs = none();
    if (rank_scale) {
      if (need_rs) {
        at::Tensor dl = new_output({s.r}, x.options().dtype(acc_dtype(x.scalar_type())));
        Kernels::scale_reduce(grad_xa, xa_c, rs_acc, scaling, scaling, grad_xa, dl);
        grad_rs = dl.to(rank_scale->scalar_type()).view(rank_scale->sizes());
      } else {
        Kernels::scale_columns(grad_xa, rs_acc, scaling, grad_xa);
      }
    } else {
      grad_xa.mul_(scaling);
    }
    const at::Tensor grad_b = need_b ? at::mm(gs.t(), u).mul_(scaling) : none();
    at::Tensor grad_x = at::mm(grad_out, weight);
    at::Tensor xd = x;  // dropout(x), for grad_A
    if (dropout_p > 0.0) {  // one draw of m: grad_x += (grad_xa·A) ⊙ m/(1−p), and xd
      xd = dropout::backward_lora_grad(grad_x, at::mm(grad_xa, lora_a), x, dropout_p, seed, offset);
    } else {
      grad_x.addmm_(grad_xa, lora_a);
    }
    const at::Tensor grad_a = need_a ? at::mm(grad_xa.t(), xd) : none();
    return {grad_x, grad_a, grad_b, grad_rs, grad_os};
  }
};

}  // namespace scaled_lora
}  // namespace peftkern
