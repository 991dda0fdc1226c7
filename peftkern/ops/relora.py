"""ReLoRA's NF4 merge: W_nf4 ← quantize(deq(W_nf4) + s·B·A), one fused op per quantization
block (csrc/relora/): decode the block, add its slice of s·B·A, take the new absmax, re-encode.
No dense weight is ever written, and the bytes are those of quantizing the dense sum.

The sum is defined exactly, so that every implementation gives the same bytes: deq(W) is
code·absmax in float32 (bitsandbytes' dequantization), the delta is s·Σ_k B[o,k]·A[k,i] formed
in float64 and rounded once to float32 (products of float32 values are exact in float64, so the
sum's order hardly matters), and the two are added in float32. Quantizing then follows
bitsandbytes' rules (csrc/common/blockwise_quant.h)."""

from __future__ import annotations

import torch

from .. import _ext
from . import nf4 as nf4_ops


def nf4_merge_lowrank_reference(packed, absmax, lora_a, lora_b, scaling: float, blocksize: int, shape):
    """(packed, float32 absmax) of quantize(deq(packed, absmax) + s·B·A); the spec."""
    dense = nf4_ops.nf4_dequantize_reference(packed, absmax, blocksize, shape, torch.float32)
    delta = (scaling * (lora_b.double() @ lora_a.double())).float()
    return nf4_ops.nf4_quantize_reference(dense + delta, blocksize)


@_ext.register_fake("nf4_merge_lowrank")
def _(packed, absmax, lora_a, lora_b, scaling, blocksize, shape):
    return torch.empty_like(packed), torch.empty_like(absmax)


def nf4_merge_lowrank(packed, absmax, lora_a, lora_b, scaling: float, blocksize: int, shape):
    """The compiled fused merge for the tensors' device, else the reference. `absmax` is the
    float32 absmax of every block (decoded first when double-quantized); A [r, in] and B [out, r]
    are read as float32 (a bf16/fp16 adapter converts exactly)."""
    lora_a, lora_b = lora_a.detach().float().contiguous(), lora_b.detach().float().contiguous()
    if _ext.has_kernel("nf4_merge_lowrank", packed.device.type):
        return torch.ops.peftkern.nf4_merge_lowrank(packed, absmax, lora_a, lora_b, float(scaling), blocksize,
                                                    list(shape))  # fmt: skip
    return nf4_merge_lowrank_reference(packed, absmax, lora_a, lora_b, scaling, blocksize, shape)


@torch.no_grad()
def nf4_merge_lowrank_(weight, lora_a, lora_b, scaling: float) -> None:
    """Merge s·B·A into the `NF4Weight` `weight` in place: its packed bytes, absmax and (under
    double quantization) nested absmax and offset tensors are overwritten, so whatever shares
    them (a bitsandbytes Linear4bit's Params4bit and QuantState, an NF4Linear's buffers) sees
    the merged weight. Double quantization re-quantizes the new absmax as bitsandbytes does
    (mean offset, 8-bit blockwise in blocks of 256, the weight's own 8-bit code table)."""
    if len(weight.shape) != 2 or lora_a.shape[1] != weight.shape[1] or lora_b.shape != (weight.shape[0], lora_a.shape[0]):
        raise ValueError(f"nf4_merge_lowrank_: A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} do not fit a "
                         f"weight of shape {tuple(weight.shape)}")  # fmt: skip
    packed, absmax = nf4_merge_lowrank(
        weight.packed, weight.block_absmax().contiguous(), lora_a, lora_b, scaling, weight.blocksize, weight.shape
    )
    weight.packed.copy_(packed.view_as(weight.packed))
    nested = weight.nested
    if nested is None:
        weight.absmax.copy_(absmax)
        return
    offset = absmax.mean()
    codes, nested_absmax = nf4_ops.quantize_blockwise_8bit(absmax - offset, nested.code, nested.blocksize)
    weight.absmax.copy_(codes)
    nested.absmax.copy_(nested_absmax)
    nested.offset.copy_(offset)
