"""NF4 op family: plain-PyTorch references (the spec), fake implementations, and the wrappers
that dispatch to the compiled kernels (csrc/nf4/) or, where there is none, to the reference.

Format and rounding: see csrc/common/blockwise_quant.h. In short, bitsandbytes' NF4 layout and
the rounding rules of bitsandbytes' reference backend, so quantized bytes equal bitsandbytes'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import _ext

# The spec's NF4 table (bitsandbytes' values; QLoRA paper, appendix E). The kernels carry their
# own copy in csrc/common/blockwise_quant.h, exported as torch.ops.peftkern.nf4_code_table();
# tests/test_nf4.py checks the two are bit-identical and equal to bitsandbytes'.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
NESTED_BLOCKSIZE = 256  # bitsandbytes' double quantization always uses 256-element blocks
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_MIN_ABSMAX = 1e-38


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def _build_dynamic_code() -> torch.Tensor:
    # The signed 8-bit "dynamic tree" data type of Dettmers (2016): for exponent e = 0..6, the
    # 2^e midpoints of linspace(0.1, 1, 2^e + 1) scaled by 10^(e - 6), both signs, plus 0 and 1.
    # Computed with the same float32 operations bitsandbytes uses, so the table is bit-identical.
    values = [0.0, 1.0]
    for exponent in range(7):
        edges = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** (exponent - 6)) * means
        values += scaled.tolist() + (-scaled).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


_DYNAMIC_CODE = _build_dynamic_code()  # built once: torch.compile sees a constant


def dynamic_code_8bit(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry code table of the double-quantized absmax (bitsandbytes' dynamic map)."""
    return _DYNAMIC_CODE.to(device, copy=True)  # a copy: callers may hand it to code that mutates


# --------------------------------------------------------------------------------------------
# References: the spec every kernel is tested against, and the fallback where none is built.
# --------------------------------------------------------------------------------------------


def check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"{name} must be one of {VALID_BLOCKSIZES} (as bitsandbytes accepts), got {blocksize}")


def _normalize_blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened float32 values scaled into [-1, 1] per block, and the stored absmax per block.

    Full blocks: x * (1 / max(absmax, 1e-38)), absmax stored raw. The partial tail block:
    x / max(absmax, 1e-38), and the clamped absmax is stored (bitsandbytes' reference rule).
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].view(-1, blocksize)
    absmax = head.abs().amax(dim=1) if full else flat.new_empty(0)
    scaled = (head * (1.0 / absmax.clamp(min=_MIN_ABSMAX)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().amax().clamp(min=_MIN_ABSMAX)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        scaled = torch.cat([scaled, (flat[full:] / tail_absmax).clamp(-1, 1)])
    return scaled, absmax


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted `code`, ties to the lower index."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, right=False)


def nf4_quantize_reference(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_blocksize(blocksize)
    scaled, absmax = _normalize_blocks(weight, blocksize)
    if scaled.numel() % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])  # the pad nibble encodes 0.0
    codes = _nearest_code(scaled, nf4_code(weight.device)).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.view(-1, 1), absmax


def _unpack_nf4(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape, dtype) -> torch.Tensor:
    n = math.prod(shape)
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n].long()
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (nf4_code(packed.device)[codes] * scale).to(dtype).view(tuple(shape))


def nf4_dequantize_reference(packed, absmax, blocksize, shape, dtype) -> torch.Tensor:
    return _unpack_nf4(packed, absmax, blocksize, shape, dtype)


def nested_absmax_reference(absmax_codes, nested_absmax, nested_code, nested_offset, nested_blocksize):
    """The float32 absmax of every NF4 block under double quantization."""
    values = dequantize_blockwise_8bit_reference(absmax_codes, nested_absmax, nested_code, nested_blocksize)
    return values + nested_offset


def nf4_dequantize_nested_reference(
    packed, absmax_codes, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, dtype
) -> torch.Tensor:
    absmax = nested_absmax_reference(absmax_codes, nested_absmax, nested_code, nested_offset, nested_blocksize)
    return _unpack_nf4(packed, absmax, blocksize, shape, dtype)


def quantize_blockwise_8bit_reference(x, code, blocksize) -> tuple[torch.Tensor, torch.Tensor]:
    check_blocksize(blocksize)
    scaled, absmax = _normalize_blocks(x, blocksize)
    return _nearest_code(scaled, code).to(torch.uint8).view(x.shape), absmax


def dequantize_blockwise_8bit_reference(codes, absmax, code, blocksize) -> torch.Tensor:
    flat = codes.reshape(-1).long()
    scale = absmax.repeat_interleave(blocksize)[: flat.numel()]
    return (code[flat] * scale).view(codes.shape)


# --------------------------------------------------------------------------------------------
# Fakes: output metadata for torch.compile / meta tensors.
# --------------------------------------------------------------------------------------------


@_ext.register_fake("nf4_quantize")
def _(weight, blocksize):
    n = weight.numel()
    return (
        weight.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
        weight.new_empty((-(-n // blocksize),), dtype=torch.float32),
    )


@_ext.register_fake("nf4_dequantize")
def _(packed, absmax, blocksize, shape, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


@_ext.register_fake("nf4_dequantize_nested")
def _(packed, absmax_codes, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


@_ext.register_fake("nf4_dequantize_into")
def _(out, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize):
    return None


@_ext.register_fake("nf4_decode_range")
def _(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, numel, first, count, dtype):
    return packed.new_empty((count,), dtype=dtype)


@_ext.register_fake("quantize_blockwise_8bit")
def _(x, code, blocksize):
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((-(-x.numel() // blocksize),), dtype=torch.float32)


@_ext.register_fake("dequantize_blockwise_8bit")
def _(codes, absmax, code, blocksize):
    return codes.new_empty(codes.shape, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Wrappers: the compiled kernel for the tensor's device, else the reference.
# --------------------------------------------------------------------------------------------


def _use_kernel(op: str, tensor: torch.Tensor) -> bool:
    return _ext.has_kernel(op, tensor.device.type)


def quantize(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [ceil(n/2), 1], absmax float32 [ceil(n/blocksize)]) of `weight` in NF4."""
    if _use_kernel("nf4_quantize", weight):
        return torch.ops.peftkern.nf4_quantize(weight, blocksize)
    return nf4_quantize_reference(weight, blocksize)


def dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    if _use_kernel("nf4_dequantize", packed):
        return torch.ops.peftkern.nf4_dequantize(packed, absmax, blocksize, list(shape), dtype)
    return nf4_dequantize_reference(packed, absmax, blocksize, shape, dtype)


def dequantize_nested(
    packed, absmax_codes, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape, dtype
) -> torch.Tensor:
    args = (packed, absmax_codes, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize)
    if _use_kernel("nf4_dequantize_nested", packed):
        return torch.ops.peftkern.nf4_dequantize_nested(*args, list(shape), dtype)
    return nf4_dequantize_nested_reference(*args, shape, dtype)


def dequantize_into(out: torch.Tensor, packed, absmax, nested=None, blocksize: int = 64) -> torch.Tensor:
    """NF4 weight -> the caller's buffer `out` (contiguous, float32/float16/bfloat16, as many
    elements as the weight; bitsandbytes' `dequantize_4bit(out=...)`): no allocation, so a buffer
    reused across calls pays no page faults. nested: (nested_absmax, nested_code, nested_offset,
    nested_blocksize) under double quantization, absmax then the uint8 codes. Returns out."""
    args = (nested[0], nested[1], nested[2].reshape(1), blocksize, nested[3]) if nested else (None, None, None, blocksize, 0)
    if _use_kernel("nf4_dequantize_into", packed):
        torch.ops.peftkern.nf4_dequantize_into(out, packed, absmax, *args)
        return out
    if not out.is_contiguous():
        raise ValueError("dequantize_into: out must be contiguous")
    shape = (out.numel(),)
    dense = (nf4_dequantize_nested_reference(packed, absmax, *args[:3], blocksize, args[4], shape, out.dtype) if nested
             else nf4_dequantize_reference(packed, absmax, blocksize, shape, out.dtype))  # fmt: skip
    return out.copy_(dense.view(out.shape))


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_kernel("quantize_blockwise_8bit", x):
        return torch.ops.peftkern.quantize_blockwise_8bit(x, code, blocksize)
    return quantize_blockwise_8bit_reference(x, code, blocksize)


def dequantize_blockwise_8bit(codes, absmax, code, blocksize) -> torch.Tensor:
    if _use_kernel("dequantize_blockwise_8bit", codes):
        return torch.ops.peftkern.dequantize_blockwise_8bit(codes, absmax, code, blocksize)
    return dequantize_blockwise_8bit_reference(codes, absmax, code, blocksize)
