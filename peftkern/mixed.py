"""The per-call state of a mixed-adapter batch, which layers read: `model(..., adapter_names=[...])`
and `model.generate(..., adapter_names=[...])` run each sequence of a batch with its own adapter
("__base__": none), as Hugging Face PEFT's `adapter_names` does, for LoRA and IA³.

How it works: the hooks that `peftkern.multi_adapter` installs on a patched model take
`adapter_names` out of the call, check them against the model's patch record, and make them the
current `MixedBatch` (a context variable) for the length of the call. Each LoRA / IA³ layer then
maps the names to the adapters it holds (`row_slots`: one int32 per row of its input, -1 for
none) and calls one grouped op for all of them (`peftkern.ops.grouped`): no Python loop over
sub-batches, as punica / S-LoRA.

The names are turned into device tensors once per call and per distinct set of adapters a layer
holds (not once per layer), so a forward costs one small host-to-device copy, not one per layer.
IA³ layers stack the vectors they need once per call too (kept here, so a `generate` stacks them
once for all its steps, and nothing cached outlives the call or a change to the adapters); LoRA
layers pass their adapters' weights to the grouped op as lists, with no stacking at all.
Inside `generate`, a batch that beam search or num_return_sequences has expanded k-fold (HF
repeats each sequence k times in place) takes each name k times, as PEFT does for beams.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch

BASE = "__base__"  # PEFT's name for rows that run without an adapter

_CURRENT: contextvars.ContextVar["MixedBatch | None"] = contextvars.ContextVar("peftkern_mixed_batch", default=None)


def current() -> "MixedBatch | None":
    """The mixed batch of the forward being run, or None (every row uses the active adapter)."""
    return _CURRENT.get()


class MixedBatch:
    """One call's `adapter_names`: the adapter of each sequence (each entry of the batch dim)."""

    def __init__(self, names: list[str], expandable: bool):
        self.names = list(names)
        self.expandable = expandable  # inside generate(): the batch may be a k-fold expansion
        self._slots: dict[tuple, torch.Tensor] = {}
        self.stacks: dict[tuple, object] = {}  # IA³ layers' stacked vectors, built once per call

    def adapters_in(self, available) -> tuple[str, ...]:
        """The adapters this batch uses that a layer holds (in `available`), in first-use order;
        names the layer lacks run as the base there, as in PEFT."""
        seen: dict[str, None] = {}
        for name in self.names:
            if name != BASE and name in available:
                seen.setdefault(name)
        return tuple(seen)

    def _repeat(self, batch: int) -> int:
        """How many times each name repeats along a batch of `batch` sequences (1, or k inside
        generate when beam search / num_return_sequences expanded the batch k-fold)."""
        if batch == len(self.names):
            return 1
        if self.expandable and self.names and batch % len(self.names) == 0:
            return batch // len(self.names)
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(self.names)} and {batch} respectively."
        )

    def sequences_of(self, name: str, batch: int) -> list[int]:
        """The batch indices of the sequences that use adapter `name`."""
        repeat = self._repeat(batch)
        return [i for i in range(batch) if self.names[i // repeat] == name]

    def row_slots(self, adapters: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        """int32 [rows]: for each row of x flattened to [rows, features], the index of its
        adapter in `adapters` (-1: none). x is [batch, ..., features], batch = len(names)."""
        if x.dim() < 2:
            raise ValueError(f"adapter_names needs an input with a batch dimension, got shape {tuple(x.shape)}")
        batch, per_sequence = x.shape[0], x[0].numel() // max(x.shape[-1], 1)
        repeat = self._repeat(batch)
        key = (adapters, x.device, repeat, per_sequence)
        slots = self._slots.get(key)
        if slots is None:
            index = {name: i for i, name in enumerate(adapters)}
            per_name = [index.get(name, -1) for name in self.names for _ in range(repeat)]
            slots = torch.tensor(per_name, dtype=torch.int32).to(x.device, non_blocking=True)
            if per_sequence != 1:
                slots = slots.repeat_interleave(per_sequence)
            self._slots[key] = slots
        return slots


@contextmanager
def using(batch: MixedBatch):
    """Make `batch` the current mixed batch for the duration."""
    token = _CURRENT.set(batch)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def push(batch: MixedBatch) -> contextvars.Token:
    """Make `batch` current until `pop(token)` (for a pair of forward hooks)."""
    return _CURRENT.set(batch)


def pop(token: contextvars.Token) -> None:
    _CURRENT.reset(token)
