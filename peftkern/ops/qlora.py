"""QLoRA op family (csrc/qlora/ for the decode GEMV): LoRA over a base weight held in NF4
(`peftkern.NF4Weight`), never keeping the dequantized weight between forward and backward.

    out = x·deq(W)ᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ

Training and prefill: the weight is dequantized into x's dtype inside forward and again inside
backward (`_NF4LoraLinear`), feeding `peftkern::lora_linear_fwd` / `lora_linear_bwd`; saved for
backward: x, A, B and xa = dropout(x)·Aᵀ (no dropout mask: drawn again from (seed, offset)). Decode sizes in inference: the GEMV
`peftkern::nf4_lora_gemv` reads the 4-bit weight once (bias and LoRA-B in its epilogue).
"""

from __future__ import annotations

import torch

from .. import _ext
from .common import autocast_inputs
from .lora import lora_linear_reference, prepare_dropout, reference_mask

# --------------------------------------------------------------------------------------------
# Training and prefill: dequantize + the LoRA op, the weight recomputed in backward.
# --------------------------------------------------------------------------------------------


class _NF4LoraLinear(torch.autograd.Function):
    """lora_linear over an NF4 base: the dequantized weight lives only inside forward and inside
    backward (recomputed there), never between them; saved: x, A, B and xa. `drop` is the
    call's dropout (p, seed, offset), drawn again in backward."""

    @staticmethod
    def forward(ctx, x, bias, lora_a, lora_b, weight, scaling, drop, dense):
        if dense is None:  # a caller that already dequantized (DoRA) passes it in
            dense = weight.dequantize(x.dtype)
        if _ext.has_kernel("lora_linear_fwd", x.device.type):
            out, xa = torch.ops.peftkern.lora_linear_fwd(x, dense, bias, lora_a, lora_b, scaling, *drop)
        else:  # no compiled library: the reference, with backward by autograd through it (below)
            out, xa = lora_linear_reference(x, dense, bias, lora_a, lora_b, scaling, *reference_mask(x, drop)), None
        ctx.save_for_backward(x, lora_a, lora_b, xa)
        ctx.weight, ctx.scaling, ctx.drop = weight, scaling, drop
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_a, lora_b, xa = ctx.saved_tensors
        dense = ctx.weight.dequantize(grad_out.dtype)  # recomputed, not stored
        if xa is not None:
            grad_x, grad_a, grad_b = torch.ops.peftkern.lora_linear_bwd(
                grad_out, x, dense, lora_a, lora_b, xa, ctx.scaling, *ctx.drop
            )
        else:
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (x, lora_a, lora_b)]
                out = lora_linear_reference(leaves[0], dense, None, leaves[1], leaves[2], ctx.scaling,
                                            *reference_mask(x, ctx.drop))  # fmt: skip
                grad_x, grad_a, grad_b = torch.autograd.grad(out, leaves, grad_out)
        grad_bias = grad_out.sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, grad_a, grad_b, None, None, None, None


# --------------------------------------------------------------------------------------------
# QLoRA at decode sizes: the GEMV that reads the 4-bit weight once (peftkern::nf4_lora_gemv).
# --------------------------------------------------------------------------------------------

# Up to this many tokens, an inference-mode nf4_lora_linear on a device with the kernel runs the
# GEMV (bandwidth-bound: the weight is read once at 4 bits) instead of dequantize + GEMM.
GEMV_MAX_TOKENS = 8
# Devices where the GEMV is the faster decode path (measured on CPU: 0.55-0.61x the time of
# dequantize + GEMM at 1 and 8 tokens, 2048x5632, bench/bench_qlora.py).
_GEMV_DEVICES = ("cpu", "cuda")


def nf4_lora_gemv_reference(x, weight, bias, xa, lora_b, scaling):
    """The spec: x·deq(W)ᵀ + b + scaling·xa·lora_bᵀ, accumulated in float32, returned in x's dtype."""
    out = x.float() @ weight.dequantize(torch.float32).t()
    if bias is not None:
        out = out + bias.float()
    if xa is not None:
        out = out + scaling * (xa.float() @ lora_b.float().t())
    return out.to(x.dtype)


@_ext.register_fake("nf4_lora_gemv")
def _(x, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, out_features,
      bias, xa, lora_b, scaling):  # fmt: skip
    return x.new_empty((x.shape[0], out_features))


def nf4_lora_gemv(x, weight, bias=None, xa=None, lora_b=None, scaling=0.0):
    """`nf4_lora_gemv_reference` by the compiled kernel where x's device has one. x: [T, in]
    with contiguous rows; weight an NF4Weight [out, in]; xa = x·Aᵀ [T, r], lora_b [out, r]; bias,
    xa and lora_b in x's dtype. Inference only (no autograd)."""
    if not _ext.has_kernel("nf4_lora_gemv", x.device.type):
        return nf4_lora_gemv_reference(x, weight, bias, xa, lora_b, scaling)
    nested = weight.nested
    return torch.ops.peftkern.nf4_lora_gemv(
        x, weight.packed, weight.absmax,
        nested.absmax if nested else None, nested.code if nested else None,
        nested.offset.reshape(1) if nested else None, weight.blocksize, nested.blocksize if nested else 0,
        weight.shape[0], bias, xa, lora_b, float(scaling),
    )  # fmt: skip


def use_gemv(x2, tensors, drop, dense) -> bool:
    """Whether an NF4 linear over x2 [T, in] takes the decode GEMV: few tokens, a device with the
    kernel, no dropout, no caller-dequantized weight, nothing that needs a gradient."""
    return (
        x2.shape[0] <= GEMV_MAX_TOKENS
        and x2.device.type in _GEMV_DEVICES
        and drop[0] == 0.0
        and dense is None
        and _ext.has_kernel("nf4_lora_gemv", x2.device.type)
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, *tensors)))
    )


def nf4_lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout=0.0, training=False, dense=None) -> torch.Tensor:
    """`lora_linear` with `weight` a `peftkern.NF4Weight` ([out, in]); computes in x's dtype.
    `dense`: the weight already dequantized into x's dtype, used by the forward only (backward
    always dequantizes again, so it is never kept). In inference with few tokens (decode) on a
    device with the kernel (CPU and CUDA), the GEMV that reads the 4-bit weight once runs instead
    (LoRA-B and bias in its epilogue)."""
    x, bias, lora_a, lora_b = autocast_inputs(x, bias, lora_a, lora_b)  # the weight dequantizes into x's dtype
    x2, drop = prepare_dropout(x, dropout, training, "nf4_lora_linear")
    if use_gemv(x2, (bias, lora_a, lora_b), drop, dense):
        x2 = x2.contiguous()
        xa = (x2 @ lora_a.t()).contiguous() if lora_a.shape[0] > 0 else None
        out = nf4_lora_gemv(x2, weight, bias, xa, lora_b.contiguous() if xa is not None else None, scaling)
        return out.view(*x.shape[:-1], out.shape[-1])
    dense = dense.detach() if dense is not None else None
    out = _NF4LoraLinear.apply(x2, bias, lora_a, lora_b, weight, float(scaling), drop, dense)
    return out.view(*x.shape[:-1], out.shape[-1])


def nf4_linear(x: torch.Tensor, weight, bias: torch.Tensor | None, dense=None) -> torch.Tensor:
    """x·Wᵀ + b for an NF4 `weight`, with W dequantized in forward and again in backward (never
    stored between them): the QLoRA function with rank-0 adapters."""
    empty_a = x.new_zeros((0, x.shape[-1]))
    empty_b = x.new_zeros((weight.shape[0], 0))
    return nf4_lora_linear(x, weight, bias, empty_a, empty_b, 0.0, dense=dense)
