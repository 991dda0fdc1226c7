"""Several adapters in one patched model, by name, as Hugging Face PEFT's PeftModel keeps them:
`add_adapter`, `set_adapter`, `delete_adapter`, `disable_adapter()`, `list_adapters`,
`active_adapter`. For LoRA (dense and NF4 bases) and IA³; any mix of them in one batch runs with
`model(..., adapter_names=[...])` / `model.generate(..., adapter_names=[...])`: the hooks for that
are here too (`install`), the per-call state that layers read is `peftkern.mixed`.

PEFT's rules: one adapter is active (the one forward and merge use); only its parameters are
trainable; adapters are of one method per model; an added adapter may target other modules than
the first (layers it does not reach run their base for it); deleting the active adapter makes the
first remaining one active; `set_adapter` on a merged model unmerges first (with a warning).
Stricter than PEFT: only the first adapter may train base biases (`bias`) or `modules_to_save`.
"""

from __future__ import annotations

import contextvars
import functools
import types
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from . import mixed
from .methods import resolve_config
from .record import PatchRecord

# The methods whose models hold several adapters and run mixed batches.
MULTI_ADAPTER_METHODS = ("LORA", "IA3")


def _record(model: nn.Module) -> PatchRecord:
    record = PatchRecord.required(model, "peftkern.patch(model, config) first")
    if record.from_peft:
        raise TypeError("this is a patched peft.PeftModel: manage its adapters with PEFT (peftkern.unpatch first)")
    return record


def list_adapters(model: nn.Module) -> list[str]:
    """The adapters of a patched model, in the order they were added."""
    return list(_record(model).adapters)


def active_adapter(model: nn.Module) -> str | None:
    """The adapter that forward, merge and training use (None when every adapter was deleted)."""
    return _record(model).active


def _activate(model: nn.Module, record: PatchRecord, name: str | None) -> None:
    """Make `name` the active adapter of every layer, and its parameters the trainable ones."""
    record.active = name
    for layer in record.layers(model):
        if hasattr(layer, "adapter_parameters"):
            layer.active_adapter = name
            for adapter in record.adapters:
                for parameter in layer.adapter_parameters(adapter):
                    parameter.requires_grad_(adapter == name)


def add_adapter(model: nn.Module, adapter_name: str, config) -> nn.Module:
    """Add another adapter, of the model's method, under a new name; the active one stays active
    (`set_adapter` switches). Everything is checked before anything changes, and a failure midway
    undoes what this call did."""
    method, config = checked_new_adapter(model, adapter_name, config)
    apply_new_adapter(model, method, config, adapter_name)
    return model


def checked_new_adapter(model: nn.Module, adapter_name: str, config):
    """(method module, validated config) for a new adapter of a patched model, or raise."""
    record = _record(model)
    if record.method not in MULTI_ADAPTER_METHODS:
        raise NotImplementedError(f"several adapters per model: LoRA and IA³ so far, not {record.method}")
    if not isinstance(adapter_name, str) or not adapter_name or adapter_name == mixed.BASE:
        raise ValueError(f"adapter_name must be a non-empty name other than '__base__', got {adapter_name!r}")
    if adapter_name in record.adapters:
        raise ValueError(f"the model already has an adapter named {adapter_name!r} (delete_adapter it first)")
    method, config = resolve_config(config)
    if config.peft_type != record.method:
        raise ValueError(f"the model's adapters are {record.method}; cannot add a {config.peft_type} adapter")
    extras = {"modules_to_save": getattr(config, "modules_to_save", None),
              "bias": getattr(config, "bias", "none") != "none",
              "a task_type head": bool(getattr(config, "classifier_heads", lambda: ())())}  # fmt: skip
    used = [k for k, v in extras.items() if v]
    if used:
        raise NotImplementedError(f"only the first adapter of a model may use {used[0]} in peftkern")
    return method, config


def apply_new_adapter(model: nn.Module, method, config, adapter_name: str) -> PatchRecord:
    """Apply a checked adapter (`checked_new_adapter`); return what it changed, which the model's
    record has taken over (`retract_adapter` undoes exactly that)."""
    record = _record(model)
    changes = PatchRecord(model)
    changes.apply_or_undo(model, method.plan_patch(model, config, adapter_name))
    record.absorb(changes)
    record.adapters[adapter_name] = config
    _activate(model, record, record.active)
    return changes


def retract_adapter(model: nn.Module, adapter_name: str, changes: PatchRecord) -> None:
    """Undo exactly what `apply_new_adapter` did (load_adapter, when the checkpoint turns out not to fit)."""
    record = _record(model)
    record.retract(model, changes)
    del record.adapters[adapter_name]
    _activate(model, record, record.active)


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make `adapter_name` the active adapter (forward, merge, training)."""
    record = _record(model)
    if adapter_name not in record.adapters:
        raise ValueError(f"no adapter named {adapter_name!r} (the model has {list(record.adapters)})")
    layers = record.layers(model)
    if any(layer.merged for layer in layers):
        warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2)
        for layer in layers:
            layer.unmerge()
    _activate(model, record, adapter_name)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove an adapter's parameters from every layer. Layers wrapped for it alone stay wrapped
    (running their base) until unpatch. Deleting the active adapter activates the first remaining one."""
    record = _record(model)
    if adapter_name not in record.adapters:
        raise ValueError(f"no adapter named {adapter_name!r} (the model has {list(record.adapters)})")
    for layer in record.layers(model):
        if hasattr(layer, "delete_adapter"):
            layer.delete_adapter(adapter_name)
    del record.adapters[adapter_name]
    active = record.active
    if active == adapter_name:
        active = next(iter(record.adapters), None)
        if active is not None:
            warnings.warn(f"deleted the active adapter {adapter_name!r}; {active!r} is active now", stacklevel=2)
    _activate(model, record, active)
    return model


@contextmanager
def disable_adapter(model: nn.Module):
    """`with peftkern.disable_adapter(model): ...` runs the base model alone (merged adapters are
    unmerged first, and stay unmerged), then turns the adapters back on, as PEFT's context."""
    record = _record(model)
    layers = [layer for layer in record.layers(model) if hasattr(layer, "disabled")]
    others = [type(layer).__name__ for layer in record.layers(model) if not hasattr(layer, "disabled")]
    if others or record.method not in MULTI_ADAPTER_METHODS:
        raise NotImplementedError(f"disable_adapter: LoRA and IA³ models so far (this one has {others[:1] or record.method})")
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


# ---------------------------------------------------------------------------------------------
# Mixed batches: the hooks that take `adapter_names` (installed by patch, removed by unpatch).
# ---------------------------------------------------------------------------------------------


def mixed_batch(model: nn.Module, record: PatchRecord, adapter_names, expandable: bool) -> mixed.MixedBatch:
    """`adapter_names` as a MixedBatch, after PEFT's checks: a list of known names (or
    "__base__"), eval mode, nothing merged."""
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of adapter names (one per sequence), got {adapter_names!r}")
    if model.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode (call model.eval()).")
    unknown = sorted({n for n in adapter_names if n != mixed.BASE} - set(record.adapters))
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)} "
                         f"(this model has {list(record.adapters)}; {mixed.BASE!r} for none)")  # fmt: skip
    if any(layer.merged for layer in record.layers(model)):
        raise ValueError("Cannot pass `adapter_names` when there are merged adapters: peftkern.unmerge(model) first.")
    return mixed.MixedBatch(adapter_names, expandable)


_GENERATE = "_peftkern_inner_generate"
# The tokens of the mixed batches that forward pre-hooks made current, innermost last, per thread
# and per context: a forward in one thread never pops (or sees) another thread's batch.
_HOOK_TOKENS: contextvars.ContextVar[tuple] = contextvars.ContextVar("peftkern_mixed_hook_tokens", default=())


def _check_length(names, inputs) -> None:
    """PEFT's check, once per call: one name per sequence of the input (input_ids or
    inputs_embeds), also where no layer would read the names (an empty list, say)."""
    batch = next((t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    if batch is not None and len(names) != batch:
        raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(names)} and {batch} respectively.")  # fmt: skip


def _pre_forward(record: PatchRecord, model, args, kwargs):
    names = kwargs.pop("adapter_names", None)
    token = None
    if names is not None:
        batch = mixed_batch(model, record, names, expandable=False)
        _check_length(names, (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]))
        token = mixed.push(batch)
    _HOOK_TOKENS.set((*_HOOK_TOKENS.get(), token))
    return args, kwargs


def _post_forward(model, args, output):
    tokens = _HOOK_TOKENS.get()
    if tokens:
        _HOOK_TOKENS.set(tokens[:-1])
        if tokens[-1] is not None:
            mixed.pop(tokens[-1])


def _generate(record: PatchRecord, self, *args, adapter_names=None, **kwargs):
    inner = self.__dict__.get(_GENERATE) or types.MethodType(type(self).generate, self)
    if adapter_names is None:
        return inner(*args, **kwargs)
    batch = mixed_batch(self, record, adapter_names, expandable=True)
    _check_length(adapter_names, (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]))
    with mixed.using(batch):
        return inner(*args, **kwargs)


def install(model: nn.Module, record: PatchRecord) -> None:
    """Accept `adapter_names` in `model(...)` and `model.generate(...)`, checked against `record`;
    the record's undo removes both."""
    record.on_undo(model.register_forward_pre_hook(functools.partial(_pre_forward, record), with_kwargs=True).remove)
    record.on_undo(model.register_forward_hook(_post_forward, always_call=True).remove)
    if callable(getattr(model, "generate", None)):
        previous = model.__dict__.get("generate")  # an instance-level generate someone installed before us
        if previous is not None:
            record.set_attribute(model, _GENERATE, previous)
        record.set_attribute(model, "generate", types.MethodType(functools.partial(_generate, record), model))


__all__ = ["active_adapter", "add_adapter", "delete_adapter", "disable_adapter", "list_adapters", "set_adapter"]
