"""A batch of 8 sequences, each with its own LoRA adapter (8 adapters, r=16, every projection of a
small Llama: hidden 512, MLP 1408, 2 layers, vocab 2048), in inference, side by side in one run:

- peftkern: `model(..., adapter_names=names)`: one grouped op per layer for all 8 adapters;
- peft: Hugging Face PEFT's mixed-batch path, `peft_model(..., adapter_names=names)` (per layer, a
  Python loop over the adapters, each on its sub-batch);
- peftkern-1ad / peft-1ad: the same batch with ONE adapter for every sequence (what a server
  that batches by adapter runs: the floor a mixed batch should approach).

Shapes: prefill (8 x 64 tokens) and one decode step (8 x 1 token, the model's forward on one new
token per sequence with a KV cache of 64). Dense float32 bases, and NF4 bases (peftkern's NF4
against PEFT on bitsandbytes' Linear4bit) for the decode step, on CPU here.

    python -m pytest -q bench/bench_mixed.py

GB/s counts the base weights read once (float32, or 4-bit + absmax for NF4) plus every adapter used
in the batch read once: the floor of one forward.
"""

import pytest
import torch

import peftkern

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = [f"task{i}" for i in range(8)]
BATCH, PROMPT = 8, 64


def base_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def lora() -> dict:
    return {"r": 16, "lora_alpha": 32, "target_modules": TARGETS, "init_lora_weights": False}


def build(impl: str, nf4: bool):
    model = base_model()
    if impl.startswith("peftkern"):
        model = peftkern.patch(model, lora(), adapter_name=ADAPTERS[0], quantize="nf4" if nf4 else None)
        for name in ADAPTERS[1:]:
            peftkern.add_adapter(model, name, lora())
        return model.eval()
    if nf4:
        bnb = pytest.importorskip("bitsandbytes")
        _to_bnb_nf4(model, bnb)
    config = peft.LoraConfig(**lora())
    model = peft.get_peft_model(model, config, adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.add_adapter(name, config)
    return model.eval()


def _to_bnb_nf4(model, bnb):
    """Every targeted nn.Linear as bitsandbytes' Linear4bit (NF4, blocksize 64, double quantization)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)  # fmt: skip
            layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64)  # fmt: skip
            layer = layer.to("cpu")
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer)


def floor_bytes(model, nf4: bool, adapters_used: int) -> int:
    weights = sum(m.weight.numel() for n, m in base_model().named_modules()
                  if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS)  # fmt: skip
    base = weights // 2 + weights // 64 if nf4 else 4 * weights
    per_adapter = sum(p.numel() for n, p in model.named_parameters() if f".{ADAPTERS[0]}." in n) * 4
    return base + adapters_used * per_adapter


@pytest.mark.parametrize("impl", ["peftkern", "peft", "peftkern-1ad", "peft-1ad"])
@pytest.mark.parametrize("shape", ["prefill", "decode", "decode-nf4"])
def test_mixed_adapter_batch(benchmark, record, shape, impl):
    nf4 = shape.endswith("nf4")
    model = build(impl, nf4)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 2048, (BATCH, PROMPT), generator=generator)
    one_adapter = impl.endswith("-1ad")
    names = [ADAPTERS[0]] * BATCH if one_adapter else ADAPTERS[:BATCH]
    kwargs = {} if one_adapter else {"adapter_names": names}
    with torch.inference_mode():
        if shape == "prefill":
            inputs = {"input_ids": prompt}
        else:
            cache = model(input_ids=prompt, use_cache=True, **kwargs).past_key_values
            inputs = {"input_ids": prompt[:, -1:], "past_key_values": cache}

        def forward():
            with torch.inference_mode():
                if shape != "prefill":  # the same cache each round: crop it back to the prompt
                    inputs["past_key_values"].crop(PROMPT)
                return model(**inputs, **kwargs).logits

        first = forward()
        assert torch.isfinite(first).all()
        benchmark.group = f"mixed batch {shape}"
        benchmark.pedantic(forward, rounds=7 if shape == "prefill" else 15, warmup_rounds=2, iterations=1)
    tokens = BATCH * (PROMPT if shape == "prefill" else 1)
    # one group per shape, so the summary's ratio column compares every row with peftkern's mixed batch
    record(f"{BATCH} seqs, 8 adapters: {shape} {tokens} tok", impl.replace("-1ad", " 1ad"),
           floor_bytes(model, nf4, len(set(names))), "cpu")
