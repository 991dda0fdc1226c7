"""Bottleneck-adapter op family (AdapterHub's `Adapter` block, its linear part): the plain-PyTorch
reference (the spec), fakes, the autograd formula of `peftkern::adapter_bottleneck_fwd` (its
backward is the op `adapter_bottleneck_bwd`) and the wrapper `adapter_bottleneck` that layers call.

    out = residual + s·(act(x·W_downᵀ + b_down)·W_upᵀ + b_up),   s = scaling · scale

`scale` is an optional 1-element tensor (AdapterHub's scaling="learned"); its gradient is
computed too. What backward keeps: x (an alias of the input, no copy) and the pre-activation
x·W_downᵀ + b_down ([tokens, bottleneck]); the activation and its derivative are recomputed from
it, the activation output is never stored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _ext
from . import routing
from .common import autocast_inputs

# AdapterHub / transformers activation names -> the op's activation codes (csrc/common/activations.h).
ACTIVATIONS = {
    "relu": 0,
    "gelu": 1,
    "gelu_new": 2,
    "gelu_pytorch_tanh": 2,
    "gelu_tanh": 2,
    "silu": 3,
    "swish": 3,
}


def activation_code(name: str) -> int:
    key = str(name).lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"non_linearity {name!r} is not supported by peftkern's bottleneck adapters "
                         f"(supported: {sorted(ACTIVATIONS)})")  # fmt: skip
    return ACTIVATIONS[key]


def activate(pre: torch.Tensor, code: int) -> torch.Tensor:
    """The reference activations, as transformers' get_activation computes them."""
    if code == 0:
        return F.relu(pre)
    if code == 1:
        return F.gelu(pre)
    if code == 2:  # transformers' NewGELUActivation ("gelu_new")
        return 0.5 * pre * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (pre + 0.044715 * torch.pow(pre, 3.0))))
    return F.silu(pre)


# --------------------------------------------------------------------------------------------
# Reference: the spec (autograd through plain PyTorch ops gives its gradients).
# --------------------------------------------------------------------------------------------


def adapter_bottleneck_reference(x, residual, w_down, b_down, w_up, b_up, scaling=1.0, scale=None, activation=0):
    s = scaling if scale is None else scaling * scale.reshape(())
    return residual + F.linear(activate(F.linear(x, w_down, b_down), activation), w_up, b_up) * s


# --------------------------------------------------------------------------------------------
# Fakes and autograd for the compiled op.
# --------------------------------------------------------------------------------------------


@_ext.register_fake("adapter_bottleneck_fwd")
def _(x, residual, w_down, b_down, w_up, b_up, scaling, scale, activation):
    return x.new_empty((x.shape[0], w_up.shape[0])), x.new_empty((x.shape[0], w_down.shape[0]))


@_ext.register_fake("adapter_bottleneck_bwd")
def _(grad_out, x, pre, w_down, w_up, b_up, scaling, scale, activation):
    grad_scale = torch.empty_like(scale) if scale is not None else x.new_empty((0,))
    return (torch.empty_like(x), torch.empty_like(w_down), w_down.new_empty((w_down.shape[0],)),
            torch.empty_like(w_up), torch.empty_like(b_up), grad_scale)  # fmt: skip


def _setup_context(ctx, inputs, output):
    x, residual, w_down, b_down, w_up, b_up, scaling, scale, activation = inputs
    ctx.save_for_backward(x, output[1], w_down, w_up, b_up, scale)
    ctx.scaling, ctx.activation = scaling, activation
    # `pre` is almost never used downstream: leave its gradient None instead of a zero tensor
    # (a materialized zero would cost two extra GEMMs in _backward)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_pre):
    # grads are not materialized: either may be None (an output unused downstream)
    x, pre, w_down, w_up, b_up, scale = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if grad_out is None:  # only `pre` was used: the linear part of its gradient
        grad_x = grad_w_down = grad_b_down = grad_w_up = grad_b_up = grad_scale = None
    else:
        grad_x, grad_w_down, grad_b_down, grad_w_up, grad_b_up, grad_scale = torch.ops.peftkern.adapter_bottleneck_bwd(
            grad_out, x, pre, w_down, w_up, b_up, ctx.scaling, scale, ctx.activation
        )
    if grad_pre is not None:  # pre used downstream (unusual): chain its gradient
        grad_x = grad_pre @ w_down + (grad_x if grad_x is not None else 0)
        grad_w_down = grad_pre.t() @ x + (grad_w_down if grad_w_down is not None else 0)
        grad_b_down = grad_pre.sum(0) + (grad_b_down if grad_b_down is not None else 0)
    return (grad_x if needs[0] else None, grad_out if needs[1] else None, grad_w_down, grad_b_down,
            grad_w_up, grad_b_up, None, grad_scale if scale is not None else None, None)  # fmt: skip


if _ext.op_exists("adapter_bottleneck_fwd"):
    torch.library.register_autograd("peftkern::adapter_bottleneck_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Wrapper
# --------------------------------------------------------------------------------------------


def adapter_bottleneck(
    x: torch.Tensor,
    residual: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    scaling: float = 1.0,
    scale: torch.Tensor | None = None,
    activation: str | int = "relu",
) -> torch.Tensor:
    """`residual + scaling·scale·up(act(down(x)))` over any leading dims of x (residual shaped
    like x). w_down [bottleneck, hidden], b_down [bottleneck], w_up [hidden, bottleneck], b_up
    [hidden] (nn.Linear layouts); `scale` an optional 1-element tensor; `activation` an
    AdapterHub name (relu, gelu, gelu_new, silu/swish) or the op's code."""
    code = activation if isinstance(activation, int) else activation_code(activation)
    if x.shape != residual.shape:
        raise ValueError(f"adapter_bottleneck: residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
    if x.dim() == 0 or x.shape[-1] != w_down.shape[-1]:
        raise ValueError(f"adapter_bottleneck: x has shape {tuple(x.shape)}, expected [..., {w_down.shape[-1]}]")
    x, residual, w_down, b_down, w_up, b_up, scale = autocast_inputs(x, residual, w_down, b_down, w_up, b_up, scale)
    if scale is not None and scale.dtype != x.dtype:
        scale = scale.to(x.dtype)
    x2, r2 = x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1])
    if _ext.has_kernel("adapter_bottleneck_fwd", x.device.type) and routing.use_kernel(
        "adapter", x2.shape[0], x.device.type
    ):
        out = torch.ops.peftkern.adapter_bottleneck_fwd(x2, r2, w_down, b_down, w_up, b_up, float(scaling), scale, code)[0]
    else:  # no kernel for this device (or no compiled library), or too few tokens for it to pay (ops/routing.py)
        out = adapter_bottleneck_reference(x2, r2, w_down, b_down, w_up, b_up, scaling, scale, code)
    return out.view(x.shape)
