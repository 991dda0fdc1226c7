"""VeRA ("Vector-based Random Matrix Adaptation", Kopiczko et al., ICLR 2024) with Hugging Face
PEFT's config fields and semantics, on dense bases (`nn.Linear`, transformers' `Conv1D`) and NF4
bases, computed by the scaled-LoRA op (`peftkern.ops.scaled_lora`):

    y = W·x + b + λ_b ⊙ (B_s·(λ_d ⊙ A_s·dropout(x)))

A_s = vera_A[:r, :in] and B_s = vera_B[:out, :r] are slices of two frozen random matrices shared
by every layer: vera_A [r, max_in] and vera_B [max_out, r], drawn Kaiming-uniform (bound
√(6/fan_in)) from a CPU generator seeded with `projection_prng_key`, vera_A first, exactly as PEFT
draws them, so the same key gives the same bits. They are held ONCE per model, in a
`VeraProjections` module at `model.vera_projections` (non-persistent buffers: the model's
state_dict does not grow; the adapter checkpoint carries them as PEFT's `base_model.vera_A` /
`base_model.vera_B` when save_projection is on). Layers hold a plain reference to it. Trained: λ_b
[out] (0 at init, so a fresh adapter is the identity) and λ_d [r] (d_initial), float32 as PEFT.

Not supported: several VeRA adapters per model (add_adapter raises), mixed batches (PEFT neither),
modules_to_save (NotImplementedError).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .. import targeting
from ..record import PatchRecord
from . import config_fields
from .bases import (
    base_features,
    check_new_base,
    check_quantize_option,
    is_conv1d,
    nf4_base_weight,
    quantized_base,
    supports,
)
from .scaled_lora_layer import Factors, ScaledLoraLayer

# PEFT's TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING (a copy of LoRA's) for the
# architectures peftkern tests.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
}
PROJECTIONS_ATTRIBUTE = "vera_projections"  # where a patched model holds its shared vera_A / vera_B


@dataclass
class VeraConfig:
    """PEFT's `VeraConfig` fields, same names, defaults and meaning."""

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    task_type: str | None = None  # recorded in checkpoints, as PEFT does

    peft_type = "VERA"  # a class attribute, not a field

    @classmethod
    def from_any(cls, config) -> "VeraConfig":
        """From a peftkern VeraConfig, a `peft.VeraConfig`, or a plain dict (PEFT's fields only)."""
        if isinstance(config, cls):
            return dataclasses.replace(config)
        values = config_fields(config, cls, "a VeraConfig, a peft.VeraConfig or a dict")
        if isinstance(values.get("target_modules"), (set, tuple)):
            values["target_modules"] = sorted(values["target_modules"])
        return cls(**values)

    def validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"VeraConfig.r must be a positive integer, got {self.r!r}")
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise TypeError(f"VeraConfig.projection_prng_key must be an integer, got {self.projection_prng_key!r}")
        for name in ("vera_dropout", "d_initial"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"VeraConfig.{name} must be a number, got {value!r}")
        if not 0.0 <= self.vera_dropout < 1.0:
            raise ValueError(f"VeraConfig.vera_dropout must be in [0, 1), got {self.vera_dropout}")
        for name in ("save_projection", "fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"VeraConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.bias not in ("none", "all", "vera_only"):
            raise ValueError(f"VeraConfig.bias must be 'none', 'all' or 'vera_only', got {self.bias!r}")
        value = self.target_modules
        if not (value is None or isinstance(value, str) or (isinstance(value, list)
                                                             and all(isinstance(v, str) for v in value))):  # fmt: skip
            raise TypeError(f"VeraConfig.target_modules must be a list of module names or a regex string, got {value!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("VeraConfig: when layers_pattern is specified, layers_to_transform must also be specified")
        if self.modules_to_save:
            raise NotImplementedError("VeraConfig.modules_to_save is not supported by peftkern yet")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's `_kaiming_init`: U(-b, b) with b = √3·√2/√fan_in, fan_in = shape[1], float32 on the
    CPU, drawn from `generator` (the same float operations, so the same bound and bits)."""
    tensor = torch.empty(shape)
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def projections_from_key(key: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(vera_A [r, max_in], vera_B [max_out, r]) as PEFT draws them: one CPU generator seeded with
    `key`, vera_A first."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    vera_a = kaiming_uniform((r, max_in), generator)
    return vera_a, kaiming_uniform((max_out, r), generator)


class VeraProjections(nn.Module):
    """The shared frozen matrices of a model's VeRA layers, held once (buffers, so `model.to()`
    moves them; non-persistent, so the model's state_dict does not carry them)."""

    def __init__(self, vera_a: torch.Tensor, vera_b: torch.Tensor):
        super().__init__()
        self.register_buffer("vera_A", vera_a, persistent=False)
        self.register_buffer("vera_B", vera_b, persistent=False)

    def extra_repr(self) -> str:
        return f"vera_A={tuple(self.vera_A.shape)}, vera_B={tuple(self.vera_B.shape)}"


class VeraLinear(ScaledLoraLayer):
    """A frozen base plus a VeRA adapter: `vera_lambda_b.<adapter>` [out] and
    `vera_lambda_d.<adapter>` [r] (PEFT's names), the shared projections by reference."""

    method = "VeRA"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: VeraConfig, projections: VeraProjections):
        super().__init__()
        self._init_base(base_layer, adapter_name, config.fan_in_fan_out)
        object.__setattr__(self, "projections", projections)  # a reference, not a submodule: held once per model
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.dropout: dict[str, float] = {}
        self.add_adapter(adapter_name, config)

    def add_adapter(self, name: str, config: VeraConfig) -> None:
        device = self.adapter_factory()["device"]
        lambda_b = torch.ones(self.out_features, device=device)  # float32, as PEFT makes them
        lambda_d = torch.randn(config.r, device=device)
        if config.init_weights:
            lambda_d.fill_(config.d_initial)
            lambda_b.zero_()
        self.vera_lambda_b[name] = nn.Parameter(lambda_b)
        self.vera_lambda_d[name] = nn.Parameter(lambda_d)
        self.r[name] = config.r
        self.dropout[name] = config.vera_dropout

    def has_adapter(self, name: str) -> bool:
        return name in self.vera_lambda_d

    def delete_adapter(self, name: str) -> None:
        if name not in self.vera_lambda_d:
            return
        if self.merged and self.active_adapter == name:
            self.unmerge()
        del self.vera_lambda_b[name], self.vera_lambda_d[name]
        self.r.pop(name, None)
        self.dropout.pop(name, None)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.vera_lambda_b[name], self.vera_lambda_d[name]] if name in self.vera_lambda_d else []

    def factors(self, name: str) -> Factors:
        r = self.r[name]
        vera_a, vera_b = self.projections.vera_A, self.projections.vera_B
        return Factors(vera_a[:r, : self.in_features], vera_b[: self.out_features, :r], 1.0,
                       self.vera_lambda_d[name], self.vera_lambda_b[name], self.dropout[name])  # fmt: skip

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"


CONFIG = VeraConfig


def _largest_shape(matched, config: VeraConfig) -> tuple[int, int]:
    """(max out_features, max in_features) over the targets, as PEFT's `_find_dim`."""
    shapes = []
    for _, module in matched:
        quantized = nf4_base_weight(module) is not None
        shapes.append(base_features(module, quantized, (config.fan_in_fan_out or is_conv1d(module)) and not quantized))
    return max(s[0] for s in shapes), max(s[1] for s in shapes)


def plan_patch(model: nn.Module, config: VeraConfig, adapter_name: str, quantize: str | None = None):
    """Check every target, then return the function that creates the shared projections and swaps
    VeraLinear layers in. `quantize="nf4"` quantizes the targeted dense nn.Linear bases first."""
    check_quantize_option(quantize)
    if hasattr(model, PROJECTIONS_ATTRIBUTE):
        raise ValueError(f"the model already has an attribute {PROJECTIONS_ATTRIBUTE!r}; cannot patch VeRA into it")
    matched = targeting.find_targets(
        model, config, DEFAULT_TARGETS, supports,
        "peftkern's VeRA supports nn.Linear, transformers' Conv1D and NF4 (peftkern NF4Linear, bitsandbytes "
        "Linear4bit) bases",
    )  # fmt: skip
    for name, module in matched:
        check_new_base(name, module, quantize)
    max_out, max_in = _largest_shape(matched, config)
    first = matched[0][1]
    nf4 = nf4_base_weight(first)
    device = nf4.device if nf4 is not None else first.weight.device

    def apply(record: PatchRecord) -> None:
        vera_a, vera_b = projections_from_key(config.projection_prng_key, config.r, max_in, max_out)
        projections = VeraProjections(vera_a.to(device), vera_b.to(device))
        setattr(model, PROJECTIONS_ATTRIBUTE, projections)
        record.on_undo(_ProjectionsUndo(model))
        for name, module in matched:
            base = quantized_base(module, quantize)
            record.swap(model, name, VeraLinear(base, adapter_name, config, projections), restore=base)
        for parameter in trained_biases(model, config).values():  # PEFT's bias="all" / "vera_only"
            parameter.requires_grad_(True)

    return apply


class _ProjectionsUndo:
    """Removes the model's shared projections. An object, not a closure, so the undo of a deep
    copy of a patched model refers to the copy."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self) -> None:
        if PROJECTIONS_ATTRIBUTE in self.model._modules:
            delattr(self.model, PROJECTIONS_ATTRIBUTE)


def projections(model: nn.Module) -> VeraProjections:
    return getattr(model, PROJECTIONS_ATTRIBUTE)


def trained_biases(model: nn.Module, config: VeraConfig) -> dict[str, torch.Tensor]:
    """The base biases that bias="all" / "vera_only" train (and save), as PEFT picks them: every
    parameter with "bias" in its name, or the biases of the VeRA layers' bases."""
    if config.bias == "all":
        return {n: p for n, p in model.named_parameters() if "bias" in n and "vera_" not in n}
    if config.bias == "vera_only":
        return {
            f"{name}.base_layer.bias": layer.base_layer.bias
            for name, layer in model.named_modules()
            if isinstance(layer, VeraLinear) and getattr(layer.base_layer, "bias", None) is not None
        }
    return {}


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT's checkpoint keys (without the `base_model.model.` prefix or adapter name) -> the live
    tensors: the λ vectors, trained biases; the shared projections under the prefix-less keys
    `PROJECTION_KEYS` when the config saves them."""
    tensors = {}
    for name, layer in model.named_modules():
        if isinstance(layer, VeraLinear) and adapter_name in layer.vera_lambda_d:
            tensors[f"{name}.vera_lambda_b"] = layer.vera_lambda_b[adapter_name]
            tensors[f"{name}.vera_lambda_d"] = layer.vera_lambda_d[adapter_name]
    config = PatchRecord.required(model).adapters[adapter_name]
    tensors.update(trained_biases(model, config))
    return tensors


def extra_checkpoint_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Tensors saved under full keys of their own (outside `base_model.model.`): PEFT's
    `base_model.vera_A` / `base_model.vera_B`, when save_projection is on."""
    config = PatchRecord.required(model).adapters[adapter_name]
    if not config.save_projection:
        return {}
    shared = projections(model)
    return {"base_model.vera_A": shared.vera_A, "base_model.vera_B": shared.vera_B}


def prepare_load(model: nn.Module, adapter_name: str, tensors: dict) -> dict:
    """PEFT's rules for the projections in a checkpoint: with save_projection they must be there
    (a KeyError names them otherwise); without, the ones drawn from projection_prng_key are used
    and any in the checkpoint are ignored with a warning, as PEFT does."""
    config = PatchRecord.required(model).adapters[adapter_name]
    keys = ("base_model.vera_A", "base_model.vera_B")
    if not config.save_projection and any(k in tensors for k in keys):
        warnings.warn("the VeRA checkpoint holds vera_A / vera_B but its config says save_projection=False: they "
                      "are ignored and the ones drawn from projection_prng_key are used, as PEFT does")  # fmt: skip
        tensors = {k: v for k, v in tensors.items() if k not in keys}
    return tensors
