"""`NF4Weight`: a weight held in bitsandbytes' NF4 format, and the public quantize/dequantize API.

The tensors and their meaning are exactly bitsandbytes' (`Params4bit` data + `QuantState`), so a
weight converts both ways without copying the packed bytes, and its state dict uses the names
transformers writes for bitsandbytes 4-bit checkpoints (`weight`, `weight.absmax`,
`weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
`weight.quant_state.bitsandbytes__nf4`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .ops import nf4 as nf4_ops
from .ops import qlora as qlora_ops

_QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


@dataclass
class NestedAbsmax:
    """Double quantization of the per-block absmax (bitsandbytes' `compress_statistics`):
    absmax[b] = code[codes[b]] * absmax2[b // blocksize] + offset, with `codes` held in
    `NF4Weight.absmax`."""

    absmax: torch.Tensor  # float32 [ceil(blocks / 256)]
    code: torch.Tensor  # float32 [256], the dynamic 8-bit map
    offset: torch.Tensor  # float32 [] (0-dim): the mean absmax subtracted before quantizing
    blocksize: int = nf4_ops.NESTED_BLOCKSIZE


@dataclass
class NF4Weight:
    """A tensor quantized to NF4. `packed` and `absmax` are bitsandbytes' tensors, unchanged."""

    packed: torch.Tensor  # uint8 [ceil(numel / 2), 1], element 2i in the high nibble
    absmax: torch.Tensor  # float32 [blocks]; uint8 codes [blocks] when `nested` is set
    shape: torch.Size
    dtype: torch.dtype  # the dtype dequantize() returns by default (the original weight's)
    blocksize: int = 64
    nested: NestedAbsmax | None = None

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> "NF4Weight":
        if not isinstance(weight, torch.Tensor) or weight.dtype not in _DTYPE_NAMES:
            got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise TypeError(f"nf4_quantize: weight must be a float32/float16/bfloat16 tensor, got {got}")
        nf4_ops.check_blocksize(blocksize)
        weight = weight.detach()
        packed, absmax = nf4_ops.quantize(weight, blocksize)
        nested = None
        if double_quant:
            # As bitsandbytes: subtract the mean, then 8-bit blockwise quantize in blocks of 256.
            offset = absmax.mean()
            code = nf4_ops.dynamic_code_8bit(weight.device)
            absmax, nested_absmax = nf4_ops.quantize_blockwise_8bit(absmax - offset, code, nf4_ops.NESTED_BLOCKSIZE)
            nested = NestedAbsmax(absmax=nested_absmax, code=code, offset=offset)
        return cls(packed, absmax, weight.shape, weight.dtype, blocksize, nested)

    # ---- use ----------------------------------------------------------------------------------

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every block (decoded when double-quantized)."""
        if self.nested is None:
            return self.absmax
        n = self.nested
        return nf4_ops.nested_absmax_reference(self.absmax, n.absmax, n.code, n.offset, n.blocksize)

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight in `dtype` (default: the original dtype), or written into `out` (any
        shape with the weight's element count, contiguous; its dtype is used), as bitsandbytes'
        `dequantize_4bit(out=...)`: a buffer reused across calls is not allocated again."""
        if out is not None:
            if dtype is not None and dtype != out.dtype:
                raise ValueError(f"dequantize: dtype {dtype} but out is {out.dtype}")
            if out.numel() != math.prod(self.shape):
                raise ValueError(f"dequantize: out has {out.numel()} elements, the weight {math.prod(self.shape)}")
            n = self.nested
            nested = (n.absmax, n.code, n.offset, n.blocksize) if n else None
            return nf4_ops.dequantize_into(out, self.packed, self.absmax, nested, self.blocksize)
        dtype = dtype or self.dtype
        if self.nested is None:
            return nf4_ops.dequantize(self.packed, self.absmax, self.blocksize, self.shape, dtype)
        n = self.nested
        return nf4_ops.dequantize_nested(
            self.packed, self.absmax, n.absmax, n.code, n.offset, self.blocksize, n.blocksize, self.shape, dtype
        )

    def to(self, device: torch.device | str) -> "NF4Weight":
        nested = self.nested
        if nested is not None:
            nested = replace(
                nested, absmax=nested.absmax.to(device), code=nested.code.to(device), offset=nested.offset.to(device)
            )
        return replace(self, packed=self.packed.to(device), absmax=self.absmax.to(device), nested=nested)

    # ---- bitsandbytes interop -----------------------------------------------------------------

    @classmethod
    def from_bnb(cls, weight, quant_state=None) -> "NF4Weight":
        """From a bitsandbytes `Params4bit` (its `.quant_state` is used) or a packed tensor plus a
        `QuantState`. Shares the tensors: nothing is copied."""
        quant_state = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if quant_state is None:
            raise ValueError("from_bnb: no QuantState given and the weight has none (was it quantized?)")
        if quant_state.quant_type != "nf4":
            raise ValueError(f"from_bnb: only NF4 is supported, this weight is {quant_state.quant_type!r}")
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError("from_bnb: this weight was repacked by bitsandbytes' AVX512 CPU path; its bytes are "
                             "no longer bitsandbytes' NF4 layout")  # fmt: skip
        packed = weight.data if isinstance(weight, torch.nn.Parameter) else weight
        if packed.dtype != torch.uint8:  # bitsandbytes allows other quant_storage dtypes
            packed = packed.view(torch.uint8)
        nested = None
        if quant_state.nested:
            s2 = quant_state.state2
            nested = NestedAbsmax(absmax=s2.absmax, code=s2.code, offset=quant_state.offset, blocksize=s2.blocksize)
        return cls(
            packed=packed.reshape(-1, 1),
            absmax=quant_state.absmax,
            shape=torch.Size(quant_state.shape),
            dtype=quant_state.dtype,
            blocksize=quant_state.blocksize,
            nested=nested,
        )

    def to_bnb_quant_state(self):
        """The equivalent bitsandbytes `QuantState` (shares the tensors). Needs bitsandbytes."""
        from bitsandbytes.functional import QuantState

        state2, offset = None, None
        if self.nested is not None:
            n = self.nested
            state2 = QuantState(absmax=n.absmax, code=n.code, blocksize=n.blocksize, dtype=torch.float32)
            offset = n.offset
        return QuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=nf4_ops.nf4_code(self.device),
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=offset,
            state2=state2,
        )

    # ---- serialization (bitsandbytes' packed state-dict format) -------------------------------

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """Tensors named as transformers saves a bitsandbytes 4-bit weight, safetensors-ready."""
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _DTYPE_NAMES[self.dtype], "shape": list(self.shape)}
        tensors = {
            prefix: self.packed,
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": nf4_ops.nf4_code(self.device),
        }
        if self.nested is not None:
            n = self.nested
            tensors[f"{prefix}.nested_absmax"] = n.absmax
            tensors[f"{prefix}.nested_quant_map"] = n.code
            meta.update(nested_blocksize=n.blocksize, nested_dtype="float32", nested_offset=n.offset.item())
        tensors[f"{prefix}.{_QUANT_STATE_KEY}"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], prefix: str = "weight") -> "NF4Weight":
        key = f"{prefix}.{_QUANT_STATE_KEY}"
        missing = [k for k in (prefix, f"{prefix}.absmax", key) if k not in tensors]
        if missing:
            raise KeyError(f"not an NF4 state dict: missing {missing}")
        meta = json.loads(bytes(tensors[key].cpu().tolist()).decode())
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"only NF4 is supported, this state dict holds {meta.get('quant_type')!r}")
        quant_map = tensors.get(f"{prefix}.quant_map")
        if quant_map is not None and not torch.equal(quant_map.cpu().float(), nf4_ops.nf4_code()):
            raise ValueError(f"{prefix}.quant_map is not the NF4 code table")
        packed = tensors[prefix]
        nested = None
        if "nested_offset" in meta:
            nested = NestedAbsmax(
                absmax=tensors[f"{prefix}.nested_absmax"],
                code=tensors[f"{prefix}.nested_quant_map"],
                offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=packed.device),
                blocksize=int(meta["nested_blocksize"]),
            )
        weight = cls(
            packed=packed.view(torch.uint8).reshape(-1, 1),
            absmax=tensors[f"{prefix}.absmax"],
            shape=torch.Size(meta["shape"]),
            dtype=_DTYPES[meta["dtype"]],
            blocksize=int(meta["blocksize"]),
            nested=nested,
        )
        weight._validate()
        return weight

    def _validate(self) -> None:
        blocks = -(-self.numel // self.blocksize)
        expected = {"packed": (self.packed.numel(), (self.numel + 1) // 2), "absmax": (self.absmax.numel(), blocks)}
        for name, (got, want) in expected.items():
            if got != want:
                raise ValueError(f"NF4 state for shape {tuple(self.shape)}: {name} has {got} elements, expected {want}")

    def save(self, path: str | Path, prefix: str = "weight") -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in self.state_dict(prefix).items()}, str(path))

    @classmethod
    def load(cls, path: str | Path, prefix: str = "weight", device: torch.device | str = "cpu") -> "NF4Weight":
        from safetensors.torch import load_file

        return cls.from_state_dict(load_file(str(path), device=str(device)), prefix)


class NF4Linear(torch.nn.Module):
    """A frozen linear layer whose weight is held in NF4 (what `peftkern.patch(...,
    quantize="nf4")` puts under a LoRA adapter). The NF4 tensors are buffers, so `.to()`,
    `.cuda()` and `state_dict()` handle them; forward dequantizes into x's dtype."""

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.blocksize, self.shape, self.dtype = weight.blocksize, weight.shape, weight.dtype
        self.register_buffer("packed", weight.packed)
        self.register_buffer("absmax", weight.absmax)
        nested = weight.nested
        self.nested_blocksize = nested.blocksize if nested else None
        for name in ("absmax", "code", "offset"):
            self.register_buffer(f"nested_{name}", getattr(nested, name) if nested else None)
        self.bias = torch.nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        return cls(nf4_quantize(linear.weight, blocksize, double_quant), linear.bias)

    def nf4_weight(self) -> NF4Weight:
        nested = None
        if self.nested_absmax is not None:
            nested = NestedAbsmax(self.nested_absmax, self.nested_code, self.nested_offset, self.nested_blocksize)
        return NF4Weight(self.packed, self.absmax, self.shape, self.dtype, self.blocksize, nested)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must move the NF4 state but never cast it (a bf16 absmax would
        # corrupt the format): buffers follow device moves only; the bias follows everything.
        buffers = dict(self._buffers)
        self._buffers.clear()
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in buffers.items():
                if tensor is not None:
                    moved = fn(tensor)
                    tensor = moved if moved.dtype == tensor.dtype else tensor.to(moved.device)
                self._buffers[name] = tensor
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        x2 = x.reshape(-1, x.shape[-1])
        if not torch.is_autocast_enabled(x.device.type) and qlora_ops.use_gemv(x2, (bias,), None, None):
            # decode sizes in inference (CPU and CUDA): the GEMV that reads the 4-bit weight once
            out = qlora_ops.nf4_lora_gemv(x2.contiguous(), self.nf4_weight(), bias)
            return out.view(*x.shape[:-1], out.shape[-1])
        return torch.nn.functional.linear(x, self.nf4_weight().dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}"


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize `weight` to NF4 exactly as bitsandbytes' `quantize_4bit(quant_type="nf4",
    compress_statistics=double_quant)` does, on the weight's device."""
    return NF4Weight.quantize(weight, blocksize, double_quant)


def nf4_dequantize(weight: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense tensor an `NF4Weight` stands for, in `dtype` (default: the original dtype)."""
    return weight.dequantize(dtype)
