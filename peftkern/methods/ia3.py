"""IA³ ("Infused Adapter by Inhibiting and Amplifying Inner Activations", Liu et al. 2022) with
Hugging Face PEFT's config fields and semantics, on dense bases (`nn.Linear`, transformers'
`Conv1D`) and NF4 bases (peftkern `NF4Linear`, bitsandbytes `Linear4bit`), computed by the fused
ops in `peftkern.ops.ia3`.

A target learns one vector l: feedforward modules scale their input, `(x ⊙ l)·Wᵀ + b` with l of
shape [1, in]; every other target scales its output, `(x·Wᵀ + b) ⊙ l` with l of shape [out, 1]
(PEFT's shapes and its state-dict key `ia3_l.<adapter>`, so checkpoints are interchangeable).

PEFT's rules reproduced here: target_modules None -> the architecture's default targets AND
feedforward modules; feedforward_modules None -> the architecture's default (even when
target_modules is given); a list feedforward spec matches a target whose name ends with one of
its entries (plain `endswith`, no dot, as PEFT), a str one is a regex full-match; Conv1D bases
always use fan_in_fan_out, nn.Linear never. l is float32 (float64 on a float64 base): PEFT makes
it in the base dtype and `get_peft_model` then upcasts half/bfloat16 adapters to float32.
Stricter than PEFT: a feedforward list that is not a subset of the targets raises even when the
targets came from the architecture defaults (PEFT checks only two explicit lists).
layers_to_transform / layers_pattern: peftkern accepts them (the same matching as LoRA); PEFT
0.21's IA3Config has no such fields, so a checkpoint that uses them does not load into PEFT the
same way. Not supported (NotImplementedError): modules_to_save.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

import torch
from torch import nn

from .. import mixed, targeting
from ..ops import grouped as grouped_ops
from ..ops import ia3 as ia3_ops
from ..ops.common import acc_dtype
from ..record import PatchRecord
from . import config_fields
from .bases import (
    base_features,
    bias_like,
    check_new_base,
    check_quantize_option,
    is_conv1d,
    nf4_base_weight,
    quantized_base,
    supports,
)
from .layer import MultiAdapterLayer

# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING
# (peft 0.21) for the architectures peftkern tests.
DEFAULT_TARGETS = {
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bert": ["key", "value", "output.dense"],
}
DEFAULT_FEEDFORWARD = {
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "qwen2": ["down_proj"],
    "gpt2": ["mlp.c_proj"],
    "bert": ["output.dense"],
}


def _as_list(value):
    return sorted(value) if isinstance(value, (set, tuple, frozenset)) else value


@dataclass
class IA3Config:
    """PEFT's `IA3Config` fields, same names and meaning (plus layers_to_transform /
    layers_pattern, which PEFT 0.21's IA3Config lacks: see the module docstring)."""

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None  # recorded in checkpoints, as PEFT does

    peft_type = "IA3"  # a class attribute, not a field

    @classmethod
    def from_any(cls, config) -> "IA3Config":
        """From a peftkern IA3Config, a `peft.IA3Config`, or a plain dict of PEFT's fields."""
        if isinstance(config, cls):
            return dataclasses.replace(config)  # a copy: patching fills in defaults
        values = config_fields(config, cls, "an IA3Config, a peft.IA3Config or a dict")
        task_type = values.get("task_type")
        if task_type is not None:
            values["task_type"] = str(getattr(task_type, "value", task_type))
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            values[name] = _as_list(values.get(name))
        return cls(**values)

    def checkpoint_dict(self) -> dict:
        """The fields written to adapter_config.json: layers_to_transform / layers_pattern only
        when set (PEFT 0.21's IA3Config has no such fields and warns about unknown keys)."""
        values = dataclasses.asdict(self)
        for name in ("layers_to_transform", "layers_pattern"):
            if values[name] is None:
                del values[name]
        return values

    def validate(self) -> None:
        if self.modules_to_save:
            raise NotImplementedError(
                f"IA3Config.modules_to_save={self.modules_to_save!r} is not supported by peftkern yet"
            )
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list)):
                raise TypeError(f"IA3Config.{name} must be a list of names or a regex string, got {value!r}")
        if not isinstance(self.init_ia3_weights, bool):
            raise TypeError(f"IA3Config.init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            check_feedforward_subset(self.feedforward_modules, self.target_modules)


def check_feedforward_subset(feedforward: list[str], targets: list[str]) -> None:
    extra = sorted(set(feedforward) - set(targets))
    if extra:
        raise ValueError(
            f"IA3Config.feedforward_modules must be a subset of target_modules: {extra} not in "
            f"target_modules={sorted(targets)}"
        )


def is_feedforward(config: IA3Config, key: str) -> bool:
    """PEFT's rule: a str is a regex full-match, a list matches names ending with an entry."""
    spec = config.feedforward_modules
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return any(key.endswith(name) for name in spec or ())


class IA3Linear(MultiAdapterLayer):
    """A frozen base plus IA³ vectors, named as PEFT names them (`base_layer`, `ia3_l.<adapter>`)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: IA3Config, feedforward: bool):
        super().__init__()
        self._init_base(base_layer, adapter_name, feedforward)
        self.add_adapter(adapter_name, config)

    def _init_base(self, base_layer: nn.Module, adapter_name: str | None, feedforward: bool) -> None:
        """Everything but the adapters (shared with `peftkern.methods.from_peft`, which puts a PEFT
        layer's own `ia3_l` in)."""
        self.base_layer = base_layer
        self._own(base_layer)
        self.quantized = nf4_base_weight(base_layer) is not None
        self.is_feedforward = feedforward
        # As PEFT: Conv1D ([in, out]) always fan-in-fan-out, nn.Linear never.
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.out_features, self.in_features = base_features(base_layer, self.quantized, self.fan_in_fan_out)
        self.ia3_l = nn.ParameterDict()
        self.active_adapter = adapter_name  # may name an adapter this layer lacks: it then runs the base
        self.merged = False

    def add_adapter(self, name: str, config: IA3Config) -> None:
        if self.quantized:
            device, dtype = nf4_base_weight(self.base_layer).device, torch.float32
        else:
            weight = self.base_layer.weight
            device, dtype = weight.device, acc_dtype(weight.dtype)
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        if config.init_ia3_weights:
            value = torch.ones(shape, device=device, dtype=dtype)
        else:  # PEFT's (discouraged) alternative: standard normal
            value = torch.randn(shape, device=device, dtype=dtype)
        self.ia3_l[name] = nn.Parameter(value)

    def delete_adapter(self, name: str) -> None:
        """Drop adapter `name` (unmerged first if it is the merged one); a no-op if absent."""
        if name not in self.ia3_l:
            return
        if self.merged and self.active_adapter == name:
            self.unmerge()
        del self.ia3_l[name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.ia3_l[name]] if name in self.ia3_l else []

    def _scale_in_weight_layout(self, name: str) -> torch.Tensor:
        l = self.ia3_l[name].detach()
        return l.t() if self.fan_in_fan_out else l

    def _refuse_quantized_merge(self) -> None:
        if self.quantized:
            raise NotImplementedError(
                "merging IA³ into an NF4 base would re-quantize it (lossy); PEFT refuses it for 4-bit bases too"
            )

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """W <- W ⊙ l (rows for output scaling, columns for input scaling); for output scaling
        also b <- b ⊙ l. With input scaling the bias is left alone: (x ⊙ l)·Wᵀ + b has an
        unscaled bias, exactly as PEFT merges. What it overwrites is kept (on the CPU) so that
        unmerge restores it exactly."""
        if self.merged or self.active_adapter not in self.ia3_l:
            return
        self._refuse_quantized_merge()
        name, base = self.active_adapter, self.base_layer
        if keep_original:
            self._keep_before_merge(base.weight, None if self.is_feedforward else base.bias)
        base.weight.copy_((base.weight * self._scale_in_weight_layout(name)).to(base.weight.dtype))
        if not self.is_feedforward and base.bias is not None:
            base.bias.copy_((base.bias * self.ia3_l[name].detach().reshape(base.bias.shape)).to(base.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restores the weights from before the merge exactly (PEFT divides back by l + 1e-8,
        which rounds; that remains the path for a merge that kept nothing)."""
        if not self.merged:
            return
        if self._restore_before_merge():
            self.merged = False
            return
        name, base = self.active_adapter, self.base_layer
        base.weight.copy_((base.weight / (self._scale_in_weight_layout(name) + 1e-8)).to(base.weight.dtype))
        if not self.is_feedforward and base.bias is not None:
            l = self.ia3_l[name].detach().reshape(base.bias.shape)
            base.bias.copy_((base.bias / (l + 1e-8)).to(base.bias.dtype))
        self.merged = False

    def _active_forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        self._check_not_wrapped(())
        if self.merged or name not in self.ia3_l:
            return self.base_layer(x)
        l = self.ia3_l[name]
        base = self.base_layer
        if self.quantized:
            return ia3_ops.nf4_ia3_linear(x, nf4_base_weight(base), bias_like(base.bias, x), l, self.is_feedforward)
        return ia3_ops.ia3_linear(x, base.weight, base.bias, l, self.is_feedforward, self.fan_in_fan_out)

    def _mixed_forward(self, x: torch.Tensor, batch: "mixed.MixedBatch") -> torch.Tensor:
        """Each sequence with its own vector (none for "__base__"): one grouped scaling op,
        on the input before the base (feedforward) or on the base's output (with its bias)."""
        names = batch.adapters_in(self.ia3_l)
        if not names:
            return self.base_layer(x)
        rows = batch.row_slots(names, x)
        if self.is_feedforward:
            return self.base_layer(grouped_ops.ia3_grouped_scale(x, self._stacked_scales(names, x.dtype, batch), rows))
        out = self.base_layer(x)
        return grouped_ops.ia3_grouped_scale(out, self._stacked_scales(names, out.dtype, batch), rows)

    def _stacked_scales(self, names: tuple[str, ...], dtype: torch.dtype, batch: "mixed.MixedBatch") -> torch.Tensor:
        """The vectors of `names` as [G, features], float32 (float64 for float64 inputs), built
        once per mixed-batch call and kept in it."""
        acc = acc_dtype(dtype)
        key = (id(self), names, acc)
        if key not in batch.stacks:
            batch.stacks[key] = torch.stack([self.ia3_l[n].reshape(-1).to(acc) for n in names])
        return batch.stacks[key]

    def extra_repr(self) -> str:
        side = "input" if self.is_feedforward else "output"
        return f"in={self.in_features}, out={self.out_features}, scales={side}, adapters={list(self.ia3_l)}, merged={self.merged}"


CONFIG = IA3Config


def plan_patch(model: nn.Module, config: IA3Config, adapter_name: str, quantize: str | None = None):
    """Check every target (and fill in PEFT's per-architecture defaults), then return the
    function that swaps IA3Linear layers in. `quantize="nf4"` quantizes the targeted dense
    nn.Linear bases to NF4 first (as for QLoRA); unpatch then gives back the NF4 layers."""
    check_quantize_option(quantize)
    user_feedforward = config.feedforward_modules is not None
    matched = targeting.find_targets(
        model, config, DEFAULT_TARGETS, lambda m: supports(m) or isinstance(m, IA3Linear),
        "peftkern's IA³ supports nn.Linear, transformers' Conv1D and NF4 (peftkern NF4Linear, bitsandbytes "
        "Linear4bit) bases",
    )  # fmt: skip
    if not user_feedforward:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_FEEDFORWARD:
            raise ValueError(
                f"feedforward_modules is not set and there is no default for model type {model_type!r}; "
                "name them (feedforward_modules=[] for none)"
            )
        config.feedforward_modules = list(DEFAULT_FEEDFORWARD[model_type])
    elif isinstance(config.feedforward_modules, list) and isinstance(config.target_modules, list):
        check_feedforward_subset(config.feedforward_modules, config.target_modules)
    for name, module in matched:
        if isinstance(module, IA3Linear):  # another adapter on a layer that already has one
            if quantize:
                raise ValueError(f"{name!r} is already patched: quantize applies when a layer is first patched")
            if adapter_name in module.ia3_l:
                raise ValueError(f"{name!r} already has an adapter named {adapter_name!r}")
            if module.is_feedforward != is_feedforward(config, name):
                raise ValueError(f"{name!r} scales its {'input' if module.is_feedforward else 'output'} for the "
                                 "adapters it has; another adapter cannot change that (feedforward_modules)")  # fmt: skip
            continue
        check_new_base(name, module, quantize)

    def apply(record: PatchRecord) -> None:
        for name, module in matched:
            if isinstance(module, IA3Linear):  # the undo first: it also clears a half-made adapter
                record.on_undo(functools.partial(module.delete_adapter, adapter_name))
                module.add_adapter(adapter_name, config)
                continue
            base = quantized_base(module, quantize)
            # with quantize, unpatch gives back the NF4 layer, not the dense one
            record.swap(model, name, IA3Linear(base, adapter_name, config, is_feedforward(config, name)), restore=base)

    apply.modules = tuple(name for name, _ in matched)  # what it replaces (ConfigUnion's conflict check)
    return apply


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT's checkpoint keys (without the `base_model.model.` prefix or adapter name) -> the
    live parameters."""
    return {
        f"{name}.ia3_l": layer.ia3_l[adapter_name]
        for name, layer in model.named_modules()
        if isinstance(layer, IA3Linear) and adapter_name in layer.ia3_l
    }
