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

from .methods import method_module, resolve_config
from .record import PatchRecord

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
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


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's live tensors under PEFT's checkpoint keys."""
    method = method_module(adapter_config(model, adapter_name).peft_type)
    prefix = getattr(method, "CHECKPOINT_PREFIX", _PREFIX)  # prompt learning: plain "prompt_embeddings"
    tensors = {f"{prefix}{k}": v for k, v in method.adapter_tensors(model, adapter_name).items()}
    extra = getattr(method, "extra_checkpoint_tensors", None)  # VeRA: PEFT's base_model.vera_A / vera_B
    if extra is not None:
        tensors.update(extra(model, adapter_name))
    return tensors


def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> None:
    """Write the adapter of a patched model as PEFT would (config + safetensors weights)."""
    from safetensors.torch import save_file

    saved_config = adapter_config(model, adapter_name)
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
