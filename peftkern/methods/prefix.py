"""Prefix tuning (Li & Liang 2021) with Hugging Face PEFT's config fields, parameterisation and
semantics, for causal LMs: trainable per-layer key/value prefixes injected through the model's
KV cache (a `DynamicCache` pre-filled with the prefix, the attention mask extended by it).

Parameters, as PEFT's `PrefixEncoder`: `embedding.weight` [num_virtual_tokens,
num_layers * 2 * token_dim] holds the prefixes directly; with `prefix_projection=True` it is
[num_virtual_tokens, token_dim] fed through `transform` = Linear(token_dim, encoder_hidden_size),
Tanh, Linear(encoder_hidden_size, num_layers * 2 * token_dim) (the reparametrisation of the
paper). Checkpoints hold the prefixes themselves (`prompt_embeddings`, the projection folded),
as PEFT's `get_peft_model_state_dict` writes them; such a checkpoint loads as a plain embedding
(`inference_mode=True`, as PEFT loads it). For models with grouped-query attention the prefix is
sized for the KV heads (token_dim = head_dim * num_key_value_heads), as PEFT sizes it.

UniPELT's gated prefix (`use_gating`, set by a gated ConfigUnion; methods/gates.py): per layer
a gate Linear(hidden, 1) on the attention's input hidden states scales that layer's prefix
keys and values, G recomputed on every forward as AdapterHub does. The scaled prefix cannot be
pre-filled: each cache layer is a `GatedPrefixLayer` holding the prefix apart from the real keys
and joining G·prefix to them inside the attention's `cache.update`, G set just before by a
forward pre-hook on that attention module.

AdapterHub's prefix conventions (`convention="adapterhub"`, set by a ConfigUnion's
prefix_convention, e.g. `MAMConfig(prefix_convention="adapterhub")`): the real tokens' positions
start at 0 (AdapterHub's prefix is not in the cache; PEFT's real tokens start at P), and a
projected prefix's embedding is [P, hidden] (AdapterHub's `wte`) where PEFT's is [P, KV width]
under grouped-query attention; everything else (the MLP's output, the per-layer key/value
layout, the folded checkpoint) is the same.

Gradient checkpointing is refused, as PEFT refuses it: transformers drops `past_key_values` in
checkpointed layers, so the prefix would silently vanish. peftkern checks when patching and on
every training forward (PEFT only at setup).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from . import gates, prompt_learning
from .prompt_learning import PromptLearningConfig


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """PEFT's `PrefixTuningConfig` fields, same names and meaning."""

    encoder_hidden_size: int | None = None  # filled with token_dim, as PEFT does
    prefix_projection: bool = False
    init_weights: str | None = None  # None (random, normal(0, 1) as nn.Embedding) or "zero"

    peft_type = "PREFIX_TUNING"

    def validate(self) -> None:
        super().validate()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"PrefixTuningConfig.init_weights must be None or 'zero', got {self.init_weights!r}")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size <= 0):
            raise ValueError(f"PrefixTuningConfig.encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size!r}")

    @property
    def projected(self) -> bool:
        """Whether the MLP reparametrisation is live (a loaded checkpoint holds folded prefixes)."""
        return self.prefix_projection and not self.inference_mode


CONFIG = PrefixTuningConfig
CHECKPOINT_PREFIX = ""  # PEFT's key is plain `prompt_embeddings`


class PrefixEncoder(nn.Module):
    """PEFT's PrefixEncoder parameters, same module names and creation order (so the same seed
    gives the same initial values); `prefixes()` returns [num_virtual_tokens, num_layers*2*token_dim]
    once per call, not once per batch row."""

    def __init__(self, config: PrefixTuningConfig, gate_sites: tuple[str, ...] = (), hidden: int | None = None,
                 embedding_dim: int | None = None):  # fmt: skip
        super().__init__()
        embedding_dim = embedding_dim or config.token_dim  # AdapterHub's convention: the model's hidden size
        # UniPELT: one gate per layer, gate_sites[i] the attention module of layer i (checkpoint names)
        self.gate_sites = tuple(gate_sites)
        width = config.num_layers * 2 * config.token_dim
        self.projected = config.projected
        if self.projected:
            self.embedding = nn.Embedding(config.num_virtual_tokens, embedding_dim)
            self.transform = nn.Sequential(
                nn.Linear(embedding_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)
        if gate_sites:  # created after PEFT's modules: the same seed gives PEFT's prefix values
            self.gates = nn.ModuleList(gates.new_gate(hidden) for _ in gate_sites)

    def prefixes(self) -> torch.Tensor:
        if self.projected:
            return self.transform(self.embedding.weight)
        return self.embedding.weight


def _encoder(model: nn.Module, adapter_name: str) -> PrefixEncoder:
    return getattr(model, prompt_learning.ENCODER_ATTR)[adapter_name]


def _set_gate(gate: nn.Linear, attention: nn.Module, args, kwargs):
    """Forward pre-hook on layer i's attention: G = gate_i(its input hidden states), handed to
    the cache layer its `update` will reach. Another cache (not ours) passes untouched."""
    from .gated_prefix import GatedPrefixLayer  # transformers is imported only once a model runs

    cache = kwargs.get("past_key_values")
    layers = getattr(cache, "layers", None)
    if layers is not None and isinstance(layers[attention.layer_idx], GatedPrefixLayer):
        hidden = args[0] if args else kwargs["hidden_states"]
        layers[attention.layer_idx].gate = gates.gate_value(gate, hidden)


def attention_modules(model: nn.Module, num_layers: int) -> list[tuple[str, nn.Module]]:
    """[(name, module)] of each layer's self-attention, in layer order: the modules with an int
    `layer_idx` whose class name ends in "Attention" (not cross-attention), one per layer."""
    found = {}
    for name, module in model.named_modules():
        index = getattr(module, "layer_idx", None)
        if (type(module).__name__.endswith("Attention") and isinstance(index, int)
                and not getattr(module, "is_cross_attention", False)):  # fmt: skip
            if index in found:
                raise TypeError(f"{name} and {found[index][0]} both are layer {index}'s attention: cannot place its gate")
            found[index] = (name, module)
    if sorted(found) != list(range(num_layers)):
        raise TypeError(f"gated prefix tuning needs one attention module per layer with `layer_idx` (0..{num_layers - 1}); "
                        f"found {sorted(found)} in {type(model).__name__}")  # fmt: skip
    return [found[i] for i in range(num_layers)]


def prefix_cache(model: nn.Module, config: PrefixTuningConfig, encoder: PrefixEncoder, batch: int):
    """A DynamicCache holding each layer's prefix keys/values [batch, kv_heads, num_virtual_tokens,
    head_dim], in the model's dtype, as PEFT's `get_prompt` builds it.

    PEFT materialises batch copies (the encoder runs on batch-expanded tokens, then the cache
    constructor concatenates them into fresh buffers). Here the prefix is computed once and each
    layer holds a broadcast view (stride 0 over the batch): the first `update` (the forward's
    own keys) concatenates it straight into the layer's buffer, so the batch-expanded prefix is
    written exactly once, where the model needs it. Same values, one copy less."""
    from transformers import DynamicCache

    kv = encoder.prefixes()
    dtype = prompt_learning.model_dtype(model)
    if dtype is not None:
        kv = kv.to(dtype)
    heads = config.num_attention_heads
    kv = kv.view(config.num_virtual_tokens, config.num_layers * 2, heads, config.token_dim // heads)
    kv = kv.permute(1, 2, 0, 3).unsqueeze(1)  # [layers*2, 1, heads, tokens, head_dim]
    if encoder.gate_sites:  # gated: the prefix stays apart, joined per call (GatedPrefixLayer)
        from .gated_prefix import GatedPrefixLayer

        cache = DynamicCache(ddp_cache_data=[(None, None)] * config.num_layers)
        cache.layers = [GatedPrefixLayer(kv[2 * i], kv[2 * i + 1]) for i in range(config.num_layers)]
        return cache
    cache = DynamicCache(ddp_cache_data=[(None, None)] * config.num_layers)
    for index, layer in enumerate(cache.layers):
        keys = kv[2 * index].expand(batch, -1, -1, -1)
        values = kv[2 * index + 1].expand(batch, -1, -1, -1)
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    return cache


def _refuse_checkpointing(model: nn.Module) -> None:
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise ValueError(
            "PREFIX_TUNING does not work with gradient checkpointing (transformers drops the KV cache in "
            "checkpointed layers, which would silently drop the prefix); disable it "
            "(model.gradient_checkpointing_disable()), as PEFT requires"
        )


CONVENTIONS = ("peft", "adapterhub")


def _positions(call: dict, convention: str, num_virtual_tokens: int, past: int = 0) -> None:
    """Position ids of the real tokens: PEFT's (`adjust_ids`: given ones shifted by P, else the
    model's own, from the cache length P + past) or AdapterHub's (given ones as they are, else
    past, past + 1, ...: numbered from 0 as if there were no prefix)."""
    given = call.get("position_ids")
    prompt_learning.adjust_ids(call, "PREFIX_TUNING", num_virtual_tokens)
    if convention == "peft":
        return
    if given is not None:
        call["position_ids"] = given
        return
    tokens = call.get("input_ids") if call.get("input_ids") is not None else call["inputs_embeds"]
    positions = torch.arange(past, past + tokens.shape[1], device=tokens.device)
    call["position_ids"] = positions.unsqueeze(0).expand(tokens.shape[0], -1)


def plan_patch(model: nn.Module, config: PrefixTuningConfig, adapter_name: str, use_gating: bool = False,
               convention: str = "peft", **options):  # fmt: skip
    if options:
        raise TypeError(f"prefix tuning takes no patch options, got {sorted(options)}")
    if convention not in CONVENTIONS:
        raise ValueError(f"prefix convention must be one of {CONVENTIONS}, got {convention!r}")
    prompt_learning.check_model(model, config, needs=("past_key_values", "attention_mask"))
    prompt_learning.fill_from_model(config, model, gqa=True)
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    if config.token_dim % config.num_attention_heads:
        raise ValueError(
            f"PrefixTuningConfig.token_dim={config.token_dim} is not a multiple of num_attention_heads={config.num_attention_heads}"
        )
    _check_cache_shape(model, config)
    _refuse_checkpointing(model)
    attentions = attention_modules(model, config.num_layers) if use_gating else []
    hidden = getattr(prompt_learning.text_config(model), "hidden_size", None)
    embedding_dim = hidden if convention == "adapterhub" else None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    adapter = adapter_name

    def on_forward(model, call):
        # PeftModelForCausalLM.forward for PREFIX_TUNING; labels are untouched.
        if model.training:
            _refuse_checkpointing(model)
        batch = prompt_learning.batch_size(call)
        if call.get("attention_mask") is not None:
            call["attention_mask"] = prompt_learning.prepend_ones(call["attention_mask"], config.num_virtual_tokens)
        _positions(call, convention, config.num_virtual_tokens)
        call["past_key_values"] = prefix_cache(model, config, _encoder(model, adapter), batch)
        return call

    def on_prepare(model, inputs):
        # PeftModelForCausalLM.prepare_inputs_for_generation for PREFIX_TUNING.
        prefill = prompt_learning.is_prefill(inputs)
        prompt_learning.trim_cached_input_ids(inputs)
        prompt_learning.generation_mask(inputs, config.num_virtual_tokens)
        cache = inputs.get("past_key_values")
        past = 0
        if convention == "adapterhub" and not prompt_learning.cache_is_empty(cache):
            past = cache.get_seq_length() - config.num_virtual_tokens  # the real tokens already cached
        _positions(inputs, convention, config.num_virtual_tokens, past)
        if prompt_learning.cache_is_empty(cache):
            from transformers import Cache, DynamicCache

            if isinstance(cache, Cache) and not isinstance(cache, DynamicCache):
                raise NotImplementedError(f"prefix tuning generates with a DynamicCache, not {type(cache).__name__}")
            ids = inputs.get("input_ids")
            batch = (ids if ids is not None else inputs["inputs_embeds"]).shape[0]
            inputs["past_key_values"] = prefix_cache(model, config, _encoder(model, adapter), batch)
        if prefill:  # only where the model still takes cache_position (remote code)
            inputs["cache_position"] = inputs["cache_position"] + config.num_virtual_tokens
        return inputs

    def apply(record):
        encoder = PrefixEncoder(config, tuple(name for name, _ in attentions), hidden, embedding_dim).to(device)
        prompt_learning.install(model, record, adapter, encoder, on_forward, on_prepare)
        for (_, attention), gate in zip(attentions, getattr(encoder, "gates", ())):
            # a partial, not a lambda: a deep copy of the model re-points it at the copied gate
            handle = attention.register_forward_pre_hook(functools.partial(_set_gate, gate), with_kwargs=True)
            record.on_undo(handle.remove)

    apply.modules = ("",)  # hooks on the model itself (ConfigUnion's conflict check)
    return apply


def _check_cache_shape(model: nn.Module, config: PrefixTuningConfig) -> None:
    """The prefix must have the shape the model's attention caches: refuse a config whose
    layers / KV heads / head_dim disagree with the model (PEFT fails later, inside attention)."""
    model_config = prompt_learning.text_config(model)
    values = model_config.to_dict()
    layers = getattr(model_config, "num_hidden_layers", None) or values.get("n_layer")
    if layers is not None and config.num_layers != layers:
        raise ValueError(f"PrefixTuningConfig.num_layers={config.num_layers}, but {type(model).__name__} has {layers} layers")
    heads = prompt_learning.kv_heads(model_config) or values.get("num_attention_heads") or values.get("n_head")
    hidden = values.get("hidden_size") or values.get("n_embd")
    head_dim = values.get("head_dim") or (hidden // (values.get("num_attention_heads") or values.get("n_head")) if hidden else None)
    if heads and head_dim and (config.num_attention_heads, config.token_dim) != (heads, heads * head_dim):
        raise ValueError(
            f"PrefixTuningConfig (num_attention_heads={config.num_attention_heads}, token_dim={config.token_dim}) "
            f"does not match {type(model).__name__}'s KV cache ({heads} heads of {head_dim})"
        )


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """{"prompt_embeddings": [num_virtual_tokens, num_layers*2*token_dim]}: the live embedding, or
    with a live projection the folded prefixes (computed, so saving only; see check_loadable)."""
    encoder = _encoder(model, adapter_name)
    if encoder.projected:
        with torch.no_grad():
            return {"prompt_embeddings": encoder.prefixes()}
    return {"prompt_embeddings": encoder.embedding.weight}


def check_loadable(model: nn.Module, adapter_name: str) -> None:
    if _encoder(model, adapter_name).projected:
        raise ValueError(
            "cannot load flattened prefixes (prompt_embeddings) into a model patched with prefix_projection=True "
            "(the projection cannot be inverted); load onto an unpatched model (it is patched with inference_mode=True)"
        )


def gate_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """UniPELT's prefix gates under AdapterHub's names less the adapter name:
    `<layer i's attention>.prefix_tuning.prefix_gates.weight|bias`. Empty when ungated."""
    encoder = _encoder(model, adapter_name)
    tensors = {}
    for site, gate in zip(encoder.gate_sites, getattr(encoder, "gates", ())):
        tensors[f"{site}.prefix_tuning.prefix_gates.weight"] = gate.weight
        tensors[f"{site}.prefix_tuning.prefix_gates.bias"] = gate.bias
    return tensors
