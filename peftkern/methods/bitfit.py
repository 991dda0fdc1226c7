"""BitFit (Ben Zaken et al., ACL 2022): freeze everything, train the model's existing biases (every
one, or those of named modules: the paper's subset variant trains only the query and second MLP
layer biases), optionally plus whole modules such as the head (`modules_to_save`).

PEFT has no BitFit tuner, so `peft_type="BITFIT"` is our own. Nothing is swapped or added: patching
sets requires_grad, unpatch restores the flags. The checkpoint is PEFT's file layout with PEFT's
key names for trained biases (`base_model.model.<module>.bias`, what a PEFT LoRA checkpoint with
bias="all" holds) and for modules_to_save. No kernel: a bias gradient is a column sum that
autograd already computes; this is config and patch work.

Models without biases (Llama, Mistral) are refused with a clear error; Qwen2 has biases on
q/k/v only, GPT-2 and BERT everywhere.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn

from .. import targeting
from ..record import PatchRecord
from . import PEFT_METADATA_FIELDS, config_fields, modules_to_save


@dataclass
class BitFitConfig:
    """`bias_modules`: None trains every bias of the model (every parameter named `bias`, LayerNorm
    biases included, as the paper); otherwise PEFT's module-name spec (a list of names or
    ".suffix"es, or a regex full-match) picks the modules whose bias trains, e.g. ["q_proj",
    "down_proj"] or ["c_attn", "mlp.c_proj"]. `modules_to_save`: modules trained and saved whole
    (e.g. ["lm_head"], ["score"]), as PEFT's field."""

    bias_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None  # recorded in checkpoints

    peft_type = "BITFIT"  # a class attribute, not a field

    @classmethod
    def from_any(cls, config) -> "BitFitConfig":
        if isinstance(config, cls):
            return dataclasses.replace(config)
        values = config_fields(config, cls, "a BitFitConfig or a dict")
        given = config if isinstance(config, dict) else config.to_dict()
        unknown = set(given) - {f.name for f in dataclasses.fields(cls)} - PEFT_METADATA_FIELDS
        if unknown:
            raise ValueError(f"BitFitConfig has no field(s) {sorted(unknown)}")
        return cls(**values)

    def validate(self) -> None:
        for name in ("bias_modules", "modules_to_save"):
            value = getattr(self, name)
            if not (value is None or (name == "bias_modules" and isinstance(value, str))
                    or (isinstance(value, list) and all(isinstance(v, str) for v in value))):  # fmt: skip
                raise TypeError(f"BitFitConfig.{name} must be a list of module names"
                                + (" or a regex string" if name == "bias_modules" else "") + f", got {value!r}")  # fmt: skip
            if isinstance(value, list) and not value:
                raise ValueError(f"BitFitConfig.{name} must not be an empty list (None for {'every bias' if name == 'bias_modules' else 'none'})")  # fmt: skip
        if isinstance(self.bias_modules, str):
            try:
                re.compile(self.bias_modules)
            except re.error as error:
                raise ValueError(f"BitFitConfig.bias_modules is not a valid regex: {error}") from None


CONFIG = BitFitConfig


def trained_biases(model: nn.Module, config: BitFitConfig) -> dict[str, nn.Parameter]:
    """{parameter name: parameter} of the biases the config trains, in the model's order."""
    found = {}
    for name, parameter in model.named_parameters():
        module_name, _, leaf = name.rpartition(".")
        if leaf != "bias" or ".modules_to_save." in name or ".original_module." in name:
            continue
        if config.bias_modules is None or targeting.matches(config.bias_modules, module_name):
            found[name] = parameter
    return found


def plan_patch(model: nn.Module, config: BitFitConfig, adapter_name: str):
    """Check that there are biases to train (and the modules to save exist) before anything
    changes; apply sets requires_grad on them."""
    biases = trained_biases(model, config)
    if not biases:
        if not any(n.rpartition(".")[2] == "bias" for n, _ in model.named_parameters()):
            raise ValueError(f"BitFit: {type(model).__name__} has no bias parameters (Llama and Mistral, for instance, "
                             "have none), so there is nothing to train")  # fmt: skip
        raise ValueError(f"BitFit: no bias belongs to a module matching bias_modules={config.bias_modules!r}")
    saved = modules_to_save.find(model, config.modules_to_save or [], set())
    overlap = [n for n, _ in saved if any(b.startswith(f"{n}.") for b in biases)]
    if overlap:
        raise ValueError(f"BitFit: {overlap[0]!r} is in modules_to_save and also has a trained bias; name it in one only")

    def apply(record: PatchRecord) -> None:
        modules_to_save.apply(model, saved, adapter_name, record)
        for parameter in biases.values():
            parameter.requires_grad_(True)

    return apply


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT's checkpoint keys (without `base_model.model.`): `<module>.bias` per trained bias,
    plus modules_to_save."""
    config = PatchRecord.required(model).adapters[adapter_name]
    tensors = dict(trained_biases(model, config))
    tensors.update(modules_to_save.tensors(model, adapter_name))
    return tensors
