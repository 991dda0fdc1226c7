"""`peftkern.patch(model, config)`: swap PEFT methods into a Hugging Face model in place, with
PEFT's module-matching rules (`peftkern.targeting`), and undo it exactly with `unpatch`.

Everything is checked before anything changes: a bad config, no matching module, or a matched
module of an unsupported type raises with the module's name, and the model is left untouched.
Should applying still fail midway, the changes made so far are undone before the error propagates:
a model is never left half-patched. What was changed is kept in the model's `PatchRecord`.
"""

from __future__ import annotations

import warnings

from torch import nn

from . import hf_integration, multi_adapter
from .methods import AdapterLayer, from_peft, resolve_config
from .nf4 import NF4Linear
from .record import PatchRecord

MULTI_ADAPTER_METHODS = multi_adapter.MULTI_ADAPTER_METHODS  # kept importable from here


def patch(model: nn.Module, config=None, adapter_name: str = "default", fused_loss: bool = True,
          **options) -> nn.Module:  # fmt: skip
    """Apply a PEFT method to `model` in place (it is returned too). `config`: a peftkern config
    (`peftkern.LoraConfig`, ...), the matching `peft` config object, or a dict of PEFT's field
    names (its `peft_type` picks the method; LORA when absent). Freezes every parameter but the
    adapter's, as PEFT does.

    LoRA options: bases may be dense (`nn.Linear`, `Conv1D`) or NF4 (bitsandbytes `Linear4bit`,
    read without copying): QLoRA. `quantize="nf4"` quantizes the targeted dense `nn.Linear` bases
    to NF4 (blocksize 64, double quantization, as QLoRA) and frees their dense weights; `unpatch`
    then gives back the NF4 layers, not the dense ones.

    `fused_loss` (default True): a transformers causal LM computes its training loss with
    peftkern's fused cross-entropy (`peftkern.ops.cross_entropy.causal_lm_loss`: transformers'
    ForCausalLMLoss without the [tokens, vocab] log-probabilities); the logits it returns are
    unchanged. False keeps transformers' loss.

    A Hugging Face `peft.PeftModel` is patched without a config: its LoRA / DoRA / IA³ layers are
    swapped for peftkern's, sharing PEFT's own parameters (see `peftkern.methods.from_peft`)."""
    if PatchRecord.of(model) is not None:
        raise RuntimeError("this model is already patched: peftkern.add_adapter(model, name, config) adds another "
                           "adapter, peftkern.unpatch(model) undoes the patch")  # fmt: skip
    if from_peft.is_peft_model(model):
        if config is not None:
            raise TypeError("model is a peft.PeftModel: call peftkern.patch(model) without a config; its own "
                            "adapters are taken over")  # fmt: skip
        # requires_grad flags are PEFT's and stay as they are
        return _apply_recorded(model, PatchRecord(model, from_peft=True), from_peft.plan_patch(model, **options),
                               freeze=False)  # fmt: skip
    if config is None:
        raise TypeError("peftkern.patch(model, config): a config is required unless model is a peft.PeftModel")
    method, config = resolve_config(config)
    plan = method.plan_patch(model, config, adapter_name, **options)

    def apply(record: PatchRecord) -> None:
        plan(record)
        if config.peft_type in MULTI_ADAPTER_METHODS:  # model(..., adapter_names=[...]) and generate(...)
            multi_adapter.install(model, record)
        hf_integration.install(model, record, fused_loss)  # Trainer, save_pretrained, checkpointing, loss

    record = PatchRecord(model, method=config.peft_type, config=config, adapter_name=adapter_name)
    return _apply_recorded(model, record, apply, freeze=True)


def _apply_recorded(model: nn.Module, record: PatchRecord, apply, freeze: bool) -> nn.Module:
    """Only now change the model, recording every change in `record` (made before anything
    changed, so it holds the original requires_grad flags): freeze every parameter first when
    asked (the method then unfreezes its own), and undo everything if applying fails midway."""
    if freeze:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    record.apply_or_undo(model, apply)
    record.attach(model)
    return model


def _restore(model: nn.Module, record: PatchRecord) -> nn.Module:
    record.undo(model)
    PatchRecord.detach(model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put back the original modules and requires_grad flags (merged weights are unmerged first)."""
    record = PatchRecord.required(model)
    for layer in record.layers(model):
        layer.unmerge()
        layer.restore_base()
    return _restore(model, record)


def merge(model: nn.Module, keep_original: bool = True) -> nn.Module:
    """Fold every active adapter into its base weight (forward then runs the base alone). The
    weights from before are kept on the CPU (`keep_original`), so unmerge and unpatch restore
    them bit for bit; pass False to save that memory, and unmerge then subtracts / divides the
    adapter back out, which rounds (as PEFT's unmerge)."""
    for layer in _mergeable_layers(model):
        layer.merge(keep_original)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for layer in _mergeable_layers(model):
        layer.unmerge()
    return model


def _mergeable_layers(model: nn.Module) -> list[AdapterLayer]:
    """The adapter layers of a patched model; raises for an unpatched one, or one whose method
    has no weights to merge into (prefix and prompt tuning), instead of doing nothing."""
    record = PatchRecord.required(model)
    layers = record.layers(model)
    if not layers:
        raise NotImplementedError(f"{record.method or 'these'} adapters cannot be merged: they add no weight to a layer")
    unmergeable = sorted({type(layer).__name__ for layer in layers if type(layer).merge is AdapterLayer.merge})
    if unmergeable:  # refused before any layer merges (a union: LoRA with a bottleneck adapter)
        raise NotImplementedError(f"{', '.join(unmergeable)} layers cannot be merged into a weight")
    if any(getattr(layer, "gated", False) for layer in layers):  # UniPELT: the gate depends on the input
        raise NotImplementedError("gated (UniPELT) LoRA layers cannot be merged into a weight: the gate depends on the input")
    return layers


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put the (now merged) base modules back: a plain model with the adapters baked in."""
    record = PatchRecord.required(model)
    if record.from_peft:
        raise TypeError("this is a patched peft.PeftModel: peftkern.unpatch(model), then model.merge_and_unload()")
    merge(model, keep_original=False)  # the merged weights stay: nothing to restore later
    unloaded = []
    for parent_name, attr, _ in record.swaps:
        current = getattr(model.get_submodule(parent_name) if parent_name else model, attr)
        if isinstance(current, AdapterLayer):
            unloaded.append((parent_name, attr, current.unloaded()))
    _restore(model, record)
    for parent_name, attr, module in unloaded:
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)
    return model


def patch_record(model: nn.Module) -> PatchRecord | None:
    """Deprecated: `peftkern.record.PatchRecord.of(model)` (a PatchRecord now, no longer a dict)."""
    warnings.warn("peftkern.patch.patch_record is deprecated: use peftkern.record.PatchRecord.of(model)",
                  DeprecationWarning, stacklevel=2)  # fmt: skip
    return PatchRecord.of(model)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all): NF4 weights count as the elements they stand for, as PEFT counts 4-bit."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quantized = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, sum(p.numel() for p in model.parameters()) + quantized


def print_trainable_parameters(model: nn.Module) -> None:
    """As PEFT prints it."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
