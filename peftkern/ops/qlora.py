"""QLoRA op family (csrc/qlora/ for the decode GEMV): LoRA over a base weight held in NF4
(`peftkern.NF4Weight`), never keeping the dequantized weight between forward and backward.

    out = x·deq(W)ᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ

Training and prefill (`_NF4LoraLinear`): on CPU from `FUSED_MIN_TOKENS` tokens the fused ops
`peftkern::nf4_lora_linear_fwd` / `nf4_lora_linear_bwd_input` decode the weight tile by tile into a
cache-sized buffer feeding the GEMM (the dense weight never exists); otherwise the weight is
dequantized into x's dtype inside forward and again inside backward, feeding
`peftkern::lora_linear_fwd` / `lora_linear_bwd`. Saved for backward either way: x, A, B and
xa = dropout(x)·Aᵀ (no dropout mask: drawn again from (seed, offset)). Decode sizes in inference: the GEMV
`peftkern::nf4_lora_gemv` reads the 4-bit weight once (bias and LoRA-B in its epilogue).
"""

from __future__ import annotations

import torch

from .. import _ext
from . import dropout as _dropout
from . import rank_product as _rank
from .common import autocast_inputs
from .lora import lora_linear_reference, prepare_dropout, reference_mask

# --------------------------------------------------------------------------------------------
# Training and prefill: dequantize + the LoRA op, the weight recomputed in backward.
# --------------------------------------------------------------------------------------------


class _NF4LoraLinear(torch.autograd.Function):
    """lora_linear over an NF4 base: on CPU the dense weight never exists whole (the fused ops
    decode it tile by tile); elsewhere it lives only inside forward and inside backward
    (recomputed there), never between them. Saved: x, A, B and xa. `drop` is the call's dropout
    (p, seed, offset), drawn again in backward. `nf4_lora_linear` takes the op
    `nf4_lora_linear_train` instead on the CPU fused path (the same ops with the backward in C++,
    csrc/qlora/qlora_train.cpp; tests hold the two equal bit for bit); this Function serves the
    dequantizing paths (CUDA, a caller's dense weight, float64) and is that op's Python spec."""

    @staticmethod
    def forward(ctx, x, bias, lora_a, lora_b, weight, scaling, drop, dense):
        if dense is None and use_fused_gemm(x, weight):  # the weight decoded tile by tile, never whole
            out, xa = nf4_lora_linear_fused_fwd(x, weight, bias, lora_a, lora_b, scaling, drop)
        else:
            if dense is None:  # a caller that already dequantized (DoRA) passes it in
                dense = weight.dequantize(x.dtype)
            if _ext.has_kernel("lora_linear_fwd", x.device.type):
                out, xa = torch.ops.peftkern.lora_linear_fwd(x, dense, bias, lora_a, lora_b, scaling, *drop)
            else:  # no compiled library: the reference, with backward by autograd through it (below)
                out = lora_linear_reference(x, dense, bias, lora_a, lora_b, scaling, *reference_mask(x, drop))
                xa = None
        ctx.save_for_backward(x, lora_a, lora_b, xa)
        ctx.weight, ctx.scaling, ctx.drop = weight, scaling, drop
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_a, lora_b, xa = ctx.saved_tensors
        if xa is not None and use_fused_gemm(grad_out, ctx.weight):
            grad_x, grad_a, grad_b = nf4_lora_linear_fused_bwd(
                grad_out, x, ctx.weight, lora_a, lora_b, xa, ctx.scaling, ctx.drop
            )
            grad_bias = grad_out.sum(0) if ctx.needs_input_grad[1] else None
            return grad_x, grad_bias, grad_a, grad_b, None, None, None, None
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
# Training and prefill on CPU: the fused NF4 dequant + GEMM (peftkern::nf4_lora_linear_fwd and
# nf4_lora_linear_bwd_input, csrc/qlora/qlora_gemm_cpu.cpp).
# --------------------------------------------------------------------------------------------

# From this many tokens (rows of x, or of grad_out in backward) a CPU QLoRA layer takes the fused
# ops instead of dequantize-whole + GEMM. Measured with bench/bench_qlora.py
# (test_qlora_fused_vs_dequant; bench/results/qlora-fused-cpu-2core-2026-12-02.txt; DESIGN.md
# "QLoRA"), float32, 16-4096 tokens: 2-4x faster at 16-64 tokens on the 7B-like shapes, parity
# within noise at 1024-4096 tokens and on SmolLM2-135M's shapes; no size lost beyond the noise, and
# the fused path never allocates the dense weight, so it is taken from the first token.
FUSED_MIN_TOKENS = 1
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_fused_gemm(x2: torch.Tensor, weight) -> bool:
    """Whether a training / prefill NF4 linear over x2 [T, in] (or a grad_out [T, out]) takes the
    fused dequant + GEMM: CPU, the op compiled, a dtype it takes, at least FUSED_MIN_TOKENS rows."""
    return (
        x2.device.type == "cpu"
        and x2.dtype in _FUSED_DTYPES
        and x2.shape[0] >= FUSED_MIN_TOKENS
        and _ext.has_kernel("nf4_lora_linear_fwd", "cpu")
    )


def _quant_state(weight):
    """The NF4 weight's tensors and sizes as the ops take them (nested ones None without double
    quantization)."""
    n = weight.nested
    return (weight.packed, weight.absmax, n.absmax if n else None, n.code if n else None,
            n.offset.reshape(1) if n else None, weight.blocksize, n.blocksize if n else 0)  # fmt: skip


def nf4_lora_linear_fwd_reference(x, weight, bias, xa, lora_b, scaling):
    """The spec of `peftkern::nf4_lora_linear_fwd`: dequantize into x's dtype, then plain matmuls."""
    out = x @ weight.dequantize(x.dtype).t()
    if bias is not None:
        out = out + bias
    if xa is not None:
        out = out + scaling * (xa @ lora_b.t())
    return out


def nf4_lora_linear_bwd_input_reference(grad_out, weight, grad_xa, lora_a):
    """The spec of `peftkern::nf4_lora_linear_bwd_input`: grad_out·deq(W) + grad_xa·lora_a."""
    grad_x = grad_out @ weight.dequantize(grad_out.dtype)
    return grad_x + grad_xa @ lora_a if grad_xa is not None else grad_x


@_ext.register_fake("nf4_lora_linear_fwd")
def _(x, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, out_features,
      bias, xa, lora_b, scaling, tile_bytes):  # fmt: skip
    return x.new_empty((x.shape[0], out_features))


@_ext.register_fake("nf4_lora_linear_bwd_input")
def _(grad_out, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
      in_features, grad_xa, lora_a, tile_bytes):  # fmt: skip
    return grad_out.new_empty((grad_out.shape[0], in_features))


@_ext.register_fake("nf4_lora_linear_train")
def _(x, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, out_features,
      bias, lora_a, lora_b, scaling, dropout_p, seed, offset):  # fmt: skip
    return x.new_empty((x.shape[0], out_features)), x.new_empty((x.shape[0], lora_a.shape[0]))


def nf4_lora_linear_fwd(x, weight, bias=None, xa=None, lora_b=None, scaling=0.0, tile_bytes=0):
    """x·deq(W)ᵀ + b + scaling·xa·lora_bᵀ by the fused CPU op where compiled (else the reference),
    never materialising deq(W). x [T, in]; weight an NF4Weight [out, in]; bias, xa [T, r] and
    lora_b [out, r] in x's dtype. tile_bytes: the per-thread decode buffer (0: the op's default)."""
    if not (x.device.type == "cpu" and _ext.has_kernel("nf4_lora_linear_fwd", "cpu")):
        return nf4_lora_linear_fwd_reference(x, weight, bias, xa, lora_b, scaling)
    return torch.ops.peftkern.nf4_lora_linear_fwd(x, *_quant_state(weight), weight.shape[0], bias, xa, lora_b,
                                                  float(scaling), tile_bytes)  # fmt: skip


def nf4_lora_linear_bwd_input(grad_out, weight, grad_xa=None, lora_a=None, tile_bytes=0):
    """grad_out·deq(W) + grad_xa·lora_a by the fused CPU op where compiled (else the reference)."""
    if not (grad_out.device.type == "cpu" and _ext.has_kernel("nf4_lora_linear_bwd_input", "cpu")):
        return nf4_lora_linear_bwd_input_reference(grad_out, weight, grad_xa, lora_a)
    return torch.ops.peftkern.nf4_lora_linear_bwd_input(grad_out, *_quant_state(weight), weight.shape[1], grad_xa,
                                                        lora_a, tile_bytes)  # fmt: skip


def nf4_lora_linear_fused_fwd(x, weight, bias, lora_a, lora_b, scaling, drop):
    """`peftkern::lora_linear_fwd` over an NF4 weight, with no dense weight: -> (out, xa). `drop`:
    the call's dropout (p, seed, offset)."""
    xa = _dropout.lora_dropout_project(x, lora_a, *drop)  # [T, r]: dropout(x)·Aᵀ, xd never written on CPU
    has_lora = lora_a.shape[0] > 0
    out = nf4_lora_linear_fwd(x, weight, bias, xa if has_lora else None, lora_b if has_lora else None, scaling)
    return out, xa


def nf4_lora_linear_fused_bwd(grad_out, x, weight, lora_a, lora_b, xa, scaling, drop):
    """`peftkern::lora_linear_bwd` over an NF4 weight, with no dense weight: -> (grad_x, grad_a,
    grad_b). Same formulas: the rank-r factors scaled, dropout(x) drawn again from `drop`."""
    # grad_out feeds two ops: an expanded one (stride 0, e.g. from .sum()) is copied once
    grad_out = grad_out.contiguous()
    # grad_xa = s·grad_out·B [T, r] and grad_B = s·grad_outᵀ·xa [N, r], one read of grad_out
    grad_xa, grad_b = _rank.lora_out_grads(grad_out, xa, lora_b, scaling)
    grad_x = nf4_lora_linear_bwd_input(grad_out, weight)
    # grad_x += (grad_xa·A) ⊙ m/(1 − p) and grad_A = grad_xaᵀ·dropout(x), one read of x: the LoRA
    # path's gradient is dropped as x was, the base path's is not (one draw of the decisions)
    grad_a = _rank.lora_input_grads_(grad_x, x, grad_xa, lora_a, *drop)
    return grad_x, grad_a, grad_b


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


def decode_projection(x2: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """xa = x2·Aᵀ [T, r] for the decode GEMV, in x2's dtype. On CPU in bf16/fp16 it is computed in
    float32 and rounded once (what the half-precision GEMM does too): ATen's bf16 path took ~32 µs
    for a [1, 2048]·[2048, 16] product against ~5 µs in float32, more than the whole GEMV of a
    small model's layer (DESIGN.md "QLoRA", decode)."""
    if x2.device.type == "cpu" and x2.dtype in (torch.bfloat16, torch.float16):
        return (x2.float() @ lora_a.float().t()).to(x2.dtype)
    return (x2 @ lora_a.t()).contiguous()


def use_gemv(x2, tensors, drop, dense) -> bool:
    """Whether an NF4 linear over x2 [T, in] takes the decode GEMV: few tokens, a device with the
    kernel, no dropout (`drop` the call's (p, seed, offset), or None for a layer without any), no
    caller-dequantized weight, nothing that needs a gradient."""
    return (
        x2.shape[0] <= GEMV_MAX_TOKENS
        and x2.device.type in _GEMV_DEVICES
        and (drop is None or drop[0] == 0.0)
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
        xa = decode_projection(x2, lora_a) if lora_a.shape[0] > 0 else None
        out = nf4_lora_gemv(x2, weight, bias, xa, lora_b.contiguous() if xa is not None else None, scaling)
        return out.view(*x.shape[:-1], out.shape[-1])
    if dense is None and use_fused_gemm(x2, weight) and _ext.has_kernel("nf4_lora_linear_train", "cpu"):
        # the fused path with its backward in C++ (csrc/qlora/qlora_train.cpp): no Python per layer
        out = torch.ops.peftkern.nf4_lora_linear_train(x2, *_quant_state(weight), weight.shape[0], bias, lora_a, lora_b,
                                                      float(scaling), *drop)[0]  # fmt: skip
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
