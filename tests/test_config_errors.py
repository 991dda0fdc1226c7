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


def test_merge_and_unmerge_refuse_models_they_cannot_change():
    with pytest.raises(RuntimeError, match="not patched by peftkern"):
        peftkern.merge(tiny_llama())
    with pytest.raises(RuntimeError, match="not patched by peftkern"):
        peftkern.unmerge(tiny_llama())
    prefixed = peftkern.patch(tiny_llama(), {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4})
    with pytest.raises(NotImplementedError, match="PREFIX_TUNING adapters cannot be merged"):
        peftkern.merge(prefixed)


def test_a_malformed_adapter_config_names_the_file(tmp_path):
    model = peftkern.patch(tiny_llama(), LORA)
    peftkern.save_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"r": 4,')
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        peftkern.load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="adapter_config.json must hold a JSON object"):
        peftkern.load_adapter(tiny_llama(), tmp_path)


def test_load_adapter_never_fetches_what_a_checkpoint_names(tmp_path, monkeypatch):
    """A prompt-tuning checkpoint with a TEXT init, inference_mode false and a tokenizer name: as
    PEFT loads it (inference mode), nothing it names is fetched or run; the saved prompt loads."""
    import json

    model = peftkern.patch(tiny_llama(), {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3})
    peftkern.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update(prompt_tuning_init="TEXT", prompt_tuning_init_text="hello", inference_mode=False,
                  tokenizer_name_or_path="some-org/some-remote-tokenizer")  # fmt: skip
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    def no_fetch(*args, **kwargs):
        raise AssertionError(f"load_adapter tried to load a tokenizer: {args}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_fetch)
    loaded = peftkern.load_adapter(tiny_llama(), tmp_path)
    saved = model.state_dict()["prompt_encoder.default.embedding.weight"]
    torch.testing.assert_close(loaded.state_dict()["prompt_encoder.default.embedding.weight"], saved)
