"""LoRA-on-a-dense-base op family: the plain-PyTorch reference (the spec), fakes and the wrapper
`lora_linear` that layers call. The autograd of `peftkern::lora_linear_fwd` is in C++ (its
backward is the op `lora_linear_bwd`).

    out = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ

The same with the base held in NF4 (QLoRA) is `peftkern.ops.qlora`.

What backward keeps: x (an alias of the layer input, not a copy) and xa = dropout(x)·Aᵀ
([tokens, r]). No dropout mask: the op draws its decisions from (seed, offset) with Philox
(`peftkern.ops.dropout`) and draws them again in backward; dropout(x) is recomputed. The base W
and b are frozen in LoRA; if a caller does make them trainable, their gradients are computed too
(never silently dropped).

The reference takes the dropout as a bool mask (the spec given the decisions); tests get the
op's decisions from `dropout.lora_dropout_mask(x, p, seed, offset)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from . import dropout as _dropout
from . import routing
from .common import autocast_inputs

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
def _(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, offset):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


@_ext.register_fake("lora_linear_bwd")
def _(grad_out, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, offset):
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b)


# The autograd formula of `lora_linear_fwd` is C++ (csrc/lora/lora_linear.cpp, LoraLinearFunction,
# registered for the Autograd key): backward is `lora_linear_bwd`; a gradient flowing into the
# returned xa as well goes through `lora_input_grads_`; a trainable base weight or bias gets
# grad_outᵀ·x and grad_out summed over tokens. No Python runs per layer in backward.


# --------------------------------------------------------------------------------------------
# Wrapper
# --------------------------------------------------------------------------------------------


NO_DROPOUT = (0.0, 0, 0)


def prepare_dropout(x: torch.Tensor, dropout: float, training: bool, op: str):
    """x flattened to [tokens, in], and the call's dropout (p, seed, offset): NO_DROPOUT when off,
    else (seed, offset) drawn from torch's generator of x's device (`dropout.draw_seed`). No mask:
    the ops draw the decisions from (seed, offset) where they read x, forward and backward."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{op}: dropout must be in [0, 1), got {dropout}")
    x2 = x.reshape(-1, x.shape[-1])
    if not (training and dropout > 0.0):
        return x2, NO_DROPOUT
    return x2, (float(dropout), *_dropout.draw_seed(x.device))


# Decode on CPU in bf16/fp16 (up to this many tokens, nothing needing a gradient, no dropout): the
# rank-r branch runs in float32. ATen's half-precision path took 15-22 µs for each of x·Aᵀ and
# xa·Bᵀ at 1 token against 2-4 µs in float32 (2026-12-03, 2-core EPYC), so LoRA doubled a
# SmolLM2-sized bf16 layer's decode time (DESIGN.md "LoRA", decode).
DECODE_FLOAT32_BRANCH_MAX_TOKENS = 8


def uses_float32_decode_branch(x2: torch.Tensor) -> bool:
    return (x2.device.type == "cpu" and x2.dtype in (torch.bfloat16, torch.float16)
            and x2.shape[0] <= DECODE_FLOAT32_BRANCH_MAX_TOKENS)  # fmt: skip


def _lora_linear_decode_half(x2, weight, bias, lora_a, lora_b, scaling) -> torch.Tensor:
    """x·Wᵀ + b in x's dtype (ATen), plus scaling·(x·Aᵀ)·Bᵀ computed in float32 and added before
    one rounding: at least as accurate as the reference, which rounds xa and the branch to x's
    dtype on the way."""
    base = F.linear(x2, weight, bias)
    branch = (x2.float() @ lora_a.float().t()) @ lora_b.float().t()
    return (base.float() + float(scaling) * branch).to(x2.dtype)


def reference_mask(x2: torch.Tensor, drop) -> tuple[torch.Tensor | None, float]:
    """(mask, keep scale) of a (p, seed, offset) dropout for the references (the fallback
    without a compiled library): the decisions the kernels draw, materialised."""
    p, seed, offset = drop
    if p == 0.0:
        return None, 1.0
    return _dropout.lora_dropout_mask(x2, p, seed, offset), 1.0 / (1.0 - p)


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
    x, weight, bias, lora_a, lora_b = autocast_inputs(x, weight, bias, lora_a, lora_b)
    x2, drop = prepare_dropout(x, dropout, training, "lora_linear")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_a, lora_b)
    )
    if _ext.has_kernel("lora_linear_fwd", x.device.type) and routing.use_kernel(
        "lora", x2.shape[0], x.device.type, needs_grad
    ):
        out = torch.ops.peftkern.lora_linear_fwd(x2, weight, bias, lora_a, lora_b, float(scaling), *drop)[0]
    elif not needs_grad and drop[0] == 0.0 and uses_float32_decode_branch(x2):
        out = _lora_linear_decode_half(x2, weight, bias, lora_a, lora_b, scaling)
    else:  # no kernel here, or too few tokens for it to pay (ops/routing.py): the same decisions, as a mask
        out = lora_linear_reference(x2, weight, bias, lora_a, lora_b, scaling, *reference_mask(x2, drop))
    return out.view(*x.shape[:-1], out.shape[-1])
