"""Adapter checkpoints in Hugging Face PEFT's format: `adapter_config.json` +
`adapter_model.safetensors`, keys as PEFT names them (`base_model.model.<module>.lora_A.weight`,
`...lora_B.weight`, `...lora_magnitude_vector` for DoRA; no adapter name). A directory written by
`save_adapter` loads with `peft.PeftModel.from_pretrained`, and one written by PEFT's
`save_pretrained` loads with `load_adapter` (`peftkern.load`). safetensors only: a pickle
checkpoint is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from .methods import method_module, resolve_config, union
from .record import PatchRecord

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
GATES_NAME = "gates.safetensors"  # a gated union's LoRA / prefix gates, beside their PEFT checkpoint
_PREFIX = "base_model.model."


def adapter_config(model: nn.Module, adapter_name: str):
    """The config of the patched model's adapter `adapter_name` (raises for anything else)."""
    record = PatchRecord.of(model)
    if record is not None and record.from_peft:
        raise TypeError("this is a patched peft.PeftModel: save and load with its own save_pretrained / load_adapter")
    adapters = record.adapters if record is not None else {}
    config = adapters.get(adapter_name)
    if config is None:
        raise ValueError(f"the model has no peftkern adapter named {adapter_name!r}"
                         + (f" (it has {list(adapters)})" if adapters else ""))  # fmt: skip
    return config


def _wrapper_prefixes(model: nn.Module) -> list[tuple[str, str]]:
    """(`<site>.base_layer.`, `<site>.`) for every layer wrapping a whole sublayer (a bottleneck
    adapter site), innermost first: a LoRA / IA³ layer inside one is saved under its own name, as
    its library names it in a model without the wrapper."""
    names = [n for n, m in model.named_modules() if getattr(m, "wraps_sublayer", False)]
    return [(f"{n}.base_layer.", f"{n}.") for n in sorted(names, key=len, reverse=True)]


def component_state_dict(model: nn.Module, config, adapter_name: str) -> dict[str, torch.Tensor]:
    """The live tensors of the adapter `adapter_name` of method `config.peft_type`, under its
    library's checkpoint keys."""
    method = method_module(config.peft_type)
    prefix = getattr(method, "CHECKPOINT_PREFIX", _PREFIX)  # prompt learning: plain "prompt_embeddings"
    wrappers = _wrapper_prefixes(model)
    tensors = {}
    for key, tensor in method.adapter_tensors(model, adapter_name).items():
        for wrapped, own in wrappers:
            if key.startswith(wrapped):
                key = own + key[len(wrapped):]
        tensors[f"{prefix}{key}"] = tensor
    extra = getattr(method, "extra_checkpoint_tensors", None)  # VeRA: PEFT's base_model.vera_A / vera_B
    if extra is not None:
        tensors.update(extra(model, adapter_name))
    return tensors


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's live tensors under PEFT's checkpoint keys (a union: `union_state_dicts`)."""
    config = adapter_config(model, adapter_name)
    if config.peft_type == union.ConfigUnion.peft_type:
        raise TypeError("a ConfigUnion adapter has one checkpoint per component: peftkern.io.union_state_dicts")
    return component_state_dict(model, config, adapter_name)


def union_state_dicts(model: nn.Module, adapter_name: str = "default") -> dict[str, tuple[object, dict]]:
    """{folder: (component config, its tensors under its library's keys)} of a union adapter."""
    config = adapter_config(model, adapter_name)
    return {folder: (part, component_state_dict(model, part, name))
            for folder, name, part in union.components(config, adapter_name)}  # fmt: skip


def _write(model: nn.Module, directory: Path, saved_config, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    # A method may leave out fields PEFT's config class lacks (see IA3Config.checkpoint_dict).
    config = saved_config.checkpoint_dict() if hasattr(saved_config, "checkpoint_dict") else dataclasses.asdict(saved_config)
    config.update(
        peft_type=saved_config.peft_type,
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        inference_mode=True,
    )
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    _save_tensors(tensors, directory / WEIGHTS_NAME)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> None:
    """Write the adapter of a patched model as PEFT would (config + safetensors weights). A
    ConfigUnion adapter: one such folder per component (`<directory>/<folder>`, each in its own
    library's format), and `<directory>/adapter_config.json` naming them (peft_type "UNION")."""
    saved_config = adapter_config(model, adapter_name)
    if any(layer.merged for layer in PatchRecord.layers(model)):
        raise RuntimeError("unmerge the adapter before saving it (merged weights live in the base)")
    directory = Path(directory)
    if saved_config.peft_type != union.ConfigUnion.peft_type:
        _write(model, directory, saved_config, adapter_state_dict(model, adapter_name))
        return
    parts = union_state_dicts(model, adapter_name)
    for folder, (config, tensors) in parts.items():
        _write(model, directory / folder, config, tensors)
    for folder, tensors in union.gate_tensors(model, saved_config, adapter_name).items():
        _save_tensors(tensors, directory / folder / GATES_NAME)
    described = {"peft_type": union.ConfigUnion.peft_type, "components": list(parts)}
    if saved_config.use_gating:
        described["use_gating"] = True
    if saved_config.prefix_convention != "peft":
        described["prefix_convention"] = saved_config.prefix_convention
    (directory / CONFIG_NAME).write_text(json.dumps(described, indent=2))


def read_adapter(directory: str | Path):
    """(config, tensors) of a PEFT-format checkpoint, the config validated before use. A union
    checkpoint (peft_type "UNION"): (ConfigUnion of the components' configs, {folder: tensors})."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}")
    try:
        raw = json.loads((directory / CONFIG_NAME).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{directory / CONFIG_NAME} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{directory / CONFIG_NAME} must hold a JSON object, got {type(raw).__name__}")
    if raw.get("peft_type") == union.ConfigUnion.peft_type:
        return _read_union(directory, raw)
    if not (directory / WEIGHTS_NAME).exists():
        pickles = [p.name for p in directory.glob("adapter_model.*")]
        raise FileNotFoundError(
            f"{directory} has no {WEIGHTS_NAME}" + (f" (found {pickles}: peftkern loads safetensors only)" if pickles else "")
        )
    # As PEFT loads a checkpoint (inference_mode = not is_trainable): nothing the config names is
    # fetched or run (no tokenizer for a TEXT prompt init), a prefix projection stays folded.
    raw = {**raw, "inference_mode": True}
    try:
        _, config = resolve_config(raw)
    except ValueError as error:
        raise ValueError(f"{directory}/{CONFIG_NAME}: {error}") from None
    return config, load_file(str(directory / WEIGHTS_NAME))


def _read_union(directory: Path, raw: dict):
    from safetensors.torch import load_file

    folders = raw.get("components")
    if not isinstance(folders, list) or not folders or not all(
        isinstance(f, str) and f and Path(f).name == f and f not in (".", "..") for f in folders
    ):
        raise ValueError(f"{directory / CONFIG_NAME}: a UNION config needs 'components', a list of folder names, "
                         f"got {folders!r}")  # fmt: skip
    use_gating = raw.get("use_gating", False)
    if not isinstance(use_gating, bool):
        raise ValueError(f"{directory / CONFIG_NAME}: use_gating must be true or false, got {use_gating!r}")
    parts = [read_adapter(directory / folder) for folder in folders]
    if any(config.peft_type == union.ConfigUnion.peft_type for config, _ in parts):
        raise ValueError(f"{directory}: a union component is itself a union")
    config = union.ConfigUnion.from_any({"configs": [c for c, _ in parts], "use_gating": use_gating,
                                         "prefix_convention": raw.get("prefix_convention", "peft")})  # fmt: skip
    config.validate()
    expected = [folder for folder, _, _ in union.components(config, "default")]
    if expected != folders:
        raise ValueError(f"{directory / CONFIG_NAME}: components {folders} do not match their configs' methods "
                         f"(expected folders {expected})")  # fmt: skip
    tensors = {folder: part_tensors for folder, (_, part_tensors) in zip(folders, parts)}
    for folder in folders:  # a gated union's LoRA / prefix gates (union.gate_tensors)
        if (directory / folder / GATES_NAME).exists():
            tensors[f"{folder}/{GATES_NAME}"] = load_file(str(directory / folder / GATES_NAME))
    return config, tensors
