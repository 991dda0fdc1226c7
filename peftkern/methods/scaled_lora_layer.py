"""The layer base shared by the LoRA relatives computed by the scaled-LoRA op (`peftkern.ops.
scaled_lora`): VeRA and AdaLoRA. A frozen base (dense `nn.Linear`, transformers' `Conv1D`, or NF4)
plus per-adapter low-rank factors that a subclass names in `factors(name)`:

    out = base(x) + scaling·((dropout(x)·Aᵀ ⊙ rank_scale)·Bᵀ) ⊙ out_scale

The subclass holds its adapter tensors under PEFT's names; this base does forward (the fused
op), merge / unmerge (exact: the weights from before are kept, an NF4 base is swapped for a dense
copy while merged, as LoRA does), and the bookkeeping MultiAdapterLayer expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import mixed
from ..ops import scaled_lora as scaled_lora_ops
from .bases import base_features, bias_like, is_conv1d, nf4_base_weight
from .layer import MultiAdapterLayer


@dataclass
class Factors:
    """One adapter's terms of the op: A [r, in], B [out, r] (any strides), the scales (None or r /
    out elements), the scaling and the dropout probability."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    rank_scale: torch.Tensor | None
    out_scale: torch.Tensor | None
    dropout: float


class ScaledLoraLayer(MultiAdapterLayer):
    """Base of VeraLinear and SVDLinear. Subclasses implement `factors(name)`, `has_adapter(name)`,
    `adapter_parameters(name)` and `delete_adapter(name)`."""

    method = "scaled-LoRA"  # for messages

    def _init_base(self, base_layer: nn.Module, adapter_name: str, fan_in_fan_out: bool) -> None:
        self.base_layer = base_layer
        self._own(base_layer)
        self.quantized = nf4_base_weight(base_layer) is not None
        # GPT-2's Conv1D stores its weight as [in, out]: always fan-in-fan-out, as PEFT forces.
        self.fan_in_fan_out = (fan_in_fan_out or is_conv1d(base_layer)) and not self.quantized
        self.out_features, self.in_features = base_features(base_layer, self.quantized, self.fan_in_fan_out)
        self.active_adapter = adapter_name
        self.merged = False
        self._nf4_base_while_merged = None

    def adapter_factory(self) -> dict:
        """Device and dtype for new adapter tensors: the base weight's (float32 on an NF4 base, as
        PEFT makes them)."""
        nf4 = nf4_base_weight(self.base_layer)
        if nf4 is not None:
            return dict(device=nf4.device, dtype=torch.float32)
        return dict(device=self.base_layer.weight.device, dtype=self.base_layer.weight.dtype)

    # -- what subclasses provide ---------------------------------------------------------------

    def factors(self, name: str) -> Factors:
        raise NotImplementedError

    def has_adapter(self, name: str) -> bool:
        raise NotImplementedError

    # -- merge ---------------------------------------------------------------------------------

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight as [out, in] in `dtype` (dequantized for NF4 bases)."""
        nf4 = nf4_base_weight(self.base_layer)
        if nf4 is not None:
            return nf4.dequantize(dtype)
        weight = self.base_layer.weight
        return (weight.t() if self.fan_in_fan_out else weight).to(dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling·(out_scale ⊙ B)·(rank_scale ⊙ A), computed in float32 (float64 for a float64
        adapter), laid out like the base weight."""
        f = self.factors(name)
        dtype = torch.float64 if f.lora_a.dtype == torch.float64 else torch.float32
        a, b = f.lora_a.to(dtype), f.lora_b.to(dtype)
        if f.rank_scale is not None:
            a = f.rank_scale.reshape(-1, 1).to(dtype) * a
        if f.out_scale is not None:
            b = f.out_scale.reshape(-1, 1).to(dtype) * b
        delta = f.scaling * (b @ a)
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """W <- W + delta, the weight from before kept (on the CPU) so that unmerge restores it
        exactly. An NF4 base is set aside and replaced by a dense nn.Linear in the weight's
        original dtype holding the merged weight, as LoRA merges (docs/lora.md)."""
        if self.merged or not self.has_adapter(self.active_adapter):
            return
        if self.quantized:
            self._dense_base_for_merge()
        elif keep_original:
            self._keep_before_merge(self.base_layer.weight)
        weight = self.base_layer.weight
        weight += self.delta_weight(self.active_adapter).to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._nf4_base_back():  # the dense merged copy is simply dropped
            return
        if not self._restore_before_merge():  # merged without keeping the original: undo the arithmetic
            weight = self.base_layer.weight
            weight -= self.delta_weight(self.active_adapter).to(weight.dtype)
        self.merged = False

    def unloaded(self) -> nn.Module:
        return self.base_layer

    # -- forward -------------------------------------------------------------------------------

    def _active_forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        self._check_not_wrapped(())
        if self.merged or not self.has_adapter(name):
            return self._base_forward(x)
        f = self.factors(name)
        lora_a, lora_b = f.lora_a, f.lora_b
        if lora_a.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            # e.g. float32 adapters on a bfloat16 model: compute in x's dtype (the scales stay
            # float32: the op reads them so); under autocast the op casts everything itself
            lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        if self.quantized:
            return scaled_lora_ops.nf4_scaled_lora_linear(
                x, nf4_base_weight(self.base_layer), bias_like(self.base_layer.bias, x), lora_a, lora_b, f.scaling,
                f.rank_scale, f.out_scale, dropout=f.dropout, training=self.training,
            )  # fmt: skip
        return scaled_lora_ops.scaled_lora_linear(
            x, self.base_layer.weight, self.base_layer.bias, lora_a, lora_b, f.scaling, f.rank_scale, f.out_scale,
            dropout=f.dropout, training=self.training, fan_in_fan_out=self.fan_in_fan_out,
        )  # fmt: skip

    def _mixed_forward(self, x: torch.Tensor, batch: "mixed.MixedBatch") -> torch.Tensor:
        raise ValueError(f"{self.method} does not support mixed-adapter batches (`adapter_names`), as in PEFT")

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, merged={self.merged}"
