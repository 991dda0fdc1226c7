"""The patch state of a model, owned by one class: `PatchRecord`.

`peftkern.patch` (and `add_adapter`, `load_adapter`) change a model in place; the record keeps
what it takes to undo every change exactly (the modules swapped out, undo callables for every
other change, the requires_grad flags from before) and which adapters the model holds. It lives
on the model (`PatchRecord.of(model)`), so it travels with `copy.deepcopy` of a patched model.

Methods change a model only through a record: `record.swap(model, name, new)` for a module swap,
`record.on_undo(fn)` for anything else. A leaf module: it imports nothing of peftkern but the
layer base class.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .methods.layer import AdapterLayer

ATTRIBUTE = "_peftkern_patch_record"  # where a patched model keeps its record


class PatchRecord:
    """What was changed in a model, and its adapters.

    - `swaps`: (parent module name, attribute, module to put back), in the order made;
    - `undos`: callables undoing every other change, in the order made;
    - `requires_grad`: each parameter's flag before the change;
    - `method`: the PEFT method (`peft_type`) of the model's adapters; `config` / `adapter_name`:
      the first adapter's; `adapters`: name -> config, in the order added; `active`: the adapter
      that forward, merge and training use (None when every adapter was deleted);
    - `from_peft`: the model is a `peft.PeftModel` whose own layers were taken over.
    """

    def __init__(self, model: nn.Module, *, method: str | None = None, config=None, adapter_name: str | None = None,
                 from_peft: bool = False):  # fmt: skip
        self.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self.swaps: list[tuple[str, str, nn.Module]] = []
        self.undos: list[Callable[[], None]] = []
        self.method = method
        self.config = config
        self.adapter_name = adapter_name
        self.adapters: dict[str, object] = {adapter_name: config} if adapter_name is not None else {}
        self.active = adapter_name
        self.from_peft = from_peft

    # -- where it lives ------------------------------------------------------------------------

    @staticmethod
    def of(model: nn.Module) -> PatchRecord | None:
        """The record of a patched model, or None."""
        return getattr(model, ATTRIBUTE, None) or None

    @staticmethod
    def required(model: nn.Module, hint: str = "") -> PatchRecord:
        """The record of a patched model; raises for an unpatched one (`hint` says what to do)."""
        record = PatchRecord.of(model)
        if record is None:
            raise RuntimeError("this model was not patched by peftkern" + (f": {hint}" if hint else ""))
        return record

    def attach(self, model: nn.Module) -> None:
        setattr(model, ATTRIBUTE, self)

    @staticmethod
    def detach(model: nn.Module) -> None:
        delattr(model, ATTRIBUTE)

    # -- recording changes ---------------------------------------------------------------------

    def swap(self, model: nn.Module, name: str, new: nn.Module, restore: nn.Module | None = None) -> nn.Module:
        """Put `new` at `name`; undo puts back `restore` (default: the module that was there,
        returned). QLoRA's quantize passes its NF4 layer, so that unpatch gives that back."""
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        setattr(parent, attr, new)
        self.swaps.append((parent_name, attr, old if restore is None else restore))
        return old

    def set_attribute(self, owner: object, name: str, value) -> None:
        """Set a plain instance attribute (a wrapped method, a flag) of `owner`; undo puts back
        the instance attribute it replaced, or removes it (the class attribute shows again)."""
        self.undos.append(_AttributeUndo(owner, name))
        setattr(owner, name, value)

    def on_undo(self, undo: Callable[[], None]) -> None:
        """Record the undo of a change that is not a module swap (hooks, attributes, adapters)."""
        self.undos.append(undo)

    def apply_or_undo(self, model: nn.Module, apply: Callable[[PatchRecord], None]) -> None:
        """apply(self); should it fail midway, undo what it recorded before the error propagates."""
        try:
            apply(self)
        except BaseException:
            self.undo(model)
            raise

    def undo(self, model: nn.Module) -> None:
        """Undo the recorded changes, newest first, and restore the requires_grad flags."""
        for undo in reversed(self.undos):
            undo()
        for parent_name, attr, original in reversed(self.swaps):
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, original)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(self.requires_grad.get(name, parameter.requires_grad))

    def absorb(self, changes: PatchRecord) -> None:
        """Take over the changes recorded in `changes` (an adapter added to a patched model)."""
        self.swaps += changes.swaps
        self.undos += changes.undos

    def retract(self, model: nn.Module, changes: PatchRecord) -> None:
        """Undo exactly the changes `absorb(changes)` took over, and forget them."""
        changes.undo(model)
        self.swaps = [s for s in self.swaps if s not in changes.swaps]
        self.undos = [u for u in self.undos if u not in changes.undos]

    # -- what it changed -----------------------------------------------------------------------

    @staticmethod
    def layers(model: nn.Module) -> list[AdapterLayer]:
        """The adapter layers a patch swapped into `model`."""
        return [m for m in model.modules() if isinstance(m, AdapterLayer)]

    def __repr__(self) -> str:
        return f"PatchRecord(method={self.method!r}, adapters={list(self.adapters)}, active={self.active!r})"


class _AttributeUndo:
    """Puts one instance attribute back as it was. An object, not a closure, so that the undo of
    a `copy.deepcopy` of a patched model refers to the copy."""

    def __init__(self, owner: object, name: str):
        self.owner, self.name = owner, name
        self.had = name in vars(owner)
        self.previous = vars(owner).get(name)

    def __call__(self) -> None:
        if self.had:
            vars(self.owner)[self.name] = self.previous
        else:
            vars(self.owner).pop(self.name, None)
