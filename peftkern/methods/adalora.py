"""AdaLoRA (Zhang et al., ICLR 2023) with Hugging Face PEFT 0.21's config fields and semantics, on
dense bases (`nn.Linear`, transformers' `Conv1D`) and NF4 bases, computed by the scaled-LoRA op
(`peftkern.ops.scaled_lora`) with rank_scale = E:

    y = W·x + b + α/(ranknum + 1e-5)·B·((A ⊙ E)·dropout(x)),   ranknum = init_r, even after pruning

A [r, in], B [out, r], E [r, 1] trained (PEFT's `lora_A` / `lora_B` / `lora_E` ParameterDicts,
so parameter names and checkpoint keys are PEFT's). Also, as PEFT:
* the orthogonal regulariser orth_reg_weight·mean_p ‖PPᵀ − I‖_F (A) / ‖PᵀP − I‖_F (B), not squared,
  added to the model output's `loss` by a forward hook whenever the output has one. PEFT adds it
  only when its PeftModel dispatches to AdaLoraModel.forward, which task_type=None skips (its
  trap): peftkern always adds it;
* the RankAllocator: `update_and_allocate(model, step)` (`peftkern.update_and_allocate`) once per
  optimizer step, after optimizer.step() and before zero_grad(): importance EMAs, PEFT's cubic
  budget schedule, E masked below the budget's threshold, `rank_pattern` recorded in the config,
  then frozen and re-applied every step after total_step − tfinal. `AdaLoraCallback` calls it from
  transformers' Trainer (on_optimizer_step), which PEFT leaves to the user;
* checkpoints pruned to rank_pattern (r′ may be 0), ranknum not saved; loading resizes the layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .. import targeting
from ..record import PatchRecord
from . import config_fields
from .bases import check_new_base, check_quantize_option, quantized_base, supports
from .scaled_lora_layer import Factors, ScaledLoraLayer

# PEFT's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING for the architectures peftkern
# tests (Mistral has none: name the targets).
DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
                   "bert": ["query", "value"]}  # fmt: skip
ALLOCATOR_ATTRIBUTE = "peftkern_rank_allocator"


@dataclass
class AdaLoraConfig:
    """PEFT's `AdaLoraConfig` fields (LoraConfig's plus AdaLoRA's), same names, defaults, meaning.
    `r` is ignored (PEFT warns); the layers start at init_r."""

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict | None = None
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    init_lora_weights: bool = True
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    task_type: str | None = None  # recorded in checkpoints, as PEFT does

    peft_type = "ADALORA"  # a class attribute, not a field

    @classmethod
    def from_any(cls, config) -> "AdaLoraConfig":
        """From a peftkern AdaLoraConfig, a `peft.AdaLoraConfig`, or a plain dict (PEFT's fields;
        those peftkern does not implement only at PEFT's default)."""
        if isinstance(config, cls):
            return dataclasses.replace(config)
        values = config_fields(config, cls, "an AdaLoraConfig, a peft.AdaLoraConfig or a dict")
        for name in ("target_modules", "exclude_modules"):
            if isinstance(values.get(name), (set, tuple)):
                values[name] = sorted(values[name])
        return cls(**values)

    def validate(self) -> None:
        for name in ("target_r", "init_r", "tinit", "tfinal", "deltaT"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"AdaLoraConfig.{name} must be an integer, got {value!r}")
        if self.init_r <= 0 or self.target_r <= 0:
            raise ValueError(f"AdaLoraConfig.init_r and target_r must be positive, got init_r={self.init_r}, "
                             f"target_r={self.target_r}")  # fmt: skip
        if self.init_r < self.target_r:
            raise ValueError(f"AdaLoraConfig.init_r ({self.init_r}) must be >= target_r ({self.target_r}): the "
                             "budget only shrinks")  # fmt: skip
        if self.use_dora:
            raise ValueError("ADALORA does not support DoRA (use_dora=True), as in PEFT")
        if self.total_step is None or isinstance(self.total_step, bool) or not isinstance(self.total_step, int) \
                or self.total_step <= 0:  # fmt: skip
            raise ValueError("AdaLoRA does not work when `total_step` is None, supply a value > 0 (AdaLoraConfig."
                             f"total_step, got {self.total_step!r})")  # fmt: skip
        if self.tinit < 0 or self.tfinal < 0 or self.deltaT <= 0:
            raise ValueError(f"AdaLoraConfig: tinit and tfinal must be >= 0 and deltaT > 0, got {self.tinit}, "
                             f"{self.tfinal}, {self.deltaT}")  # fmt: skip
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError("AdaLoraConfig: the supplied schedule values don't allow for a budgeting phase "
                             f"(tinit={self.tinit} >= total_step - tfinal={self.total_step - self.tfinal}); decrease "
                             "tfinal / tinit or increase total_step")  # fmt: skip
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"AdaLoraConfig.{name} must be in (0, 1), got {value!r}")
        for name in ("orth_reg_weight", "lora_alpha", "lora_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"AdaLoraConfig.{name} must be a number, got {value!r}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"AdaLoraConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"AdaLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"AdaLoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not isinstance(self.init_lora_weights, bool):
            raise NotImplementedError(f"AdaLoraConfig.init_lora_weights={self.init_lora_weights!r}: True or False")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if not (value is None or isinstance(value, str)
                    or (isinstance(value, list) and all(isinstance(v, str) for v in value))):  # fmt: skip
                raise TypeError(f"AdaLoraConfig.{name} must be a list of module names or a regex string, got {value!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("AdaLoraConfig: layers_to_transform cannot be used when target_modules is a str")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("AdaLoraConfig: when layers_pattern is specified, layers_to_transform must also be")
        if self.modules_to_save:
            raise NotImplementedError("AdaLoraConfig.modules_to_save is not supported by peftkern yet")
        if self.rank_pattern is not None and not isinstance(self.rank_pattern, dict):
            raise TypeError("AdaLoraConfig.rank_pattern must be a dict of <module>.lora_E -> list of bools")
        if self.r != 8:
            warnings.warn("Note that `r` is not used in AdaLora and will be ignored. If you intended to set the "
                          "initial rank, use `init_r` instead.")  # fmt: skip

    def checkpoint_dict(self) -> dict:
        """The fields as adapter_config.json holds them: rank_pattern keyed `<module>.lora_E`,
        without the adapter name, as PEFT saves it."""
        values = dataclasses.asdict(self)
        if self.rank_pattern is not None:
            values["rank_pattern"] = {k.partition(".lora_E")[0] + ".lora_E": v for k, v in self.rank_pattern.items()}
        return values

    @property
    def scaling(self) -> float:
        """PEFT's: lora_alpha, or init_r when lora_alpha <= 0; divided by (ranknum + 1e-5) per call."""
        return self.lora_alpha if self.lora_alpha > 0 else float(self.init_r)


def _float32(value: float) -> float:
    return torch.tensor(value, dtype=torch.float32).item()


class SVDLinear(ScaledLoraLayer):
    """A frozen base plus an AdaLoRA adapter in SVD form: `lora_A.<adapter>` [r, in],
    `lora_B.<adapter>` [out, r], `lora_E.<adapter>` [r, 1] (PEFT's names)."""

    method = "AdaLoRA"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: AdaLoraConfig):
        super().__init__()
        self._init_base(base_layer, adapter_name, config.fan_in_fan_out)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum: dict[str, float] = {}  # init_r, kept through pruning (not saved, as PEFT)
        self.lora_alpha: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.add_adapter(adapter_name, config)

    def add_adapter(self, name: str, config: AdaLoraConfig) -> None:
        factory = self.adapter_factory()
        r = config.init_r
        self.lora_A[name] = nn.Parameter(torch.randn(r, self.in_features, **factory))
        self.lora_E[name] = nn.Parameter(torch.randn(r, 1, **factory))
        self.lora_B[name] = nn.Parameter(torch.randn(self.out_features, r, **factory))
        if config.init_lora_weights:  # PEFT's reset_lora_parameters
            with torch.no_grad():
                nn.init.zeros_(self.lora_E[name])
                nn.init.normal_(self.lora_A[name], mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B[name], mean=0.0, std=0.02)
        self.ranknum[name] = float(r)
        self.lora_alpha[name] = config.scaling
        self.dropout[name] = config.lora_dropout

    @torch.no_grad()
    def resize(self, name: str, keep: list[bool]) -> None:
        """Keep the triplets `keep` says (a bool per current rank, PEFT's rank_pattern entry), as
        PEFT's resize_modules_by_rank_pattern; ranknum stays what it was."""
        rows = torch.tensor(keep, dtype=torch.bool, device=self.lora_A[name].device)
        self.lora_A[name] = nn.Parameter(self.lora_A[name][rows].clone())
        self.lora_E[name] = nn.Parameter(self.lora_E[name][rows].clone())
        self.lora_B[name] = nn.Parameter(self.lora_B[name][:, rows].clone())

    def has_adapter(self, name: str) -> bool:
        return name in self.lora_A

    def delete_adapter(self, name: str) -> None:
        if name not in self.lora_A:
            return
        if self.merged and self.active_adapter == name:
            self.unmerge()
        del self.lora_A[name], self.lora_B[name], self.lora_E[name]
        for table in (self.ranknum, self.lora_alpha, self.dropout):
            table.pop(name, None)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.lora_A[name], self.lora_B[name], self.lora_E[name]] if name in self.lora_A else []

    def factors(self, name: str) -> Factors:
        # PEFT divides by the float32 tensor ranknum + 1e-5: the same float32 denominator here
        scaling = self.lora_alpha[name] / _float32(_float32(self.ranknum[name]) + _float32(1e-5))
        return Factors(self.lora_A[name], self.lora_B[name], scaling, self.lora_E[name], None, self.dropout[name])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={ {n: a.shape[0] for n, a in self.lora_A.items()} }"


CONFIG = AdaLoraConfig


# --------------------------------------------------------------------------------------------
# Patching: layers, the regulariser hook, the allocator.
# --------------------------------------------------------------------------------------------


def plan_patch(model: nn.Module, config: AdaLoraConfig, adapter_name: str, quantize: str | None = None):
    """Check every target, then return the function that swaps SVDLinear layers in, hooks the
    orthogonal regulariser into the model's loss and creates the rank allocator."""
    check_quantize_option(quantize)
    if hasattr(model, ALLOCATOR_ATTRIBUTE):
        raise ValueError(f"the model already has an attribute {ALLOCATOR_ATTRIBUTE!r}")
    matched = targeting.find_targets(
        model, config, DEFAULT_TARGETS, supports,
        "peftkern's AdaLoRA supports nn.Linear, transformers' Conv1D and NF4 (peftkern NF4Linear, bitsandbytes "
        "Linear4bit) bases",
    )  # fmt: skip
    for name, module in matched:
        check_new_base(name, module, quantize)

    def apply(record: PatchRecord) -> None:
        for name, module in matched:
            base = quantized_base(module, quantize)
            record.swap(model, name, SVDLinear(base, adapter_name, config), restore=base)
        for parameter in _trained_biases(model, config).values():
            parameter.requires_grad_(True)
        handle = model.register_forward_hook(functools.partial(_add_orthogonal_regulariser, adapter_name))
        record.on_undo(handle.remove)
        record.set_attribute(model, ALLOCATOR_ATTRIBUTE, RankAllocator(model, config, adapter_name))

    return apply


def _layers(model: nn.Module, adapter_name: str):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SVDLinear) and adapter_name in m.lora_A]


def orthogonal_regulariser(model: nn.Module, adapter_name: str) -> torch.Tensor | float:
    """mean over every lora_A / lora_B p of ‖PPᵀ − I‖_F (A) or ‖PᵀP − I‖_F (B), as PEFT's
    AdaLoraModel.forward computes it (norm not squared; 0 without layers)."""
    total, count = 0, 0
    for _, layer in _layers(model, adapter_name):
        for p, gram in ((layer.lora_A[adapter_name], lambda t: t @ t.T), (layer.lora_B[adapter_name], lambda t: t.T @ t)):
            cov = gram(p)
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    return total / count if count else 0


def _add_orthogonal_regulariser(adapter_name: str, model: nn.Module, args, output):
    """Forward hook: output.loss += orth_reg_weight · regulariser, when the output has a loss."""
    loss = getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor):
        return output
    allocator = getattr(model, ALLOCATOR_ATTRIBUTE)
    allocator.note_forward(model.training)
    output.loss = loss + allocator.config.orth_reg_weight * orthogonal_regulariser(model, adapter_name)
    return output


def _trained_biases(model: nn.Module, config: AdaLoraConfig) -> dict[str, torch.Tensor]:
    if config.bias == "all":
        return {n: p for n, p in model.named_parameters() if "bias" in n and "lora_" not in n}
    if config.bias == "lora_only":
        return {f"{name}.base_layer.bias": layer.base_layer.bias for name, layer in model.named_modules()
                if isinstance(layer, SVDLinear) and getattr(layer.base_layer, "bias", None) is not None}  # fmt: skip
    return {}


# --------------------------------------------------------------------------------------------
# The rank allocator (PEFT's RankAllocator and AdaLoraModel.update_and_allocate, same arithmetic).
# --------------------------------------------------------------------------------------------


class RankAllocator:
    """Importance EMAs per adapter tensor and the budget schedule. Keys are the model's parameter
    names, as PEFT's (`<module>.lora_A.<adapter>`), so rank_pattern is PEFT's too."""

    # training forwards without an update_and_allocate call before the warning (PEFT's trap)
    WARN_AFTER_FORWARDS = 8

    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str):
        self.config, self.adapter_name = config, adapter_name
        self.reset_ipt()
        self.init_bgt, names = 0, set()
        for n, p in model.named_parameters():
            if f"lora_A.{adapter_name}" in n:
                self.init_bgt += p.size(0)
                names.add(n.replace("lora_A", "%s"))
        self.name_set = sorted(names)
        self.target_bgt = config.target_r * len(self.name_set)
        self.calls, self.training_forwards, self.warned = 0, 0, False

    def reset_ipt(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def note_forward(self, training: bool) -> None:
        """Warn once when a model trains without update_and_allocate being called (PEFT's silent
        trap: without it AdaLoRA is LoRA in SVD form, nothing is pruned)."""
        if not training or self.calls or self.warned:
            return
        self.training_forwards += 1
        if self.training_forwards >= self.WARN_AFTER_FORWARDS:
            self.warned = True
            warnings.warn("AdaLoRA: the model has trained without peftkern.update_and_allocate(model, step) being "
                          "called, so no rank is ever pruned. Call it after each optimizer.step() (before "
                          "zero_grad), or pass callbacks=[peftkern.AdaLoraCallback()] to transformers' Trainer.")  # fmt: skip

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt), step % c.deltaT == 0

    def _tensors(self, model: nn.Module):
        """(name, parameter) as PEFT's loops see them: every parameter with "lora_" and the
        adapter name in its name, in the model's order."""
        return [(n, p) for n, p in model.named_parameters() if "lora_" in n and self.adapter_name in n]

    @torch.no_grad()
    def update_ipt(self, model: nn.Module) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for n, p in self._tensors(model):
            if p.grad is None:
                raise RuntimeError(f"update_and_allocate: {n} has no gradient; call it after loss.backward() and "
                                   "optimizer.step(), before zero_grad()")  # fmt: skip
            if n not in self.ipt:
                self.ipt[n], self.exp_avg_ipt[n], self.exp_avg_unc[n] = (torch.zeros_like(p) for _ in range(3))
            self.ipt[n] = (p * p.grad).abs().detach()
            self.exp_avg_ipt[n] = b1 * self.exp_avg_ipt[n] + (1 - b1) * self.ipt[n]
            self.exp_avg_unc[n] = b2 * self.exp_avg_unc[n] + (1 - b2) * (self.ipt[n] - self.exp_avg_ipt[n]).abs()

    def _score(self, n: str) -> torch.Tensor:
        return self.exp_avg_ipt[n] * self.exp_avg_unc[n]

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Zero the E entries of the triplets scoring <= the (init − budget)-th smallest score
        S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki); returns rank_pattern."""
        vector_ipt, value_ipt = {}, {}
        for n, _ in self._tensors(model):
            if f"lora_A.{self.adapter_name}" in n:
                vector_ipt.setdefault(n.replace("lora_A", "%s"), []).append(self._score(n).mean(dim=1, keepdim=True))
            if f"lora_B.{self.adapter_name}" in n:
                vector_ipt.setdefault(n.replace("lora_B", "%s"), []).append(self._score(n).mean(dim=0).view(-1, 1))
            if f"lora_E.{self.adapter_name}" in n:
                value_ipt[n.replace("lora_E", "%s")] = self._score(n)
        triplet_ipt, all_score = {}, []
        for name_m, vectors in vector_ipt.items():
            summed = value_ipt[name_m].view(-1) + torch.cat(vectors, dim=1).sum(dim=1).view(-1)
            triplet_ipt[name_m % "lora_E"] = summed.view(-1, 1)
            all_score.append(summed.view(-1))
        k = self.init_bgt - budget
        rank_pattern = {}
        # k <= 0 (init_r == target_r): nothing to prune; PEFT's kthvalue would raise here
        threshold = torch.kthvalue(torch.cat(all_score), k=k)[0].item() if k > 0 else -math.inf
        for n, p in self._tensors(model):
            if f"lora_E.{self.adapter_name}" in n:
                p.masked_fill_(triplet_ipt[n] <= threshold, 0.0)
                rank_pattern[n] = (~(triplet_ipt[n] <= threshold)).view(-1).tolist()
        return rank_pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, model: nn.Module, rank_pattern: dict) -> None:
        truncated = self.adapter_name not in next(iter(rank_pattern))
        for n, p in self._tensors(model):
            if f"lora_E.{self.adapter_name}" in n:
                key = n.replace(f".{self.adapter_name}", "") if truncated else n
                mask = torch.tensor(rank_pattern[key], dtype=torch.bool, device=p.device).unsqueeze(-1)
                p.masked_fill_(~mask, 0.0)

    def update_and_allocate(self, model: nn.Module, global_step: int) -> None:
        """AdaLoraModel.update_and_allocate: before total_step − tfinal, update the importance and
        mask on schedule; at it, a final mask (rank_pattern fixed); after it, re-apply that mask."""
        self.calls += 1
        c = self.config
        final = c.total_step - c.tfinal
        if global_step < final:
            self.update_ipt(model)
            budget, mask_ind = self.budget_schedule(global_step)
            if mask_ind:
                rank_pattern = self.mask_to_budget(model, budget)
                if rank_pattern:
                    c.rank_pattern = rank_pattern
        elif global_step == final:
            budget, _ = self.budget_schedule(global_step)
            c.rank_pattern = self.mask_to_budget(model, budget)
            self.reset_ipt()
        elif c.rank_pattern:
            self.mask_using_rank_pattern(model, c.rank_pattern)


def update_and_allocate(model: nn.Module, global_step: int) -> None:
    """`model.base_model.update_and_allocate(step)` of PEFT for a model patched with AdaLoRA: call
    it once per optimizer step, after optimizer.step() and before zero_grad() (under gradient
    accumulation: once per optimizer step, not per micro-batch)."""
    record = PatchRecord.required(model, "peftkern.patch(model, AdaLoraConfig(...)) first")
    allocator = getattr(model, ALLOCATOR_ATTRIBUTE, None)
    if record.method != "ADALORA" or allocator is None:
        raise TypeError(f"update_and_allocate is for AdaLoRA models; this one has {record.method} adapters")
    allocator.update_and_allocate(model, int(global_step))


@functools.lru_cache(maxsize=None)
def make_trainer_callback():
    """A transformers TrainerCallback calling update_and_allocate(model, state.global_step) at
    every optimizer step (on_optimizer_step: after optimizer.step(), before zero_grad(); once per
    optimizer step under gradient accumulation)."""
    from transformers import TrainerCallback

    class AdaLoraCallback(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            update_and_allocate(model, state.global_step)

    return AdaLoraCallback


# --------------------------------------------------------------------------------------------
# Checkpoints: pruned to rank_pattern both ways.
# --------------------------------------------------------------------------------------------


def _pattern(config: AdaLoraConfig, adapter_name: str) -> dict[str, list[bool]]:
    """rank_pattern keyed by `<module>` (PEFT's saved keys are `<module>.lora_E`, in memory
    `<module>.lora_E.<adapter>`)."""
    out = {}
    for key, keep in (config.rank_pattern or {}).items():
        key = key.removesuffix(f".{adapter_name}")
        out[key.removesuffix(".lora_E")] = list(keep)
    return out


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT's checkpoint keys (no `.weight`, no adapter name): `<m>.lora_A` [r′, in], `.lora_B`
    [out, r′], `.lora_E` [r′, 1], pruned to rank_pattern where the layer still holds init_r rows
    (a loaded, already pruned layer is saved as it is); trained biases."""
    config = PatchRecord.required(model).adapters[adapter_name]
    pattern = _pattern(config, adapter_name)
    tensors = {}
    for name, layer in _layers(model, adapter_name):
        a, b, e = layer.lora_A[adapter_name], layer.lora_B[adapter_name], layer.lora_E[adapter_name]
        keep = pattern.get(name)
        if keep is not None and sum(keep) != a.shape[0]:
            rows = torch.tensor(keep, dtype=torch.bool, device=a.device)
            a, b, e = a[rows], b[:, rows], e[rows]
        tensors.update({f"{name}.lora_A": a, f"{name}.lora_B": b, f"{name}.lora_E": e})
    tensors.update(_trained_biases(model, config))
    return tensors


def prepare_load(model: nn.Module, adapter_name: str, tensors: dict) -> dict:
    """Resize the freshly patched layers (init_r) to the checkpoint's rank_pattern, as PEFT's
    resize_modules_by_rank_pattern, so that the pruned tensors fit."""
    config = PatchRecord.required(model).adapters[adapter_name]
    layers = dict(_layers(model, adapter_name))
    for name, keep in _pattern(config, adapter_name).items():
        if name not in layers:
            raise KeyError(f"the checkpoint's rank_pattern names {name!r}, which is not an AdaLoRA layer of this model")
        if len(keep) != layers[name].lora_A[adapter_name].shape[0]:
            raise ValueError(f"rank_pattern[{name!r}] has {len(keep)} entries; the layer has init_r="
                             f"{layers[name].lora_A[adapter_name].shape[0]}")  # fmt: skip
        layers[name].resize(adapter_name, keep)
    return tensors
