"""Child-Tuning (Xu et al., EMNLP 2021; reference code alibaba/AliceMind, ChildTuningAdamW):
full-weight fine-tuning that updates only a "child network", by masking the gradient before the
optimizer step, g ← g ⊙ M:

- task-free, `mode="F"`: M ~ Bernoulli(reserve_p), drawn afresh every step, and g /= reserve_p;
- task-driven, `mode="D"`: M fixed for the run, the top-reserve_p fraction of the Fisher
  information F = (1/N) Σ (∇w)² over a few batches (`fisher_mask`), over parameters whose name
  contains "layer" (the reference's rule; embeddings and the head are not masked).

Two faces:
    ChildTuning(optimizer, reserve_p, mode, gradient_mask=None)   wraps ANY torch optimizer
    ChildTuningAdamW(params, lr, ..., reserve_p, mode)            the reference's optimizer
                                                                  (eps 1e-6, decoupled weight decay
                                                                  applied after the update);
                                                                  fused=True: one kernel pass per
                                                                  tensor (peftkern.ops.masked_adamw)

Full-weight training: NF4 (4-bit) bases cannot be trained and are refused."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from .methods.bases import nf4_base_weight
from .ops import masked_adamw as masked_adamw_ops

MODES = ("F", "D")


def _check_reserve_p(reserve_p) -> float:
    if isinstance(reserve_p, bool) or not isinstance(reserve_p, (int, float)) or not 0.0 < reserve_p <= 1.0:
        raise ValueError(f"child_tuning: reserve_p must be a number in (0, 1], got {reserve_p!r}")
    return float(reserve_p)


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"child_tuning: mode must be 'F' (task-free) or 'D' (task-driven), got {mode!r}")
    return mode


def check_trainable(model: nn.Module | None = None, params: Iterable[torch.Tensor] = ()) -> None:
    """Refuse NF4 (4-bit) bases and non-float parameters: Child-Tuning updates full weights."""
    if model is not None:
        for name, module in model.named_modules():
            if nf4_base_weight(module) is not None:
                raise ValueError(f"child_tuning: {name!r} holds an NF4 (4-bit) weight; Child-Tuning trains full "
                                 "weights, which a 4-bit base cannot hold. Use a dense (bf16/fp32) model.")  # fmt: skip
    for p in params:
        if not p.is_floating_point():
            raise ValueError(f"child_tuning: a parameter of dtype {p.dtype} (a quantized weight, e.g. NF4) cannot "
                             "be trained by Child-Tuning; use a dense model")  # fmt: skip


def _mask_gradients(params, mode: str, reserve_p: float, gradient_mask: dict | None, generator) -> None:
    for p in params:
        if p.grad is None:
            continue
        if mode == "D":
            mask = gradient_mask.get(p) if gradient_mask is not None else None
            if mask is not None:
                p.grad.mul_(mask)
        else:  # the reference's draw, torch.distributions.Bernoulli(full(reserve_p)).sample() / reserve_p
            keep = torch.bernoulli(torch.full_like(p.grad, reserve_p), generator=generator)
            p.grad.mul_(keep / reserve_p)


class ChildTuning(torch.optim.Optimizer):
    """Wraps any torch optimizer: `step()` masks every gradient (see the module doc), then runs the
    wrapped optimizer's step. param_groups, state, defaults, zero_grad, state_dict and
    add_param_group are the wrapped optimizer's (shared, not copied), and it is a
    torch.optim.Optimizer, so LR schedulers and transformers' Trainer take it (as accelerate's
    AcceleratedOptimizer wraps one). `gradient_mask`: {parameter: bool tensor} for mode "D" (from
    `fisher_mask`); parameters without a mask are updated fully. `generator`: draws mode F's masks
    (default: torch's global RNG). `model`: checked for NF4 bases."""

    def __init__(self, optimizer: torch.optim.Optimizer, reserve_p: float = 0.3, mode: str = "F", *,
                 gradient_mask: dict | None = None, generator: torch.Generator | None = None,
                 model: nn.Module | None = None):  # fmt: skip
        # no Optimizer.__init__: it would build new param groups; everything is the wrapped one's
        self.reserve_p, self.mode = _check_reserve_p(reserve_p), _check_mode(mode)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        check_trainable(model, params)
        if mode == "D":
            if gradient_mask is None:
                raise ValueError("child_tuning: mode 'D' needs gradient_mask (peftkern.child_tuning.fisher_mask)")
            for p, m in gradient_mask.items():
                if m.shape != p.shape:
                    raise ValueError(f"child_tuning: a mask of shape {tuple(m.shape)} for a parameter of shape "
                                     f"{tuple(p.shape)}")  # fmt: skip
        self.optimizer, self.gradient_mask, self.generator = optimizer, gradient_mask, generator

    param_groups = property(lambda self: self.optimizer.param_groups,
                            lambda self, value: setattr(self.optimizer, "param_groups", value))  # fmt: skip
    state = property(lambda self: self.optimizer.state, lambda self, value: setattr(self.optimizer, "state", value))
    defaults = property(lambda self: self.optimizer.defaults,
                        lambda self, value: setattr(self.optimizer, "defaults", value))  # fmt: skip

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"ChildTuning(mode={self.mode!r}, reserve_p={self.reserve_p}, {self.optimizer!r})"

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        _mask_gradients(params, self.mode, self.reserve_p, self.gradient_mask, self.generator)
        self.optimizer.step()
        return loss


class ChildTuningAdamW(torch.optim.Optimizer):
    """The reference's ChildTuningAdamW (AliceMind), same arithmetic: the masked gradient, Adam
    moments, denominator sqrt(v) + eps with the bias correction folded into the step size, then
    decoupled weight decay p -= lr·wd·p applied AFTER the update to every entry (masked or not).
    `fused=True`: each tensor's step is one pass of the fused masked-AdamW op (the same bits in
    float32; D's masks kept as packed bits, F's drawn in the kernel from `generator`; float32
    moments; see docs/child-tuning.md)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True, reserve_p: float = 1.0, mode: str = "F", *,
                 gradient_mask: dict | None = None, generator: torch.Generator | None = None,
                 fused: bool = False):  # fmt: skip
        if lr < 0.0 or not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0 or eps < 0.0:
            raise ValueError(f"ChildTuningAdamW: invalid lr={lr}, betas={betas} or eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias))
        self.reserve_p, self.mode = _check_reserve_p(reserve_p), _check_mode(mode)
        all_params = [p for g in self.param_groups for p in g["params"]]
        check_trainable(None, all_params)
        if mode == "D" and gradient_mask is None:
            raise ValueError("child_tuning: mode 'D' needs gradient_mask (peftkern.child_tuning.fisher_mask)")
        self.generator, self.fused = generator, bool(fused)
        self.gradient_mask, self.mask_bits = gradient_mask, None
        if self.fused:  # D keeps only the packed bits (1 bit per weight), not the bool masks
            _check_fusable(all_params, gradient_mask if mode == "D" else None)
            if mode == "D":
                self.gradient_mask = None
                self.mask_bits = {p: masked_adamw_ops.pack_mask(m) for p, m in gradient_mask.items()}

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if self.fused:
                self._fused_step(group)
                continue
            _mask_gradients(group["params"], self.mode, self.reserve_p, self.gradient_mask, self.generator)
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq, grad = state["exp_avg"], state["exp_avg_sq"], p.grad
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size = step_size * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                p.addcdiv_(exp_avg, denom, value=-step_size)
                p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss

    def _fused_step(self, group) -> None:
        """The group's step through the fused op (peftkern.ops.masked_adamw), one pass per tensor:
        the same arithmetic, float32 moments, p.grad left unmasked. F draws its masks in the kernel
        (Philox; seed and offsets from `generator` or the device's default generator, new every
        step and tensor), so they differ from the unfused path's torch.bernoulli draws."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        seed, offset = 0, 0
        if self.mode == "F" and self.reserve_p < 1.0:
            seed, offset = masked_adamw_ops.philox_seed_offset(self.generator, params[0].device, len(params))
        beta1, beta2 = group["betas"]
        for i, p in enumerate(params):
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            step_size = group["lr"]
            if group["correct_bias"]:
                step_size = step_size * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
            bits = self.mask_bits.get(p) if self.mode == "D" else None
            masked_adamw_ops.masked_adamw_(
                p, p.grad, state["exp_avg"], state["exp_avg_sq"], bits, self.reserve_p if self.mode == "F" else 1.0,
                seed, offset + i, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], step_size=step_size,
            )  # fmt: skip


def _check_fusable(params, gradient_mask: dict | None) -> None:
    """What the fused op takes, refused at construction with a clear message rather than mid-step."""
    for p in params:
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not p.is_contiguous():
            raise ValueError(f"ChildTuningAdamW(fused=True): parameters must be contiguous float32, bfloat16 or "
                             f"float16, got {p.dtype} of shape {tuple(p.shape)}")  # fmt: skip
    for p, m in (gradient_mask or {}).items():
        if m.dtype != torch.bool or m.shape != p.shape:
            raise ValueError(f"ChildTuningAdamW(fused=True): a mode-D mask must be bool of its parameter's shape "
                             f"{tuple(p.shape)}, got {m.dtype} {tuple(m.shape)}")  # fmt: skip


def fisher_mask(
    model: nn.Module,
    batches: Iterable,
    reserve_p: float,
    *,
    loss_fn: Callable | None = None,
    grad_clip: dict | None = None,
    name_filter: Callable[[str], bool] = lambda name: "layer" in name,
) -> dict[nn.Parameter, torch.Tensor]:
    """Child-Tuning D's mask, as the reference's `calculate_fisher`: for the trainable parameters
    whose name passes `name_filter` (default: contains "layer"), F = Σ_batches grad² / N (each
    gradient clipped by clip_grad_norm_(param, **grad_clip) first when given); the threshold is
    numpy's percentile of all F values at (1 − reserve_p)·100; mask = F ≥ threshold (ties at the
    threshold kept, so slightly more than reserve_p may be kept). `loss_fn(model, batch)` gives
    the loss (default: model(**batch).loss). The model's gradients are zeroed afterwards."""
    reserve_p = _check_reserve_p(reserve_p)
    check_trainable(model)
    batches = list(batches)
    if not batches:
        raise ValueError("child_tuning.fisher_mask: needs at least one batch")
    loss_fn = loss_fn or (lambda m, batch: m(**batch).loss)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and name_filter(n)]
    if not named:
        raise ValueError("child_tuning.fisher_mask: no trainable parameter passes name_filter")
    fisher = {p: torch.zeros_like(p) for _, p in named}
    model.zero_grad()
    for batch in batches:
        loss_fn(model, batch).backward()
        for _, p in named:
            if p.grad is None:
                continue
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(p, **grad_clip)
            fisher[p] += p.grad**2 / len(batches)
        model.zero_grad()
    values = np.concatenate([f.detach().reshape(-1).cpu().numpy() for f in fisher.values()])
    threshold = np.percentile(values, (1 - reserve_p) * 100)
    return {p: f >= threshold for p, f in fisher.items()}
