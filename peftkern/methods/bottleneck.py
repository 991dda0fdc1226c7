"""Bottleneck adapters with AdapterHub's (`adapters` package) config names and semantics:
`SeqBnConfig` (Pfeiffer: after the FFN), `DoubleSeqBnConfig` (Houlsby: after attention and after
the FFN), `ParBnConfig` (He et al.: parallel to the FFN). peft_type "BOTTLENECK" is ours: Hugging
Face PEFT has no bottleneck adapters, so the checkpoint format is our own (docs/bottleneck.md).

Where an adapter sits ("site"): the output of a transformer sublayer h, with the residual
input x of that sublayer block and, in post-LN models, the block's LayerNorm LN. AdapterHub's
math per site (adapters/methods/modeling.py: `Adapter.pre_forward`, `forward`, `post_forward`):

    sequential:  r = h (residual_before_ln=True);  z = h
                 original_ln_before: z = h + x; (post_add: r = z); z = LN(z) if the site has LN
                 residual_before_ln=False: r = z
                 y = r + s·up(act(down(z)))                       <- the fused op
    parallel:    y = h + s·up(act(down(x)))                        <- the fused op
    then         original_ln_after: LN(y + x) with LN, y + x without; else y.

Post-LN (BERT: BertSelfOutput, BertOutput) computes all of it inside the site. Pre-LN decoders
(Llama/Qwen2/Mistral, GPT-2) add x themselves after the sublayer, so the site returns y and the
model's own `x + y` completes `original_ln_after` bit for bit; x itself, when the math needs it
(original_ln_before, parallel), is read by a forward pre-hook on the norm in front of the
sublayer (its input is the residual stream).

Supported fields: mh_adapter, output_adapter, reduction_factor (number or {"<layer>": rf,
"default": rf}), non_linearity (relu, gelu, gelu_new/gelu_pytorch_tanh, silu/swish), scaling
(float or "learned"), residual_before_ln, original_ln_before, original_ln_after, is_parallel,
init_weights ("mam_adapter", the default here: up-projection zero so a fresh adapter is the
identity; "bert" and "houlsby" as AdapterHub), leave_out, use_gating (UniPELT's gate on the
adapter's output, methods/gates.py). Refused with NotImplementedError: ln_before, ln_after,
phm_layer, cross_adapter, inv_adapter, dropout > 0, stochastic_depth > 0, scaling="channel".
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops import adapter as adapter_ops
from ..record import PatchRecord
from . import config_fields, gates
from .layer import AdapterLayer


@dataclass
class BnConfig:
    """AdapterHub's `BnConfig` fields (the subset peftkern runs; see the module docstring).
    Defaults are AdapterHub's except init_weights ("mam_adapter": a fresh adapter is the identity)."""

    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: float | dict = 16
    non_linearity: str = "relu"
    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "mam_adapter"
    is_parallel: bool = False
    scaling: float | str = 1.0
    use_gating: bool = False
    leave_out: list[int] = field(default_factory=list)
    dropout: float = 0.0
    phm_layer: bool = False
    cross_adapter: bool = False
    inv_adapter: str | None = None
    stochastic_depth: float = 0.0
    architecture: str = "bottleneck"  # AdapterHub writes this key in its configs too

    peft_type = "BOTTLENECK"  # a class attribute, not a field

    @classmethod
    def from_any(cls, config) -> "BnConfig":
        """From a peftkern BnConfig (a copy), a dict, or an AdapterHub config object (`to_dict()`).
        Keys peftkern does not know are ignored."""
        if isinstance(config, BnConfig):
            return dataclasses.replace(config)
        values = config_fields(config, BnConfig, "a BnConfig, an AdapterHub bottleneck config or a dict")
        if isinstance(values.get("leave_out"), (set, tuple)):
            values["leave_out"] = sorted(values["leave_out"])
        return BnConfig(**values)

    def validate(self) -> None:
        name = type(self).__name__
        adapter_ops.activation_code(self.non_linearity)  # raises naming the supported ones
        factors = self.reduction_factor.values() if isinstance(self.reduction_factor, dict) else [self.reduction_factor]
        for factor in factors:
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
                raise ValueError(f"{name}.reduction_factor must be a positive number (or a dict of them), got {factor!r}")
        if isinstance(self.scaling, str):
            if self.scaling == "channel":
                raise NotImplementedError(f"{name}.scaling='channel' is not supported by peftkern yet")
            if self.scaling != "learned":
                raise ValueError(f"{name}.scaling must be a number or 'learned', got {self.scaling!r}")
        elif isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise ValueError(f"{name}.scaling must be a number or 'learned', got {self.scaling!r}")
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ValueError(f"{name}.residual_before_ln must be True, False or 'post_add', got {self.residual_before_ln!r}")
        if self.init_weights not in ("mam_adapter", "bert", "houlsby"):
            raise ValueError(f"{name}.init_weights must be 'mam_adapter', 'bert' or 'houlsby', got {self.init_weights!r}")
        if not (self.mh_adapter or self.output_adapter):
            raise ValueError(f"{name}: mh_adapter and output_adapter are both False: no adapter would be added")
        if not isinstance(self.leave_out, list) or not all(isinstance(i, int) for i in self.leave_out):
            raise ValueError(f"{name}.leave_out must be a list of layer indices, got {self.leave_out!r}")
        unsupported = {
            "ln_before": self.ln_before,
            "ln_after": self.ln_after,
            "phm_layer": self.phm_layer,
            "cross_adapter": self.cross_adapter,
            "inv_adapter": self.inv_adapter is not None,
            "dropout": self.dropout != 0.0,
            "stochastic_depth": self.stochastic_depth != 0.0,
        }
        for key, used in unsupported.items():
            if used:
                raise NotImplementedError(f"{name}.{key}={getattr(self, key)!r} is not supported by peftkern yet")

    def bottleneck_size(self, hidden: int, layer: int) -> int:
        """int(hidden // reduction_factor), with the per-layer mapping as AdapterHub reads it."""
        factor = self.reduction_factor
        if isinstance(factor, dict):
            if str(layer) in factor:
                factor = factor[str(layer)]
            elif "default" in factor:
                factor = factor["default"]
            else:
                raise ValueError(f"reduction_factor {self.reduction_factor!r} has neither layer {layer} nor a 'default'")
        return int(hidden // factor)


@dataclass
class SeqBnConfig(BnConfig):
    """Pfeiffer et al. (2020): one adapter after the FFN, on the post-residual (LN'd) stream."""

    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    mh_adapter: bool = False
    output_adapter: bool = True
    non_linearity: str = "relu"
    reduction_factor: float | dict = 16


@dataclass
class DoubleSeqBnConfig(BnConfig):
    """Houlsby et al. (2019): adapters after the attention and after the FFN outputs."""

    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    mh_adapter: bool = True
    output_adapter: bool = True
    non_linearity: str = "swish"
    reduction_factor: float | dict = 16


@dataclass
class ParBnConfig(BnConfig):
    """He et al. (2021): an adapter parallel to the FFN, fed the FFN block's residual input."""

    original_ln_before: bool = False
    original_ln_after: bool = True
    mh_adapter: bool = False
    output_adapter: bool = True
    non_linearity: str = "relu"
    reduction_factor: float | dict = 2
    is_parallel: bool = True
    scaling: float | str = 4.0


CONFIG = BnConfig


class BottleneckAdapter(nn.Module):
    """One adapter: `adapter_down` (hidden -> bottleneck, bias), `adapter_up` (bottleneck -> hidden,
    bias), `scaling` (a float, or a 1-element Parameter for scaling="learned"), and with
    use_gating UniPELT's `gate` (hidden -> 1)."""

    def __init__(self, hidden: int, bottleneck: int, config: BnConfig, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.activation = adapter_ops.activation_code(config.non_linearity)
        self.adapter_down = nn.Linear(hidden, bottleneck, **factory)
        self.adapter_up = nn.Linear(bottleneck, hidden, **factory)
        if config.scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1, **factory))
        else:
            self.scaling = float(config.scaling)
        with torch.no_grad():
            if config.init_weights == "mam_adapter":  # identity at start: the up-projection is zero
                nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
                nn.init.zeros_(self.adapter_up.weight)
            elif config.init_weights == "bert":
                nn.init.normal_(self.adapter_down.weight, std=0.02)
                nn.init.normal_(self.adapter_up.weight, std=0.02)
            else:  # "houlsby"
                for layer in (self.adapter_down, self.adapter_up):
                    nn.init.trunc_normal_(layer.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
            nn.init.zeros_(self.adapter_down.bias)
            nn.init.zeros_(self.adapter_up.bias)
        self.gate = None
        if config.use_gating:  # AdapterHub: "bert" init for bert / mam_adapter, nn.Linear's own for houlsby
            if config.init_weights == "houlsby":
                self.gate = nn.Linear(hidden, 1, **factory)
            else:
                self.gate = gates.new_gate(hidden, zero_bias=True, **factory)

    def forward(self, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + s·up(act(down(z))), by the fused op; gated: residual + G·s·up(act(down(z)))
        with G = gate(z) [batch, 1] (AdapterHub's order: scaling, then the gate, then the residual).
        The op's only scale is one number for all rows and G is one per sequence, so a gated
        adapter runs the op on a zero residual and scales its output (one more elementwise
        pass; a per-row scale in the op's epilogue is left for later: docs/hybrids.md)."""
        if self.gate is not None:
            gate = gates.gate_value(self.gate, z)
            delta = self._fused(z, torch.zeros_like(residual))
            return residual + delta * gate.unsqueeze(1).to(delta.dtype)
        return self._fused(z, residual)

    def _fused(self, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        params = [self.adapter_down.weight, self.adapter_down.bias, self.adapter_up.weight, self.adapter_up.bias]
        learned = isinstance(self.scaling, nn.Parameter)
        scale = self.scaling if learned else None
        if params[0].dtype != z.dtype and not torch.is_autocast_enabled(z.device.type):
            params = [p.to(z.dtype) for p in params]  # e.g. float32 adapters on a bfloat16 model
        return adapter_ops.adapter_bottleneck(
            z, residual, *params, scaling=1.0 if learned else self.scaling, scale=scale, activation=self.activation
        )


def site_output(adapter: BottleneckAdapter, config: BnConfig, h, x, layer_norm):
    """AdapterHub's math at one site (module docstring). Pre-LN sites (layer_norm None) return y:
    the model adds x itself."""
    if config.is_parallel:
        y = adapter(x, h)
    else:
        r, z = (h if config.residual_before_ln is True else None), h
        if config.original_ln_before:
            z = h + x
            if layer_norm is not None:
                if config.residual_before_ln == "post_add":
                    r = z
                z = layer_norm(z)
        if config.residual_before_ln is False:
            r = z
        y = adapter(z, r)
    if layer_norm is None:
        return y
    return layer_norm(y + x) if config.original_ln_after else y


class BottleneckLayer(AdapterLayer):
    """A sublayer (`base_layer`) with bottleneck adapters at its output (`adapters[<name>]`).
    Bottleneck adapters are non-linear: they cannot be merged into a weight."""

    wraps_sublayer = True  # the modules of base_layer keep their own names in checkpoints (io)

    def __init__(self, base_layer: nn.Module, adapter_name: str, adapter: BottleneckAdapter, config: BnConfig,
                 post_ln: bool):  # fmt: skip
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict({adapter_name: adapter})
        self.bn_config = config
        self.post_ln = post_ln
        self.active_adapter = adapter_name
        self.residual_input = None  # pre-LN sites: x, set by the pre-hook on the norm in front

    def forward(self, *args, **kwargs):
        adapter = self.adapters[self.active_adapter]
        if self.post_ln:  # BertSelfOutput / BertOutput: dense -> dropout -> (adapter + LN)
            hidden_states = args[0] if args else kwargs["hidden_states"]
            x = args[1] if len(args) > 1 else kwargs["input_tensor"]
            base = self.base_layer
            h = base.dropout(base.dense(hidden_states))
            return site_output(adapter, self.bn_config, h, x, base.LayerNorm)
        out = self.base_layer(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        x, self.residual_input = self.residual_input, None
        if x is None and (self.bn_config.is_parallel or self.bn_config.original_ln_before):
            raise RuntimeError(
                "bottleneck adapter: this sublayer was called without the norm in front of it, so its residual "
                "input is unknown (the config needs it: is_parallel or original_ln_before)"
            )
        y = site_output(adapter, self.bn_config, h, x, None)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, post_ln={self.post_ln}"


def _stash_residual(layer: BottleneckLayer, module, args, kwargs):
    layer.residual_input = args[0] if args else next(iter(kwargs.values()))


# Per architecture (model.config.model_type): (what a layer must hold, [(site, location, norm)]);
# `norm` is the pre-LN norm whose input is the site's residual stream, None for post-LN sites.
ARCHITECTURES = {
    "llama": [("self_attn", "mh_adapter", "input_layernorm"), ("mlp", "output_adapter", "post_attention_layernorm")],
    "gpt2": [("attn", "mh_adapter", "ln_1"), ("mlp", "output_adapter", "ln_2")],
    "bert": [("attention.output", "mh_adapter", None), ("output", "output_adapter", None)],
}
ARCHITECTURES["qwen2"] = ARCHITECTURES["mistral"] = ARCHITECTURES["llama"]
_LAYER_LISTS = {"llama": "layers", "qwen2": "layers", "mistral": "layers", "gpt2": "h", "bert": "layer"}


def _layers(model: nn.Module, model_type: str):
    """[(dotted name, index, layer)] of the transformer layers: the children of the ModuleList
    named as the architecture names it (model.layers, transformer.h, encoder.layer)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rpartition(".")[2] == _LAYER_LISTS[model_type]:
            found += [(f"{name}.{i}", i, layer) for i, layer in enumerate(module)]
    return found


def find_sites(model: nn.Module, config: BnConfig):
    """[(site name, norm name or None, layer index, hidden size)] where adapters go; raises
    before anything changes when the model is not one peftkern knows how to adapt."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"peftkern's bottleneck adapters support model types {sorted(ARCHITECTURES)}; "
            f"{type(model).__name__} has model_type {model_type!r}"
        )
    post_ln = model_type == "bert"
    if not post_ln:
        if not config.original_ln_after:
            raise ValueError(
                f"original_ln_after=False on {model_type} (pre-LN) would drop the pre-trained residual connection "
                "(AdapterHub adds it in post_forward); peftkern supports original_ln_after=True there"
            )
        if config.residual_before_ln == "post_add" and not config.is_parallel:
            raise ValueError(f"residual_before_ln='post_add' needs a LayerNorm at the site; {model_type} has none there")
    hidden = model.config.hidden_size
    sites = []
    layers = _layers(model, model_type)
    if not layers:
        raise ValueError(f"no transformer layers found in {type(model).__name__} (model_type {model_type!r})")
    for layer_name, index, layer in layers:
        if index in config.leave_out:
            continue
        for site, location, norm in ARCHITECTURES[model_type]:
            if not getattr(config, location):
                continue
            module = layer.get_submodule(site)
            missing = [a for a in (("dense", "dropout", "LayerNorm") if post_ln else ()) if not hasattr(module, a)]
            if missing or (norm is not None and not hasattr(layer, norm)):
                raise TypeError(f"{layer_name}.{site} is a {type(module).__name__} without {missing or [norm]}: "
                                "not the layout peftkern's bottleneck adapters expect")  # fmt: skip
            bottleneck = config.bottleneck_size(hidden, index)
            if bottleneck < 1:
                raise ValueError(
                    f"{layer_name}.{site}: bottleneck size hidden // reduction_factor = {hidden} // "
                    f"{config.reduction_factor!r} = {bottleneck} (< 1 unit); lower reduction_factor"
                )
            sites.append((f"{layer_name}.{site}", f"{layer_name}.{norm}" if norm else None, bottleneck))
    if not sites:
        raise ValueError(f"no adapter site left in {type(model).__name__} (leave_out={config.leave_out})")
    return sites, hidden, post_ln


def plan_patch(model: nn.Module, config: BnConfig, adapter_name: str, use_gating: bool = False):
    """Check the model and config, then return the function that wraps every site. `use_gating`
    (a gated ConfigUnion) is config.use_gating set for it."""
    if use_gating:
        config = dataclasses.replace(config, use_gating=True)
    sites, hidden, post_ln = find_sites(model, config)
    needs_residual = not post_ln and (config.is_parallel or config.original_ln_before)

    def apply(record: PatchRecord) -> None:
        for site, norm, bottleneck in sites:
            base = model.get_submodule(site)
            weight = next(base.parameters())
            adapter = BottleneckAdapter(hidden, bottleneck, config, device=weight.device, dtype=weight.dtype)
            layer = BottleneckLayer(base, adapter_name, adapter, config, post_ln)
            record.swap(model, site, layer)
            if needs_residual:
                # a partial, not a lambda: copy.deepcopy of the patched model then re-points the
                # hook at the copied layer
                handle = model.get_submodule(norm).register_forward_pre_hook(
                    functools.partial(_stash_residual, layer), with_kwargs=True
                )
                record.on_undo(handle.remove)

    apply.modules = tuple(site for site, _, _ in sites)  # what it wraps (ConfigUnion's conflict check)
    return apply


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Checkpoint keys (without the `base_model.model.` prefix io adds, no adapter name) -> live
    tensors: `<site>.adapter_down.weight|bias`, `<site>.adapter_up.weight|bias`, and
    `<site>.adapter_scaling` for scaling="learned"."""
    tensors = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, BottleneckLayer) or adapter_name not in layer.adapters:
            continue
        adapter = layer.adapters[adapter_name]
        for part in ("adapter_down", "adapter_up"):
            tensors[f"{name}.{part}.weight"] = getattr(adapter, part).weight
            tensors[f"{name}.{part}.bias"] = getattr(adapter, part).bias
        if isinstance(adapter.scaling, nn.Parameter):
            tensors[f"{name}.adapter_scaling"] = adapter.scaling
        if adapter.gate is not None:  # AdapterHub's `adapters.<name>.gate`
            tensors[f"{name}.gate.weight"], tensors[f"{name}.gate.bias"] = adapter.gate.weight, adapter.gate.bias
    return tensors
