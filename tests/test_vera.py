"""VeRA against Hugging Face PEFT 0.21 on tiny Llama, Qwen2, Mistral and GPT-2 models: the shared
projections (same bits from the same key, held once), trainable names and counts, logits, loss,
gradients and AdamW steps; checkpoints both ways with and without the projections; merge /
unmerge / merge_and_unload / unpatch exact; NF4 bases; bf16 autocast; torch.compile; bad input
leaving the model untouched."""

import copy
import json

import pytest
import torch

import peftkern
from peftkern.methods.vera import VeraLinear, VeraProjections, projections_from_key

from .helpers import PEFT_PREFIX, assert_compiled_matches_eager, assert_matches_peft, batch, tiny_model

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "k_proj", "up_proj"],
           "mistral": None, "gpt2": ["c_attn", "c_fc"]}  # fmt: skip  (None: PEFT's default targets)


def vera_pair(arch, generator, **config):
    """(PEFT model, peftkern model) from one base and one config (r=8 unless given), with random
    λ vectors copied from PEFT's into ours (so that the adapter is not the identity)."""
    base = tiny_model(arch)
    config = {"r": 8, "target_modules": TARGETS[arch], **config}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(**config))
    ours = peftkern.patch(copy.deepcopy(base), {"peft_type": "VERA", **config})
    their_l = {k[len(PEFT_PREFIX):]: v for k, v in theirs.state_dict().items() if "vera_lambda" in k}
    our_l = {k: v for k, v in ours.state_dict().items() if "vera_lambda" in k}
    assert their_l.keys() == our_l.keys() and their_l  # same modules, same names
    with torch.no_grad():
        for key, value in their_l.items():
            value.copy_(torch.randn(value.shape, generator=generator) * 0.5)
            our_l[key].copy_(value)
    return theirs, ours


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_matches_peft(arch, generator):
    theirs, ours = vera_pair(arch, generator, vera_dropout=0.0)
    their_trainable = {n.removeprefix(PEFT_PREFIX): p.numel() for n, p in theirs.named_parameters() if p.requires_grad}
    our_trainable = {n: p.numel() for n, p in ours.named_parameters() if p.requires_grad}
    assert our_trainable == their_trainable
    assert torch.equal(ours.vera_projections.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(ours.vera_projections.vera_B, theirs.base_model.vera_B["default"])
    assert_matches_peft(theirs, ours, batch(generator), logits=(1e-5, 1e-5), loss=(1e-5, 1e-6), grads=(1e-4, 1e-6),
                        steps=4, step_losses=(1e-4, 1e-5))  # fmt: skip


def test_fresh_adapter_is_the_identity_and_init_weights_false_as_peft(generator):
    base = tiny_model("llama")
    inputs = batch(generator)
    with torch.no_grad():
        want = base(**inputs).logits
    ours = peftkern.patch(copy.deepcopy(base), {"peft_type": "VERA", "r": 4, "d_initial": 0.3})
    layer = ours.model.layers[0].self_attn.q_proj
    assert isinstance(layer, VeraLinear)
    assert torch.equal(layer.vera_lambda_b["default"], torch.zeros(32))
    assert torch.equal(layer.vera_lambda_d["default"], torch.full((4,), 0.3))
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, want, rtol=0, atol=0)
    off = peftkern.patch(copy.deepcopy(base), {"peft_type": "VERA", "r": 4, "init_weights": False})
    assert torch.equal(off.model.layers[0].self_attn.q_proj.vera_lambda_b["default"], torch.ones(32))


def test_projections_are_drawn_as_peft_draws_them_and_held_once():
    model = peftkern.patch(tiny_model("llama"), peftkern.VeraConfig(r=16, projection_prng_key=1234,
                                                                    target_modules=["q_proj", "k_proj", "down_proj"]))  # fmt: skip
    theirs = peft.get_peft_model(tiny_model("llama"), peft.VeraConfig(r=16, projection_prng_key=1234,
                                                                      target_modules=["q_proj", "k_proj", "down_proj"]))  # fmt: skip
    shared = model.vera_projections
    assert isinstance(shared, VeraProjections)
    assert shared.vera_A.shape == (16, 64) and shared.vera_B.shape == (32, 16)  # max in (down_proj), max out (q)
    assert torch.equal(shared.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(shared.vera_B, theirs.base_model.vera_B["default"])
    a, b = projections_from_key(1234, 16, 64, 32)
    assert torch.equal(a, shared.vera_A) and torch.equal(b, shared.vera_B)
    layers = [m for m in model.modules() if isinstance(m, VeraLinear)]
    assert len(layers) == 6 and all(layer.projections is shared for layer in layers)
    # one copy in memory: the buffers appear once and never in the model's state_dict
    assert sum(1 for n, _ in model.named_buffers() if "vera_" in n) == 2
    assert not any("vera_A" in k or "vera_B" in k for k in model.state_dict())
    # deep copies and .to() keep the sharing
    copied = copy.deepcopy(model)
    assert all(m.projections is copied.vera_projections for m in copied.modules() if isinstance(m, VeraLinear))
    model.to(torch.float64)
    assert layers[0].projections.vera_A.dtype == torch.float64


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peftkern_checkpoint_loads_in_peft(save_projection, arch, tmp_path, generator):
    _, ours = vera_pair(arch, generator, save_projection=save_projection, projection_prng_key=7)
    peftkern.save_adapter(ours, tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) == save_projection
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path))
    ours.eval()
    theirs.eval()
    assert_matches_peft(theirs, ours, batch(generator), logits=(1e-5, 1e-5))


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_checkpoint_loads_in_peftkern(save_projection, tmp_path, generator):
    theirs, _ = vera_pair("llama", generator, save_projection=save_projection, projection_prng_key=3)
    theirs.save_pretrained(str(tmp_path))
    ours = peftkern.load_adapter(tiny_model("llama"), tmp_path)
    ours.eval()
    theirs.eval()
    assert_matches_peft(theirs, ours, batch(generator), logits=(1e-5, 1e-5))


def test_projections_in_a_checkpoint_are_the_ones_loaded(tmp_path, generator):
    """With save_projection the saved matrices are used even when the key would draw others."""
    _, ours = vera_pair("llama", generator, projection_prng_key=11)
    with torch.no_grad():
        ours.vera_projections.vera_A.mul_(2.0)  # no longer what key 11 draws
    peftkern.save_adapter(ours, tmp_path)
    loaded = peftkern.load_adapter(tiny_model("llama"), tmp_path)
    assert torch.equal(loaded.vera_projections.vera_A, ours.vera_projections.vera_A)
    inputs = batch(generator)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, ours(**inputs).logits)
    # a checkpoint saved without them but carrying them anyway: ignored with a warning, as PEFT
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "save_projection": False}))
    with pytest.warns(UserWarning, match="ignored"):
        ignored = peftkern.load_adapter(tiny_model("llama"), tmp_path)
    assert torch.equal(ignored.vera_projections.vera_A, projections_from_key(11, 8, 64, 32)[0])


def test_merge_unmerge_merge_and_unload_unpatch_are_exact(generator):
    base = tiny_model("gpt2")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    _, ours = vera_pair("gpt2", generator)
    inputs = batch(generator)
    ours.eval()
    with torch.no_grad():
        want = ours(**inputs).logits
        peftkern.merge(ours)
        torch.testing.assert_close(ours(**inputs).logits, want, rtol=1e-5, atol=1e-5)
        peftkern.unmerge(ours)
        torch.testing.assert_close(ours(**inputs).logits, want, rtol=0, atol=0)
        merged = peftkern.merge_and_unload(copy.deepcopy(ours))
        assert not any(isinstance(m, VeraLinear) for m in merged.modules()) and not hasattr(merged, "vera_projections")
        torch.testing.assert_close(merged(**inputs).logits, want, rtol=1e-5, atol=1e-5)
        peftkern.merge(ours)
        peftkern.unpatch(ours)
    assert not hasattr(ours, "vera_projections")
    state = ours.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], v) for k, v in original.items())
    assert all(p.requires_grad for p in ours.parameters())


def test_nf4_base_matches_the_dequantized_dense_model(generator):
    """quantize="nf4": the same as VeRA on a dense model holding the dequantized weights."""
    ours = peftkern.patch(tiny_model("llama"), {"peft_type": "VERA", "r": 8, "init_weights": False}, quantize="nf4")
    dense = tiny_model("llama")
    for name, module in ours.named_modules():
        if isinstance(module, VeraLinear):
            target = dense.get_submodule(name)
            with torch.no_grad():
                target.weight.copy_(module.dense_weight(torch.float32))
    dense = peftkern.patch(dense, {"peft_type": "VERA", "r": 8, "init_weights": False})
    dense_params = dict(dense.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                dense_params[name].copy_(p)
    inputs = batch(generator)
    out_q, out_d = ours(**inputs), dense(**inputs)
    torch.testing.assert_close(out_q.logits, out_d.logits, rtol=1e-4, atol=1e-5)
    out_q.loss.backward()
    out_d.loss.backward()
    grads_d = {n: p.grad for n, p in dense.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_d[name], rtol=1e-4, atol=1e-6, msg=name)
    peftkern.merge(ours)  # the NF4 base swapped for a dense merged copy, given back on unmerge
    peftkern.unpatch(ours)
    assert type(ours.model.layers[0].self_attn.q_proj).__name__ == "NF4Linear"


def test_bf16_autocast_and_compile(generator):
    _, ours = vera_pair("llama", generator)
    inputs = batch(generator)
    with torch.no_grad():
        want = ours(**inputs).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(**inputs)
    torch.testing.assert_close(out.logits.float(), want, rtol=5e-2, atol=5e-2)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters() if p.requires_grad)
    ours.zero_grad()
    assert_compiled_matches_eager(ours, inputs)


def test_bf16_model(generator):
    _, ours = vera_pair("llama", generator)
    inputs = batch(generator)
    with torch.no_grad():
        want = ours(**inputs).logits
    ours.to(torch.bfloat16)
    out = ours(**inputs)
    torch.testing.assert_close(out.logits.float(), want, rtol=5e-2, atol=5e-2)
    out.loss.backward()


@pytest.mark.parametrize("config, error, message", [
    ({"r": 0}, ValueError, "r must be a positive integer"),
    ({"r": 2.5}, ValueError, "r must be a positive integer"),
    ({"vera_dropout": 1.0}, ValueError, "vera_dropout"),
    ({"bias": "lora_only"}, ValueError, "bias"),
    ({"projection_prng_key": "0"}, TypeError, "projection_prng_key"),
    ({"modules_to_save": ["lm_head"]}, NotImplementedError, "modules_to_save"),
    ({"target_modules": ["nope"]}, ValueError, "no module"),
    ({"target_modules": ["embed_tokens"]}, TypeError, "embed_tokens"),
    ({"rank": 4}, ValueError, "has no field 'rank'"),
])  # fmt: skip
def test_bad_config_is_refused_and_the_model_left_alone(config, error, message):
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        peftkern.patch(model, {"peft_type": "VERA", **config})
    assert model.state_dict().keys() == state.keys() and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not hasattr(model, "vera_projections") and not hasattr(model, "_peftkern_patch_record")
    assert all(p.requires_grad for p in model.parameters())


def test_failure_midway_undoes_everything(monkeypatch):
    model = tiny_model("llama")
    calls = []

    def broken(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return original(self, *args, **kwargs)

    original = VeraLinear.__init__
    monkeypatch.setattr(VeraLinear, "__init__", broken)
    with pytest.raises(RuntimeError, match="boom"):
        peftkern.patch(model, {"peft_type": "VERA", "r": 4})
    assert not hasattr(model, "vera_projections")
    assert not any(isinstance(m, VeraLinear) for m in model.modules())


def test_several_adapters_and_mixed_batches_are_refused():
    model = peftkern.patch(tiny_model("llama"), {"peft_type": "VERA", "r": 4})
    with pytest.raises(NotImplementedError, match="VERA"):
        peftkern.add_adapter(model, "other", {"peft_type": "VERA", "r": 4})
    assert peftkern.list_adapters(model) == ["default"]
