"""Proxy-tuning's decode-step op (csrc/proxy/): the three next-token logit rows of the base M, the
tuned expert M+ and the untuned anti-expert M− combined, z = s_M + α·(s_M+ − s_M−), then
transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper applied in that
order, in one pass per row: filtered float32 logits [B, V], removed tokens at -inf, ready for
argmax or softmax + multinomial.

The experts' rows may be wider than the base's (padded vocabularies): only the first V = the
base's width columns are read, as the reference truncates them (alisawuffles/proxy-tuning,
`DExpertsLlama.generate`).

Semantics, defined so every implementation agrees exactly:
- z is formed in float32 from float32 copies of the inputs: t = e − a, u = α·t, z = (b + u) / T,
  each rounded once (no FMA), as PyTorch computes the same expression.
- top-k keeps every token whose z is >= the k-th largest (ties at the k-th value are all kept),
  k = max(top_k, min_tokens_to_keep), as TopKLogitsWarper.
- top-p sorts ascending, ties in index order (a stable sort), and removes the tokens whose
  cumulative probability is <= 1 − top_p, except the last min_tokens_to_keep of the order, as
  TopPLogitsWarper; the probabilities are those of the top-k survivors and the cumulative sums
  are taken in float64 (TopPLogitsWarper's float32 sums can flip a token whose cumulative
  probability lies within float32 rounding of 1 − top_p: the only place the two may differ).
- top_k = 0 and top_p = 1 turn the filters off (generate() does not install them then).
- a row holding NaN or +inf after combining comes out all NaN: nothing downstream can sample
  from it silently.
"""

from __future__ import annotations

import math

import torch

from .. import _ext


def check_args(base, expert, anti_expert, alpha, temperature, top_k, top_p, min_tokens_to_keep):
    """The op's checks, in Python for the reference path (the kernels repeat them in C++)."""
    op = "proxy_logits"
    for name, t in (("base", base), ("expert", expert), ("anti_expert", anti_expert)):
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be [batch, vocab], got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
        if t.shape[0] != base.shape[0]:
            raise ValueError(f"{op}: {name} has {t.shape[0]} rows but base has {base.shape[0]}")
        if t.shape[1] < base.shape[1]:
            raise ValueError(f"{op}: {name} has {t.shape[1]} vocabulary columns, fewer than base's {base.shape[1]}")
        if t.device != base.device:
            raise ValueError(f"{op}: {name} is on {t.device} but base is on {base.device}")
    if not math.isfinite(alpha):
        raise ValueError(f"{op}: alpha must be finite, got {alpha}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"{op}: top_k must be >= 0 (0: off), got {top_k}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"{op}: top_p must be in (0, 1] (1: off), got {top_p}")
    if min_tokens_to_keep < 1:
        raise ValueError(f"{op}: min_tokens_to_keep must be >= 1, got {min_tokens_to_keep}")


def proxy_logits_reference(base, expert, anti_expert, alpha: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                           top_p: float = 1.0, min_tokens_to_keep: int = 1):  # fmt: skip
    """The spec (see the module docstring): filtered float32 logits [B, V]."""
    check_args(base, expert, anti_expert, alpha, temperature, top_k, top_p, min_tokens_to_keep)
    vocab = base.shape[1]
    b, e, a = base.float(), expert[:, :vocab].float(), anti_expert[:, :vocab].float()
    z = (b + (e - a) * alpha) / temperature
    if vocab == 0 or z.shape[0] == 0:
        return z
    bad = (z.isnan() | (z == math.inf)).any(dim=-1, keepdim=True)
    if 0 < top_k:
        k = min(max(top_k, min_tokens_to_keep), vocab)
        z = z.masked_fill(z < torch.topk(z, k)[0][..., -1:], -math.inf)
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, descending=False, stable=True)
        cumulative = sorted_z.double().softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -min_tokens_to_keep:] = False
        z = z.masked_fill(remove.scatter(1, order, remove), -math.inf)
    return z.masked_fill(bad, math.nan)


@_ext.register_fake("proxy_logits")
def _(base, expert, anti_expert, alpha, temperature, top_k, top_p, min_tokens_to_keep):
    return base.new_empty(base.shape, dtype=torch.float32)


def proxy_logits(base, expert, anti_expert, alpha: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, min_tokens_to_keep: int = 1):  # fmt: skip
    """The compiled fused op for the tensors' device, else the reference. Float64 inputs (gradcheck
    style tests only) take the reference: the kernels read float32, float16 and bfloat16."""
    args = (float(alpha), float(temperature), int(top_k), float(top_p), int(min_tokens_to_keep))
    if base.dtype != torch.float64 and _ext.has_kernel("proxy_logits", base.device.type):
        return torch.ops.peftkern.proxy_logits(base, expert, anti_expert, *args)
    return proxy_logits_reference(base, expert, anti_expert, *args)
