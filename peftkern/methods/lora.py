"""LoRA (and rsLoRA) with Hugging Face PEFT's config fields and semantics, on dense bases
(`nn.Linear`, transformers' `Conv1D`), computed by the fused op `peftkern.ops.lora.lora_linear`.

Supported now: r, lora_alpha, lora_dropout, target_modules (suffix list, regex full-match,
"all-linear", or PEFT's per-architecture default), exclude_modules, layers_to_transform,
layers_pattern, fan_in_fan_out, use_rslora, use_dora, init_lora_weights in {True, False,
"gaussian"}; dense and NF4 bases. Not yet (a clear NotImplementedError, never silently ignored):
bias other than "none", modules_to_save, rank_pattern / alpha_pattern, other init schemes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import targeting
from ..nf4 import NF4Linear, NF4Weight
from ..ops import dora as dora_ops
from ..ops import lora as lora_ops
from . import AdapterLayer

# PEFT's default LoRA targets per architecture (used when target_modules is None).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
}


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
    task_type: str | None = None  # recorded in checkpoints, as PEFT does

    peft_type = "LORA"  # a class attribute, not a field

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


class DoraMagnitude(nn.Module):
    """DoRA's trainable magnitude vector m [out_features]; a module so that its state-dict key is
    PEFT's `lora_magnitude_vector.<adapter>.weight`."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoraLinear(AdapterLayer):
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
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
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
        if config.use_dora:  # m starts as ||W + s·BA|| per output row, so DoRA starts where LoRA does
            norm = dora_ops.dora_weight_norm(
                self.dense_weight(factory["dtype"]), self.lora_A[name].weight, self.lora_B[name].weight, config.scaling
            )
            self.lora_magnitude_vector[name] = DoraMagnitude(norm)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight as [out, in] in `dtype` (dequantized for NF4 bases)."""
        nf4 = nf4_base_weight(self.base_layer)
        if nf4 is not None:
            return nf4.dequantize(dtype)
        weight = self.base_layer.weight
        return (weight.t() if self.fan_in_fan_out else weight).to(dtype)

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

    def _dora_factor(self, name: str) -> torch.Tensor | None:
        """m / ||W + s·BA|| per output row (a column of the base weight's layout), or None."""
        if name not in self.lora_magnitude_vector:
            return None
        weight = self.base_layer.weight
        norm = dora_ops.dora_weight_norm(
            self.dense_weight(weight.dtype), self.lora_A[name].weight.to(weight.dtype),
            self.lora_B[name].weight.to(weight.dtype), self.scaling[name],
        )  # fmt: skip
        factor = self.lora_magnitude_vector[name].weight.to(weight.dtype) / norm
        return factor.view(1, -1) if self.fan_in_fan_out else factor.view(-1, 1)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s·BA (LoRA), or W <- m/||W + s·BA|| ⊙ (W + s·BA) (DoRA), as PEFT merges."""
        self._refuse_quantized_merge()
        if self.merged:
            return
        name, weight = self.active_adapter, self.base_layer.weight
        factor = self._dora_factor(name)
        weight += self.delta_weight(name).to(weight.dtype)
        if factor is not None:
            weight *= factor
            self._merged_dora_factor = factor
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        factor = getattr(self, "_merged_dora_factor", None)
        if factor is not None:
            weight /= factor
            self._merged_dora_factor = None
        weight -= self.delta_weight(self.active_adapter).to(weight.dtype)
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
        if name in self.lora_magnitude_vector:
            return self._dora_forward(x, name, lora_a, lora_b)
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

    def _dora_forward(self, x, name, lora_a, lora_b):
        """y = m/n ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b with n = ||W + s·BA|| per output row, detached (DoRA
        paper §4.3, PEFT). With dropout in training, PEFT's form: the base term on x, the DoRA
        correction on dropout(x): x·Wᵀ + b + (m/n - 1) ⊙ xd·Wᵀ + m/n ⊙ s·xd·Aᵀ·Bᵀ."""
        base, scaling, p = self.base_layer, self.scaling[name], self.dropout[name]
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, lora_a, lora_b = x.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        nf4 = nf4_base_weight(base)
        bias = base.bias.to(x.dtype) if base.bias is not None else None
        dense = self.dense_weight(x.dtype)  # dequantized once per step for an NF4 base, shared below
        norm = dora_ops.dora_weight_norm(dense, lora_a, lora_b, scaling)
        scale = self.lora_magnitude_vector[name].weight.to(x.dtype) / norm

        def lora_part(inputs):  # inputs·Wᵀ + s·inputs·Aᵀ·Bᵀ, no bias
            if nf4 is not None:
                return lora_ops.nf4_lora_linear(inputs, nf4, None, lora_a, lora_b, scaling, dense=dense)
            return lora_ops.lora_linear(inputs, base.weight.to(x.dtype), None, lora_a, lora_b, scaling,
                                        fan_in_fan_out=self.fan_in_fan_out)  # fmt: skip

        def base_part(inputs, with_bias):
            b = bias if with_bias else None
            if nf4 is not None:
                return lora_ops.nf4_linear(inputs, nf4, b, dense=dense)
            weight = base.weight.to(x.dtype)
            return nn.functional.linear(inputs, weight.t() if self.fan_in_fan_out else weight, b)

        if not (self.training and p > 0.0):
            out = scale * lora_part(x)
            return out + bias if bias is not None else out
        dropped = nn.functional.dropout(x, p, training=True)
        return base_part(x, True) + scale * lora_part(dropped) - base_part(dropped, False)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.lora_A)}, merged={self.merged}"


CONFIG = LoraConfig


def plan_patch(model: nn.Module, config: LoraConfig, adapter_name: str, quantize: str | None = None):
    """Check every target, then return the function that swaps LoraLinear layers in.
    `quantize="nf4"` quantizes the targeted dense nn.Linear bases to NF4 first (QLoRA)."""
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    matched = targeting.find_targets(
        model, config, DEFAULT_TARGETS, supports,
        "peftkern's LoRA supports nn.Linear, transformers' Conv1D and bitsandbytes' Linear4bit (NF4) bases so far",
    )  # fmt: skip
    for name, module in matched:
        nf4_base_weight(module)  # a Linear4bit that is not quantized yet fails here, early
        if quantize and not isinstance(module, nn.Linear):
            raise NotImplementedError(f"quantize='nf4' supports nn.Linear bases; {name!r} is a {type(module).__name__}")

    def apply(record: dict) -> None:
        progress = matched
        if quantize:
            try:
                from tqdm.auto import tqdm

                progress = tqdm(matched, desc="peftkern: quantizing to NF4", unit="layer", disable=None)
            except ImportError:
                pass
        for name, module in progress:
            if quantize and nf4_base_weight(module) is None:
                module = NF4Linear.from_linear(module)  # the dense weight is released with the old module
            targeting.swap_module(model, name, LoraLinear(module, adapter_name, config), record)
            if quantize:  # unpatch gives back the NF4 layer, not the dense one
                record["swaps"][-1] = (*record["swaps"][-1][:2], module)

    return apply


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT's checkpoint keys (without the `base_model.model.` prefix or adapter name) -> the
    live parameters."""
    tensors = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLinear) or adapter_name not in layer.lora_A:
            continue
        tensors[f"{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
        tensors[f"{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
        if adapter_name in layer.lora_magnitude_vector:
            tensors[f"{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].weight
    return tensors
