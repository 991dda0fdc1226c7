"""The base classes of the layers that methods swap into a model."""

from __future__ import annotations

from torch import nn

from .. import mixed


class AdapterLayer(nn.Module):
    """Base of every layer a method swaps in: `merge()` folds the active adapter into the base
    weight, `unmerge()` takes it back out, `unloaded()` is the module merge_and_unload leaves."""

    merged = False

    def merge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def unmerge(self) -> None:
        pass

    def unloaded(self) -> nn.Module:
        """What merge_and_unload leaves in this layer's place (after merge): the base layer."""
        base = getattr(self, "base_layer", None)
        if base is None:
            raise NotImplementedError(f"{type(self).__name__} cannot be unloaded")
        return base

    def restore_base(self) -> None:
        """Undo what patching did to the base module itself (unpatch calls it; merge_and_unload not)."""


class MultiAdapterLayer(AdapterLayer):
    """A layer holding several named adapters (LoRA, IA³). Forward runs the base alone while
    disabled (`peftkern.disable_adapter`, unmerging first, as PEFT), each row with its own
    adapter in a mixed batch (`peftkern.mixed`; merged models are refused before), else the
    active adapter. Subclasses provide `_mixed_forward(x, batch)` and `_active_forward(x)`."""

    disabled = False

    def forward(self, x):
        if self.disabled:
            self.unmerge()
            return self.base_layer(x)
        batch = mixed.current()
        if batch is not None:
            return self._mixed_forward(x, batch)
        return self._active_forward(x)
