"""The rank-r products of a LoRA backward (csrc/rank_product/): each reads one big matrix once for
both of its thin products. On CPU float32 with the AVX-512 path they are our kernels (2-3x MKL
on these shapes, DESIGN.md "Rank-r products"); elsewhere ATen's GEMMs. Backward-only helpers:
no autograd formula (they compute gradients)."""

from __future__ import annotations

import torch

from .. import _ext
from . import dropout as _dropout


def lora_out_grads_reference(grad_out, xa, lora_b, scaling):
    """The spec of `peftkern::lora_out_grads`: (scaling·grad_out·lora_b, scaling·grad_outᵀ·xa)."""
    return (grad_out @ lora_b) * scaling, (grad_out.t() @ xa) * scaling


def lora_input_grads_reference(grad_x, x, grad_xa, lora_a, p, seed, offset):
    """The spec of `peftkern::lora_input_grads_`, out of place: (grad_x + (grad_xa·A) ⊙ m/(1 − p),
    grad_xaᵀ·(x ⊙ m/(1 − p))), m lora_dropout's decisions for (p, seed, offset)."""
    if p == 0.0:
        return grad_x + grad_xa @ lora_a, grad_xa.t() @ x
    summed, xd = _dropout.lora_dropout_backward_reference(grad_x, grad_xa @ lora_a, x, p, seed, offset)
    return summed, grad_xa.t() @ xd


@_ext.register_fake("lora_out_grads")
def _(grad_out, xa, lora_b, scaling):
    return xa.new_empty((grad_out.shape[0], lora_b.shape[1])), xa.new_empty((grad_out.shape[1], xa.shape[1]))


@_ext.register_fake("lora_input_grads_")
def _(grad_x, x, grad_xa, lora_a, p, seed, offset):
    return x.new_empty((grad_xa.shape[1], x.shape[1]))


def lora_out_grads(grad_out: torch.Tensor, xa: torch.Tensor, lora_b: torch.Tensor, scaling: float):
    """(grad_xa [M, r], grad_b [N, r]) of out += scaling·xa·lora_bᵀ for grad_out [M, N]."""
    if _ext.has_kernel("lora_out_grads", grad_out.device.type):
        return torch.ops.peftkern.lora_out_grads(grad_out, xa, lora_b, float(scaling))
    return lora_out_grads_reference(grad_out, xa, lora_b, scaling)


def lora_input_grads_(grad_x: torch.Tensor, x: torch.Tensor, grad_xa: torch.Tensor, lora_a: torch.Tensor, p: float,
                      seed: int, offset: int) -> torch.Tensor:  # fmt: skip
    """grad_x += (grad_xa·lora_a) ⊙ m/(1 − p) in place; returns grad_a = grad_xaᵀ·(x ⊙ m/(1 − p))
    [r, K]. The dropout decisions m (none when p = 0) are the forward's, drawn again."""
    if _ext.has_kernel("lora_input_grads_", x.device.type):
        return torch.ops.peftkern.lora_input_grads_(grad_x, x, grad_xa, lora_a, float(p), int(seed), int(offset))
    summed, grad_a = lora_input_grads_reference(grad_x, x, grad_xa, lora_a, p, seed, offset)
    grad_x.copy_(summed)
    return grad_a
