"""peftkern's bottleneck adapters against AdapterHub's `adapters` package itself, in two steps
(`adapters` pins its own transformers, so it lives in a separate venv; never install it into
peftkern's):

    # 1. in a venv with `adapters` (+ torch): tiny models, random adapters, their logits
    python scripts/compare_adapterhub.py produce /tmp/ah
    # 2. in peftkern's venv: the same base weights and adapter weights through peftkern.patch
    python scripts/compare_adapterhub.py check /tmp/ah

Step 1 saves, per case, the base model's weights, the adapter weights, input ids and logits;
step 2 rebuilds the model from the same config, loads the weights, patches it with the matching
peftkern config, copies the adapter weights (AdapterHub's names mapped to ours) and compares.
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
    sys.exit(produce(Path(sys.argv[2])) if sys.argv[1] == "produce" else check(Path(sys.argv[2])))
