"""LoRA-dropout op family (csrc/dropout/): dropout without a mask. The keep decision of element e
of an [M, K] input (e = i·K + j, row-major) is drawn from (seed, offset, e) by Philox4x32-10
(csrc/common/philox.h: key = seed, counter = (e // 4, offset), word e % 4):

    keep[e] = uniform(word e) < 1 − p,   uniform(w) = (w >> 8)·2⁻²⁴,   xd = x ⊙ keep/(1 − p)

The same (seed, offset) gives the same decisions on CPU and CUDA and in forward and backward, so
the LoRA ops draw them again in backward instead of saving a mask. Here: the plain-PyTorch
reference of the generator and of the decisions (the spec, and the fallback without a compiled
library), the fakes, the autograd of `lora_dropout`, and `draw_seed`, which takes (seed, offset)
from torch's generator of the input's device so `torch.manual_seed` reproduces a run.
"""

from __future__ import annotations

import torch

from .. import _ext

_M32 = 0xFFFFFFFF
_ROUND_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_WEYL_KEYS = (0x9E3779B9, 0xBB67AE85)
# XORed into a CUDA generator's seed: our counters (element block, offset) would otherwise
# coincide with those torch's own CUDA Philox kernels use (offset, thread), so the dropout
# decisions would be correlated with other draws of the same run. Another key is another stream.
_CUDA_STREAM_KEY = 0x5045_4654_4B45_524E  # "PEFTKERN"


def _as_int64(v: int) -> int:
    """A uint64 as the int64 with the same bits (torch's `int` arguments are signed)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


# --------------------------------------------------------------------------------------------
# Reference: the spec, in plain PyTorch (int64 arithmetic, masked to 32 bits).
# --------------------------------------------------------------------------------------------


def philox_words_reference(groups: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """Philox4x32-10 of counters (group, offset) under key seed: int64 [G, 4] words in [0, 2³²)."""
    g = groups.to(torch.int64).reshape(-1)
    seed, offset = seed & ((1 << 64) - 1), offset & ((1 << 64) - 1)
    c = [g & _M32, (g >> 32) & _M32, torch.full_like(g, offset & _M32), torch.full_like(g, offset >> 32)]
    k0, k1 = seed & _M32, seed >> 32
    for _ in range(10):
        # 32×32 → 64-bit products: int64 multiplication wraps, and the masks recover both halves.
        p0, p1 = c[0] * _ROUND_MULTIPLIERS[0], c[2] * _ROUND_MULTIPLIERS[1]
        hi0, lo0 = (p0 >> 32) & _M32, p0 & _M32
        hi1, lo1 = (p1 >> 32) & _M32, p1 & _M32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + _WEYL_KEYS[0]) & _M32, (k1 + _WEYL_KEYS[1]) & _M32
    return torch.stack(c, dim=1)


def philox_uniform_reference(shape, seed: int, offset: int) -> torch.Tensor:
    """float32 uniforms of elements 0 .. numel − 1 (row-major) of stream (seed, offset)."""
    numel = 1
    for s in shape:
        numel *= s
    words = philox_words_reference(torch.arange((numel + 3) // 4), seed, offset).reshape(-1)[:numel]
    return ((words >> 8).to(torch.float32) * 2.0**-24).reshape(shape)


def lora_dropout_mask_reference(shape, p: float, seed: int, offset: int) -> torch.Tensor:
    """The keep decisions (bool): uniform < 1 − p, compared in float64 (exact for these uniforms)."""
    return philox_uniform_reference(shape, seed, offset).double() < 1.0 - p


def lora_dropout_reference(x: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    """x ⊙ keep/(1 − p), as torch's dropout computes it given the mask."""
    mask = lora_dropout_mask_reference(tuple(x.shape), p, seed, offset).to(x.device)
    return x * mask * (1.0 / (1.0 - p))


def lora_dropout_backward_reference(grad_x, grad_xd, x, p: float, seed: int, offset: int):
    """The spec of `lora_dropout_backward_` (out of place): (grad_x + grad_xd ⊙ keep/(1 − p), summed
    in the accumulation dtype and rounded once, x ⊙ keep/(1 − p)) with one set of decisions."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    mask = lora_dropout_mask_reference(tuple(x.shape), p, seed, offset).to(x.device)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=acc)
    return (grad_x.to(acc) + (grad_xd.to(acc) * mask) * scale).to(x.dtype), lora_dropout_reference(x, p, seed, offset)


# --------------------------------------------------------------------------------------------
# Fakes and autograd for the compiled ops.
# --------------------------------------------------------------------------------------------


@_ext.register_fake("lora_dropout")
def _(x, p, seed, offset):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_ext.register_fake("lora_dropout_accumulate_")
def _(out, x, p, seed, offset):
    return None


@_ext.register_fake("lora_dropout_backward_")
def _(grad_x, grad_xd, x, p, seed, offset):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_ext.register_fake("lora_dropout_project")
def _(x, lora_a, p, seed, offset):
    torch._check(lora_a.dim() == 2 and lora_a.shape[1] == x.shape[1], lambda: "lora_dropout_project: lora_a must be [r, K]")
    return x.new_empty((x.shape[0], lora_a.shape[0]))


@_ext.register_fake("lora_dropout_mask")
def _(x, p, seed, offset):
    return torch.empty_like(x, dtype=torch.bool, memory_format=torch.contiguous_format)


@_ext.register_fake("philox_uniform")
def _(x, seed, offset):
    return torch.empty_like(x, dtype=torch.float32, memory_format=torch.contiguous_format)


@_ext.register_fake("philox_words")
def _(groups, seed, offset):
    return groups.new_empty((groups.shape[0], 4))


def _setup_context(ctx, inputs, output):
    _, ctx.p, ctx.seed, ctx.offset = inputs


def _backward(ctx, grad):  # dropout is linear: its gradient is the same dropout of the gradient
    return torch.ops.peftkern.lora_dropout(grad, ctx.p, ctx.seed, ctx.offset), None, None, None


if _ext.op_exists("lora_dropout"):
    torch.library.register_autograd("peftkern::lora_dropout", _backward, setup_context=_setup_context)


def _project_setup_context(ctx, inputs, output):
    x, lora_a, ctx.p, ctx.seed, ctx.offset = inputs
    ctx.save_for_backward(x, lora_a)


def _project_backward(ctx, grad):  # xa = dropout(x)·Aᵀ: grad_x = dropout(grad·A), grad_A = gradᵀ·dropout(x)
    x, lora_a = ctx.saved_tensors
    drop = (ctx.p, ctx.seed, ctx.offset)
    grad_x = torch.ops.peftkern.lora_dropout(grad @ lora_a, *drop) if ctx.needs_input_grad[0] else None
    grad_a = grad.t() @ torch.ops.peftkern.lora_dropout(x, *drop) if ctx.needs_input_grad[1] else None
    return grad_x, grad_a, None, None, None


if _ext.op_exists("lora_dropout_project"):
    torch.library.register_autograd("peftkern::lora_dropout_project", _project_backward,
                                    setup_context=_project_setup_context)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------


def draw_seed(device: torch.device) -> tuple[int, int]:
    """(seed, offset) for one dropout call, from torch's generator of `device`.

    CPU (and any device without a Philox generator): one 63-bit seed drawn from the default CPU
    generator, offset 0; a fresh key per call gives an independent stream. CUDA: as PyTorch's own
    CUDA dropout, the generator's seed (XORed with our stream key) and its Philox offset, which
    this call advances, so nothing is read back from the device. Either way `torch.manual_seed`
    reproduces a run, and activation checkpointing (which restores the RNG states) replays it.
    """
    if device.type == "cuda":
        gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        offset = gen.get_offset()
        gen.set_offset(offset + 4)  # torch's CUDA generator advances in multiples of 4
        return _as_int64(gen.initial_seed() ^ _CUDA_STREAM_KEY), offset
    return int(torch.empty((), dtype=torch.int64).random_()), 0


def lora_dropout(x: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    """xd = x ⊙ keep/(1 − p) for a 2-D x (any strides), differentiable; x itself when p = 0."""
    if p == 0.0:
        return x
    if _ext.has_kernel("lora_dropout", x.device.type):
        return torch.ops.peftkern.lora_dropout(x, float(p), int(seed), int(offset))
    return lora_dropout_reference(x, p, seed, offset)


def lora_dropout_project_reference(x: torch.Tensor, lora_a: torch.Tensor, p: float, seed: int, offset: int):
    """The spec of `peftkern::lora_dropout_project`: lora_dropout(x)·lora_aᵀ."""
    return lora_dropout_reference(x, p, seed, offset) @ lora_a.t() if p > 0.0 else x @ lora_a.t()


def lora_dropout_project(x: torch.Tensor, lora_a: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    """xa = dropout(x)·lora_aᵀ [M, r] for a 2-D x (any strides), differentiable: on CPU (AVX-512) one
    pass that draws the decisions where it reads x and never writes xd; without dropout, x·Aᵀ by the
    rank-r kernel (csrc/rank_product/) where it applies."""
    if _ext.has_kernel("lora_dropout_project", x.device.type):
        return torch.ops.peftkern.lora_dropout_project(x, lora_a, float(p), int(seed), int(offset))
    return lora_dropout_project_reference(x, lora_a, p, seed, offset)


def lora_dropout_backward_(grad_x: torch.Tensor, grad_xd: torch.Tensor, x: torch.Tensor, p: float, seed: int,
                           offset: int) -> torch.Tensor:
    """The LoRA backward's dropout in one draw of the decisions: grad_x += dropout(grad_xd) in place
    (grad_x contiguous), returns dropout(x) for grad_A. A plain add and x itself when p = 0."""
    if p == 0.0:
        grad_x.add_(grad_xd)
        return x
    if _ext.has_kernel("lora_dropout_backward_", x.device.type):
        return torch.ops.peftkern.lora_dropout_backward_(grad_x, grad_xd, x, float(p), int(seed), int(offset))
    summed, xd = lora_dropout_backward_reference(grad_x, grad_xd, x, p, seed, offset)
    grad_x.copy_(summed)
    return xd


def lora_dropout_mask(x: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    """The keep decisions (bool, x's shape) that `lora_dropout` and the LoRA ops apply to x."""
    if _ext.has_kernel("lora_dropout_mask", x.device.type):
        return torch.ops.peftkern.lora_dropout_mask(x, float(p), int(seed), int(offset))
    return lora_dropout_mask_reference(tuple(x.shape), p, seed, offset).to(x.device)
