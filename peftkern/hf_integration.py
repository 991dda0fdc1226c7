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
  PeftModel. No config.json is written: the directory is an adapter, not a model;
- on a causal LM whose loss is transformers' `ForCausalLMLoss`: `loss_function` =
  `peftkern.ops.cross_entropy.causal_lm_loss`, the same loss from the fused cross-entropy op, which
  writes no [tokens, vocab] log-probabilities (`patch(..., fused_loss=False)` keeps transformers').
"""

from __future__ import annotations

import functools
import os
import types
from pathlib import Path

from torch import nn

from .io import save_adapter
from .ops.cross_entropy import causal_lm_loss
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


def install(model: nn.Module, record: PatchRecord, fused_loss: bool = True) -> None:
    """Mark a transformers model as carrying adapters, give it PEFT's save_pretrained and (with
    fused_loss) the fused causal-LM loss; a model that is not a transformers PreTrainedModel is
    left alone."""
    if not callable(getattr(type(model), "save_pretrained", None)) or not hasattr(model, "config"):
        return
    record.set_attribute(model, _MARK, True)
    record.set_attribute(model, "save_pretrained", types.MethodType(functools.partial(_save_pretrained, record), model))
    if fused_loss and _uses_causal_lm_loss(model):
        # transformers reads `_loss_function` first (PreTrainedModel.loss_function); unpatch removes it
        record.set_attribute(model, "_loss_function", causal_lm_loss)


def _uses_causal_lm_loss(model: nn.Module) -> bool:
    """Whether the model computes its loss with transformers' ForCausalLMLoss (and not with a loss
    of its own, a user's, or another task's)."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:
        return False
    if "_loss_function" in vars(model) or getattr(model, "loss_type", None) != "ForCausalLM":
        return False  # a loss the user set, or another task's (reading loss_function would warn then)
    # transformers' property, which reads `_loss_function` first
    return LOSS_MAPPING.get("ForCausalLM") is ForCausalLMLoss and isinstance(getattr(type(model), "loss_function", None),
                                                                             property)
