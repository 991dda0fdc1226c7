"""What prefix tuning and prompt tuning share (PEFT's "prompt learning" methods, causal LMs):
the common config fields and how PEFT fills them from the model config, the checks a model
must pass, and the two hooks through which both methods reach a Hugging Face model.

How peftkern hooks in (no wrapper class, the model object stays the model):
- a forward pre-hook (with kwargs) on the top-level model rewrites each call as
  `PeftModelForCausalLM.forward` would (prefix: a pre-filled KV cache and a longer attention
  mask; prompt: the soft prompt prepended to the input embeddings, labels with -100);
- an instance attribute `prepare_inputs_for_generation` wrapping the class's method, mirroring
  PEFT's override: `generate()` injects at prefill, then decodes from the cache. Its calls into
  forward carry a private marker so the pre-hook lets them through untouched.
Both are undone through the patch record (`record.on_undo`), together with the `prompt_encoder` submodule that
holds the trainable tensors (named as PEFT's live model names them:
`prompt_encoder.<adapter>.embedding.weight`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..record import PatchRecord
from . import config_fields

# Marks the kwargs of a forward call that our prepare_inputs_for_generation already prepared.
PREPARED = "_peftkern_prepared"
ENCODER_ATTR = "prompt_encoder"


def _enum_value(value):
    return getattr(value, "value", value)


@dataclass
class PromptLearningConfig:
    """PEFT's `PromptLearningConfig` fields (same names and meaning). token_dim, num_layers,
    num_attention_heads and num_transformer_submodules left None are filled from the model's
    config when patching, as PEFT does."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None  # CAUSAL_LM only; None is filled with it (docs/prefix-and-prompt.md)
    inference_mode: bool = False

    peft_type = ""  # set by subclasses (a class attribute, not a field)

    @classmethod
    def from_any(cls, config):
        """From a peftkern config of this class, the matching `peft` config object, or a dict of
        PEFT's field names (unknown keys are refused: `peftkern.methods.config_fields`)."""
        if isinstance(config, cls):
            return dataclasses.replace(config)  # a copy: patching fills in fields
        values = config_fields(config, cls, f"a {cls.__name__}, a peft.{cls.__name__} or a dict")
        return cls(**{k: _enum_value(v) for k, v in values.items()})

    def validate(self) -> None:
        name = type(self).__name__
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"{name}.num_virtual_tokens must be a positive integer, got {n!r}")
        if self.task_type not in (None, "CAUSAL_LM"):
            raise NotImplementedError(f"{name}.task_type={self.task_type!r}: peftkern supports CAUSAL_LM only")
        if self.num_transformer_submodules not in (None, 1):
            raise NotImplementedError(f"{name}.num_transformer_submodules must be 1 for a causal LM (encoder-decoder models are not supported)")
        if self.modules_to_save:
            raise NotImplementedError(f"{name}.modules_to_save is not supported by peftkern yet")
        for field in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name}.{field} must be a positive integer or None, got {value!r}")


def text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no `config`: a Hugging Face causal LM is expected")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_heads(model_config) -> int | None:
    """The number of key/value heads the model's attention caches, where its config says it
    differently from num_attention_heads: num_key_value_heads (GQA), or Falcon's, which caches
    every query head with new_decoder_architecture (it expands its KV heads before caching), one
    head with multi_query, else num_kv_heads (transformers' FalconAttention)."""
    values = model_config.to_dict()
    if values.get("model_type") == "falcon":
        if values.get("new_decoder_architecture"):
            return values.get("num_attention_heads")
        return 1 if values.get("multi_query") else values.get("num_kv_heads")
    return values.get("num_key_value_heads")


def fill_from_model(config: PromptLearningConfig, model: nn.Module, gqa: bool) -> None:
    """PEFT's `_prepare_prompt_learning_config` for a causal LM: num_layers, token_dim and
    num_attention_heads from the model config; for prefix tuning (`gqa`) on a model with
    num_key_value_heads, the prefix is sized for the KV heads: token_dim = head_dim * kv heads."""
    model_config = text_config(model)
    values = model_config.to_dict()

    def first(*keys, what):
        for key in keys:
            if getattr(model_config, key, None) is not None:
                return getattr(model_config, key)
            if values.get(key) is not None:
                return values[key]
        raise ValueError(f"cannot infer `{what}` from {type(model_config).__name__}; set it in the config")

    config.num_transformer_submodules = config.num_transformer_submodules or 1
    config.task_type = config.task_type or "CAUSAL_LM"
    if config.num_layers is None:
        config.num_layers = first("num_hidden_layers", "num_layers", "n_layer", what="num_layers")
    if config.token_dim is None:
        config.token_dim = first("hidden_size", "n_embd", "d_model", what="token_dim")
    if config.num_attention_heads is None:
        config.num_attention_heads = first("num_attention_heads", "n_head", "num_heads", what="num_attention_heads")
    kv = kv_heads(model_config)
    if gqa and kv is not None and kv != config.num_attention_heads:
        head_dim = values.get("head_dim") or config.token_dim // config.num_attention_heads
        config.token_dim = head_dim * kv
        config.num_attention_heads = kv


def position_budget(model: nn.Module) -> int | None:
    model_config = text_config(model)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(model_config, key, None)
        if isinstance(value, int):
            return value
    return None


def check_model(model: nn.Module, config: PromptLearningConfig, needs: tuple[str, ...]) -> None:
    """Refuse (naming what is missing) a model the method cannot reach, before anything changes."""
    name = type(model).__name__
    model_config = text_config(model)
    if getattr(model_config, "is_encoder_decoder", False):
        raise NotImplementedError(f"{name} is an encoder-decoder model: peftkern's {config.peft_type} supports causal LMs only")
    params = inspect.signature(model.forward).parameters
    for arg in needs:
        if arg not in params:
            raise TypeError(f"{name}.forward takes no `{arg}`: {config.peft_type} needs it")
    if hasattr(model, ENCODER_ATTR):
        raise RuntimeError(f"{name} already has an attribute `{ENCODER_ATTR}` (a PEFT model?); pass the base model")
    if "prepare_inputs_for_generation" in vars(model) or not hasattr(type(model), "prepare_inputs_for_generation"):
        raise TypeError(f"{name} needs its class's own prepare_inputs_for_generation (a generation model, not already wrapped)")
    budget = position_budget(model)
    if budget is not None and config.num_virtual_tokens >= budget:
        raise ValueError(
            f"num_virtual_tokens={config.num_virtual_tokens} leaves no room for input tokens within "
            f"{name}'s position budget ({budget} positions)"
        )


def model_dtype(model: nn.Module) -> torch.dtype | None:
    return getattr(model, "dtype", None)


def install(model: nn.Module, record: PatchRecord, adapter_name: str, encoder: nn.Module, on_forward, on_prepare) -> None:
    """Attach the encoder and both hooks (see the module docstring). The hooks reach the model
    through their arguments (the hook's module, the method's self), never through a closure, and
    the undo is a method bound to the model: a deep copy of a patched model is patched on its own
    (copy.deepcopy rebinds bound methods to the copy) and unpatches on its own."""
    record.on_undo(types.MethodType(_uninstall, model))  # first: it also cleans a partial install
    setattr(model, ENCODER_ATTR, nn.ModuleDict({adapter_name: encoder}))

    signature = inspect.signature(model.forward)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    def pre_hook(module, args, kwargs):
        if kwargs.pop(PREPARED, False):  # from generate(): already injected at prefill
            return args, kwargs
        call = dict(signature.bind_partial(*args, **kwargs).arguments)  # positional args by name
        call.update(call.pop(var_keyword, None) or {})
        return (), on_forward(module, call)

    pre_hook._peftkern_hook = True
    model.register_forward_pre_hook(pre_hook, with_kwargs=True)

    original = type(model).prepare_inputs_for_generation

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = on_prepare(self, original(self, *args, **kwargs))
        inputs[PREPARED] = True
        return inputs

    functools.update_wrapper(prepare_inputs_for_generation, original)  # generate() reads its signature
    model.prepare_inputs_for_generation = types.MethodType(prepare_inputs_for_generation, model)


def _uninstall(model: nn.Module) -> None:
    vars(model).pop("prepare_inputs_for_generation", None)
    ours = [k for k, hook in model._forward_pre_hooks.items() if getattr(hook, "_peftkern_hook", False)]
    for key in ours:
        model._forward_pre_hooks.pop(key)
        model._forward_pre_hooks_with_kwargs.pop(key, None)
    if ENCODER_ATTR in model._modules:
        delattr(model, ENCODER_ATTR)


def batch_size(call: dict) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if call.get(key) is not None:
            return call[key].shape[0]
    raise ValueError("expected input_ids or inputs_embeds")


def prepend_ones(mask: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat((mask.new_ones(mask.shape[0], n), mask), dim=1)


def adjust_ids(call: dict, peft_type: str, num_virtual_tokens: int) -> None:
    """PEFT's `_adjust_prompt_learning_kwargs`: prefix tuning shifts given position ids past
    the prefix; prompt tuning ignores them (warning, as PEFT); token_type_ids are dropped."""
    if call.get("position_ids") is not None:
        if peft_type == "PREFIX_TUNING":
            call["position_ids"] = call["position_ids"] + num_virtual_tokens
        else:
            warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.")
            call["position_ids"] = None
    if call.get("token_type_ids") is not None:
        warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids")
        call["token_type_ids"] = None


def generation_mask(inputs: dict, num_virtual_tokens: int) -> None:
    """Extend the (2-D) attention mask of a generation step by the virtual tokens, as PEFT does."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return
    if isinstance(mask, dict):
        if len(mask) != 1:
            raise ValueError(f"expected a single attention mask, got {len(mask)}")
        mask = next(iter(mask.values()))
    if mask.dim() != 2:
        raise NotImplementedError(
            "peftkern's prefix/prompt tuning generates with a dynamic cache and 2-D attention masks only "
            "(no static / compiled caches)"
        )
    inputs["attention_mask"] = prepend_ones(mask, num_virtual_tokens)


def cache_is_empty(cache) -> bool:
    from transformers import Cache

    return cache is None or (isinstance(cache, Cache) and not cache.get_seq_length())


def trim_cached_input_ids(inputs: dict) -> None:
    """As PEFT: once the cache holds at least as many positions as input_ids, feed only the last
    token (a no-op where generate() already sliced to the new tokens)."""
    cache = inputs.get("past_key_values")
    ids = inputs.get("input_ids")
    if cache is None or ids is None:
        return
    seq_len = cache[0][0].shape[-2] if isinstance(cache, (tuple, list)) else cache.get_seq_length()
    if seq_len >= ids.shape[1]:
        inputs["input_ids"] = ids[:, -1:]


def is_prefill(inputs: dict) -> bool:
    position = inputs.get("cache_position")
    return position is not None and bool(position[0] == 0)
