"""PEFT's `modules_to_save`: whole modules (a classifier head, an lm_head) trained and saved next
to the adapter. The module is wrapped; the original stays frozen and a trainable copy per adapter
runs in its place, as PEFT's ModulesToSaveWrapper does, so unpatch gives the untouched original
back. Checkpoint keys are the module's own (`<module>.weight`), as PEFT writes them."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import mixed
from ..record import PatchRecord
from .layer import AdapterLayer


class ModulesToSave(AdapterLayer):
    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        trainable = copy.deepcopy(module)
        trainable.requires_grad_(True)
        self.modules_to_save = nn.ModuleDict({adapter_name: trainable})
        self.active_adapter = adapter_name

    disabled = False  # peftkern.disable_adapter(): the original module runs, as in PEFT

    def _in_use(self) -> nn.Module:
        """The active adapter's trainable copy; the original while disabled or while the active
        adapter (another one of the model) has no copy here."""
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters()) if name in self.modules_to_save else []

    def forward(self, *args, **kwargs):
        batch = mixed.current()
        names = batch.adapters_in(self.modules_to_save) if batch is not None and not self.disabled else ()
        if not names:
            return self._in_use()(*args, **kwargs)
        # A mixed batch: the original for every sequence, then each copy on its own sequences (as
        # PEFT; a module to save is one of few, so a loop over the copies is cheap here).
        x, rest = args[0], args[1:]
        out = self.original_module(x, *rest, **kwargs).clone()
        for name in names:
            rows = batch.sequences_of(name, x.shape[0])
            out[rows] = self.modules_to_save[name](x[rows], *rest, **kwargs).to(out.dtype)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # model code reads e.g. `lm_head.weight`: the module in use answers
            return getattr(self._in_use(), name)

    def merge(self, keep_original: bool = True) -> None:  # nothing to fold: the copy is the module
        pass

    def unloaded(self) -> nn.Module:
        return self._in_use()


def find(model: nn.Module, names: list[str], exclude: set[str] = frozenset(), optional=()) -> list[tuple[str, nn.Module]]:
    """The outermost modules whose dotted name ends with one of `names` or `optional` (PEFT's
    rule). Raises when a name of `names` matches nothing, or a match overlaps a module another
    part of the config already adapts."""
    found: list[tuple[str, nn.Module]] = []
    for name in [*names, *(n for n in optional if n not in names)]:
        hits = [(k, m) for k, m in model.named_modules() if k and k.endswith(name)]
        hits = [(k, m) for k, m in hits if not any(k.startswith(f"{other}.") for other, _ in hits)]
        if not hits and name in optional:
            continue
        if not hits:
            raise ValueError(f"modules_to_save: no module of {type(model).__name__} matches {name!r}")
        found += [hit for hit in hits if hit[0] not in {k for k, _ in found}]
    for key, _ in found:
        clash = [t for t in exclude if t == key or t.startswith(f"{key}.") or key.startswith(f"{t}.")]
        if clash:
            raise ValueError(f"modules_to_save module {key!r} overlaps the adapter's target {clash[0]!r}")
    return found


def apply(model: nn.Module, found: list[tuple[str, nn.Module]], adapter_name: str, record: PatchRecord) -> None:
    for key, module in found:
        record.swap(model, key, ModulesToSave(module, adapter_name))


def tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, module in model.named_modules():
        if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for name, parameter in module.modules_to_save[adapter_name].named_parameters():
                out[f"{key}.{name}"] = parameter
    return out
