"""Several adapters in one patched model, by name, as Hugging Face PEFT's PeftModel keeps them:
`add_adapter`, `set_adapter`, `delete_adapter`, `disable_adapter()`, `list_adapters`,
`active_adapter`. For LoRA (dense and NF4 bases) and IA³; any mix of them in one batch runs with
`model(..., adapter_names=[...])` / `model.generate(..., adapter_names=[...])` (`peftkern.mixed`).

PEFT's rules: one adapter is active (the one forward and merge use); only its parameters are
trainable; adapters are of one method per model; an added adapter may target other modules than
the first (layers it does not reach run their base for it); deleting the active adapter makes the
first remaining one active; `set_adapter` on a merged model unmerges first (with a warning).
Stricter than PEFT: only the first adapter may train base biases (`bias`) or `modules_to_save`.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

from torch import nn

from .methods import resolve_config
from .patch import MULTI_ADAPTER_METHODS, _patched_layers, _undo, apply_or_undo, new_record, patch_record


def _record(model: nn.Module) -> dict:
    record = patch_record(model)
    if not record:
        raise RuntimeError("this model was not patched by peftkern: peftkern.patch(model, config) first")
    if record.get("from_peft"):
        raise TypeError("this is a patched peft.PeftModel: manage its adapters with PEFT (peftkern.unpatch first)")
    return record


def list_adapters(model: nn.Module) -> list[str]:
    """The adapters of a patched model, in the order they were added."""
    return list(_record(model)["adapters"])


def active_adapter(model: nn.Module) -> str | None:
    """The adapter that forward, merge and training use (None when every adapter was deleted)."""
    return _record(model)["active"]


def _activate(model: nn.Module, record: dict, name: str | None) -> None:
    """Make `name` the active adapter of every layer, and its parameters the trainable ones."""
    record["active"] = name
    for layer in _patched_layers(model):
        if hasattr(layer, "adapter_parameters"):
            layer.active_adapter = name
            for adapter in record["adapters"]:
                for parameter in layer.adapter_parameters(adapter):
                    parameter.requires_grad_(adapter == name)


def add_adapter(model: nn.Module, adapter_name: str, config) -> nn.Module:
    """Add another adapter, of the model's method, under a new name; the active one stays active
    (`set_adapter` switches). Everything is checked before anything changes, and a failure midway
    undoes what this call did."""
    method, config = checked_new_adapter(model, adapter_name, config)
    apply_new_adapter(model, _record(model), method, config, adapter_name)
    return model


def checked_new_adapter(model: nn.Module, adapter_name: str, config):
    """(method module, validated config) for a new adapter of a patched model, or raise."""
    record = _record(model)
    if record["method"] not in MULTI_ADAPTER_METHODS:
        raise NotImplementedError(f"several adapters per model: LoRA and IA³ so far, not {record['method']}")
    if not isinstance(adapter_name, str) or not adapter_name or adapter_name == "__base__":
        raise ValueError(f"adapter_name must be a non-empty name other than '__base__', got {adapter_name!r}")
    if adapter_name in record["adapters"]:
        raise ValueError(f"the model already has an adapter named {adapter_name!r} (delete_adapter it first)")
    method, config = resolve_config(config)
    if config.peft_type != record["method"]:
        raise ValueError(f"the model's adapters are {record['method']}; cannot add a {config.peft_type} adapter")
    extras = {"modules_to_save": getattr(config, "modules_to_save", None),
              "bias": getattr(config, "bias", "none") != "none",
              "a task_type head": bool(getattr(config, "classifier_heads", lambda: ())())}  # fmt: skip
    used = [k for k, v in extras.items() if v]
    if used:
        raise NotImplementedError(f"only the first adapter of a model may use {used[0]} in peftkern")
    return method, config


def apply_new_adapter(model: nn.Module, record: dict, method, config, adapter_name: str) -> dict:
    """Apply the adapter; return what it changed (for `retract_adapter`), already merged into the record."""
    local = new_record(model)
    apply_or_undo(model, method.plan_patch(model, config, adapter_name), local)
    record["swaps"] += local["swaps"]
    record["undo"] += local["undo"]
    record["adapters"][adapter_name] = config
    _activate(model, record, record["active"])
    return local


def retract_adapter(model: nn.Module, adapter_name: str, local: dict) -> None:
    """Undo exactly what `apply_new_adapter` did (load_adapter, when the checkpoint turns out not to fit)."""
    record = _record(model)
    _undo(model, local)
    record["swaps"] = [s for s in record["swaps"] if s not in local["swaps"]]
    record["undo"] = [u for u in record["undo"] if u not in local["undo"]]
    del record["adapters"][adapter_name]
    _activate(model, record, record["active"])


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make `adapter_name` the active adapter (forward, merge, training)."""
    record = _record(model)
    if adapter_name not in record["adapters"]:
        raise ValueError(f"no adapter named {adapter_name!r} (the model has {list(record['adapters'])})")
    layers = _patched_layers(model)
    if any(layer.merged for layer in layers):
        warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2)
        for layer in layers:
            layer.unmerge()
    _activate(model, record, adapter_name)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove an adapter's parameters from every layer. Layers wrapped for it alone stay wrapped
    (running their base) until unpatch. Deleting the active adapter activates the first remaining one."""
    record = _record(model)
    if adapter_name not in record["adapters"]:
        raise ValueError(f"no adapter named {adapter_name!r} (the model has {list(record['adapters'])})")
    for layer in _patched_layers(model):
        if hasattr(layer, "delete_adapter"):
            layer.delete_adapter(adapter_name)
    del record["adapters"][adapter_name]
    active = record["active"]
    if active == adapter_name:
        active = next(iter(record["adapters"]), None)
        if active is not None:
            warnings.warn(f"deleted the active adapter {adapter_name!r}; {active!r} is active now", stacklevel=2)
    _activate(model, record, active)
    return model


@contextmanager
def disable_adapter(model: nn.Module):
    """`with peftkern.disable_adapter(model): ...` runs the base model alone (merged adapters are
    unmerged first, and stay unmerged), then turns the adapters back on, as PEFT's context."""
    record = _record(model)
    layers = [layer for layer in _patched_layers(model) if hasattr(layer, "disabled")]
    others = [type(layer).__name__ for layer in _patched_layers(model) if not hasattr(layer, "disabled")]
    if others or record["method"] not in MULTI_ADAPTER_METHODS:
        raise NotImplementedError(f"disable_adapter: LoRA and IA³ models so far (this one has {others[:1] or record['method']})")
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


__all__ = ["active_adapter", "add_adapter", "delete_adapter", "disable_adapter", "list_adapters", "set_adapter"]
