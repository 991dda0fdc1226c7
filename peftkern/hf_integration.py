"""How a patched model presents itself to transformers: as a model that carries adapters.

`peftkern.patch` installs, on a transformers `PreTrainedModel` (undone by unpatch):
- `_hf_peft_config_loaded = True`, transformers' own mark of a model with adapters attached
  (what its `add_adapter` sets): `Trainer` then accepts a model loaded in 4-bit by bitsandbytes
  (it refuses "purely quantized" models), and `gradient_checkpointing_enable()` makes the input
  embeddings' output require grad, so checkpointed frozen layers still pass gradients to the
  adapters, as PEFT arranges;
- `save_pretrained(directory)`, as `PeftModel.save_pretrained` writes it: every adapter in PEFT's
  format (the first one in `directory`, the others in `directory/<name>`), loadable with
  `peftkern.load_adapter` or `peft.PeftModel.from_pretrained`; plus `model.safetensors` holding
  only the trainable tensors under the model's own state-dict names, which is what
  `Trainer(resume_from_checkpoint=...)` loads (non-strictly) into a model that is not a
  PeftModel. No config.json is written: the directory is an adapter, not a model.
"""

from __future__ import annotations

import functools
import os
import types
from pathlib import Path

from torch import nn

from .io import save_adapter
from .record import PatchRecord

TRAINABLE_NAME = "model.safetensors"  # transformers' SAFE_WEIGHTS_NAME: what Trainer resumes from
_MARK = "_hf_peft_config_loaded"


def _save_pretrained(record: PatchRecord, model: nn.Module, save_directory, *args, **kwargs) -> None:
    """PEFT's layout: the first adapter at `save_directory`, any other in a subdirectory named
    after it; plus the trainable tensors for Trainer's resume. Other arguments (state_dict,
    safe_serialization, ...) are accepted and not used: the adapters' own tensors are saved."""
    from safetensors.torch import save_file

    directory = Path(save_directory)
    names = list(record.adapters) or [record.adapter_name]
    for index, name in enumerate(names):
        save_adapter(model, directory if index == 0 else directory / name, adapter_name=name)
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, os.fspath(directory / TRAINABLE_NAME), metadata={"format": "pt"})


def install(model: nn.Module, record: PatchRecord) -> None:
    """Mark a transformers model as carrying adapters and give it PEFT's save_pretrained; a model
    that is not a transformers PreTrainedModel is left alone."""
    if not callable(getattr(type(model), "save_pretrained", None)) or not hasattr(model, "config"):
        return
    record.set_attribute(model, _MARK, True)
    record.set_attribute(model, "save_pretrained", types.MethodType(functools.partial(_save_pretrained, record), model))
