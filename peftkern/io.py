"""Adapter checkpoints in Hugging Face PEFT's format: `adapter_config.json` +
`adapter_model.safetensors`, keys as PEFT names them (`base_model.model.<module>.lora_A.weight`,
`...lora_B.weight`, `...lora_magnitude_vector` for DoRA; no adapter name). A directory written by
`save_adapter` loads with `peft.PeftModel.from_pretrained`, and one written by PEFT's
`save_pretrained` loads with `load_adapter`. safetensors only: a pickle checkpoint is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from . import multi_adapter
from .methods import method_module, resolve_config
from .patch import patch, unpatch
from .record import PatchRecord

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _config(model: nn.Module, adapter_name: str):
    """The config of the model's adapter `adapter_name`."""
    record = PatchRecord.of(model)
    if record is not None and record.from_peft:
        raise TypeError("this is a patched peft.PeftModel: save and load with its own save_pretrained / load_adapter")
    adapters = record.adapters if record is not None else {}
    config = adapters.get(adapter_name)
    if config is None:
        raise ValueError(f"the model has no peftkern adapter named {adapter_name!r}"
                         + (f" (it has {list(adapters)})" if adapters else ""))  # fmt: skip
    return config


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's live tensors under PEFT's checkpoint keys."""
    method = method_module(_config(model, adapter_name).peft_type)
    prefix = getattr(method, "CHECKPOINT_PREFIX", _PREFIX)  # prompt learning: plain "prompt_embeddings"
    return {f"{prefix}{k}": v for k, v in method.adapter_tensors(model, adapter_name).items()}


def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> None:
    """Write the adapter of a patched model as PEFT would (config + safetensors weights)."""
    from safetensors.torch import save_file

    saved_config = _config(model, adapter_name)
    tensors = adapter_state_dict(model, adapter_name)
    if any(layer.merged for layer in PatchRecord.layers(model)):
        raise RuntimeError("unmerge the adapter before saving it (merged weights live in the base)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # A method may leave out fields PEFT's config class lacks (see IA3Config.checkpoint_dict).
    config = saved_config.checkpoint_dict() if hasattr(saved_config, "checkpoint_dict") else dataclasses.asdict(saved_config)
    config.update(
        peft_type=saved_config.peft_type,
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        inference_mode=True,
    )
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / WEIGHTS_NAME),
              metadata={"format": "pt"})  # fmt: skip


def read_adapter(directory: str | Path):
    """(config, tensors) of a PEFT-format checkpoint, the config validated before use."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}")
    if not (directory / WEIGHTS_NAME).exists():
        pickles = [p.name for p in directory.glob("adapter_model.*")]
        raise FileNotFoundError(
            f"{directory} has no {WEIGHTS_NAME}" + (f" (found {pickles}: peftkern loads safetensors only)" if pickles else "")
        )
    try:
        raw = json.loads((directory / CONFIG_NAME).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{directory / CONFIG_NAME} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{directory / CONFIG_NAME} must hold a JSON object, got {type(raw).__name__}")
    # As PEFT loads a checkpoint (inference_mode = not is_trainable): nothing the config names is
    # fetched or run (no tokenizer for a TEXT prompt init), a prefix projection stays folded.
    raw = {**raw, "inference_mode": True}
    try:
        _, config = resolve_config(raw)
    except ValueError as error:
        raise ValueError(f"{directory}/{CONFIG_NAME}: {error}") from None
    return config, load_file(str(directory / WEIGHTS_NAME))


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default", **options):
    """Load a PEFT-format checkpoint: patches an unpatched model with the saved config first, or
    adds it as another adapter to a patched model that has none named `adapter_name` (not made
    active, as PEFT's load_adapter), then copies the tensors. Every key and shape is checked
    before any tensor is written; on a mismatch the model is left as it was (a patch or an
    adapter added here is undone)."""
    config, tensors = read_adapter(directory)
    record = PatchRecord.of(model)
    undo = None
    if record is None:
        patch(model, config, adapter_name=adapter_name, **options)
        undo = lambda: unpatch(model)  # noqa: E731
    elif adapter_name not in record.adapters and not record.from_peft:
        if options:
            raise TypeError(f"load_adapter options {sorted(options)} apply only when it patches an unpatched model")
        method, checked = multi_adapter.checked_new_adapter(model, adapter_name, config)
        changes = multi_adapter.apply_new_adapter(model, method, checked, adapter_name)
        undo = lambda: multi_adapter.retract_adapter(model, adapter_name, changes)  # noqa: E731
    try:
        expected = adapter_state_dict(model, adapter_name)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise KeyError(f"adapter checkpoint does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for key, target in expected.items():
            if tensors[key].shape != target.shape:
                raise ValueError(f"{key}: checkpoint shape {tuple(tensors[key].shape)}, model {tuple(target.shape)}")
        check_loadable = getattr(method_module(_config(model, adapter_name).peft_type), "check_loadable", None)
        if check_loadable is not None:  # a method whose saved tensors are computed (folded) may refuse
            check_loadable(model, adapter_name)
    except Exception:
        if undo is not None:
            undo()
        raise
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])
    return model
