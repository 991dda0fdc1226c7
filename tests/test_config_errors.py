"""Bad configs get a clear error naming the field, before anything changes; a failure midway
through adding an adapter leaves no half-made adapter behind."""

import pytest
import torch

import peftkern
from peftkern.methods.lora import LoraLinear

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)  # fmt: skip
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()]


def assert_unchanged(model, before):
    state, flags = before
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("field, value", [("r", True), ("r", 4.0), ("lora_alpha", "16"), ("lora_alpha", "x"),
                                          ("lora_dropout", "0.1"), ("target_modules", 5),
                                          ("target_modules", ["q_proj", 3]), ("use_dora", "yes")])  # fmt: skip
def test_lora_config_fields_of_the_wrong_type_raise_naming_the_field(field, value):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(TypeError, match=f"LoraConfig.{field}"):
        peftkern.patch(model, {**LORA, field: value})
    assert_unchanged(model, before)
    peftkern.patch(model, LORA)  # and the model is still patchable
    before = snapshot(model)
    with pytest.raises(TypeError, match=f"LoraConfig.{field}"):
        peftkern.add_adapter(model, "b", {**LORA, field: value})
    assert_unchanged(model, before)
    peftkern.add_adapter(model, "b", LORA)
    assert peftkern.list_adapters(model) == ["default", "b"]


def test_add_adapter_failing_midway_leaves_no_half_adapter(monkeypatch):
    """A layer that fails after creating part of the adapter: every layer is cleaned up, the
    name is free again, and the state dict is the one from before."""
    model = peftkern.patch(tiny_llama(), LORA)
    before = snapshot(model)
    original, calls = LoraLinear.add_adapter, []

    def fails_on_the_third_layer(self, name, config):
        original(self, name, config)  # the adapter's tensors exist now
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("simulated failure after the adapter was half made")

    monkeypatch.setattr(LoraLinear, "add_adapter", fails_on_the_third_layer)
    with pytest.raises(RuntimeError, match="simulated failure"):
        peftkern.add_adapter(model, "b", LORA)
    monkeypatch.undo()
    assert_unchanged(model, before)
    assert peftkern.list_adapters(model) == ["default"]
    peftkern.add_adapter(model, "b", LORA)
    assert peftkern.list_adapters(model) == ["default", "b"]
