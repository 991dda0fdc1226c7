"""merge, then unmerge or unpatch, gives back the original weights bit for bit (LoRA, DoRA and
IA³; float32 and bfloat16; nn.Linear and GPT-2's Conv1D), where subtracting or dividing the
adapter back out would round. merge(keep_original=False) keeps PEFT's arithmetic unmerge."""

import pytest
import torch

import peftkern

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "lora": {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "dora": {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "use_dora": True, "target_modules": ["q_proj", "up_proj"]},
    "ia3": {"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
}  # fmt: skip


def tiny(kind, dtype):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4)
        return transformers.GPT2LMHeadModel(config).to(dtype).eval()
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def randomize(model, generator):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name or "ia3_l" in name:
                noise = torch.randn(parameter.shape, generator=generator) * 0.3
                parameter.copy_(noise + (1.0 if "ia3_l" in name or "magnitude" in name else 0.0))


def config_for(method, kind):
    if kind == "gpt2":
        if method == "ia3":
            return {"peft_type": "IA3", "target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]}
        return {**CONFIGS[method], "target_modules": ["c_attn", "mlp.c_fc"]}
    return CONFIGS[method]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_then_unmerge_or_unpatch_restores_the_weights_exactly(generator, kind, method, dtype):
    model = tiny(kind, dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    peftkern.patch(model, config_for(method, kind))
    randomize(model, generator)
    ids = torch.randint(0, 96, (2, 5), generator=generator)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        peftkern.merge(model)
        merged = model(input_ids=ids).logits
        peftkern.unmerge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
        peftkern.merge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, merged, rtol=0, atol=0)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(merged, before, rtol=tolerance, atol=tolerance)  # the merge itself is right
    peftkern.unpatch(model)  # while merged
    restored = model.state_dict()
    assert restored.keys() == original.keys()
    changed = [k for k in original if not torch.equal(restored[k], original[k])]
    assert not changed, f"weights not restored bit for bit: {changed}"


def test_merge_without_keeping_the_original_unmerges_by_arithmetic(generator):
    """keep_original=False saves the CPU copy; unmerge then subtracts, as PEFT does (close, not exact)."""
    model = tiny("llama", torch.float32)
    peftkern.patch(model, CONFIGS["lora"])
    randomize(model, generator)
    weight = model.model.layers[0].self_attn.q_proj.base_layer.weight
    before = weight.clone()
    peftkern.merge(model, keep_original=False)
    assert not torch.allclose(weight, before)
    peftkern.unmerge(model)
    torch.testing.assert_close(weight, before, rtol=1e-5, atol=1e-6)
