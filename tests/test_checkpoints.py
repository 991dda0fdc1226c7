"""Adapter checkpoints both ways with Hugging Face PEFT: saved by peftkern, loaded by
PeftModel.from_pretrained; saved by PEFT, loaded by peftkern; same logits. Bad checkpoints give
clear errors and leave the model as it was."""

import json

import pytest
import torch

import peftkern

from .helpers import TARGETS, assert_matches_peft, batch, lora_pair, tiny_model

peft = pytest.importorskip("peft")

CONFIGS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
}


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peftkern_checkpoint_loads_in_peft(kind, arch, tmp_path, generator):
    _, ours = lora_pair(arch, target_modules=TARGETS[arch], task_type="CAUSAL_LM", **CONFIGS[kind])
    with torch.no_grad():  # make B nonzero and distinct so the test sees every tensor
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    peftkern.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path))
    inputs = batch(generator)
    ours.eval()
    theirs.eval()
    assert_matches_peft(theirs, ours, inputs, logits=(1e-4, 1e-5))


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_peft_checkpoint_loads_in_peftkern(kind, tmp_path, generator):
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS["llama"], "init_lora_weights": False, **CONFIGS[kind]}
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(task_type="CAUSAL_LM", **config))
    theirs.save_pretrained(str(tmp_path))
    ours = peftkern.load_adapter(tiny_model("llama"), tmp_path)
    inputs = batch(generator)
    ours.eval()
    theirs.eval()
    assert_matches_peft(theirs, ours, inputs, logits=(1e-4, 1e-5))


def test_bad_checkpoints_give_clear_errors_and_leave_the_model_alone(tmp_path, generator):
    _, ours = lora_pair("llama", target_modules=["q_proj", "v_proj"])
    good = tmp_path / "good"
    peftkern.save_adapter(ours, good)

    def broken(name, edit_config=None, edit_tensors=None, pickle=False):
        directory = tmp_path / name
        directory.mkdir()
        config = json.loads((good / "adapter_config.json").read_text())
        if edit_config:
            edit_config(config)
        (directory / "adapter_config.json").write_text(json.dumps(config))
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(good / "adapter_model.safetensors"))
        if edit_tensors:
            edit_tensors(tensors)
        if pickle:
            torch.save(tensors, directory / "adapter_model.bin")
        else:
            save_file(tensors, str(directory / "adapter_model.safetensors"))
        return directory

    first_key = lambda t: sorted(t)[0]  # noqa: E731
    cases = [
        (broken("missing", edit_tensors=lambda t: t.pop(first_key(t))), KeyError, "missing"),
        (broken("shape", edit_tensors=lambda t: t.update({first_key(t): torch.zeros(3, 3)})), ValueError, "shape"),
        (broken("type", edit_config=lambda c: c.update(peft_type="POLY")), ValueError, "POLY"),
        # a supported method whose tensors do not match: refused before anything is written
        (broken("other method", edit_config=lambda c: [c.clear(), c.update(peft_type="IA3", target_modules=["q_proj"],
                                                                             feedforward_modules=[])]),
         KeyError, "does not fit"),  # fmt: skip
        # another method's fields under a peft_type: refused naming the field (a typo likewise)
        (broken("other fields", edit_config=lambda c: c.update(peft_type="IA3")), ValueError, "IA3Config has no field"),
        (broken("typo", edit_config=lambda c: c.update(lora_alphaa=3)), ValueError, "did you mean 'lora_alpha'"),
        (broken("unsupported", edit_config=lambda c: c.update(use_qalora=True)), NotImplementedError, "use_qalora"),
        (broken("pickle", pickle=True), FileNotFoundError, "safetensors only"),
    ]
    for directory, error, message in cases:
        model = tiny_model("llama")
        before = {n: m for n, m in model.named_modules()}
        with pytest.raises(error, match=message):
            peftkern.load_adapter(model, directory)
        assert {n: m for n, m in model.named_modules()} == before
        assert not hasattr(model, "_peftkern_patch_record")


def test_qlora_adapter_round_trip(tmp_path, generator):
    model = peftkern.patch(tiny_model("llama"), {"r": 4, "target_modules": ["q_proj", "up_proj"],
                                                 "init_lora_weights": False}, quantize="nf4")  # fmt: skip
    peftkern.save_adapter(model, tmp_path)
    reloaded = peftkern.load_adapter(tiny_model("llama"), tmp_path, quantize="nf4")
    inputs = batch(generator)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)
