"""`peftkern.patch(model, config)`: swap PEFT methods into a Hugging Face model in place, with
PEFT's module-matching rules, and undo it exactly with `unpatch`.

Everything is checked before anything changes: a bad config, no matching module, or a matched
module of an unsupported type raises with the module's name, and the model is left untouched.
"""

from __future__ import annotations

import re

from torch import nn

from .methods import lora as lora_method
from .nf4 import NF4Linear

# PEFT's default LoRA targets per architecture (used when target_modules is None).
DEFAULT_LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
}
_PATCH_RECORD = "_peftkern_patch_record"


def _layer_index(key: str, layers_pattern) -> int | None:
    """The first numbered path segment (the decoder layer), as PEFT reads it."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match.group("idx")) if match else None


def is_target(config: lora_method.LoraConfig, key: str, all_linear: set[str] | None = None) -> bool:
    """PEFT's rule: exclude_modules first; then a str target is a regex full-match, a list
    matches the exact name or a ".suffix"; layers_to_transform filters list matches by layer."""
    exclude = config.exclude_modules
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    targets = config.target_modules
    if all_linear is not None:
        return key in all_linear
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = config.layers_to_transform
    if found and layers is not None and (not isinstance(layers, list) or layers):
        index = _layer_index(key, config.layers_pattern)
        if index is None:
            return False
        return index == layers if isinstance(layers, int) else index in layers
    return found


def _resolve_targets(model: nn.Module, config: lora_method.LoraConfig):
    if config.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_LORA_TARGETS:
            raise ValueError(
                f"target_modules is not set and there is no default for model type {model_type!r}; "
                "name the modules to adapt (e.g. target_modules=['q_proj', 'v_proj'])"
            )
        config.target_modules = DEFAULT_LORA_TARGETS[model_type]
    all_linear = None
    if config.target_modules == "all-linear":
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        all_linear = {n for n, m in model.named_modules() if lora_method.supports(m) and m is not output and n}
    return all_linear


def patch(model: nn.Module, config, adapter_name: str = "default", quantize: str | None = None) -> nn.Module:
    """Swap LoRA layers into `model` in place (it is returned too). `config`: a
    `peftkern.LoraConfig`, a `peft.LoraConfig` or a dict of PEFT's field names.
    Freezes every parameter but the adapters, as PEFT does.

    Bases may be dense (`nn.Linear`, `Conv1D`) or NF4 (bitsandbytes `Linear4bit`, read without
    copying): QLoRA. `quantize="nf4"` quantizes the targeted dense `nn.Linear` bases to NF4
    (blocksize 64, double quantization, as QLoRA) and frees their dense weights; `unpatch` then
    gives back the NF4 layers, not the dense ones."""
    if getattr(model, _PATCH_RECORD, None):
        raise RuntimeError("this model is already patched; unpatch it first (several adapters come later)")
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    config = lora_method.LoraConfig.from_any(config)
    config.validate()
    all_linear = _resolve_targets(model, config)

    matched = [(name, module) for name, module in model.named_modules() if name and is_target(config, name, all_linear)]
    if not matched:
        raise ValueError(f"no module of {type(model).__name__} matches target_modules={config.target_modules!r}")
    for name, module in matched:
        if not lora_method.supports(module):
            raise TypeError(
                f"module {name!r} matches target_modules but is a {type(module).__name__}; peftkern's LoRA "
                "supports nn.Linear, transformers' Conv1D and bitsandbytes' Linear4bit (NF4) bases so far"
            )
        lora_method.nf4_base_weight(module)  # a Linear4bit that is not quantized yet fails here, early
        if quantize and not isinstance(module, nn.Linear):
            raise NotImplementedError(f"quantize='nf4' supports nn.Linear bases; {name!r} is a {type(module).__name__}")

    # Only now change the model; record enough to undo every change exactly.
    record = {
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "swaps": [],
        "config": config,
        "adapter_name": adapter_name,
    }
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    progress = matched
    if quantize:
        try:
            from tqdm.auto import tqdm

            progress = tqdm(matched, desc="peftkern: quantizing to NF4", unit="layer", disable=None)
        except ImportError:
            pass
    for name, module in progress:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if quantize and lora_method.nf4_base_weight(module) is None:
            module = NF4Linear.from_linear(module)  # the dense weight is released with the old module
        setattr(parent, attr, lora_method.LoraLinear(module, adapter_name, config))
        record["swaps"].append((parent_name, attr, module))
    setattr(model, _PATCH_RECORD, record)
    return model


def _patched_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, lora_method.LoraLinear)]


def _take_record(model: nn.Module) -> dict:
    record = getattr(model, _PATCH_RECORD, None)
    if not record:
        raise RuntimeError("this model was not patched by peftkern")
    return record


def _restore(model: nn.Module, record: dict) -> nn.Module:
    """Put back the recorded modules and requires_grad flags."""
    for parent_name, attr, original in record["swaps"]:
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, original)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(record["requires_grad"].get(name, parameter.requires_grad))
    delattr(model, _PATCH_RECORD)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put back the original modules and requires_grad flags (merged weights are unmerged first)."""
    record = _take_record(model)
    for layer in _patched_layers(model):
        layer.unmerge()
    return _restore(model, record)


def merge(model: nn.Module) -> nn.Module:
    """Fold every active adapter into its base weight (forward then runs the base alone)."""
    for layer in _patched_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for layer in _patched_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put the (now merged) base modules back: a plain model with the adapters baked in."""
    record = _take_record(model)
    merge(model)
    return _restore(model, record)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all): NF4 weights count as the elements they stand for, as PEFT counts 4-bit."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quantized = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, sum(p.numel() for p in model.parameters()) + quantized


def print_trainable_parameters(model: nn.Module) -> None:
    """As PEFT prints it."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
