"""BitFit: every bias (or the biases of named modules) trains and nothing else, the same loss and
gradients as plain PyTorch with those flags set; a head via modules_to_save; models without
biases refused, model untouched; checkpoints under PEFT's bias key names (PEFT reads them back);
unpatch restores the flags."""

import copy

import pytest
import torch
from safetensors.torch import load_file

import peftkern

from .helpers import batch, tiny_model, train_steps

peft = pytest.importorskip("peft")


def bias_names(model):
    return [n for n, _ in model.named_parameters() if n.endswith(".bias")]


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_every_bias_trains_as_plain_pytorch(arch, generator):
    base = tiny_model(arch)
    oracle = copy.deepcopy(base)
    for name, p in oracle.named_parameters():
        p.requires_grad_(name.endswith(".bias"))
    # transformers' loss, as the oracle's: bit-exact training is the claim (the fused loss rounds
    # differently; tests/test_cross_entropy_op.py holds it to transformers')
    ours = peftkern.patch(copy.deepcopy(base), peftkern.BitFitConfig(), fused_loss=False)
    trained = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trained == bias_names(base) and trained  # GPT-2: every bias; Qwen2: q/k/v only
    if arch == "qwen2":
        assert all(n.split(".")[-2] in ("q_proj", "k_proj", "v_proj") for n in trained)
    inputs = batch(generator)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, base(**inputs).logits, rtol=0, atol=0)
    losses_ours = train_steps(ours, inputs, 4)
    losses_oracle = train_steps(oracle, inputs, 4)
    assert losses_ours == losses_oracle and losses_ours[-1] < losses_ours[0]
    for (name, p), q in zip(ours.named_parameters(), oracle.parameters()):
        assert torch.equal(p, q), name
        if not name.endswith(".bias"):
            assert torch.equal(p, dict(base.named_parameters())[name]), name  # frozen: untouched


def test_subset_and_head(generator):
    model = peftkern.patch(tiny_model("gpt2"), {"peft_type": "BITFIT", "bias_modules": ["c_attn", "mlp.c_proj"]})
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained == [f"transformer.h.{i}.{m}.bias" for i in range(2) for m in ("attn.c_attn", "mlp.c_proj")]
    peftkern.unpatch(model)
    model = peftkern.patch(tiny_model("qwen2"), {"peft_type": "BITFIT", "bias_modules": ".*q_proj",
                                                 "modules_to_save": ["lm_head"]})  # fmt: skip
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained == ["model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.q_proj.bias",
                       "lm_head.modules_to_save.default.weight"]  # fmt: skip
    train_steps(model, batch(generator), 2)
    head = model.lm_head
    assert not torch.equal(head.modules_to_save["default"].weight, head.original_module.weight)


@pytest.mark.parametrize("arch, config, message", [
    ("llama", {}, "has no bias parameters"),
    ("mistral", {}, "has no bias parameters"),
    ("qwen2", {"bias_modules": ["o_proj"]}, "no bias belongs"),
    ("gpt2", {"bias_modules": []}, "empty list"),
    ("gpt2", {"bias_module": ["c_attn"]}, "no field"),
    ("gpt2", {"modules_to_save": ["nope"]}, "no module"),
])  # fmt: skip
def test_bad_config_is_refused_and_the_model_left_alone(arch, config, message):
    model = tiny_model(arch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        peftkern.patch(model, {"peft_type": "BITFIT", **config})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()) and model.state_dict().keys() == state.keys()
    assert all(p.requires_grad for p in model.parameters()) and not hasattr(model, "_peftkern_patch_record")


def test_checkpoint_round_trip_with_peft_key_names(tmp_path, generator):
    model = peftkern.patch(tiny_model("gpt2"), peftkern.BitFitConfig())
    train_steps(model, batch(generator), 3)
    peftkern.save_adapter(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(f"base_model.model.{n}" for n in bias_names(model))
    loaded = peftkern.load_adapter(tiny_model("gpt2"), tmp_path)
    inputs = batch(generator)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    # PEFT reads the biases back: they are exactly the keys of a PEFT LoRA checkpoint with bias="all"
    # (its LoRA target is the bias-free lm_head, so that no bias moves under a base_layer)
    theirs = peft.get_peft_model(tiny_model("gpt2"), peft.LoraConfig(r=2, target_modules=["lm_head"], bias="all"))
    theirs.save_pretrained(str(tmp_path / "peft"))
    their_bias_keys = {k for k in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")) if "lora_" not in k}
    assert {k for k in their_bias_keys if k.endswith(".bias")} == set(saved)
    peft.set_peft_model_state_dict(theirs, saved)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.equal(theirs.get_parameter(f"base_model.model.{name}"), p), name


def test_unpatch_restores_the_flags():
    model = tiny_model("gpt2")
    model.transformer.wte.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    peftkern.patch(model, peftkern.BitFitConfig(modules_to_save=["lm_head"]))
    peftkern.unpatch(model)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert type(model.lm_head).__name__ == "Linear"
