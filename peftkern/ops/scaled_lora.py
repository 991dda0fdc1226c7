"""Scaled-LoRA op family (csrc/scaled_lora/): one generalised low-rank op for the LoRA relatives
that scale the rank or the output dimension, with the plain-PyTorch reference (the spec), fakes,
the autograd formula of `peftkern::scaled_lora_linear_fwd` (its backward is the op
`scaled_lora_linear_bwd`) and the wrappers that layers call.

    out = x·Wᵀ + b + scaling·((dropout(x)·Aᵀ ⊙ rank_scale)·Bᵀ) ⊙ out_scale

rank_scale [r] and out_scale [N] are optional (any shape with that many elements), read in
float32 (float64 for float64 x). VeRA: A, B frozen slices of the shared random matrices,
rank_scale = λ_d, out_scale = λ_b, scaling 1. AdaLoRA: rank_scale = E, scaling α/(ranknum+1e-5).
LoRA is the case with neither scale (`peftkern.ops.lora` keeps its own op).

A / B may be frozen: their gradient GEMMs are then skipped (VeRA trains only the two vectors).
What backward keeps: x (an alias) and xa = dropout(x)·Aᵀ [tokens, r]; no dropout mask (the op
draws its decisions from (seed, offset) again in backward, `peftkern.ops.dropout`). The
reference takes the decisions as a bool mask.
"""

from __future__ import annotations

import torch

from .. import _ext
from .common import acc_dtype, autocast_inputs
from . import dropout as _dropout
from .lora import _dropped, prepare_dropout, reference_mask

# --------------------------------------------------------------------------------------------
# Reference: the spec (autograd through plain PyTorch ops gives its gradients).
# --------------------------------------------------------------------------------------------


def _scale(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """A scale flattened and widened to x's accumulation dtype (as the kernels read it)."""
    return None if t is None else t.reshape(-1).to(acc_dtype(x.dtype))


def scaled_lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, rank_scale=None, out_scale=None,
                                 dropout_mask=None, keep_scale=1.0):  # fmt: skip
    """x [M, K] (or any leading dims), weight [N, K]; the scales applied in the accumulation
    dtype, each product rounded back to x's dtype as the kernels round it."""
    xa = torch.nn.functional.linear(_dropped(x, dropout_mask, keep_scale), lora_a)
    rs = _scale(rank_scale, x)
    u = xa if rs is None else (xa.to(rs.dtype) * rs).to(x.dtype)
    v = torch.nn.functional.linear(u, lora_b)
    base = torch.nn.functional.linear(x, weight, bias)
    os_ = _scale(out_scale, x)
    if os_ is None:
        return base + scaling * v
    return (base.to(os_.dtype) + scaling * (v.to(os_.dtype) * os_)).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Fakes and autograd for the compiled op.
# --------------------------------------------------------------------------------------------


@_ext.register_fake("scaled_lora_linear_fwd")
def _(x, weight, bias, lora_a, lora_b, rank_scale, out_scale, scaling, dropout_p, seed, offset):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


@_ext.register_fake("scaled_lora_linear_bwd")
def _(grad_out, x, weight, lora_a, lora_b, xa, rank_scale, out_scale, scaling, dropout_p, seed, offset, output_mask):
    def grad_of(t, wanted):
        return torch.empty_like(t) if wanted else x.new_empty((0,))

    return (torch.empty_like(x), grad_of(lora_a, output_mask[0]), grad_of(lora_b, output_mask[1]),
            grad_of(rank_scale, output_mask[2]), grad_of(out_scale, output_mask[3]))  # fmt: skip


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, rank_scale, out_scale, scaling, dropout_p, seed, offset = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], rank_scale, out_scale)
    ctx.scaling, ctx.drop = scaling, (dropout_p, seed, offset)
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)  # xa is rarely used downstream: no zero gradient, no wasted GEMMs


def _backward(ctx, grad_out, grad_xa):
    x, weight, lora_a, lora_b, xa, rank_scale, out_scale = ctx.saved_tensors
    needs = ctx.needs_input_grad  # x, weight, bias, lora_a, lora_b, rank_scale, out_scale, ...
    if grad_out is None:
        grad_out = x.new_zeros((x.shape[0], weight.shape[0]))
    mask = [needs[3], needs[4], rank_scale is not None and needs[5], out_scale is not None and needs[6]]
    grad_x, grad_a, grad_b, grad_rs, grad_os = torch.ops.peftkern.scaled_lora_linear_bwd(
        grad_out, x, weight, lora_a, lora_b, xa, rank_scale, out_scale, ctx.scaling, *ctx.drop, mask
    )
    if grad_xa is not None:  # xa was used downstream too (unusual): chain its gradient
        grad_a = (grad_a if mask[0] else 0) + grad_xa.t() @ _dropout.lora_dropout(x, *ctx.drop)
        grad_x = grad_x + _dropout.lora_dropout(grad_xa @ lora_a, *ctx.drop)
    grad_weight = grad_out.t() @ x if needs[1] else None
    grad_bias = grad_out.sum(0) if ctx.has_bias and needs[2] else None
    return (grad_x, grad_weight, grad_bias, grad_a if needs[3] else None, grad_b if mask[1] else None,
            grad_rs if mask[2] else None, grad_os if mask[3] else None, None, None, None, None)  # fmt: skip


if _ext.op_exists("scaled_lora_linear_fwd"):
    torch.library.register_autograd("peftkern::scaled_lora_linear_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------


def _fwd(x2, weight, bias, lora_a, lora_b, scaling, rank_scale, out_scale, drop):
    """[M, N] by the compiled op where x's device has it, else by the reference."""
    if _ext.has_kernel("scaled_lora_linear_fwd", x2.device.type):
        return torch.ops.peftkern.scaled_lora_linear_fwd(x2, weight, bias, lora_a, lora_b, rank_scale, out_scale,
                                                         float(scaling), *drop)[0]  # fmt: skip
    return scaled_lora_linear_reference(x2, weight, bias, lora_a, lora_b, scaling, rank_scale, out_scale,
                                        *reference_mask(x2, drop))  # fmt: skip


def scaled_lora_linear(x, weight, bias, lora_a, lora_b, scaling, rank_scale=None, out_scale=None, dropout=0.0,
                       training=False, fan_in_fan_out=False) -> torch.Tensor:  # fmt: skip
    """`x·Wᵀ + b + scaling·((dropout(x)·Aᵀ ⊙ rank_scale)·Bᵀ) ⊙ out_scale` over any leading dims of x.

    weight [out, in] ([in, out] with fan_in_fan_out, as GPT-2's Conv1D stores it); lora_a
    [r, in], lora_b [out, r], in x's dtype (any strides); the scales in any float dtype (read in
    float32). Dropout on the low-rank branch only, as in PEFT. Gradients flow to whichever of A,
    B and the scales require them."""
    if fan_in_fan_out:
        weight = weight.t()
    x, weight, bias, lora_a, lora_b = autocast_inputs(x, weight, bias, lora_a, lora_b)
    x2, drop = prepare_dropout(x, dropout, training, "scaled_lora_linear")
    out = _fwd(x2, weight, bias, lora_a, lora_b, scaling, rank_scale, out_scale, drop)
    return out.view(*x.shape[:-1], out.shape[-1])


class _NF4ScaledLoraLinear(torch.autograd.Function):
    """scaled_lora_linear over an NF4 base: the dequantized weight lives only inside forward and
    inside backward (recomputed there), never between them, as QLoRA's `_NF4LoraLinear`."""

    @staticmethod
    def forward(ctx, x, bias, lora_a, lora_b, rank_scale, out_scale, weight, scaling, drop):
        dense = weight.dequantize(x.dtype)
        compiled = _ext.has_kernel("scaled_lora_linear_fwd", x.device.type)
        if compiled:
            out, xa = torch.ops.peftkern.scaled_lora_linear_fwd(x, dense, bias, lora_a, lora_b, rank_scale, out_scale,
                                                                scaling, *drop)  # fmt: skip
        else:
            out, xa = scaled_lora_linear_reference(x, dense, bias, lora_a, lora_b, scaling, rank_scale, out_scale,
                                                   *reference_mask(x, drop)), None  # fmt: skip
        ctx.save_for_backward(x, lora_a, lora_b, xa, rank_scale, out_scale)
        ctx.weight, ctx.scaling, ctx.drop = weight, scaling, drop
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_a, lora_b, xa, rank_scale, out_scale = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dense = ctx.weight.dequantize(grad_out.dtype)  # recomputed, not stored
        if xa is not None:
            wanted = [needs[2], needs[3], rank_scale is not None and needs[4], out_scale is not None and needs[5]]
            grad_x, grad_a, grad_b, grad_rs, grad_os = torch.ops.peftkern.scaled_lora_linear_bwd(
                grad_out.contiguous(), x, dense, lora_a, lora_b, xa, rank_scale, out_scale, ctx.scaling,
                *ctx.drop, wanted,
            )  # fmt: skip
            grads = [g if w else None for g, w in zip((grad_a, grad_b, grad_rs, grad_os), wanted)]
        else:
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() if t is not None else None
                          for t in (x, lora_a, lora_b, rank_scale, out_scale)]  # fmt: skip
                out = scaled_lora_linear_reference(leaves[0], dense, None, leaves[1], leaves[2], ctx.scaling,
                                                   leaves[3], leaves[4], *reference_mask(x, ctx.drop))  # fmt: skip
                present = [t for t in leaves if t is not None]
                found = iter(torch.autograd.grad(out, present, grad_out, allow_unused=True))
                grad_x, *grads = [next(found) if t is not None else None for t in leaves]
        grad_bias = grad_out.sum(0) if needs[1] else None
        return (grad_x, grad_bias, *grads, None, None, None)


def nf4_scaled_lora_linear(x, weight, bias, lora_a, lora_b, scaling, rank_scale=None, out_scale=None, dropout=0.0,
                           training=False) -> torch.Tensor:  # fmt: skip
    """`scaled_lora_linear` with `weight` a `peftkern.NF4Weight` ([out, in]); computes in x's dtype."""
    x, bias, lora_a, lora_b = autocast_inputs(x, bias, lora_a, lora_b)  # the weight dequantizes into x's dtype
    x2, drop = prepare_dropout(x, dropout, training, "nf4_scaled_lora_linear")
    out = _NF4ScaledLoraLinear.apply(x2, bias, lora_a, lora_b, rank_scale, out_scale, weight, float(scaling), drop)
    return out.view(*x.shape[:-1], out.shape[-1])
