"""LoRA (and rsLoRA) with Hugging Face PEFT's config fields and semantics, on dense bases
(`nn.Linear`, transformers' `Conv1D`), computed by the fused op `peftkern.ops.lora.lora_linear`.

Supported now: r, lora_alpha, lora_dropout, target_modules (suffix list, regex full-match,
"all-linear", or PEFT's per-architecture default), exclude_modules, layers_to_transform,
layers_pattern, fan_in_fan_out, use_rslora, init_lora_weights in {True, False, "gaussian"}.
Not yet (a clear NotImplementedError, never silently ignored): use_dora, bias other than "none",
modules_to_save, rank_pattern / alpha_pattern, other init schemes, NF4 bases.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nf4 import NF4Linear, NF4Weight
from ..ops import lora as lora_ops


@dataclass
class LoraConfig:
    """PEFT's `LoraConfig` fields, same names and meaning."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    @classmethod
    def from_any(cls, config) -> "LoraConfig":
        """From a peftkern LoraConfig, a `peft.LoraConfig`, or a plain dict. Fields peftkern does
        not know are ignored only when they hold PEFT's default (checked in validate())."""
        if isinstance(config, cls):
            return dataclasses.replace(config)  # a copy: patching fills in defaults
        if isinstance(config, dict):
            values = dict(config)
        elif hasattr(config, "to_dict"):
            values = config.to_dict()
        else:
            raise TypeError(f"expected a LoraConfig, a peft.LoraConfig or a dict, got {type(config).__name__}")
        peft_type = values.get("peft_type")
        if peft_type is not None and str(getattr(peft_type, "value", peft_type)).upper() != "LORA":
            raise ValueError(f"not a LoRA config: peft_type={peft_type}")
        known = {f.name for f in dataclasses.fields(cls)}
        target = values.get("target_modules")
        if isinstance(target, (set, tuple)):
            values["target_modules"] = sorted(target)
        return cls(**{k: v for k, v in values.items() if k in known})

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        unsupported = {
            "use_dora": self.use_dora,
            "bias": self.bias != "none",
            "modules_to_save": bool(self.modules_to_save),
            "rank_pattern": bool(self.rank_pattern),
            "alpha_pattern": bool(self.alpha_pattern),
            "init_lora_weights": self.init_lora_weights not in (True, False, "gaussian"),
        }
        for name, used in unsupported.items():
            if used:
                raise NotImplementedError(
                    f"LoraConfig.{name}={getattr(self, name)!r} is not supported by peftkern yet"
                )

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # transformers.pytorch_utils.Conv1D


def _is_bnb_linear4bit(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit subclasses nn.Linear: test for it before treating a base as dense.
    return type(module).__name__ == "Linear4bit" and hasattr(module.weight, "quant_state")


def nf4_base_weight(module: nn.Module) -> NF4Weight | None:
    """The NF4 weight of a quantized base (ours or bitsandbytes', read without copying), else None."""
    if isinstance(module, NF4Linear):
        return module.nf4_weight()
    if _is_bnb_linear4bit(module):
        if module.weight.quant_state is None:
            raise ValueError("a bitsandbytes Linear4bit base must be quantized (moved to its device) before patching")
        return NF4Weight.from_bnb(module.weight)
    return None


def supports(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, NF4Linear)) or _is_conv1d(module)


class LoraLinear(nn.Module):
    """A frozen dense base plus LoRA adapters, named as PEFT names them (`base_layer`,
    `lora_A.<adapter>.weight`, `lora_B.<adapter>.weight`)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig):
        super().__init__()
        self.base_layer = base_layer
        self.quantized = nf4_base_weight(base_layer) is not None
        # GPT-2's Conv1D stores its weight as [in, out]: always fan-in-fan-out, as PEFT forces.
        self.fan_in_fan_out = (config.fan_in_fan_out or _is_conv1d(base_layer)) and not self.quantized
        if self.quantized:
            self.out_features, self.in_features = base_layer.out_features, base_layer.in_features
        else:
            weight = base_layer.weight
            self.out_features, self.in_features = weight.shape[::-1] if self.fan_in_fan_out else weight.shape
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active_adapter = adapter_name
        self.merged = False
        self.add_adapter(adapter_name, config)

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        if self.quantized:  # float32 adapters on a 4-bit base, as PEFT makes them
            factory = dict(device=nf4_base_weight(self.base_layer).device, dtype=torch.float32)
        else:
            factory = dict(device=self.base_layer.weight.device, dtype=self.base_layer.weight.dtype)
        self.lora_A[name] = nn.Linear(self.in_features, config.r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(config.r, self.out_features, bias=False, **factory)
        self.scaling[name] = config.scaling
        self.dropout[name] = config.lora_dropout
        init = config.init_lora_weights
        if init is not False:  # False keeps nn.Linear's default init for both, as PEFT does
            if init is True:
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            else:  # "gaussian"
                nn.init.normal_(self.lora_A[name].weight, std=1 / config.r)
            nn.init.zeros_(self.lora_B[name].weight)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A, laid out like the base weight."""
        delta = self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)
        return delta.t() if self.fan_in_fan_out else delta

    def _refuse_quantized_merge(self) -> None:
        if self.quantized:
            raise NotImplementedError(
                "merging LoRA into an NF4 base would re-quantize it (lossy); not supported yet. "
                "Dequantize the base first if you need a merged dense model."
            )

    @torch.no_grad()
    def merge(self) -> None:
        self._refuse_quantized_merge()
        if not self.merged:
            self.base_layer.weight += self.delta_weight(self.active_adapter).to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight(self.active_adapter).to(self.base_layer.weight.dtype)
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if self.merged or name is None:
            return self.base_layer(x)
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        if lora_a.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            # e.g. float32 adapters on a bfloat16 model: compute in x's dtype (under autocast the
            # op casts everything to the autocast dtype itself)
            lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        if self.quantized:
            bias = self.base_layer.bias
            if bias is not None and bias.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
                bias = bias.to(x.dtype)
            return lora_ops.nf4_lora_linear(
                x, nf4_base_weight(self.base_layer), bias,
                lora_a, lora_b, self.scaling[name], dropout=self.dropout[name], training=self.training,
            )  # fmt: skip
        return lora_ops.lora_linear(
            x, self.base_layer.weight, self.base_layer.bias, lora_a, lora_b, self.scaling[name],
            dropout=self.dropout[name], training=self.training, fan_in_fan_out=self.fan_in_fan_out,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.lora_A)}, merged={self.merged}"
