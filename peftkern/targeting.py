"""Finding target modules, shared by every method that wraps layers (LoRA, IA³, ...).

PEFT's matching rules: `exclude_modules` first; a str `target_modules` is a regex full-match on
the module's dotted name, a list matches the exact name or a ".suffix"; `layers_to_transform`
(with `layers_pattern`) filters list matches by decoder-layer index; "all-linear" is every
supported linear layer but the output embedding.
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

from .methods.layer import AdapterLayer


def layer_index(key: str, layers_pattern) -> int | None:
    """The first numbered path segment (the decoder layer), as PEFT reads it."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match.group("idx")) if match else None


def matches(names, key: str) -> bool:
    """A PEFT module-name spec: a str is a regex full-match, a list an exact name or ".suffix"."""
    if names is None:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith(f".{n}") for n in names)


def is_target(config, key: str, all_linear: set[str] | None = None) -> bool:
    """Whether module `key` is a target of `config` (any config with PEFT's target_modules,
    exclude_modules, layers_to_transform and layers_pattern fields)."""
    if matches(getattr(config, "exclude_modules", None), key):
        return False
    if all_linear is not None:
        return key in all_linear
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = getattr(config, "layers_to_transform", None)
    if found and layers is not None and (not isinstance(layers, list) or layers):
        index = layer_index(key, getattr(config, "layers_pattern", None))
        if index is None:
            return False
        return index == layers if isinstance(layers, int) else index in layers
    return found


def resolve_target_modules(model: nn.Module, config, defaults: dict, supports: Callable[[nn.Module], bool],
                           candidates=None):
    """Fill in PEFT's per-architecture default targets when target_modules is None; return the
    set of "all-linear" names (among `candidates`, default every module) when asked for, else None."""
    if config.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in defaults:
            raise ValueError(
                f"target_modules is not set and there is no default for model type {model_type!r}; "
                "name the modules to adapt (e.g. target_modules=['q_proj', 'v_proj'])"
            )
        config.target_modules = list(defaults[model_type])
    if config.target_modules == "all-linear":
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        candidates = model.named_modules() if candidates is None else candidates
        return {n for n, m in candidates if n and supports(m) and m is not output}
    return None


def find_targets(model: nn.Module, config, defaults: dict, supports: Callable[[nn.Module], bool], what: str):
    """[(name, module)] of the targets, each checked with `supports`; raises, naming the module,
    before anything is changed. On a patched model (another adapter being added) the modules
    inside peftkern's layers (their base_layer, lora_A, ...) are not candidates: a target is the
    peftkern layer itself, which `supports` must then accept."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    inside = tuple(f"{n}." for n in wrapped)
    candidates = [(n, m) for n, m in model.named_modules() if n and not (inside and n.startswith(inside))]
    all_linear = resolve_target_modules(model, config, defaults, supports, candidates)
    matched = [(n, m) for n, m in candidates if is_target(config, n, all_linear)]
    if not matched:
        raise ValueError(f"no module of {type(model).__name__} matches target_modules={config.target_modules!r}")
    for name, module in matched:
        if not supports(module):
            raise TypeError(
                f"module {name!r} matches target_modules but is a {type(module).__name__}; {what}"
            )
    return matched

