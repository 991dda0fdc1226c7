"""Prompt tuning (Lester et al. 2021) with Hugging Face PEFT's config fields and semantics, for
causal LMs: a trainable soft prompt [num_virtual_tokens, token_dim] prepended to the input
embeddings; the attention mask is prepended with ones and labels with -100, so the returned
logits cover the virtual tokens too (as PEFT's). `generate()` injects the prompt at prefill only;
decoding then runs from the KV cache. Checkpoint: `prompt_embeddings`, as PEFT writes it.

Initialisation as PEFT's `PromptEmbedding`: RANDOM (nn.Embedding's normal(0, 1)), SAMPLE_VOCAB
(rows of the word embeddings at random token ids) or TEXT (the embeddings of
`prompt_tuning_init_text`, cut or repeated to num_virtual_tokens). For TEXT,
`tokenizer_name_or_path` may also be a tokenizer object (there is no hub here); the saved config
then records the tokenizer's `name_or_path`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import prompt_learning
from .prompt_learning import PromptLearningConfig

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """PEFT's `PromptTuningConfig` fields, same names and meaning."""

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: object = None  # a path, or (peftkern) a tokenizer object
    tokenizer_kwargs: dict | None = None

    peft_type = "PROMPT_TUNING"

    def validate(self) -> None:
        super().validate()
        init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)).upper()
        if init not in INITS:
            raise ValueError(f"PromptTuningConfig.prompt_tuning_init must be one of {INITS}, got {self.prompt_tuning_init!r}")
        self.prompt_tuning_init = init
        if init == "TEXT" and not self.tokenizer_name_or_path:
            raise ValueError("When prompt_tuning_init='TEXT', tokenizer_name_or_path can't be None.")
        if init == "TEXT" and self.prompt_tuning_init_text is None:
            raise ValueError("When prompt_tuning_init='TEXT', prompt_tuning_init_text can't be None.")
        if self.tokenizer_kwargs and init != "TEXT":
            raise ValueError("tokenizer_kwargs only valid when using prompt_tuning_init='TEXT'.")


CONFIG = PromptTuningConfig
CHECKPOINT_PREFIX = ""  # PEFT's key is plain `prompt_embeddings`


def _tokenizer(config: PromptTuningConfig):
    source = config.tokenizer_name_or_path
    if not isinstance(source, (str, bytes)) and callable(source):
        return source
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # never run a checkpoint's code, as PEFT
    return AutoTokenizer.from_pretrained(source, **kwargs)


class PromptEmbedding(nn.Module):
    """PEFT's PromptEmbedding: `embedding.weight` [num_virtual_tokens, token_dim], float32 as PEFT
    makes it; created in the same order as PEFT's so a seed gives the same initial prompt."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding, tokenizer=None):
        super().__init__()
        n = config.num_virtual_tokens
        self.embedding = nn.Embedding(n, config.token_dim)
        if config.inference_mode or config.prompt_tuning_init == "RANDOM":
            return
        device = word_embeddings.weight.device
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, word_embeddings.num_embeddings, (n,), dtype=torch.long).to(device)
        else:  # TEXT: cut or repeat the text's tokens to n
            ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
            if not ids:
                raise ValueError("prompt_tuning_init_text tokenizes to no tokens")
            ids = (ids * math.ceil(n / len(ids)))[:n]
            ids = torch.tensor(ids, dtype=torch.long, device=device)
        with torch.no_grad():
            rows = word_embeddings(ids).detach().clone().to(torch.float32)
        self.embedding.weight = nn.Parameter(rows)


def _encoder(model: nn.Module, adapter_name: str) -> PromptEmbedding:
    return getattr(model, prompt_learning.ENCODER_ATTR)[adapter_name]


def _prompts(model, adapter, batch: int, dtype: torch.dtype) -> torch.Tensor:
    weight = _encoder(model, adapter).embedding.weight
    return weight.to(dtype).unsqueeze(0).expand(batch, -1, -1)


def plan_patch(model: nn.Module, config: PromptTuningConfig, adapter_name: str, **options):
    if options:
        raise TypeError(f"prompt tuning takes no patch options, got {sorted(options)}")
    prompt_learning.check_model(model, config, needs=("inputs_embeds", "attention_mask"))
    prompt_learning.fill_from_model(config, model, gqa=False)
    word_embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(word_embeddings, nn.Embedding):
        raise TypeError(f"{type(model).__name__} has no nn.Embedding input embeddings (get_input_embeddings())")
    if word_embeddings.embedding_dim != config.token_dim:
        raise ValueError(
            f"PromptTuningConfig.token_dim={config.token_dim}, but the input embeddings of {type(model).__name__} "
            f"have {word_embeddings.embedding_dim}"
        )
    tokenizer = None
    if config.prompt_tuning_init == "TEXT" and not config.inference_mode:
        tokenizer = _tokenizer(config)  # fails here, before any change, for a bad path
        if not isinstance(config.tokenizer_name_or_path, str):  # keep the config JSON-writable
            config.tokenizer_name_or_path = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    adapter = adapter_name
    n = config.num_virtual_tokens

    def embed(model, inputs):
        """inputs_embeds with the soft prompt in front (input_ids consumed)."""
        embeds = inputs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(inputs["input_ids"])
        inputs["input_ids"] = None
        prompts = _prompts(model, adapter, embeds.shape[0], embeds.dtype)
        return torch.cat((prompts, embeds), dim=1)

    def on_forward(model, call):
        # PeftModelForCausalLM.forward for PROMPT_TUNING.
        batch = prompt_learning.batch_size(call)
        if call.get("attention_mask") is not None:
            call["attention_mask"] = prompt_learning.prepend_ones(call["attention_mask"], n)
        prompt_learning.adjust_ids(call, config.peft_type, n)
        if call.get("labels") is not None:
            labels = call["labels"]
            call["labels"] = torch.cat((labels.new_full((batch, n), -100), labels), dim=1)
        call["inputs_embeds"] = embed(model, call)
        call.pop("input_ids")
        return call

    def on_prepare(model, inputs):
        # PeftModelForCausalLM.prepare_inputs_for_generation for PROMPT_TUNING.
        prompt_learning.trim_cached_input_ids(inputs)
        prompt_learning.generation_mask(inputs, n)
        prompt_learning.adjust_ids(inputs, config.peft_type, n)
        if prompt_learning.cache_is_empty(inputs.get("past_key_values")):
            inputs["inputs_embeds"] = embed(model, inputs)
        inputs.pop("cache_position", None)  # the model derives positions from the longer input
        return inputs

    def apply(record):
        encoder = PromptEmbedding(config, word_embeddings, tokenizer).to(word_embeddings.weight.device)
        prompt_learning.install(model, record, adapter, encoder, on_forward, on_prepare)

    apply.modules = ("",)  # hooks on the model itself (ConfigUnion's conflict check)
    return apply


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    return {"prompt_embeddings": _encoder(model, adapter_name).embedding.weight}
