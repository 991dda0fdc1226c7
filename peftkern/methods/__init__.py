"""One module per PEFT method: its config (Hugging Face PEFT's field names), the module that
wraps a target layer (or the hooks it installs), merge/unmerge and its checkpoint naming.

A method module provides:
- a config dataclass with `peft_type` (PEFT's name, e.g. "LORA"), `from_any(config)` and
  `validate()`;
- `plan_patch(model, config, adapter_name, **options) -> apply`: checks everything and raises
  (naming the module) before anything changes; `apply(record)` then changes the model through the
  `peftkern.record.PatchRecord` it is given (`record.swap(...)` for a module swap,
  `record.on_undo(...)` for any other change), so `unpatch` restores the model exactly;
- `adapter_tensors(model, adapter_name) -> {PEFT checkpoint key: live tensor}` for save/load.
Layers it swaps in subclass `AdapterLayer` (`peftkern.methods.layer`) so merge/unmerge reach them;
the base layers they wrap are told apart by `peftkern.methods.bases`.
"""

from __future__ import annotations

import dataclasses
import importlib

from .layer import AdapterLayer, MultiAdapterLayer

__all__ = ["AdapterLayer", "MultiAdapterLayer", "config_fields", "config_peft_type", "method_module", "resolve_config"]

# peft_type -> module under peftkern.methods. Methods register here as they land.
_METHODS = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt",
            "BOTTLENECK": "bottleneck"}  # BOTTLENECK: AdapterHub-style adapters (ours; PEFT lacks them)


def method_module(peft_type: str):
    key = str(getattr(peft_type, "value", peft_type)).upper()
    if key not in _METHODS:
        raise ValueError(f"peft_type {peft_type!r} is not supported by peftkern (supported: {sorted(_METHODS)})")
    return importlib.import_module(f"{__name__}.{_METHODS[key]}")


def config_peft_type(config) -> str:
    """PEFT's peft_type of a peftkern config, a `peft` config object or a dict (default LORA,
    as for a dict without the field)."""
    peft_type = config.get("peft_type") if isinstance(config, dict) else getattr(config, "peft_type", None)
    architecture = config.get("architecture") if isinstance(config, dict) else getattr(config, "architecture", None)
    if peft_type is None and architecture == "bottleneck":  # an AdapterHub bottleneck config (no peft_type)
        return "BOTTLENECK"
    return str(getattr(peft_type, "value", peft_type) or "LORA").upper()


def config_fields(config, config_class, expected: str) -> dict:
    """The fields of a config given as a plain dict or as an object with `to_dict()` (a `peft`
    or AdapterHub config), keeping only `config_class`'s dataclass fields, once its peft_type (if
    it has one) is checked to be `config_class.peft_type`. `expected` names the accepted forms in
    the error for anything else. Each config's `from_any` normalises the values it needs to."""
    if isinstance(config, dict):
        values = dict(config)
    elif hasattr(config, "to_dict"):
        values = config.to_dict()
    else:
        raise TypeError(f"expected {expected}, got {type(config).__name__}")
    peft_type = values.get("peft_type")
    if peft_type is not None and str(getattr(peft_type, "value", peft_type)).upper() != config_class.peft_type:
        raise ValueError(f"not a {config_class.peft_type} config: peft_type={peft_type}")
    known = {f.name for f in dataclasses.fields(config_class)}
    return {k: v for k, v in values.items() if k in known}


def resolve_config(config):
    """(method module, a fresh validated peftkern config) from any accepted config form."""
    method = method_module(config_peft_type(config))
    resolved = method.CONFIG.from_any(config)
    resolved.validate()
    return method, resolved
