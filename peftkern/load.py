"""`peftkern.load_adapter`: patch a model from a PEFT-format checkpoint (`peftkern.io` reads it),
or add it as another adapter to a patched model. Above `patch` and `multi_adapter` in the
import order: it uses both."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import multi_adapter
from .io import GATES_NAME, adapter_config, component_state_dict, read_adapter
from .methods import method_module, union
from .patch import patch, unpatch
from .record import PatchRecord


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default", **options):
    """Load a PEFT-format checkpoint: patches an unpatched model with the saved config first, or
    adds it as another adapter to a patched model that has none named `adapter_name` (not made
    active, as PEFT's load_adapter), then copies the tensors. Every key and shape is checked
    before any tensor is written; on a mismatch the model is left as it was (a patch or an
    adapter added here is undone). A union checkpoint (`save_adapter` of a ConfigUnion) patches
    an unpatched model with the union and loads each component from its folder."""
    config, tensors = read_adapter(directory)
    is_union = config.peft_type == union.ConfigUnion.peft_type
    record = PatchRecord.of(model)
    undo = None
    if record is None:
        patch(model, config, adapter_name=adapter_name, **options)
        undo = lambda: unpatch(model)  # noqa: E731
    elif is_union:
        raise ValueError("a ConfigUnion checkpoint loads into an unpatched model only (peftkern.unpatch first)")
    elif adapter_name not in record.adapters and not record.from_peft:
        if options:
            raise TypeError(f"load_adapter options {sorted(options)} apply only when it patches an unpatched model")
        method, checked = multi_adapter.checked_new_adapter(model, adapter_name, config)
        changes = multi_adapter.apply_new_adapter(model, method, checked, adapter_name)
        undo = lambda: multi_adapter.retract_adapter(model, adapter_name, changes)  # noqa: E731
    if is_union:
        parts = [(part, name, tensors[folder]) for folder, name, part in union.components(config, adapter_name)]
    else:
        parts = [(adapter_config(model, adapter_name), adapter_name, tensors)]
    writes = []
    try:
        for part, name, part_tensors in parts:
            writes += _checked_writes(model, part, name, part_tensors)
        if is_union:
            writes += _checked_gate_writes(model, config, adapter_name, tensors)
    except Exception:
        if undo is not None:
            undo()
        raise
    with torch.no_grad():
        for target, source in writes:
            target.copy_(source)
    return model


def _checked_writes(model: nn.Module, config, adapter_name: str, tensors: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(live tensor, checkpoint tensor)] of one adapter, once every key and shape is checked."""
    method = method_module(config.peft_type)
    prepare = getattr(method, "prepare_load", None)
    if prepare is not None:  # a method may reshape its layers (AdaLoRA's rank_pattern) or drop keys first
        tensors = prepare(model, adapter_name, tensors)
    expected = component_state_dict(model, config, adapter_name)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise KeyError(f"adapter checkpoint does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, target in expected.items():
        if tensors[key].shape != target.shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(tensors[key].shape)}, model {tuple(target.shape)}")
    check_loadable = getattr(method, "check_loadable", None)
    if check_loadable is not None:  # a method whose saved tensors are computed (folded) may refuse
        check_loadable(model, adapter_name)
    return [(target, tensors[key]) for key, target in expected.items()]


def _checked_gate_writes(model: nn.Module, config, adapter_name: str, tensors: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(live gate, checkpoint gate)] of a gated union's LoRA / prefix components (the
    `<folder>/gates.safetensors` files), once every key and shape is checked."""
    expected = union.gate_tensors(model, config, adapter_name)
    found = {key.partition("/")[0] for key in tensors if key.endswith(f"/{GATES_NAME}")}
    if found - set(expected):
        raise KeyError(f"gate checkpoints {sorted(found - set(expected))} for components this union does not gate")
    writes = []
    for folder, gates in expected.items():
        saved = tensors.get(f"{folder}/{GATES_NAME}")
        if saved is None:
            raise KeyError(f"{folder}/{GATES_NAME} is missing: the union is gated (use_gating) but has no gates for {folder!r}")
        missing, unexpected = sorted(set(gates) - set(saved)), sorted(set(saved) - set(gates))
        if missing or unexpected:
            raise KeyError(f"{folder}/{GATES_NAME} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for key, target in gates.items():
            if saved[key].shape != target.shape:
                raise ValueError(f"{folder}/{GATES_NAME}: {key}: checkpoint shape {tuple(saved[key].shape)}, "
                                 f"model {tuple(target.shape)}")  # fmt: skip
        writes += [(target, saved[key]) for key, target in gates.items()]
    return writes
