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
import difflib
import importlib
import sys

from .layer import AdapterLayer, MultiAdapterLayer

__all__ = ["AdapterLayer", "MultiAdapterLayer", "config_fields", "config_peft_type", "method_module", "resolve_config"]

# peft_type -> module under peftkern.methods. Methods register here as they land.
_METHODS = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt",
            "BOTTLENECK": "bottleneck", "VERA": "vera", "ADALORA": "adalora",
            "BITFIT": "bitfit", "UNION": "union"}  # BOTTLENECK, BITFIT, UNION: our own peft_types (PEFT has none)


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


# PEFT's bookkeeping fields, in every PEFT config and checkpoint: accepted, not used.
PEFT_METADATA_FIELDS = frozenset({"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                                  "revision", "inference_mode"})  # fmt: skip
# PEFT 0.21's config fields that peftkern does not implement, with PEFT's defaults. A config that
# sets one to anything else is refused (NotImplementedError naming it) instead of silently running
# as something else; at the default it is accepted (checkpoints carry every field). The installed
# peft, where there is one, adds the fields of its version; tests/test_config_fields.py checks
# this table against peft 0.21.
UNSUPPORTED_PEFT_FIELDS = {
    "LORA": {"megatron_config": None, "megatron_core": "megatron.core", "trainable_token_indices": None,
             "loftq_config": {}, "eva_config": None, "corda_config": None, "lora_ga_config": None,
             "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False, "qalora_group_size": 16,
             "monteclora_config": None, "layer_replication": None, "runtime_config": {"ephemeral_gpu_offload": False},
             "lora_bias": False, "target_parameters": None, "use_bdlora": None, "arrow_config": None,
             "kasa_config": None, "ensure_weight_tying": False},
}  # fmt: skip
# AdaLoraConfig is a LoraConfig: the same unimplemented fields, plus LoRA's own that AdaLoRA ignores.
UNSUPPORTED_PEFT_FIELDS["ADALORA"] = {**UNSUPPORTED_PEFT_FIELDS["LORA"], "use_rslora": False, "alpha_pattern": {}}
# Our config classes whose fields must be PEFT's (BOTTLENECK is AdapterHub's and our own).
_PEFT_CONFIG_CLASSES = {"LORA": "LoraConfig", "IA3": "IA3Config", "PREFIX_TUNING": "PrefixTuningConfig",
                        "PROMPT_TUNING": "PromptTuningConfig", "VERA": "VeraConfig", "ADALORA": "AdaLoraConfig"}  # fmt: skip


def _plain(value):
    """A field value as JSON has it (dataclass configs as dicts, enums as their value)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return getattr(value, "value", value)


def _installed_peft_defaults(peft_type: str) -> dict:
    """{field: default} of the installed peft's config class for `peft_type` ({} without peft)."""
    peft = sys.modules.get("peft")
    if peft is None:
        try:
            import peft
        except ImportError:
            return {}
    config_class = getattr(peft, _PEFT_CONFIG_CLASSES[peft_type], None)
    if config_class is None:
        return {}
    defaults = {}
    for field in dataclasses.fields(config_class):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = _plain(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = _plain(field.default_factory())
    return defaults


def config_fields(config, config_class, expected: str) -> dict:
    """The fields of a config given as a plain dict or as an object with `to_dict()` (a `peft`
    or AdapterHub config), once its peft_type (if it has one) is checked to be
    `config_class.peft_type`. `expected` names the accepted forms in the error for anything else.
    Each config's `from_any` normalises the values it needs to.

    For PEFT's methods every other key must be one of PEFT's fields: PEFT's bookkeeping
    (ignored), or a PEFT field peftkern does not implement, accepted only at PEFT's default
    (NotImplementedError naming it otherwise); an unknown key (a typo) raises naming it. For
    bottleneck adapters (AdapterHub's configs) keys peftkern does not know are ignored."""
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
    if config_class.peft_type in _PEFT_CONFIG_CLASSES:
        _check_other_fields(config_class, {k: v for k, v in values.items() if k not in known}, known)
    return {k: v for k, v in values.items() if k in known}


def _check_other_fields(config_class, others: dict, known: set) -> None:
    name, peft_type = config_class.__name__, config_class.peft_type
    unsupported = {**_installed_peft_defaults(peft_type), **UNSUPPORTED_PEFT_FIELDS.get(peft_type, {})}
    for key, value in others.items():
        if key in PEFT_METADATA_FIELDS:
            continue
        if key in unsupported:
            if _plain(value) != unsupported[key]:
                raise NotImplementedError(f"{name}.{key}={value!r} is not supported by peftkern (only PEFT's default, "
                                          f"{unsupported[key]!r})")  # fmt: skip
            continue
        close = difflib.get_close_matches(key, sorted(known | set(unsupported)), n=1)
        raise ValueError(f"{name} has no field {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))


def resolve_config(config):
    """(method module, a fresh validated peftkern config) from any accepted config form."""
    method = method_module(config_peft_type(config))
    resolved = method.CONFIG.from_any(config)
    resolved.validate()
    return method, resolved
