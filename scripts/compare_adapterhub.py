"""peftkern's bottleneck adapters, UniPELT and MAM against AdapterHub's `adapters` package
itself, in two steps (`adapters` pins its own transformers, so it lives in a separate venv; never
install it into peftkern's):

    # 0. once: a venv with torch (CPU) and adapters, which brings its own transformers (4.x)
    python3.11 -m venv /tmp/ahenv && /tmp/ahenv/bin/pip install torch adapters==1.3.0 safetensors
    # 1. in that venv: tiny models, random adapters, their logits (and for the hybrids gradients)
    /tmp/ahenv/bin/python scripts/compare_adapterhub.py produce /tmp/ah
    # 2. in peftkern's venv: the same base weights and adapter weights through peftkern.patch
    python scripts/compare_adapterhub.py check /tmp/ah

Step 1 saves, per case, the base model's weights, the adapter weights, input ids and logits;
step 2 rebuilds the model from the same config, loads the weights, patches it with the matching
peftkern config, copies the adapter weights (AdapterHub's names mapped to ours) and compares.
The hybrids (UniPELTConfig, MAMConfig: `HYBRIDS`) are patched with prefix_convention="adapterhub"
(AdapterHub's position ids and prefix embedding) and compare the logits and the gradient of
the LM loss for every adapter tensor, fp32.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0)),
    "bert": ("BertConfig", "BertModel",
             dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
}  # fmt: skip
CASES = [
    (arch, config, kwargs)
    for arch in MODELS
    for config, kwargs in [
        ("SeqBnConfig", dict(reduction_factor=4)),
        ("DoubleSeqBnConfig", dict(reduction_factor=4, scaling="learned")),
        ("ParBnConfig", dict(non_linearity="gelu")),
        ("SeqBnConfig", dict(reduction_factor=8, residual_before_ln=False, non_linearity="gelu_new")),
    ]
] + [("bert", "SeqBnConfig", dict(reduction_factor=4, original_ln_after=False)),
     ("bert", "DoubleSeqBnConfig", dict(reduction_factor=4, original_ln_before=True, residual_before_ln="post_add"))]
# AdapterHub's per-layer module holding the adapter -> the sublayer peftkern wraps
SITE_NAMES = {
    "llama": {"attention_adapters": "self_attn", "output_adapters": "mlp"},
    "gpt2": {"attention_adapters": "attn", "output_adapters": "mlp"},
    "bert": {"attention.output": "attention.output", "output": "output"},
}


HYBRIDS = [("llama", "UniPELTConfig"), ("llama", "MAMConfig"), ("gpt2", "MAMConfig")]
# AdapterHub's hybrid parameter names (adapter "u") -> peftkern's (adapter "default")
HYBRID_NAMES = [
    (r"(.*)\.loras\.u\.lora_([AB])$", r"\1.lora_\2.default_lora.weight"),
    (r"(.*)\.loras\.u\.gate\.(weight|bias)$", r"\1.lora_gate.default_lora.\2"),
    (r".*\.(\d+)\.(self_attn|attn)\.prefix_tuning\.prefix_gates\.u\.(weight|bias)$",
     r"prompt_encoder.default_prefix_tuning.gates.\1.\3"),
    (r".*\.prefix_tunings\.u\.self_prefix\.wte\.weight$", "prompt_encoder.default_prefix_tuning.embedding.weight"),
    (r".*\.prefix_tunings\.u\.self_prefix\.control_trans\.(\d)\.(weight|bias)$",
     r"prompt_encoder.default_prefix_tuning.transform.\1.\2"),
    (r"(.*\.\d+)\.output_adapters\.adapters\.u\.adapter_down\.0\.(.*)$", r"\1.mlp.adapters.default_bottleneck.adapter_down.\2"),
    (r"(.*\.\d+)\.output_adapters\.adapters\.u\.(adapter_up|gate)\.(.*)$", r"\1.mlp.adapters.default_bottleneck.\2.\3"),
]


def build(arch):
    import transformers

    config_cls, model_cls, kwargs = MODELS[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kwargs)
    return getattr(transformers, model_cls)(config, **({"add_pooling_layer": False} if arch == "bert" else {}))


def run(model, arch, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.last_hidden_state if arch == "bert" else out.logits


def produce(directory: Path) -> None:
    import adapters
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1234)
    for i, (arch, config_name, kwargs) in enumerate(CASES):
        model = build(arch).eval()
        base = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
        adapters.init(model)
        model.add_adapter("bn", config=getattr(adapters, config_name)(**kwargs))
        model.set_active_adapters("bn")
        weights = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".adapters.bn." in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + (1.0 if name.endswith("scaling") else 0.0))
                    weights[name] = p.detach().clone().contiguous()
        ids = torch.randint(0, 96, (2, 7), generator=generator)
        save_file({**{f"base.{k}": v for k, v in base.items()}, **{f"adapter.{k}": v for k, v in weights.items()},
                   "ids": ids, "logits": run(model, arch, ids).contiguous()}, str(directory / f"case{i}.safetensors"))  # fmt: skip
        print(f"case{i}: {arch} {config_name} {kwargs}: {len(weights)} adapter tensors")
    (directory / "cases.json").write_text(json.dumps(CASES))


def produce_hybrids(directory: Path) -> None:
    """UniPELT and MAM with AdapterHub's defaults, every adapter tensor random; the logits and the
    gradients of the LM loss (labels = input ids) of every adapter tensor."""
    import adapters
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(4321)
    for i, (arch, config_name) in enumerate(HYBRIDS):
        model = build(arch)
        # Eager attention: with SDPA and no attention mask, transformers 4.x lets SDPA apply its own
        # is_causal mask, aligned top-left, which on AdapterHub's P + T keys hides most of the real
        # keys from each query (found here: the logits then differ from eager's by ~0.2)
        model.config._attn_implementation = "eager"
        base = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
        adapters.init(model)
        model.add_adapter("u", config=getattr(adapters, config_name)())
        model.train_adapter("u")
        model.eval()  # no dropout anywhere; train_adapter left the adapters trainable
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for p in trained.values():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        ids = torch.randint(0, 96, (2, 7), generator=generator)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        save_file({**{f"base.{k}": v for k, v in base.items()},
                   **{f"adapter.{k}": p.detach().clone().contiguous() for k, p in trained.items()},
                   **{f"grad.{k}": p.grad.contiguous() for k, p in trained.items()},
                   "ids": ids, "logits": out.logits.detach().contiguous()}, str(directory / f"hybrid{i}.safetensors"))  # fmt: skip
        print(f"hybrid{i}: {arch} {config_name}: {len(trained)} adapter tensors")
    (directory / "hybrids.json").write_text(json.dumps(HYBRIDS))


def hybrid_name(name: str) -> str:
    for pattern, replacement in HYBRID_NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    raise KeyError(f"no peftkern name for AdapterHub's {name}")


def check_hybrids(directory: Path) -> int:
    import peftkern
    from safetensors.torch import load_file

    failures = 0
    for i, (arch, config_name) in enumerate(json.loads((directory / "hybrids.json").read_text())):
        saved = load_file(str(directory / f"hybrid{i}.safetensors"))
        model = build(arch).eval()
        result = model.load_state_dict({k[5:]: v for k, v in saved.items() if k.startswith("base.")}, strict=False)
        assert not result.missing_keys, result.missing_keys
        model = peftkern.patch(model, getattr(peftkern, config_name)(prefix_convention="adapterhub"))
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        theirs = {k[8:]: v for k, v in saved.items() if k.startswith("adapter.")}
        if arch == "gpt2":  # one prefix module per layer in AdapterHub, the same tensors: ours is one
            theirs = {k: v for k, v in theirs.items() if ".prefix_tunings." not in k or ".h.0." in k}
        names = {k: hybrid_name(k) for k in theirs}
        assert sorted(names.values()) == sorted(params), (sorted(set(params) - set(names.values())),
                                                          sorted(set(names.values()) - set(params)))  # fmt: skip
        with torch.no_grad():
            for name, value in theirs.items():
                params[names[name]].copy_(value)
        out = model(input_ids=saved["ids"], labels=saved["ids"])
        out.loss.backward()
        want = saved["logits"]
        errors = {"logits": ((out.logits - want).abs().max().item(), want.abs().max().item())}
        for name in theirs:
            grad, expected = params[names[name]].grad, saved[f"grad.{name}"]
            errors[names[name]] = ((grad - expected).abs().max().item(), expected.abs().max().item())
        worst = max(errors, key=lambda k: errors[k][0] / max(1e-3, errors[k][1]))
        bad = [k for k, (error, scale) in errors.items() if error > 1e-4 * max(1e-2, scale)]
        failures += bool(bad)
        print(f"hybrid{i}: {arch:<6} {config_name:<14} logits max |diff| {errors['logits'][0]:.2e}; "
              f"{len(errors) - 1} gradients, worst {worst} {errors[worst][0]:.2e} (of {errors[worst][1]:.2e})  "
              f"{'ok' if not bad else 'MISMATCH ' + ', '.join(bad[:4])}")  # fmt: skip
    return 1 if failures else 0


def our_name(arch: str, name: str) -> str:
    """AdapterHub parameter name -> peftkern's (the site module's adapters.default.*)."""
    match = re.fullmatch(r"(.*\.\d+)\.(attention_adapters|output_adapters|attention\.output|output)\.adapters\.bn\.(.*)",
                         name)  # fmt: skip
    layer, holder, rest = match.groups()
    rest = rest.replace("adapter_down.0.", "adapter_down.")
    return f"{layer}.{SITE_NAMES[arch][holder]}.adapters.default.{rest}"


def check(directory: Path) -> int:
    import peftkern
    from safetensors.torch import load_file

    failures = 0
    for i, (arch, config_name, kwargs) in enumerate(json.loads((directory / "cases.json").read_text())):
        saved = load_file(str(directory / f"case{i}.safetensors"))
        model = build(arch).eval()
        base = {k[5:]: v for k, v in saved.items() if k.startswith("base.")}
        result = model.load_state_dict(base, strict=False)
        assert not result.missing_keys, result.missing_keys
        model = peftkern.patch(model, getattr(peftkern, config_name)(**kwargs))
        params = dict(model.named_parameters())
        with torch.no_grad():
            adapters_saved = {k[8:]: v for k, v in saved.items() if k.startswith("adapter.")}
            for name, value in adapters_saved.items():
                params[our_name(arch, name)].copy_(value.reshape(params[our_name(arch, name)].shape))
        assert len(adapters_saved) == sum(p.requires_grad for p in params.values())
        got, want = run(model, arch, saved["ids"]), saved["logits"]
        error = (got - want).abs().max().item()
        ok = error <= 1e-5 * max(1.0, want.abs().max().item())
        failures += not ok
        print(f"case{i}: {arch:<6} {config_name:<18} {json.dumps(kwargs):<75} max |diff| {error:.2e}  "
              f"{'ok' if ok else 'MISMATCH'}")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("produce", "check"):
        sys.exit(__doc__)
    if sys.argv[1] == "produce":
        produce(Path(sys.argv[2]))
        sys.exit(produce_hybrids(Path(sys.argv[2])))
    sys.exit(check(Path(sys.argv[2])) | check_hybrids(Path(sys.argv[2])))
