"""A training step (forward + backward) of one Hugging Face PEFT model, run by PEFT's own layers
and then by peftkern after `peftkern.patch(peft_model)` (the same model object, the same
parameters): what a user gets by adding one line. A small Llama (hidden 512, MLP 1408, 2 layers,
vocab 2048), LoRA / DoRA r=16 on every projection, batch 2 x 256 tokens, float32 on CPU.

    python -m pytest -q bench/bench_from_peft.py

GB/s counts the projection weights read twice (forward and dx); GFLOP/s the projections' base
GEMMs (forward and dx), 4 * tokens * weights: floors, not what the step does in total.
"""

import pytest
import torch

import peftkern

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ = 2, 256


def make(variant: str):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
    base = transformers.LlamaForCausalLM(config)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, use_dora=variant == "dora",
                           init_lora_weights=False)  # fmt: skip
    return peft.get_peft_model(base, lora)


@pytest.mark.parametrize("impl", ["peft", "peftkern"])
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_peft_model_training_step(benchmark, record, variant, impl):
    model = make(variant)
    if impl == "peftkern":
        peftkern.patch(model)
    model.train()
    ids = torch.randint(0, 2048, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    benchmark.group = f"PeftModel {variant} step"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    weights = sum(m.base_layer.weight.numel() for m in model.modules() if hasattr(m, "lora_A"))
    record(f"PeftModel {variant} fwd+bwd {BATCH}x{SEQ} fp32 cpu", impl, 2 * 4 * weights, "cpu",
           flops=4 * BATCH * SEQ * weights)  # fmt: skip
