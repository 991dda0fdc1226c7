"""ReLoRA (Lialin et al., ICLR 2024; reference code Guitaricet/relora): LoRA training with a
restart every T steps. A restart merges s·B·A into every base, re-initialises A (Kaiming, as
LoRA) and B (zero), and prunes the optimizer state of A and B; a jagged cosine schedule warms
the learning rate back up after each restart.

    restart(model, optimizer)             the merge + re-init + optimizer reset
    get_jagged_cosine_schedule(...)       the reference's `get_cosine_schedule_with_multiple_warmups`
    peftkern.ReLoRACallback(relora_steps) a transformers TrainerCallback calling restart every T steps

Dense bases are merged in place (`W += s·B·A`, the same delta LoRA's merge adds). NF4 bases are
merged by one fused op per quantization block (`peftkern.ops.relora.nf4_merge_lowrank`): the new
bytes are those of quantizing deq(W) + s·B·A, without a dense W ever being written.

A restart is training, not patching: `unpatch` does not take merged updates back out of the base
(as it does not undo optimizer steps)."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .methods.bases import nf4_base_weight
from .methods.lora import LoraLinear
from .ops import relora as relora_ops
from .record import PatchRecord

# The reference's default reset: random pruning of 99.9% of the states (its authors found that
# zeroing them outright broke ZeRO's state dict; the numerical effect is nearly the same).
RANDOM_PRUNE_RATIO = 0.999
MAGNITUDE_PRUNE_RATIO = 0.9  # the reference README's suggestion for magnitude pruning
RESETS = ("random", "magnitude", "zero")


def _relora_layers(model: nn.Module, adapter_name: str | None) -> tuple[str, list[tuple[str, LoraLinear]]]:
    """The adapter restarted and the LoRA layers holding it, checked before anything changes."""
    if adapter_name is None:
        record = PatchRecord.of(model)
        adapter_name = record.adapter_name if record is not None else None
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear) and m.lora_A]
    if adapter_name is None and layers:
        adapter_name = layers[0][1].active_adapter
    layers = [(n, m) for n, m in layers if adapter_name in m.lora_A]
    if not layers:
        raise ValueError(
            "relora.restart: the model has no LoRA layers"
            + (f" with adapter {adapter_name!r}" if adapter_name else "")
            + "; patch it first with peftkern.patch(model, peftkern.LoraConfig(...))"
        )
    for name, layer in layers:
        if adapter_name in layer.lora_magnitude_vector:
            raise ValueError(f"relora.restart: {name!r} is a DoRA layer (use_dora=True); ReLoRA merges s·B·A into "
                             "the base, which DoRA's magnitude normalisation does not allow. Use plain LoRA.")  # fmt: skip
        if layer.merged:
            raise ValueError(f"relora.restart: {name!r} is merged; unmerge it before a restart")
    return adapter_name, layers


def _check_reset(reset: str, ratio: float | None) -> float:
    if reset not in RESETS:
        raise ValueError(f"relora.restart: reset must be one of {RESETS}, got {reset!r}")
    if reset == "zero":
        return 1.0
    ratio = {"random": RANDOM_PRUNE_RATIO, "magnitude": MAGNITUDE_PRUNE_RATIO}[reset] if ratio is None else ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"relora.restart: ratio must be a number in [0, 1], got {ratio!r}")
    return float(ratio)


@torch.no_grad()
def restart(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    adapter_name: str | None = None,
    reset: str = "random",
    ratio: float | None = None,
    state_keys: list[str] | None = None,
    generator: torch.Generator | None = None,
) -> dict:
    """One ReLoRA restart of every LoRA layer holding `adapter_name` (default: the patched one):
    W += s·B·A, A ← kaiming_uniform(a=√5), B ← 0; then the optimizer state of every A and B is
    pruned in place: `reset="random"` zeroes each entry with probability `ratio` (default 0.999,
    the reference's reset), `"magnitude"` zeroes the entries at or below the `ratio` quantile of
    |state| (default 0.9), `"zero"` zeroes them all. `state_keys`: which state tensors (default:
    every tensor state shaped like its parameter, e.g. Adam's exp_avg and exp_avg_sq; never the
    step count, which the reference keeps). `generator` draws the re-init and the random masks
    (default: torch's global RNG, as the reference).

    Returns {"layers": restarted layer count, "states_zeroed": fraction of state entries now 0}.
    Errors (no LoRA layer, DoRA, a merged layer, a bad reset) leave the model untouched."""
    adapter_name, layers = _relora_layers(model, adapter_name)
    ratio = _check_reset(reset, ratio)
    for _, layer in layers:
        _merge_into_base(layer, adapter_name)
        nn.init.kaiming_uniform_(layer.lora_A[adapter_name].weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(layer.lora_B[adapter_name].weight)
    zeroed = total = 0
    if optimizer is not None:
        params = [p for _, layer in layers for p in (layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight)]
        zeroed, total = reset_optimizer_state(optimizer, params, reset=reset, ratio=ratio, state_keys=state_keys,
                                              generator=generator)  # fmt: skip
    return {"layers": len(layers), "states_zeroed": zeroed / total if total else 0.0}


def _merge_into_base(layer: LoraLinear, name: str) -> None:
    """W += s·B·A in place: dense bases by LoRA's own delta, NF4 bases by the fused block merge."""
    nf4 = nf4_base_weight(layer.base_layer)
    if nf4 is None:
        weight = layer.base_layer.weight
        weight += layer.delta_weight(name).to(weight.dtype)
        return
    relora_ops.nf4_merge_lowrank_(nf4, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])


def reset_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params,
    *,
    reset: str = "random",
    ratio: float | None = None,
    state_keys: list[str] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Prune the optimizer state of `params` in place (see `restart`); returns (entries that are
    zero afterwards, entries pruned over). Parameters without state yet are skipped."""
    ratio = _check_reset(reset, ratio)
    zeroed = total = 0
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        keys = state_keys if state_keys is not None else [
            k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == p.shape
        ]  # fmt: skip
        for key in keys:
            if key not in state:
                raise KeyError(f"relora: optimizer state has no {key!r} (it has {sorted(state)})")
            tensor = state[key]
            _prune_(tensor, reset, ratio, generator)
            total += tensor.numel()
            zeroed += int((tensor == 0).sum())
    return zeroed, total


def _prune_(tensor: torch.Tensor, reset: str, ratio: float, generator: torch.Generator | None) -> None:
    if reset == "zero":
        tensor.zero_()
    elif reset == "random":  # the reference's mask: rand > ratio keeps an entry
        keep = torch.rand(tensor.shape, generator=generator, device=tensor.device) > ratio
        tensor.mul_(keep)
    else:  # magnitude: keep |x| strictly above the ratio quantile (the reference's rule)
        magnitude = tensor.abs()
        tensor.mul_((magnitude > _quantile(magnitude, ratio).to(tensor.dtype)).to(tensor.dtype))


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(values.float(), q) (linear interpolation), also above torch.quantile's 16M
    element limit (by a full sort there)."""
    flat = values.reshape(-1).to(torch.float32)
    if flat.numel() <= 16_000_000:
        return torch.quantile(flat, q)
    ordered = flat.sort().values
    position = q * (flat.numel() - 1)
    lo = int(math.floor(position))
    hi = min(lo + 1, flat.numel() - 1)
    return torch.lerp(ordered[lo], ordered[hi], torch.tensor(position - lo, device=flat.device))


# --------------------------------------------------------------------------------------------
# The jagged cosine schedule.
# --------------------------------------------------------------------------------------------


def _jagged_cosine_lambda(step, *, num_training_steps, first_warmup_steps, restart_warmup_steps, restart_every,
                          min_lr_ratio):  # fmt: skip
    """The reference's `_get_cosine_schedule_with_multiple_warmups_lambda`, same arithmetic: a
    linear first warmup; then a global cosine from 1 to min_lr_ratio; the first
    `restart_warmup_steps` of every cycle ramp linearly from 0 up to the cosine's value at the
    cycle's start (the reference's progress there is cycle_start / (total − first_warmup))."""
    if step < first_warmup_steps:
        return float(step) / float(max(1, first_warmup_steps))
    cycle_step, cycle = step % restart_every, step // restart_every
    span = float(max(1, num_training_steps - first_warmup_steps))
    if cycle_step < restart_warmup_steps:
        progress = float(cycle * restart_every) / span
        peak = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return float(cycle_step) / float(max(1, restart_warmup_steps)) * peak
    progress = float(step - first_warmup_steps) / span
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def get_jagged_cosine_schedule(
    optimizer: torch.optim.Optimizer,
    *,
    num_training_steps: int,
    first_warmup_steps: int,
    restart_warmup_steps: int,
    restart_every: int,
    min_lr_ratio: float = 0.1,
    last_epoch: int = -1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """ReLoRA's learning-rate schedule as a LambdaLR on any torch optimizer: values equal the
    reference's `get_cosine_schedule_with_multiple_warmups` step by step. `restart_every` is the
    ReLoRA cycle (`relora_steps`) and must divide `num_training_steps`, as the reference requires."""
    for name, value in (("num_training_steps", num_training_steps), ("restart_every", restart_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"get_jagged_cosine_schedule: {name} must be a positive integer, got {value!r}")
    for name, value in (("first_warmup_steps", first_warmup_steps), ("restart_warmup_steps", restart_warmup_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"get_jagged_cosine_schedule: {name} must be an integer >= 0, got {value!r}")
    if num_training_steps % restart_every:
        raise ValueError(f"get_jagged_cosine_schedule: num_training_steps ({num_training_steps}) must be divisible "
                         f"by restart_every ({restart_every}), as in the reference")  # fmt: skip
    if not 0.0 < min_lr_ratio <= 1.0:
        raise ValueError(f"get_jagged_cosine_schedule: min_lr_ratio must be in (0, 1], got {min_lr_ratio!r}")
    schedule = functools.partial(
        _jagged_cosine_lambda, num_training_steps=num_training_steps, first_warmup_steps=first_warmup_steps,
        restart_warmup_steps=restart_warmup_steps, restart_every=restart_every, min_lr_ratio=min_lr_ratio,
    )  # fmt: skip
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch)


def make_trainer_callback():
    """A transformers TrainerCallback: `ReLoRACallback(relora_steps, **restart_options)` calls
    `restart(model, optimizer, ...)` at the end of every optimizer step whose global_step is a
    positive multiple of relora_steps (Axolotl's rule; the reference restarts one step later, at
    step % T == 1, after a step taken at learning rate 0, which moves no weight)."""
    from transformers import TrainerCallback

    class ReLoRACallback(TrainerCallback):
        def __init__(self, relora_steps: int, **restart_options):
            if isinstance(relora_steps, bool) or not isinstance(relora_steps, int) or relora_steps <= 0:
                raise ValueError(f"ReLoRACallback: relora_steps must be a positive integer, got {relora_steps!r}")
            _check_reset(restart_options.get("reset", "random"), restart_options.get("ratio"))
            self.relora_steps, self.restart_options, self.restarts = relora_steps, restart_options, 0

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step > 0 and state.global_step % self.relora_steps == 0:
                restart(model, optimizer, **self.restart_options)
                self.restarts += 1

    return ReLoRACallback
