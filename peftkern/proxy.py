"""Proxy-tuning (Liu et al., 2024, "Tuning Language Models by Proxy"; alisawuffles/proxy-tuning):
steer a large base model M at decode time with the logit difference of a small tuned expert M+
and its untuned anti-expert M−:  z = s_M + α·(s_M+ − s_M−),  then softmax.

`proxy_generate` is the reference's `DExpertsLlama.generate` with transformers 5's Cache API:
three KV caches (one per model, each with its own prompt and attention mask), the experts'
padded vocabulary rows truncated to the base's, finished sequences padded, and the combine +
temperature + top-k + top-p of each step in one fused op (`peftkern.ops.proxy.proxy_logits`).

When M+ is M− plus a peftkern adapter (`expert_adapter=`), expert and anti-expert run as one
mixed batch of 2B sequences (`adapter_names=[adapter]*B + ["__base__"]*B`, peftkern.mixed): the
small model's weights are read once per step instead of twice.
"""

from __future__ import annotations

import math

import torch

from . import mixed
from .ops import proxy as proxy_ops

# Vocabularies may differ by padding rows at the end of the embedding (rounded up for kernels,
# or a few added tokens the base never produces, as the reference's Llama-2 experts): accepted
# up to this many extra rows; more means another tokenizer, refused.
MAX_VOCAB_PADDING = 256
_SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


def vocab_size(model) -> int:
    """The width of a model's next-token logits (its output embedding's rows)."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"proxy_generate: {type(model).__name__} has no output embedding to read a vocabulary from")
    return int(head.weight.shape[0])


def _special_tokens(model) -> dict[str, object]:
    config = getattr(model, "config", None)
    found = {}
    for key in _SPECIAL_TOKENS:
        value = getattr(config, key, None)
        if value is not None:
            found[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return found


def check_vocabularies(base, expert, anti_expert, max_padding: int = MAX_VOCAB_PADDING) -> int:
    """The shared vocabulary size (the base's), or a ValueError naming what does not align:
    an expert narrower than the base, wider by more than `max_padding` rows (another tokenizer),
    or special tokens (bos / eos / pad ids in the configs) that differ."""
    size = vocab_size(base)
    base_special = _special_tokens(base)
    for name, model in (("expert", expert), ("anti_expert", anti_expert)):
        other = vocab_size(model)
        if other < size:
            raise ValueError(f"proxy_generate: the {name} scores {other} tokens but the base {size}: the vocabularies "
                             "cannot be aligned (the expert must cover every base token)")  # fmt: skip
        if other - size > max_padding:
            raise ValueError(f"proxy_generate: the {name} scores {other} tokens, the base {size}: more than "
                             f"{max_padding} extra rows is another tokenizer, not padding (raise max_vocab_padding "
                             "if the extra rows really are unused padding)")  # fmt: skip
        special = _special_tokens(model)
        for key in base_special.keys() & special.keys():
            if base_special[key] != special[key]:
                raise ValueError(f"proxy_generate: the base's {key} is {list(base_special[key])} but the {name}'s is "
                                 f"{list(special[key])}: the tokenizers differ")  # fmt: skip
    return size


class _Stream:
    """One model's decoding state: its cache, attention mask and (left-padded) positions. The
    model gets the prompt once, then one token per step."""

    def __init__(self, model, input_ids, attention_mask, call_kwargs=None):
        from transformers import DynamicCache

        self.model = model
        self.mask = attention_mask
        self.cache = DynamicCache(config=model.config)
        self.kwargs = call_kwargs or {}
        self.pending = input_ids

    def logits(self) -> torch.Tensor:
        """Next-token logits [rows, vocab] for the pending tokens, which then enter the cache."""
        length = self.pending.shape[1]
        # Left padding: positions count real tokens only, as generate() computes them.
        positions = (self.mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        out = self.model(input_ids=self.pending, attention_mask=self.mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1, **self.kwargs)  # fmt: skip
        self.cache = out.past_key_values
        return out.logits[:, -1, :]

    def push(self, tokens: torch.Tensor) -> None:
        self.pending = tokens[:, None]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=-1)


def _left_pad(ids, mask, length, pad_id):
    """ids / mask left-padded to `length` columns (for stacking prompts of two lengths)."""
    extra = length - ids.shape[1]
    if extra == 0:
        return ids, mask
    return (torch.cat([ids.new_full((ids.shape[0], extra), pad_id), ids], dim=1),
            torch.cat([mask.new_zeros(mask.shape[0], extra), mask], dim=1))  # fmt: skip


def _check_generation_args(alpha, max_new_tokens, temperature, top_k, top_p, min_tokens_to_keep):
    if not math.isfinite(float(alpha)):
        raise ValueError(f"proxy_generate: alpha must be finite, got {alpha}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"proxy_generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not (math.isfinite(float(temperature)) and temperature > 0):
        raise ValueError(f"proxy_generate: temperature must be a finite number > 0, got {temperature}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"proxy_generate: top_k must be an int >= 0 (0: off), got {top_k!r}")
    if not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"proxy_generate: top_p must be in (0, 1] (1: off), got {top_p}")
    if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise ValueError(f"proxy_generate: min_tokens_to_keep must be an int >= 1, got {min_tokens_to_keep!r}")


@torch.no_grad()
def proxy_generate(base, expert, anti_expert, input_ids, attention_mask=None, *, alpha: float = 1.0,
                   max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, min_tokens_to_keep: int = 1, eos_token_id=None, pad_token_id=None,
                   generator: torch.Generator | None = None, expert_adapter: str | None = None,
                   mixed_batch: bool = True, expert_input_ids=None, expert_attention_mask=None,
                   max_vocab_padding: int = MAX_VOCAB_PADDING) -> torch.Tensor:  # fmt: skip
    """Proxy-tuned decoding: returns [B, prompt + new tokens] like `generate` (the prompt first;
    shorter when every sequence ended early).

    base: the large model M. expert / anti_expert: M+ and M− (three separate models), or, with
    `expert_adapter`, one peftkern-patched small model holding that adapter: M+ is it with the
    adapter, M− without (`anti_expert` then None or the same module); `mixed_batch=True` runs the
    two as one batch of 2B sequences, False as two forwards (the same tokens; for measuring).
    input_ids / attention_mask: the base's (and anti-expert's) prompt, left-padded;
    expert_input_ids / expert_attention_mask: another prompt for the expert (the reference's
    chat-formatted one), else the same. Greedy unless do_sample; then temperature, top_k and
    top_p as transformers' warpers, sampling with `generator`. A sequence ends at eos_token_id
    (an int or a list; default the base's config), then gets pad_token_id (default the config's,
    else the first eos). The models must be in eval mode for deterministic decoding."""
    _check_generation_args(alpha, max_new_tokens, temperature, top_k, top_p, min_tokens_to_keep)
    if expert_adapter is not None:
        if anti_expert is not None and anti_expert is not expert:
            raise ValueError("proxy_generate: with expert_adapter, the anti-expert is the expert's model without the "
                             "adapter: pass anti_expert=None (or the same module)")  # fmt: skip
        _check_adapter(expert, expert_adapter)
        anti_expert = expert
    elif anti_expert is None:
        raise ValueError("proxy_generate: pass an anti_expert model, or expert_adapter= to use the expert's model "
                         "without its adapter")  # fmt: skip
    vocab = check_vocabularies(base, expert, anti_expert, max_vocab_padding)
    if input_ids.dim() != 2:
        raise ValueError(f"proxy_generate: input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"proxy_generate: attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}")  # fmt: skip
    if expert_input_ids is None:
        expert_input_ids, expert_attention_mask = input_ids, attention_mask
    elif expert_attention_mask is None:
        expert_attention_mask = torch.ones_like(expert_input_ids)
    if expert_input_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(f"proxy_generate: expert_input_ids has {expert_input_ids.shape[0]} sequences, input_ids "
                         f"{input_ids.shape[0]}")  # fmt: skip
    eos = _token_list(eos_token_id if eos_token_id is not None else getattr(base.config, "eos_token_id", None))
    if pad_token_id is None:
        pad_token_id = getattr(base.config, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)

    batch = input_ids.shape[0]
    base_stream = _Stream(base, input_ids, attention_mask)
    if expert_adapter is not None and mixed_batch:
        length = max(input_ids.shape[1], expert_input_ids.shape[1])
        e_ids, e_mask = _left_pad(expert_input_ids, expert_attention_mask, length, pad_token_id)
        a_ids, a_mask = _left_pad(input_ids, attention_mask, length, pad_token_id)
        names = [expert_adapter] * batch + [mixed.BASE] * batch
        pair = _Stream(expert, torch.cat([e_ids, a_ids]), torch.cat([e_mask, a_mask]), {"adapter_names": names})
        streams = [pair]
    else:
        e_kwargs = {"adapter_names": [expert_adapter] * batch} if expert_adapter is not None else {}
        a_kwargs = {"adapter_names": [mixed.BASE] * batch} if expert_adapter is not None else {}
        streams = [_Stream(expert, expert_input_ids, expert_attention_mask, e_kwargs),
                   _Stream(anti_expert, input_ids, attention_mask, a_kwargs)]  # fmt: skip

    eos_tensor = torch.tensor(eos, device=input_ids.device, dtype=input_ids.dtype)
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    sequences = input_ids
    warp = dict(temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else {}
    for _ in range(max_new_tokens):
        base_logits = base_stream.logits()
        if len(streams) == 1:
            both = streams[0].logits()
            expert_logits, anti_logits = both[:batch], both[batch:]
        else:
            expert_logits, anti_logits = streams[0].logits(), streams[1].logits()
        scores = proxy_ops.proxy_logits(base_logits[:, :vocab], expert_logits, anti_logits, float(alpha),
                                        min_tokens_to_keep=min_tokens_to_keep, **warp)  # fmt: skip
        if do_sample:
            next_tokens = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            next_tokens = scores.argmax(dim=-1)
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
        if len(eos):
            unfinished &= ~torch.isin(next_tokens, eos_tensor)
        if not bool(unfinished.any()):
            break
        base_stream.push(next_tokens)
        if len(streams) == 1:  # the mixed batch: expert rows, then anti-expert rows
            streams[0].push(torch.cat([next_tokens, next_tokens]))
        else:
            for stream in streams:
                stream.push(next_tokens)
    return sequences


def _token_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _check_adapter(model, name: str) -> None:
    from .multi_adapter import list_adapters

    try:
        names = list_adapters(model)
    except Exception as error:  # noqa: BLE001  (not a patched model: say so in our words)
        raise ValueError(f"proxy_generate: expert_adapter={name!r} needs a peftkern-patched expert model ({error})") from None
    if name not in names:
        raise ValueError(f"proxy_generate: the expert model has no adapter {name!r} (it has {names})")
