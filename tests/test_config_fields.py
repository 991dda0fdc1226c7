"""Config fields peftkern does not implement are refused, never dropped: a PEFT field at a
non-default value raises NotImplementedError naming it (from a dict, a peft config object or a
checkpoint's adapter_config.json), an unknown key raises naming it, PEFT's bookkeeping is
accepted. The table of unimplemented fields is checked against the installed peft."""

import dataclasses
import json

import pytest
import torch

import peftkern
from peftkern.methods import PEFT_METADATA_FIELDS, UNSUPPORTED_PEFT_FIELDS, lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)  # fmt: skip
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
NOT_IMPLEMENTED = [("lora_bias", True), ("target_parameters", ["mlp.experts.gate_up_proj"]),
                   ("alora_invocation_tokens", [5, 6]), ("layer_replication", [[0, 2]]), ("use_qalora", True),
                   ("trainable_token_indices", [1, 2])]  # fmt: skip


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))


@pytest.mark.skipif(not peft.__version__.startswith("0.21."), reason=f"the table is peft 0.21's ({peft.__version__})")
def test_the_unsupported_field_table_is_peft_0_21s():
    for peft_type, ours in [("LORA", peftkern.LoraConfig), ("IA3", peftkern.IA3Config),
                            ("PREFIX_TUNING", peftkern.PrefixTuningConfig), ("PROMPT_TUNING", peftkern.PromptTuningConfig),
                            ("VERA", peftkern.VeraConfig), ("ADALORA", peftkern.AdaLoraConfig)]:  # fmt: skip
        theirs = getattr(peft, ours.__name__)
        fields = {f.name: f for f in dataclasses.fields(theirs)}
        covered = {f.name for f in dataclasses.fields(ours)} | PEFT_METADATA_FIELDS | set(UNSUPPORTED_PEFT_FIELDS.get(peft_type, {}))
        assert set(fields) <= covered, f"{ours.__name__}: PEFT fields peftkern does not account for: {set(fields) - covered}"
        for name, default in UNSUPPORTED_PEFT_FIELDS.get(peft_type, {}).items():
            field = fields[name]
            value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            value = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            assert value == default, (name, value, default)


@pytest.mark.parametrize("field, value", NOT_IMPLEMENTED)
def test_an_unimplemented_peft_field_is_refused_naming_it(field, value, tmp_path):
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match=f"LoraConfig.{field}="):
        peftkern.patch(model, {**LORA, field: value})
    assert model.state_dict().keys() == state.keys() and not hasattr(model, "_peftkern_patch_record")
    # the same from a checkpoint written with the field set
    peftkern.save_adapter(peftkern.patch(tiny_llama(), LORA), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(NotImplementedError, match=f"LoraConfig.{field}="):
        peftkern.load_adapter(tiny_llama(), tmp_path)


@pytest.mark.parametrize("field, value", [("lora_bias", True), ("layer_replication", [[0, 2]]), ("use_qalora", True)])
def test_an_unimplemented_field_of_a_peft_config_object_is_refused(field, value):
    with pytest.raises(NotImplementedError, match=field):
        peftkern.patch(tiny_llama(), peft.LoraConfig(**LORA, **{field: value}))


def test_peft_config_objects_and_checkpoints_at_pefts_defaults_are_accepted(tmp_path):
    model = peftkern.patch(tiny_llama(), peft.LoraConfig(**LORA, task_type="CAUSAL_LM"))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**LORA))
    theirs.save_pretrained(tmp_path)  # every PEFT 0.21 field, at its default
    peftkern.load_adapter(tiny_llama(), tmp_path)
    peftkern.patch(tiny_llama(), peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    assert peftkern.list_adapters(model) == ["default"]


@pytest.mark.parametrize("config, message", [
    ({**LORA, "target_modulez": ["q_proj"]}, "LoraConfig has no field 'target_modulez' \\(did you mean 'target_modules'\\?\\)"),
    ({**LORA, "lora_alpah": 3}, "did you mean 'lora_alpha'"),
    ({"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": [], "r": 4}, "IA3Config has no field 'r'"),
    ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "prefix_projektion": True}, "did you mean 'prefix_projection'"),
])  # fmt: skip
def test_an_unknown_key_in_a_dict_is_refused_naming_it(config, message):
    with pytest.raises(ValueError, match=message):
        peftkern.patch(tiny_llama(), config)
