"""IA³ op family: the plain-PyTorch reference (the spec), fakes, the autograd formulas of the
compiled ops (their backwards are themselves ops) and the wrappers `ia3_linear` (dense base) and
`nf4_ia3_linear` (NF4 base) that layers call.

    input scaling  (PEFT's feedforward modules): out = (x ⊙ l)·Wᵀ + b
    output scaling (every other target):         out = (x·Wᵀ + b) ⊙ l

l is read in float32 (float64 for float64 x) whatever its dtype and every product is rounded
once to x's dtype, as PEFT's `(x.to(l.dtype) * l).to(x.dtype)` does for its float32 vectors.

What backward keeps:
- input scaling: x (an alias of the layer input) and l; g = dy·W is recomputed by one GEMM, and
  one fused kernel turns it into dx = g ⊙ l while reducing dl = Σ_rows x ⊙ g.
- output scaling: pre = x·Wᵀ + b ([tokens, out], in x's dtype) and l, NOT x: dl = Σ_rows dy ⊙ pre
  needs pre, and dx = (dy ⊙ l)·W needs neither. Recomputing pre instead would cost a second base
  GEMM per backward (+50% of the layer's FLOPs) and need x [tokens, in] saved instead, which is
  at least as large for PEFT's output-scaled targets (k/v projections: out ≤ in, 4-8x smaller
  under GQA). So saving pre is cheaper in both memory and compute. x is saved too only if the
  base weight itself requires grad (not in IA³ training).
NF4 bases: the weight is dequantized into a temporary per call, and again in backward (never
kept between them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from . import routing
from .common import acc_dtype, autocast_inputs

_FWD = {True: "ia3_input_linear_fwd", False: "ia3_output_linear_fwd"}

# --------------------------------------------------------------------------------------------
# Reference: the spec (autograd through plain PyTorch ops gives its gradients).
# --------------------------------------------------------------------------------------------


def ia3_linear_reference(x, weight, bias, ia3_l, scale_input: bool) -> torch.Tensor:
    """x [..., in], weight [out, in], ia3_l with `in` (scale_input) or `out` elements."""
    acc, l = acc_dtype(x.dtype), ia3_l.reshape(-1)
    if scale_input:
        return F.linear((x.to(acc) * l.to(acc)).to(x.dtype), weight, bias)
    return (F.linear(x, weight, bias).to(acc) * l.to(acc)).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Fakes and autograd for the compiled ops.
# --------------------------------------------------------------------------------------------


@_ext.register_fake("ia3_input_linear_fwd")
def _(x, weight, bias, ia3_l):
    return x.new_empty((x.shape[0], weight.shape[0]))


@_ext.register_fake("ia3_input_linear_bwd")
def _(grad_out, x, weight, ia3_l):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(ia3_l)


@_ext.register_fake("ia3_output_linear_fwd")
def _(x, weight, bias, ia3_l):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@_ext.register_fake("ia3_output_linear_bwd")
def _(grad_out, pre, weight, ia3_l):
    return grad_out.new_empty((grad_out.shape[0], weight.shape[1])), torch.empty_like(ia3_l)


def _base_needs_grad(weight, bias) -> bool:
    return weight.requires_grad or (bias is not None and bias.requires_grad)


def _input_setup(ctx, inputs, output):
    x, weight, bias, ia3_l = inputs
    ctx.save_for_backward(x, weight, ia3_l)
    ctx.has_bias = bias is not None


def _input_backward(ctx, grad_out):
    x, weight, ia3_l = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x, grad_l = torch.ops.peftkern.ia3_input_linear_bwd(grad_out, x, weight, ia3_l)
    grad_weight = grad_out.t() @ ia3_linear_scaled_input(x, ia3_l) if needs[1] else None
    grad_bias = grad_out.sum(0) if ctx.has_bias and needs[2] else None
    return grad_x, grad_weight, grad_bias, grad_l


def ia3_linear_scaled_input(x, ia3_l):
    """x ⊙ l rounded to x's dtype (what the input-side prologue feeds the GEMM)."""
    return (x.to(acc_dtype(x.dtype)) * ia3_l.reshape(-1).to(acc_dtype(x.dtype))).to(x.dtype)


def _output_setup(ctx, inputs, output):
    x, weight, bias, ia3_l = inputs
    keep_x = _base_needs_grad(weight, bias)  # only then is x needed (grad of W)
    # pre is an output only so that backward can read it; unused downstream, its gradient must
    # arrive as None, not as a materialized zero tensor (which would cost an extra [M, N]·W GEMM).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], weight, ia3_l, x if keep_x else None)
    ctx.has_bias = bias is not None


def _output_backward(ctx, grad_out, grad_pre):
    pre, weight, ia3_l, x = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if grad_out is None:
        grad_out = torch.zeros_like(pre)
    grad_x, grad_l = torch.ops.peftkern.ia3_output_linear_bwd(grad_out, pre, weight, ia3_l)
    scaled_grad = None
    if needs[1] or (ctx.has_bias and needs[2]):
        scaled_grad = (grad_out.to(acc_dtype(pre.dtype)) * ia3_l.reshape(-1).to(acc_dtype(pre.dtype))).to(pre.dtype)
        if grad_pre is not None:
            scaled_grad = scaled_grad + grad_pre
    if grad_pre is not None:  # pre was used downstream too (unusual): chain its gradient
        grad_x = grad_x + grad_pre @ weight
    grad_weight = scaled_grad.t() @ x if needs[1] else None
    grad_bias = scaled_grad.sum(0) if ctx.has_bias and needs[2] else None
    return grad_x, grad_weight, grad_bias, grad_l


if _ext.op_exists("ia3_input_linear_fwd"):
    torch.library.register_autograd("peftkern::ia3_input_linear_fwd", _input_backward, setup_context=_input_setup)
    torch.library.register_autograd("peftkern::ia3_output_linear_fwd", _output_backward, setup_context=_output_setup)


# --------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------


def _check(op: str, x, in_features: int, out_features: int, ia3_l, scale_input: bool) -> None:
    if not isinstance(ia3_l, torch.Tensor) or not ia3_l.is_floating_point():
        raise TypeError(f"{op}: ia3_l must be a floating-point tensor, got {getattr(ia3_l, 'dtype', type(ia3_l))}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}, expected [..., {in_features}]")
    expected = in_features if scale_input else out_features
    if ia3_l.numel() != expected:
        side = "input (feedforward)" if scale_input else "output"
        raise ValueError(f"{op}: ia3_l has {ia3_l.numel()} elements, expected {expected} for {side} scaling")
    if ia3_l.device != x.device:
        raise ValueError(f"{op}: ia3_l is on {ia3_l.device} but x is on {x.device}")


def ia3_linear(x, weight, bias, ia3_l, scale_input: bool, fan_in_fan_out: bool = False) -> torch.Tensor:
    """IA³ over a dense base, any leading dims of x: `(x ⊙ l)·Wᵀ + b` when `scale_input`, else
    `(x·Wᵀ + b) ⊙ l`. weight is [out, in] ([in, out] with fan_in_fan_out, GPT-2's Conv1D)."""
    if fan_in_fan_out:
        weight = weight.t()
    _check("ia3_linear", x, weight.shape[1], weight.shape[0], ia3_l, scale_input)
    # l keeps its dtype under autocast (PEFT multiplies by it outside the autocast list)
    x, weight, bias = autocast_inputs(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if _ext.has_kernel(_FWD[scale_input], x.device.type) and routing.use_kernel("ia3", x2.shape[0], x.device.type):
        op = getattr(torch.ops.peftkern, _FWD[scale_input])
        out = op(x2, weight, bias, ia3_l)
        out = out if scale_input else out[0]
    else:  # no kernel here, or too few tokens for it to pay (ops/routing.py)
        out = ia3_linear_reference(x2, weight, bias, ia3_l, scale_input)
    return out.view(*x.shape[:-1], out.shape[-1])


class _NF4IA3Linear(torch.autograd.Function):
    """ia3_linear over an NF4 base: the dequantized weight lives only inside forward and inside
    backward (recomputed there). Saved: x (input scaling) or pre (output scaling), and l."""

    @staticmethod
    def forward(ctx, x, bias, ia3_l, weight, scale_input):
        dense = weight.dequantize(x.dtype)
        saved = None
        if _ext.has_kernel(_FWD[scale_input], x.device.type):
            if scale_input:
                out = torch.ops.peftkern.ia3_input_linear_fwd(x, dense, bias, ia3_l)
                saved = x
            else:
                out, saved = torch.ops.peftkern.ia3_output_linear_fwd(x, dense, bias, ia3_l)
            ctx.kernel = True
        else:  # no compiled kernel: the reference, backward by autograd through it (below)
            out, saved, ctx.kernel = ia3_linear_reference(x, dense, bias, ia3_l, scale_input), x, False
        ctx.save_for_backward(saved, ia3_l)
        ctx.weight, ctx.scale_input, ctx.has_bias = weight, scale_input, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved, ia3_l = ctx.saved_tensors
        dense = ctx.weight.dequantize(grad_out.dtype)  # recomputed, not stored
        if ctx.kernel:
            op = torch.ops.peftkern.ia3_input_linear_bwd if ctx.scale_input else torch.ops.peftkern.ia3_output_linear_bwd
            grad_x, grad_l = op(grad_out, saved, dense, ia3_l)
        else:
            with torch.enable_grad():
                x, l = saved.detach().requires_grad_(), ia3_l.detach().requires_grad_()
                out = ia3_linear_reference(x, dense, None, l, ctx.scale_input)
                grad_x, grad_l = torch.autograd.grad(out, (x, l), grad_out)
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[1]:
            acc = acc_dtype(grad_out.dtype)
            grad_bias = grad_out if ctx.scale_input else grad_out.to(acc) * ia3_l.reshape(-1).to(acc)
            grad_bias = grad_bias.sum(0).to(grad_out.dtype)
        return grad_x, grad_bias, grad_l, None, None


def nf4_ia3_linear(x, weight, bias, ia3_l, scale_input: bool) -> torch.Tensor:
    """`ia3_linear` with `weight` a `peftkern.NF4Weight` ([out, in]); computes in x's dtype."""
    _check("nf4_ia3_linear", x, weight.shape[1], weight.shape[0], ia3_l, scale_input)
    x, bias = autocast_inputs(x, bias)  # the weight dequantizes into x's dtype
    x2 = x.reshape(-1, x.shape[-1])
    out = _NF4IA3Linear.apply(x2, bias, ia3_l, weight, bool(scale_input))
    return out.view(*x.shape[:-1], out.shape[-1])
