"""DoRA op family: the row norm ||W + scaling * B @ A|| (detached, as the DoRA paper and PEFT do)
computed in one pass by `peftkern::dora_weight_norm`, its reference, fake and wrapper."""

from __future__ import annotations

import torch

from .. import _ext
from .common import acc_dtype


def dora_weight_norm_reference(weight, lora_a, lora_b, scaling) -> torch.Tensor:
    acc = acc_dtype(weight.dtype)
    full = weight.to(acc) + scaling * (lora_b.to(acc) @ lora_a.to(acc))
    return torch.linalg.vector_norm(full, dim=1).to(weight.dtype)


@_ext.register_fake("dora_weight_norm")
def _(weight, lora_a, lora_b, scaling):
    return weight.new_empty((weight.shape[0],))


# The CUDA kernel stages B's row (rank values) in CUDA's default 48 KiB of shared memory
# (csrc/dora/dora_cuda.cu): larger ranks take the reference there.
_CUDA_MAX_RANK = {torch.float64: 6136}
_CUDA_MAX_RANK_DEFAULT = 8192


def dora_weight_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Per output row i: ||W[i] + scaling * B[i] @ A||_2, detached (no gradient flows through it)."""
    weight, lora_a, lora_b = weight.detach(), lora_a.detach(), lora_b.detach()
    too_large = lora_a.shape[0] > _CUDA_MAX_RANK.get(weight.dtype, _CUDA_MAX_RANK_DEFAULT)
    if _ext.has_kernel("dora_weight_norm", weight.device.type) and not (weight.device.type == "cuda" and too_large):
        return torch.ops.peftkern.dora_weight_norm(weight, lora_a, lora_b, float(scaling))
    return dora_weight_norm_reference(weight, lora_a, lora_b, scaling)
