"""The base classes of the layers that methods swap into a model."""

from __future__ import annotations

import torch
from torch import nn

from .. import mixed


class AdapterLayer(nn.Module):
    """Base of every layer a method swaps in: `merge()` folds the active adapter into the base
    weight, `unmerge()` takes it back out, `unloaded()` is the module merge_and_unload leaves."""

    merged = False
    _before_merge: list | None = None
    # True for a layer wrapping a whole sublayer (a bottleneck adapter site): layers of other
    # methods inside it keep their own names in checkpoints (`.base_layer.` dropped by io).
    wraps_sublayer = False

    def merge(self, keep_original: bool = True) -> None:
        """`keep_original`: keep what merging overwrites, so that unmerge is exact
        (merge_and_unload, which never unmerges, passes False)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def unmerge(self) -> None:
        pass

    def _keep_before_merge(self, *tensors) -> None:
        """CPU copies of the base tensors a merge is about to overwrite: unmerge (and so unpatch)
        put them back bit for bit, where subtracting or dividing the adapter back out would round
        (up to 1.5e-8 in float32, and a third of the elements of a bfloat16 weight). It costs a
        CPU copy of each merged weight for as long as it is merged."""
        self._before_merge = [(t, t.detach().to("cpu", copy=True)) for t in tensors if t is not None]

    @torch.no_grad()
    def _restore_before_merge(self) -> bool:
        """Put back what `_keep_before_merge` kept; False when nothing was kept."""
        if not self._before_merge:
            return False
        for tensor, original in self._before_merge:
            tensor.copy_(original)
        self._before_merge = None
        return True

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

    def _own(self, base_layer: nn.Module) -> None:
        """Remember which module is this layer's base (not registered as a submodule: a plain
        reference), so that forward notices when another library replaced it."""
        object.__setattr__(self, "_own_base", base_layer)

    def _check_not_wrapped(self, adapter_modules) -> None:
        """Refuse to run when another library wrapped this layer's base or adapter modules, e.g.
        PEFT's get_peft_model (SFTTrainer given a peft_config) on a model peftkern patched: the
        outer adapters would be trained and saved but silently left out of this forward."""
        if self.base_layer is not self.__dict__.get("_own_base", self.base_layer) or any(
            type(m) is not nn.Linear for m in adapter_modules
        ):
            raise RuntimeError(
                f"{type(self).__name__}: its base or adapter modules were wrapped by another library (PEFT's "
                "get_peft_model on a model peftkern already patched, e.g. SFTTrainer given both a patched model and "
                "a peft_config). Give the trainer the patched model without peft_config, or an unpatched model with "
                "the peft_config and then call peftkern.patch(trainer.model)."
            )

    def forward(self, x):
        if self.disabled:
            self.unmerge()
            return self.base_layer(x)
        batch = mixed.current()
        if batch is not None:
            return self._mixed_forward(x, batch)
        return self._active_forward(x)
