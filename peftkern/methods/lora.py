"""LoRA (and rsLoRA, DoRA, QLoRA) with Hugging Face PEFT's config fields and semantics, on dense
bases (`nn.Linear`, transformers' `Conv1D`) and NF4 bases, computed by the fused ops in
`peftkern.ops.lora` / `peftkern.ops.dora`.

Supported: r, lora_alpha, lora_dropout, target_modules (suffix list, regex full-match,
"all-linear", or PEFT's per-architecture default), exclude_modules, layers_to_transform,
layers_pattern, bias ("none", "all", "lora_only"), fan_in_fan_out, use_rslora, use_dora,
init_lora_weights in {True, False, "gaussian", "pissa", "pissa_niter_<n>"}, modules_to_save
(plus PEFT's classifier heads for SEQ_CLS / TOKEN_CLS), rank_pattern / alpha_pattern. Other
init schemes and fields raise NotImplementedError, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import mixed, targeting
from ..ops import dora as dora_ops
from ..ops import dropout as dropout_ops
from ..ops import grouped as grouped_ops
from ..ops import lora as lora_ops
from ..ops import qlora as qlora_ops
from ..record import PatchRecord
from . import config_fields, gates, modules_to_save
from .bases import (
    base_features,
    bias_like,
    check_new_base,
    check_quantize_option,
    is_conv1d,
    nf4_base_weight,
    quantized_base,
    supports,
)
from .layer import MultiAdapterLayer

# PEFT's default LoRA targets per architecture (used when target_modules is None).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
}


@dataclass
class LoraConfig:
    """PEFT's `LoraConfig` fields, same names and meaning."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    task_type: str | None = None  # recorded in checkpoints, as PEFT does

    peft_type = "LORA"  # a class attribute, not a field

    @classmethod
    def from_any(cls, config) -> "LoraConfig":
        """From a peftkern LoraConfig, a `peft.LoraConfig`, or a plain dict. PEFT fields peftkern
        does not implement are accepted only at PEFT's default, unknown keys refused
        (`peftkern.methods.config_fields`)."""
        if isinstance(config, cls):
            return dataclasses.replace(config)  # a copy: patching fills in defaults
        values = config_fields(config, cls, "a LoraConfig, a peft.LoraConfig or a dict")
        target = values.get("target_modules")
        if isinstance(target, (set, tuple)):
            values["target_modules"] = sorted(target)
        return cls(**values)

    def validate(self) -> None:
        """Every field checked before anything changes (a TypeError / ValueError names it)."""
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise TypeError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        for name in ("lora_alpha", "lora_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"LoraConfig.{name} must be a number, got {value!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if not (value is None or isinstance(value, str)
                    or (isinstance(value, list) and all(isinstance(v, str) for v in value))):  # fmt: skip
                raise TypeError(f"LoraConfig.{name} must be a list of module names or a regex string, got {value!r}")
        for name in ("fan_in_fan_out", "use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"LoraConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        init = self.init_lora_weights
        if not (init in (True, False, "gaussian", "pissa") or _pissa_niter(init) is not None):
            raise NotImplementedError(f"LoraConfig.init_lora_weights={init!r} is not supported by peftkern yet")
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name) or {}
            if not isinstance(pattern, dict):
                raise TypeError(f"LoraConfig.{name} must be a dict of module-name pattern -> value")
            for key, value in pattern.items():
                if name == "rank_pattern" and (not isinstance(value, int) or value <= 0):
                    raise ValueError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {value!r}")

    def for_module(self, key: str) -> "LoraConfig":
        """This config with r and lora_alpha as rank_pattern / alpha_pattern give them for module
        `key` (PEFT's rule: the first pattern p with re.match(rf"(.*[.])?({p})$", key))."""
        r, alpha = self.r, self.lora_alpha
        for pattern, value in (self.rank_pattern or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", key):
                r = value
                break
        for pattern, value in (self.alpha_pattern or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", key):
                alpha = value
                break
        return dataclasses.replace(self, r=r, lora_alpha=alpha)

    def classifier_heads(self) -> tuple[str, ...]:
        """PEFT also trains and saves a classification model's head (where the model has one)."""
        task = str(getattr(self.task_type, "value", self.task_type)).upper()
        return ("classifier", "score") if task in ("SEQ_CLS", "TOKEN_CLS") else ()

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _pissa_niter(init) -> int | None:
    """n for init_lora_weights="pissa_niter_<n>" (PiSSA by a randomized low-rank SVD), else None."""
    if isinstance(init, str) and init.startswith("pissa_niter_") and init[len("pissa_niter_"):].isdigit():
        return int(init[len("pissa_niter_"):])
    return None


def pissa_factors(weight: torch.Tensor, r: int, scaling: float, init) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA (Meng et al. 2024), as PEFT computes it: W = U·S·Vh ([out, in], float32); with the r
    principal triplets, A = sqrt(S_r / s)·Vh_r and B = U_r·sqrt(S_r / s), so that s·B·A is W's best
    rank-r part and the base keeps the residual W - s·B·A."""
    weight = weight.to(torch.float32)
    niter = _pissa_niter(init)
    if niter is None:
        u, singular, vh = torch.linalg.svd(weight, full_matrices=False)
        u, singular, vh = u[:, :r], singular[:r], vh[:r]
    else:
        u, singular, v = torch.svd_lowrank(weight, q=r, niter=niter)
        vh = v.t()
    root = torch.sqrt(singular / scaling)
    return root[:, None] * vh, u * root[None, :]


class DoraMagnitude(nn.Module):
    """DoRA's trainable magnitude vector m [out_features]; a module so that its state-dict key is
    PEFT's `lora_magnitude_vector.<adapter>.weight`."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoraLinear(MultiAdapterLayer):
    """A frozen dense base plus LoRA adapters, named as PEFT names them (`base_layer`,
    `lora_A.<adapter>.weight`, `lora_B.<adapter>.weight`)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig):
        super().__init__()
        self._init_base(base_layer, adapter_name, config.fan_in_fan_out)
        self.add_adapter(adapter_name, config)

    def _init_base(self, base_layer: nn.Module, adapter_name: str | None, fan_in_fan_out: bool) -> None:
        """Everything but the adapters (shared with `peftkern.methods.from_peft`, which puts a PEFT
        layer's own adapter containers in)."""
        self.base_layer = base_layer
        self._own(base_layer)
        self.quantized = nf4_base_weight(base_layer) is not None
        # GPT-2's Conv1D stores its weight as [in, out]: always fan-in-fan-out, as PEFT forces.
        self.fan_in_fan_out = (fan_in_fan_out or is_conv1d(base_layer)) and not self.quantized
        self.out_features, self.in_features = base_features(base_layer, self.quantized, self.fan_in_fan_out)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.lora_gate = nn.ModuleDict()  # UniPELT's gated adapters only (add_gate)
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active_adapter = adapter_name  # may name an adapter this layer lacks: it then runs the base
        self.merged = False
        self._original_base_weight = None  # PiSSA changes the base; unpatch puts this back
        self._nf4_base_while_merged = None

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        if self.quantized:  # float32 adapters on a 4-bit base, as PEFT makes them
            factory = dict(device=nf4_base_weight(self.base_layer).device, dtype=torch.float32)
        else:
            factory = dict(device=self.base_layer.weight.device, dtype=self.base_layer.weight.dtype)
        self.lora_A[name] = nn.Linear(self.in_features, config.r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(config.r, self.out_features, bias=False, **factory)
        self.scaling[name] = config.scaling
        self.dropout[name] = config.lora_dropout
        init = config.init_lora_weights
        if init == "pissa" or _pissa_niter(init) is not None:
            self._pissa_init(name, config)
        elif init is not False:  # False keeps nn.Linear's default init for both, as PEFT does
            if init is True:
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            else:  # "gaussian"
                nn.init.normal_(self.lora_A[name].weight, std=1 / config.r)
            nn.init.zeros_(self.lora_B[name].weight)
        if config.use_dora:  # m starts as ||W + s·BA|| per output row, so DoRA starts where LoRA does
            norm = dora_ops.dora_weight_norm(
                self.dense_weight(factory["dtype"]), self.lora_A[name].weight, self.lora_B[name].weight, config.scaling
            )
            self.lora_magnitude_vector[name] = DoraMagnitude(norm)

    def add_gate(self, name: str) -> None:
        """UniPELT: gate adapter `name` (methods/gates.py): y = W·x + G·B·A·x, α/r dropped, as
        AdapterHub computes a gated LoRA. The gate lives beside the adapter, `lora_gate.<name>`."""
        if name in self.lora_magnitude_vector:
            raise NotImplementedError("a gated LoRA adapter cannot be DoRA (AdapterHub has no gated DoRA either)")
        weight = self.lora_A[name].weight
        self.lora_gate[name] = gates.new_gate(self.in_features, device=weight.device, dtype=weight.dtype)

    @property
    def gated(self) -> bool:
        """Whether the active adapter is gated (its delta depends on the input: it cannot merge)."""
        return self.active_adapter in self.lora_gate

    def delete_adapter(self, name: str) -> None:
        """Drop adapter `name` (unmerged first if it is the merged one); a no-op if absent."""
        if name not in self.lora_A:
            return
        if self.merged and self.active_adapter == name:
            self.unmerge()
        for container in (self.lora_A, self.lora_B, self.lora_magnitude_vector, self.lora_gate):
            if name in container:
                del container[name]
        self.scaling.pop(name, None)
        self.dropout.pop(name, None)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        if name not in self.lora_A:
            return []
        modules = [self.lora_A[name], self.lora_B[name]]
        for extra in (self.lora_magnitude_vector, self.lora_gate):
            if name in extra:
                modules.append(extra[name])
        return [p for m in modules for p in m.parameters()]

    @torch.no_grad()
    def _pissa_init(self, name: str, config: LoraConfig) -> None:
        """A, B from W's principal singular triplets; the base keeps the residual. The original
        weight is kept on the CPU (not in the state dict) so that unpatch restores it exactly."""
        if self.quantized:
            raise NotImplementedError(
                "init_lora_weights='pissa' on an NF4 base is not supported: the residual would have to be "
                "re-quantized (QPiSSA). Initialise PiSSA on the dense model, then quantize."
            )
        weight = self.base_layer.weight
        dense = self.dense_weight(torch.float32)
        lora_a, lora_b = pissa_factors(dense, config.r, config.scaling, config.init_lora_weights)
        self.lora_A[name].weight.copy_(lora_a)
        self.lora_B[name].weight.copy_(lora_b)
        if self._original_base_weight is None:
            self._original_base_weight = weight.detach().to("cpu", copy=True)
        residual = dense - config.scaling * (lora_b @ lora_a)
        weight.copy_(residual.t() if self.fan_in_fan_out else residual)

    @torch.no_grad()
    def restore_base(self) -> None:
        """Give the base back its weight from before patching (PiSSA changed it)."""
        if self._original_base_weight is not None:
            self.base_layer.weight.copy_(self._original_base_weight)
            self._original_base_weight = None

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight as [out, in] in `dtype` (dequantized for NF4 bases)."""
        nf4 = nf4_base_weight(self.base_layer)
        if nf4 is not None:
            return nf4.dequantize(dtype)
        weight = self.base_layer.weight
        return (weight.t() if self.fan_in_fan_out else weight).to(dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A, laid out like the base weight."""
        delta = self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)
        return delta.t() if self.fan_in_fan_out else delta

    def _dora_factor(self, name: str) -> torch.Tensor | None:
        """m / ||W + s·BA|| per output row (a column of the base weight's layout), or None."""
        if name not in self.lora_magnitude_vector:
            return None
        weight = self.base_layer.weight
        norm = dora_ops.dora_weight_norm(
            self.dense_weight(weight.dtype), self.lora_A[name].weight.to(weight.dtype),
            self.lora_B[name].weight.to(weight.dtype), self.scaling[name],
        )  # fmt: skip
        factor = self.lora_magnitude_vector[name].weight.to(weight.dtype) / norm
        return factor.view(1, -1) if self.fan_in_fan_out else factor.view(-1, 1)

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """W <- W + s·BA (LoRA), or W <- m/||W + s·BA|| ⊙ (W + s·BA) (DoRA), as PEFT merges; the
        weight from before is kept (on the CPU) so that unmerge restores it exactly.

        An NF4 base is not re-quantized (that would be lossy): it is set aside and replaced by a
        dense nn.Linear in the weight's original dtype (bf16/fp16/fp32) holding the merged weight;
        unmerge gives the NF4 base back, bit for bit, and merge_and_unload leaves the dense one."""
        if self.merged or self.active_adapter not in self.lora_A:
            return
        if self.gated:
            raise NotImplementedError("a gated (UniPELT) LoRA adapter cannot be merged: its gate depends on the input")
        if self.quantized:
            self._dense_base_for_merge()
        elif keep_original:
            self._keep_before_merge(self.base_layer.weight)
        name, weight = self.active_adapter, self.base_layer.weight
        factor = self._dora_factor(name)
        weight += self.delta_weight(name).to(weight.dtype)
        if factor is not None:
            weight *= factor
            self._merged_dora_factor = factor
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._nf4_base_back():  # the dense merged copy is simply dropped
            self._merged_dora_factor = None
            return
        if self._restore_before_merge():
            self._merged_dora_factor = None
            self.merged = False
            return
        weight = self.base_layer.weight  # merged without keeping the original: undo the arithmetic
        factor = getattr(self, "_merged_dora_factor", None)
        if factor is not None:
            weight /= factor
            self._merged_dora_factor = None
        weight -= self.delta_weight(self.active_adapter).to(weight.dtype)
        self.merged = False

    def _active_forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        self._check_not_wrapped((self.lora_A[name], self.lora_B[name]) if name in self.lora_A else ())
        if self.merged or name not in self.lora_A:
            return self._base_forward(x)
        lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
        if lora_a.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            # e.g. float32 adapters on a bfloat16 model: compute in x's dtype (under autocast the
            # op casts everything to the autocast dtype itself)
            lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        if name in self.lora_magnitude_vector:
            return self._dora_forward(x, name, lora_a, lora_b)
        if name in self.lora_gate:
            return self._gated_forward(x, name, lora_a, lora_b)
        if self.quantized:
            return qlora_ops.nf4_lora_linear(
                x, nf4_base_weight(self.base_layer), bias_like(self.base_layer.bias, x),
                lora_a, lora_b, self.scaling[name], dropout=self.dropout[name], training=self.training,
            )  # fmt: skip
        return lora_ops.lora_linear(
            x, self.base_layer.weight, self.base_layer.bias, lora_a, lora_b, self.scaling[name],
            dropout=self.dropout[name], training=self.training, fan_in_fan_out=self.fan_in_fan_out,
        )  # fmt: skip

    def _gated_forward(self, x, name, lora_a, lora_b):
        """base(x) + ((xd·Aᵀ) ⊙ G)·Bᵀ, G = gate(x) [batch, 1] (AdapterHub: the gate sees x, the
        LoRA path dropout(x); no α/r). The gate is applied to the rank-r intermediate, M·r
        multiplies instead of M·N. It is not folded into the fused op: lora_linear_fwd's only
        scale is one float for all rows, and the per-sequence G needs a per-row one (a kernel
        change to both fused ops and their backward, left for later: docs/hybrids.md)."""
        gate = gates.gate_value(self.lora_gate[name], x)
        p = self.dropout[name]
        dropped = nn.functional.dropout(x, p, training=True) if self.training and p > 0.0 else x
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            dropped, lora_a, lora_b, gate = dropped.to(dtype), lora_a.to(dtype), lora_b.to(dtype), gate.to(dtype)
        xa = nn.functional.linear(dropped, lora_a) * gate.unsqueeze(1)
        base = self._base_forward(x)
        return base + nn.functional.linear(xa, lora_b).to(base.dtype)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            return qlora_ops.nf4_linear(x, nf4_base_weight(self.base_layer), bias_like(self.base_layer.bias, x))
        return self.base_layer(x)

    def _mixed_forward(self, x: torch.Tensor, batch: "mixed.MixedBatch") -> torch.Tensor:
        """Each sequence with its own adapter: the base for all rows, then one grouped op adds
        every row's s·(x·Aᵀ)·Bᵀ (`peftkern.ops.grouped.lora_grouped`). Dropout is off (eval)."""
        names = batch.adapters_in(self.lora_A)
        gated = [n for n in names if n in self.lora_gate]
        if gated:
            raise ValueError(f"Cannot pass `adapter_names` with a gated (UniPELT) adapter ({gated[0]!r})")
        dora = [n for n in names if n in self.lora_magnitude_vector]
        if dora:
            raise ValueError(f"Cannot pass `adapter_names` when DoRA is enabled (adapter {dora[0]!r}), as in PEFT.")
        base_out = self._base_forward(x)
        if not names:
            return base_out
        lora_a, lora_b, scaling = self._adapter_lists(names, base_out.dtype)
        rows = batch.row_slots(names, x)
        return grouped_ops.lora_grouped(base_out, x.to(base_out.dtype), lora_a, lora_b, scaling, rows)

    def _adapter_lists(self, names: tuple[str, ...], dtype: torch.dtype):
        """([lora_A weight], [lora_B weight], [scaling]) of `names`: the layer's own parameters,
        passed as they are (the grouped op reads each adapter's tensors in place: nothing to
        stack, so nothing to cache and no cache to go stale) when they share one dtype that is
        `dtype` or float32; otherwise all cast to `dtype`."""
        lora_a = [self.lora_A[n].weight for n in names]
        lora_b = [self.lora_B[n].weight for n in names]
        dtypes = {t.dtype for t in (*lora_a, *lora_b)}
        if len(dtypes) > 1 or not dtypes <= {dtype, torch.float32}:
            lora_a, lora_b = [t.to(dtype) for t in lora_a], [t.to(dtype) for t in lora_b]
        return lora_a, lora_b, [self.scaling[n] for n in names]

    def _dora_forward(self, x, name, lora_a, lora_b):
        """y = m/n ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b with n = ||W + s·BA|| per output row, detached (DoRA
        paper §4.3, PEFT). With dropout in training, PEFT's form: the base term on x, the DoRA
        correction on dropout(x): x·Wᵀ + b + (m/n - 1) ⊙ xd·Wᵀ + m/n ⊙ s·xd·Aᵀ·Bᵀ."""
        base, scaling, p = self.base_layer, self.scaling[name], self.dropout[name]
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, lora_a, lora_b = x.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        nf4 = nf4_base_weight(base)
        bias = base.bias.to(x.dtype) if base.bias is not None else None
        dense = self.dense_weight(x.dtype)  # dequantized once per step for an NF4 base, shared below
        norm = dora_ops.dora_weight_norm(dense, lora_a, lora_b, scaling)
        scale = self.lora_magnitude_vector[name].weight.to(x.dtype) / norm

        def lora_part(inputs):  # inputs·Wᵀ + s·inputs·Aᵀ·Bᵀ, no bias
            if nf4 is not None:
                return qlora_ops.nf4_lora_linear(inputs, nf4, None, lora_a, lora_b, scaling, dense=dense)
            return lora_ops.lora_linear(inputs, base.weight.to(x.dtype), None, lora_a, lora_b, scaling,
                                        fan_in_fan_out=self.fan_in_fan_out)  # fmt: skip

        def base_part(inputs, with_bias):
            b = bias if with_bias else None
            if nf4 is not None:
                return qlora_ops.nf4_linear(inputs, nf4, b, dense=dense)
            weight = base.weight.to(x.dtype)
            return nn.functional.linear(inputs, weight.t() if self.fan_in_fan_out else weight, b)

        if not (self.training and p > 0.0):
            out = scale * lora_part(x)
            return out + bias if bias is not None else out
        # peftkern's mask-free dropout (Philox from (seed, offset), no mask saved: its backward draws
        # again), not torch's bernoulli: the same distribution as PEFT's, different draws.
        x2 = x.reshape(-1, x.shape[-1])
        dropped = dropout_ops.lora_dropout(x2, p, *dropout_ops.draw_seed(x.device)).view(x.shape)
        return base_part(x, True) + scale * lora_part(dropped) - base_part(dropped, False)

    def unloaded(self) -> nn.Module:
        return self.base_layer

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.lora_A)}, merged={self.merged}"


CONFIG = LoraConfig


def plan_patch(model: nn.Module, config: LoraConfig, adapter_name: str, quantize: str | None = None,
               use_gating: bool = False):  # fmt: skip
    """Check every target, then return the function that swaps LoraLinear layers in.
    `quantize="nf4"` quantizes the targeted dense nn.Linear bases to NF4 first (QLoRA).
    `use_gating` (UniPELT, set by a gated ConfigUnion): a gate per layer (LoraLinear.add_gate)."""
    check_quantize_option(quantize)
    if use_gating and config.use_dora:
        raise NotImplementedError("a gated LoRA component cannot use DoRA (AdapterHub has no gated DoRA either)")
    matched = targeting.find_targets(
        model, config, DEFAULT_TARGETS, lambda m: supports(m) or isinstance(m, LoraLinear),
        "peftkern's LoRA supports nn.Linear, transformers' Conv1D and bitsandbytes' Linear4bit (NF4) bases so far",
    )  # fmt: skip
    pissa = config.init_lora_weights == "pissa" or _pissa_niter(config.init_lora_weights) is not None
    for name, module in matched:
        if isinstance(module, LoraLinear):  # another adapter on a layer that already has one
            if quantize:
                raise ValueError(f"{name!r} is already patched: quantize applies when a layer is first patched")
            if pissa:
                raise NotImplementedError(f"{name!r}: PiSSA rewrites the base weight, which another adapter "
                                          "already uses; initialise PiSSA adapters on an unpatched model")  # fmt: skip
            if adapter_name in module.lora_A:
                raise ValueError(f"{name!r} already has an adapter named {adapter_name!r}")
            continue
        nf4 = check_new_base(name, module, quantize)
        if pissa and (nf4 is not None or quantize):
            raise NotImplementedError(
                f"{name!r}: init_lora_weights={config.init_lora_weights!r} on an NF4 base is not supported (the "
                "residual would have to be re-quantized); initialise PiSSA on the dense model"
            )
    saved = modules_to_save.find(model, config.modules_to_save or [], {n for n, _ in matched}, config.classifier_heads())

    def apply(record: PatchRecord) -> None:
        progress = matched
        if quantize:
            try:
                from tqdm.auto import tqdm

                progress = tqdm(matched, desc="peftkern: quantizing to NF4", unit="layer", disable=None)
            except ImportError:
                pass
        for name, module in progress:
            if isinstance(module, LoraLinear):  # the undo first: it also clears a half-made adapter
                record.on_undo(functools.partial(module.delete_adapter, adapter_name))
                module.add_adapter(adapter_name, config.for_module(name))
            else:
                base = quantized_base(module, quantize)
                module = LoraLinear(base, adapter_name, config.for_module(name))
                # with quantize, unpatch gives back the NF4 layer, not the dense one
                record.swap(model, name, module, restore=base)
            if use_gating:
                module.add_gate(adapter_name)
        modules_to_save.apply(model, saved, adapter_name, record)
        for parameter in _trained_biases(model, config, adapter_name).values():  # PEFT's bias="all" / "lora_only"
            parameter.requires_grad_(True)

    apply.modules = tuple(name for name, _ in matched)  # what it replaces (ConfigUnion's conflict check)
    return apply


def _trained_biases(model: nn.Module, config: LoraConfig, adapter_name: str) -> dict[str, torch.Tensor]:
    """The base biases that bias="all" / "lora_only" train (and save), as PEFT picks them: every
    parameter with "bias" in its name, or the biases of the bases of the adapter's LoRA layers."""
    if config.bias == "all":
        return {n: p for n, p in model.named_parameters() if "bias" in n and "lora_" not in n}
    if config.bias == "lora_only":
        return {
            f"{name}.base_layer.bias": layer.base_layer.bias
            for name, layer in model.named_modules()
            if isinstance(layer, LoraLinear) and adapter_name in layer.lora_A
            and getattr(layer.base_layer, "bias", None) is not None
        }
    return {}


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT's checkpoint keys (without the `base_model.model.` prefix or adapter name) -> the
    live parameters: lora_A/lora_B (and DoRA's magnitude), trained biases, modules_to_save."""
    tensors = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLinear) or adapter_name not in layer.lora_A:
            continue
        tensors[f"{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
        tensors[f"{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
        if adapter_name in layer.lora_magnitude_vector:
            tensors[f"{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].weight
    record = PatchRecord.of(model)
    config = record.adapters.get(adapter_name) if record is not None else None
    if config is not None:
        tensors.update(_trained_biases(model, config, adapter_name))
    tensors.update(modules_to_save.tensors(model, adapter_name))
    return tensors


def gate_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """UniPELT's gates under AdapterHub's parameter names less the adapter name (the rule PEFT
    applies to its own keys): `<module>.loras.gate.weight|bias`. Empty for an ungated adapter."""
    tensors = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLinear) and adapter_name in layer.lora_gate:
            gate = layer.lora_gate[adapter_name]
            tensors[f"{name}.loras.gate.weight"], tensors[f"{name}.loras.gate.bias"] = gate.weight, gate.bias
    return tensors
