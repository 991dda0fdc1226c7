"""`peftkern.patch(peft_model)`: run an existing Hugging Face `peft.PeftModel` through peftkern's
fused layers, in place, without copying or re-creating a single parameter.

Every PEFT tuner layer is checked first (LoRA `Linear` on nn.Linear / transformers Conv1D bases,
LoRA bitsandbytes `Linear4bit` (NF4), incl. DoRA and rsLoRA; IA³ `Linear` and `Linear4bit`; one
active adapter; not merged; adapters enabled; lora_dropout an nn.Dropout or nn.Identity); anything
else raises, naming the module, with the model untouched. Then each PEFT layer is swapped for a
peftkern layer built around the same base layer and holding PEFT's very `lora_A` / `lora_B` /
`lora_magnitude_vector` ModuleDicts (IA³: its `ia3_l` ParameterDict): `peft_model.parameters()` are
the same objects (an optimizer made before patching keeps working), `state_dict()` has the same
keys, and `peft_model.save_pretrained` writes PEFT's checkpoint. Scaling (rsLoRA included) and the
dropout probability are read from the PEFT layer at patch time.

The peftkern layers are registered as virtual subclasses of PEFT's `BaseTunerLayer`, so PEFT's
structural code finds them: `save_pretrained` / `get_peft_model_state_dict` (which collects the
adapter keys from tuner layers) and `with peft_model.disable_adapter():` (honoured by forward).
Other PEFT operations on a patched model (set_adapter, add_adapter, PEFT's merge_and_unload, ...)
are not supported: `peftkern.unpatch(peft_model)` first, which puts PEFT's own layer objects back.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..record import PatchRecord
from .bases import is_conv1d, nf4_base_weight, supports
from .ia3 import IA3Linear
from .lora import LoraLinear

_SUPPORTED_TYPES = ("LORA", "IA3")


def is_peft_model(model) -> bool:
    """Whether `model` is a `peft.PeftModel` (without importing peft when nothing has yet)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


class _SharedLayerMixin:
    """What PEFT's structural code calls on a tuner layer, for the peftkern layers that stand in
    for PEFT's while patched."""

    _disable_adapters = False
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    @property
    def merged_adapters(self) -> list[str]:
        return [self.active_adapter] if self.merged else []

    def _get_available_adapters(self) -> set[str]:
        return {key for attr in self.adapter_layer_names for key in getattr(self, attr)}

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's `disable_adapter()` context: forward runs the base alone while disabled."""
        self._disable_adapters = not enabled

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if self.active_adapter is not None else []

    def set_adapter(self, *args, **kwargs):
        raise RuntimeError("this PeftModel is patched by peftkern: peftkern.unpatch(model) before switching adapters")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:
            raise TypeError(f"{type(self).__name__} takes one input tensor (got extra arguments {list(kwargs)})")
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        return super().forward(x)


class PeftLoraLinear(_SharedLayerMixin, LoraLinear):
    """A LoraLinear that holds a PEFT LoRA layer's own adapter containers."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    @classmethod
    def sharing(cls, layer: nn.Module, adapter_name: str) -> "PeftLoraLinear":
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        active = adapter_name if adapter_name in layer.lora_A else None
        self._init_base(layer.base_layer, active, bool(layer.fan_in_fan_out))
        self.lora_A = layer.lora_A  # the same ModuleDicts: the same parameter objects, the same keys
        self.lora_B = layer.lora_B
        self.lora_magnitude_vector = layer.lora_magnitude_vector
        self.scaling = {active: float(layer.scaling[active])} if active else {}
        self.dropout = {active: _dropout_p(layer.lora_dropout[active])} if active else {}
        return self


class PeftIA3Linear(_SharedLayerMixin, IA3Linear):
    """An IA3Linear that holds a PEFT IA³ layer's own `ia3_l`."""

    adapter_layer_names = ("ia3_l",)

    @classmethod
    def sharing(cls, layer: nn.Module, adapter_name: str) -> "PeftIA3Linear":
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        active = adapter_name if adapter_name in layer.ia3_l else None
        self._init_base(layer.base_layer, active, bool(layer.is_feedforward))
        self.ia3_l = layer.ia3_l
        return self


def _dropout_p(module: nn.Module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def _peft_classes():
    """{PEFT layer class: (kind, our class)} for the layer types peftkern takes over."""
    from peft.tuners.ia3 import layer as ia3_layer
    from peft.tuners.lora import layer as lora_layer

    classes = {lora_layer.Linear: ("lora", PeftLoraLinear), ia3_layer.Linear: ("ia3", PeftIA3Linear)}
    try:
        from peft.tuners.ia3 import bnb as ia3_bnb
        from peft.tuners.lora import bnb as lora_bnb
    except ImportError:
        return classes
    if hasattr(lora_bnb, "Linear4bit"):
        classes[lora_bnb.Linear4bit] = ("lora", PeftLoraLinear)
    if hasattr(ia3_bnb, "Linear4bit"):
        classes[ia3_bnb.Linear4bit] = ("ia3", PeftIA3Linear)
    return classes


def _check_base(name: str, layer: nn.Module, fan_in_fan_out: bool) -> None:
    base = layer.base_layer
    if not supports(base):
        raise TypeError(f"{name!r}: PEFT layer over a {type(base).__name__} base; peftkern supports nn.Linear, "
                        "transformers' Conv1D and bitsandbytes' Linear4bit (NF4) bases")  # fmt: skip
    try:
        quantized = nf4_base_weight(base) is not None
    except (ValueError, NotImplementedError, TypeError) as error:
        raise type(error)(f"{name!r}: {error}") from error
    if not quantized and bool(fan_in_fan_out) != is_conv1d(base):
        raise ValueError(f"{name!r}: fan_in_fan_out={fan_in_fan_out} does not match its {type(base).__name__} base")


def _check_lora(name: str, layer: nn.Module, adapter: str) -> None:
    _check_base(name, layer, layer.fan_in_fan_out)
    if adapter not in layer.lora_A:
        return  # this layer has no such adapter: forward runs its base alone, as PEFT's does
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None and type(variant).__name__ != "DoraLinearVariant":
        raise NotImplementedError(f"{name!r}: the LoRA variant {type(variant).__name__} is not supported by peftkern")
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
        raise NotImplementedError(f"{name!r}: lora_A/lora_B must be nn.Linear, got {type(lora_a).__name__}")
    if lora_a.bias is not None or lora_b.bias is not None:
        raise NotImplementedError(f"{name!r}: lora_bias=True is not supported by peftkern")
    dropout = layer.lora_dropout[adapter]
    if type(dropout) not in (nn.Dropout, nn.Identity):
        raise NotImplementedError(f"{name!r}: lora_dropout is a {type(dropout).__name__}; peftkern supports "
                                  "nn.Dropout and nn.Identity")  # fmt: skip
    if adapter in layer.lora_magnitude_vector:
        magnitude = getattr(layer.lora_magnitude_vector[adapter], "weight", None)
        if not isinstance(magnitude, nn.Parameter) or magnitude.shape != (layer.out_features,):
            raise NotImplementedError(f"{name!r}: unexpected DoRA magnitude {type(magnitude).__name__}")
    elif variant is not None:
        raise ValueError(f"{name!r}: DoRA variant without a magnitude vector")


def _check_ia3(name: str, layer: nn.Module, adapter: str) -> None:
    _check_base(name, layer, getattr(layer, "fan_in_fan_out", False))
    if adapter not in layer.ia3_l:
        return
    expected = (1, layer.in_features) if layer.is_feedforward else (layer.out_features, 1)
    if tuple(layer.ia3_l[adapter].shape) != expected:
        raise ValueError(f"{name!r}: ia3_l has shape {tuple(layer.ia3_l[adapter].shape)}, expected {expected}")


def plan_patch(model: nn.Module, **options):
    """Check the PeftModel and every PEFT tuner layer in it; return `apply(record)`, which swaps
    peftkern layers in (sharing the adapters), or raise naming what is unsupported."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if options:
        raise TypeError(f"peftkern.patch(peft_model) takes no options, got {sorted(options)}")
    active = list(getattr(model, "active_adapters", None) or [])
    if len(active) != 1:
        raise NotImplementedError(f"peftkern patches a PeftModel with exactly one active adapter, got {active}")
    adapter = active[0]
    config = model.peft_config[adapter]
    peft_type = str(getattr(config.peft_type, "value", config.peft_type)).upper()
    if peft_type not in _SUPPORTED_TYPES:
        raise NotImplementedError(f"peftkern patches PeftModels of types {_SUPPORTED_TYPES}, got {peft_type}")
    classes = _peft_classes()
    for cls in {ours for _, ours in classes.values()}:
        BaseTunerLayer.register(cls)  # so PEFT's save / disable_adapter code finds the stand-ins

    planned, auxiliary = [], []
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):  # modules_to_save etc.: left as PEFT's
            auxiliary.append(name + ".")
            continue
        if not isinstance(module, BaseTunerLayer) or any(name.startswith(a) for a in auxiliary):
            continue
        kind_and_ours = classes.get(type(module))
        if kind_and_ours is None:
            raise NotImplementedError(
                f"module {name!r} is a PEFT {type(module).__module__}.{type(module).__name__}; peftkern takes over "
                "LoRA Linear / Linear4bit and IA³ Linear / Linear4bit layers only (the model is unchanged)"
            )
        kind, ours = kind_and_ours
        if module.merged:
            raise ValueError(f"module {name!r} has merged adapters {module.merged_adapters}; unmerge it first")
        if module.disable_adapters:
            raise ValueError(f"module {name!r} has its adapters disabled; enable them before patching")
        if list(module.active_adapters) != [adapter]:
            raise NotImplementedError(f"module {name!r} has active adapters {module.active_adapters}; "
                                      f"peftkern supports exactly one ({adapter!r})")  # fmt: skip
        (_check_lora if kind == "lora" else _check_ia3)(name, module, adapter)
        planned.append((name, module, ours))
    if not planned:
        raise ValueError("this PeftModel has no PEFT tuner layer for peftkern to take over")

    def apply(record: PatchRecord) -> None:
        record.config, record.adapter_name = config, adapter
        for name, module, ours in planned:
            layer = ours.sharing(module, adapter)
            layer.train(module.training)
            record.swap(model, name, layer)
        # PEFT's adapter-management methods would silently skip the stand-in layers: refuse them
        for owner in (model, model.base_model):
            for method in _GUARDED:
                if hasattr(type(owner), method):
                    record.set_attribute(owner, method, _refusal(method))

    return apply


_GUARDED = ("set_adapter", "add_adapter", "load_adapter", "delete_adapter", "merge_adapter", "unmerge_adapter",
            "merge_and_unload", "unload", "add_weighted_adapter")  # fmt: skip


def _refusal(method: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"this PeftModel is patched by peftkern: peftkern.unpatch(model) before {method}()")

    return refuse
