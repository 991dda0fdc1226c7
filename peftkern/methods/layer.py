"""The base classes of the layers that methods swap into a model."""

from __future__ import annotations

import torch
from torch import nn

from .. import mixed
from .bases import nf4_base_weight


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

    # -- NF4 bases while merged (LoRA, VeRA, AdaLoRA: subclasses set _nf4_base_while_merged = None) --

    @torch.no_grad()
    def _dense_base_for_merge(self) -> None:
        """Before merging into an NF4 base: set it aside and put in its place a dense nn.Linear in
        the weight's original dtype holding the dequantized weight, which the merge adds to.
        Re-quantizing would be lossy; `_nf4_base_back` gives the NF4 base back bit for bit, and
        merge_and_unload leaves the dense one."""
        nf4 = nf4_base_weight(self.base_layer)
        dense = nn.Linear(self.in_features, self.out_features, bias=self.base_layer.bias is not None,
                          device=nf4.device, dtype=nf4.dtype)  # fmt: skip
        dense.weight.copy_(nf4.dequantize(nf4.dtype))
        if self.base_layer.bias is not None:
            dense.bias.copy_(self.base_layer.bias)
        dense.requires_grad_(False)
        self._nf4_base_while_merged, self.base_layer = self.base_layer, dense
        self._own(dense)
        self.quantized = False

    def _nf4_base_back(self) -> bool:
        """Unmerge of a merge onto `_dense_base_for_merge`'s copy: drop the copy, put the NF4 base
        back and mark the layer unmerged (True); False when the base was not NF4."""
        if self._nf4_base_while_merged is None:
            return False
        self.base_layer, self._nf4_base_while_merged = self._nf4_base_while_merged, None
        self._own(self.base_layer)
        self.quantized, self.merged = True, False
        return True

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base alone (merged, or no active adapter). The dense copy of a merged NF4 base runs
        in x's dtype, as the NF4 base would."""
        weight = getattr(self.base_layer, "weight", None)
        if self._nf4_base_while_merged is not None and weight.dtype != x.dtype:
            bias = self.base_layer.bias
            return nn.functional.linear(x, weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None)
        return self.base_layer(x)

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
