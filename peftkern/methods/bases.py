"""The base layers that methods wrap: dense `nn.Linear`, transformers' `Conv1D` (GPT-2, weight
stored [in, out]) and NF4 (peftkern `NF4Linear`, bitsandbytes `Linear4bit`, read in place)."""

from __future__ import annotations

import torch
from torch import nn

from ..nf4 import NF4Linear, NF4Weight


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # transformers.pytorch_utils.Conv1D


def is_bnb_linear4bit(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit subclasses nn.Linear: test for it before treating a base as dense.
    return type(module).__name__ == "Linear4bit" and hasattr(module.weight, "quant_state")


def supports(module: nn.Module) -> bool:
    """Whether `module` is a base layer the LoRA and IA³ layers can wrap."""
    return isinstance(module, (nn.Linear, NF4Linear)) or is_conv1d(module)


def nf4_base_weight(module: nn.Module) -> NF4Weight | None:
    """The NF4 weight of a quantized base (ours or bitsandbytes', read without copying), else None."""
    if isinstance(module, NF4Linear):
        return module.nf4_weight()
    if is_bnb_linear4bit(module):
        if module.weight.quant_state is None:
            raise ValueError("a bitsandbytes Linear4bit base must be quantized (moved to its device) before patching")
        return NF4Weight.from_bnb(module.weight)
    return None


def base_features(base_layer: nn.Module, quantized: bool, fan_in_fan_out: bool) -> tuple[int, int]:
    """(out_features, in_features) of a base; a dense weight is [out, in], or [in, out] when
    `fan_in_fan_out` (Conv1D)."""
    if quantized:
        return base_layer.out_features, base_layer.in_features
    shape = base_layer.weight.shape
    return (shape[1], shape[0]) if fan_in_fan_out else (shape[0], shape[1])


def bias_like(bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """An NF4 base's bias in x's dtype (under autocast the op casts it itself)."""
    if bias is not None and bias.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        return bias.to(x.dtype)
    return bias


def quantized_base(module: nn.Module, quantize: str | None) -> nn.Module:
    """The base to wrap: `module`, or with quantize="nf4" a dense nn.Linear quantized to an
    `NF4Linear` (its dense weight goes with the old module)."""
    if quantize and nf4_base_weight(module) is None:
        return NF4Linear.from_linear(module)
    return module


def check_quantize_option(quantize: str | None) -> None:
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")


def check_new_base(name: str, module: nn.Module, quantize: str | None):
    """Before patching a target that has no adapter yet: its NF4 weight (None for a dense base; a
    Linear4bit that is not quantized yet fails here, early), and quantize="nf4" only on nn.Linear."""
    nf4 = nf4_base_weight(module)
    if quantize and not isinstance(module, nn.Linear):
        raise NotImplementedError(f"quantize='nf4' supports nn.Linear bases; {name!r} is a {type(module).__name__}")
    return nf4
