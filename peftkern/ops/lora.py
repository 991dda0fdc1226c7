"""LoRA-on-a-dense-base op family: the plain-PyTorch reference (the spec), fakes, the autograd
formula of `peftkern::lora_linear_fwd` (its backward is the op `lora_linear_bwd`), and the wrapper
`lora_linear` that layers call.

    out = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ

What backward keeps: x (an alias of the layer input, not a copy), the bool dropout mask, and
xa = dropout(x)·Aᵀ ([tokens, r]); dropout(x) is recomputed. The base W and b are frozen in LoRA;
if a caller does make them trainable, their gradients are computed too (never silently dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext

# --------------------------------------------------------------------------------------------
# Reference: the spec (autograd through plain PyTorch ops gives its gradients).
# --------------------------------------------------------------------------------------------


def _dropped(x, dropout_mask, keep_scale):
    """dropout(x) from its bool mask (x itself when there is no mask)."""
    return x if dropout_mask is None else x * dropout_mask * keep_scale


def lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, dropout_mask=None, keep_scale=1.0):
    dropped = _dropped(x, dropout_mask, keep_scale)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(dropped, lora_a), lora_b)


# --------------------------------------------------------------------------------------------
# Fakes and autograd for the compiled op.
# --------------------------------------------------------------------------------------------


@_ext.register_fake("lora_linear_fwd")
def _(x, weight, bias, lora_a, lora_b, scaling, dropout_mask, keep_scale):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


@_ext.register_fake("lora_linear_bwd")
def _(grad_out, x, weight, lora_a, lora_b, xa, scaling, dropout_mask, keep_scale):
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, dropout_mask, keep_scale = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], dropout_mask)
    ctx.scaling, ctx.keep_scale = scaling, keep_scale
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)  # xa is rarely used downstream: no zero gradient, no wasted GEMMs


def _backward(ctx, grad_out, grad_xa):
    x, weight, lora_a, lora_b, xa, dropout_mask = ctx.saved_tensors
    if grad_out is None:
        grad_out = x.new_zeros((x.shape[0], weight.shape[0]))
    needs = ctx.needs_input_grad
    grad_x, grad_a, grad_b = torch.ops.peftkern.lora_linear_bwd(
        grad_out, x, weight, lora_a, lora_b, xa, ctx.scaling, dropout_mask, ctx.keep_scale
    )
    if grad_xa is not None:  # xa was used downstream too (unusual): chain its gradient
        grad_a = grad_a + grad_xa.t() @ _dropped(x, dropout_mask, ctx.keep_scale)
        grad_x = grad_x + _dropped(grad_xa @ lora_a, dropout_mask, ctx.keep_scale)
    grad_weight = grad_out.t() @ x if needs[1] else None
    grad_bias = grad_out.sum(0) if ctx.has_bias and needs[2] else None
    return grad_x, grad_weight, grad_bias, grad_a, grad_b, None, None, None


if _ext.op_exists("lora_linear_fwd"):
    torch.library.register_autograd("peftkern::lora_linear_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Wrapper
# --------------------------------------------------------------------------------------------


def _autocast(*tensors):
    """Under torch.autocast, cast the floating inputs to the autocast dtype, as autocast does for
    F.linear (our ops are not on autocast's list, and would otherwise see mixed dtypes)."""
    device_type = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _prepare(x: torch.Tensor, dropout: float, training: bool, op: str):
    """x flattened to [tokens, in], and the dropout mask and keep scale (None, 1.0 when off)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{op}: dropout must be in [0, 1), got {dropout}")
    x2 = x.reshape(-1, x.shape[-1])
    if not (training and dropout > 0.0):
        return x2, None, 1.0
    return x2, torch.empty_like(x2, dtype=torch.bool).bernoulli_(1.0 - dropout), 1.0 / (1.0 - dropout)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """`x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ` over any leading dims of x.

    weight is [out, in] ([in, out] with fan_in_fan_out, as GPT-2's Conv1D stores it); lora_a is
    [r, in], lora_b [out, r]. Dropout is applied to the LoRA branch only, as in PEFT.
    """
    if fan_in_fan_out:
        weight = weight.t()
    x, weight, bias, lora_a, lora_b = _autocast(x, weight, bias, lora_a, lora_b)
    x2, mask, keep_scale = _prepare(x, dropout, training, "lora_linear")
    if _ext.has_kernel("lora_linear_fwd", x.device.type):
        out = torch.ops.peftkern.lora_linear_fwd(x2, weight, bias, lora_a, lora_b, float(scaling), mask, keep_scale)[0]
    else:
        out = lora_linear_reference(x2, weight, bias, lora_a, lora_b, scaling, mask, keep_scale)
    return out.view(*x.shape[:-1], out.shape[-1])


# --------------------------------------------------------------------------------------------
# QLoRA: the same with the base weight held in NF4.
# --------------------------------------------------------------------------------------------


class _NF4LoraLinear(torch.autograd.Function):
    """lora_linear over an NF4 base: the dequantized weight lives only inside forward and inside
    backward (recomputed there), never between them; saved: x, the mask, A, B and xa."""

    @staticmethod
    def forward(ctx, x, bias, lora_a, lora_b, weight, scaling, mask, keep_scale, dense):
        if dense is None:  # a caller that already dequantized (DoRA) passes it in
            dense = weight.dequantize(x.dtype)
        if _ext.has_kernel("lora_linear_fwd", x.device.type):
            out, xa = torch.ops.peftkern.lora_linear_fwd(x, dense, bias, lora_a, lora_b, scaling, mask, keep_scale)
        else:  # no compiled library: the reference, with backward by autograd through it (below)
            out, xa = lora_linear_reference(x, dense, bias, lora_a, lora_b, scaling, mask, keep_scale), None
        ctx.save_for_backward(x, lora_a, lora_b, xa, mask)
        ctx.weight, ctx.scaling, ctx.keep_scale = weight, scaling, keep_scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_a, lora_b, xa, mask = ctx.saved_tensors
        dense = ctx.weight.dequantize(grad_out.dtype)  # recomputed, not stored
        if xa is not None:
            grad_x, grad_a, grad_b = torch.ops.peftkern.lora_linear_bwd(
                grad_out, x, dense, lora_a, lora_b, xa, ctx.scaling, mask, ctx.keep_scale
            )
        else:
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (x, lora_a, lora_b)]
                out = lora_linear_reference(leaves[0], dense, None, leaves[1], leaves[2], ctx.scaling, mask,
                                            ctx.keep_scale)  # fmt: skip
                grad_x, grad_a, grad_b = torch.autograd.grad(out, leaves, grad_out)
        grad_bias = grad_out.sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, grad_a, grad_b, None, None, None, None, None


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


def _use_gemv(x2, tensors, mask, dense) -> bool:
    return (
        x2.shape[0] <= GEMV_MAX_TOKENS
        and x2.device.type in _GEMV_DEVICES
        and mask is None
        and dense is None
        and _ext.has_kernel("nf4_lora_gemv", x2.device.type)
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, *tensors)))
    )


def nf4_lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout=0.0, training=False, dense=None) -> torch.Tensor:
    """`lora_linear` with `weight` a `peftkern.NF4Weight` ([out, in]); computes in x's dtype.
    `dense`: the weight already dequantized into x's dtype, used by the forward only (backward
    always dequantizes again, so it is never kept). In inference with few tokens (decode) on a
    GPU, the GEMV that reads the 4-bit weight once runs instead (LoRA-B and bias in its epilogue)."""
    x, bias, lora_a, lora_b = _autocast(x, bias, lora_a, lora_b)  # the weight dequantizes into x's dtype
    x2, mask, keep_scale = _prepare(x, dropout, training, "nf4_lora_linear")
    if _use_gemv(x2, (bias, lora_a, lora_b), mask, dense):
        x2 = x2.contiguous()
        xa = (x2 @ lora_a.t()).contiguous() if lora_a.shape[0] > 0 else None
        out = nf4_lora_gemv(x2, weight, bias, xa, lora_b.contiguous() if xa is not None else None, scaling)
        return out.view(*x.shape[:-1], out.shape[-1])
    dense = dense.detach() if dense is not None else None
    out = _NF4LoraLinear.apply(x2, bias, lora_a, lora_b, weight, float(scaling), mask, keep_scale, dense)
    return out.view(*x.shape[:-1], out.shape[-1])


def nf4_linear(x: torch.Tensor, weight, bias: torch.Tensor | None, dense=None) -> torch.Tensor:
    """x·Wᵀ + b for an NF4 `weight`, with W dequantized in forward and again in backward (never
    stored between them): the QLoRA function with rank-0 adapters."""
    empty_a = x.new_zeros((0, x.shape[-1]))
    empty_b = x.new_zeros((weight.shape[0], 0))
    return nf4_lora_linear(x, weight, bias, empty_a, empty_b, 0.0, dense=dense)
