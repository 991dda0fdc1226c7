"""AdaLoRA against Hugging Face PEFT 0.21 (task_type="CAUSAL_LM", so that PEFT adds its orthogonal
regulariser) on tiny Llama, Qwen2, Mistral and GPT-2 models: trainable names and counts, logits,
loss (regulariser included), gradients and AdamW steps; a 10-step update_and_allocate run giving
PEFT's rank_pattern, masks and pruned checkpoint shapes; checkpoints both ways (pruned, r′ = 0
included); merge / unmerge / unpatch exact; the Trainer callback; NF4 bases; bf16 autocast;
torch.compile; bad input leaving the model untouched."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import peftkern
from peftkern.methods.adalora import SVDLinear, orthogonal_regulariser
from peftkern.record import PatchRecord

from .helpers import PEFT_PREFIX, assert_compiled_matches_eager, assert_matches_peft, batch, tiny_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": None, "mistral": ["q_proj", "k_proj", "up_proj"],
           "gpt2": None}  # fmt: skip  (None: PEFT's default targets; Mistral has none)
SCHEDULE = dict(init_r=6, target_r=2, total_step=10, tinit=1, tfinal=3, deltaT=1)


def adalora_pair(arch, generator, **config):
    """(PEFT model, peftkern model) from one base and one config, with random A, B and E (E is 0
    at init, which would hide half of the math) copied from PEFT's into ours."""
    base = tiny_model(arch)
    config = {"target_modules": TARGETS[arch], "lora_alpha": 16, "orth_reg_weight": 0.3, **SCHEDULE, **config}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(task_type="CAUSAL_LM", **config))
    ours = peftkern.patch(copy.deepcopy(base), {"peft_type": "ADALORA", **config})
    their_t = {k[len(PEFT_PREFIX):]: v for k, v in theirs.state_dict().items() if "lora_" in k}
    our_t = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    assert their_t.keys() == our_t.keys() and their_t
    with torch.no_grad():
        for key, value in their_t.items():
            value.copy_(torch.randn(value.shape, generator=generator) * 0.3)
            our_t[key].copy_(value)
    return theirs, ours


def rank_pattern(model):
    return PatchRecord.of(model).adapters["default"].rank_pattern


def run_allocation(model, inputs, steps, update):
    """`steps` AdamW steps, each followed by update(step) before zero_grad, as PEFT documents."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        update(step)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_matches_peft(arch, generator):
    theirs, ours = adalora_pair(arch, generator)
    their_trainable = {n.removeprefix(PEFT_PREFIX): p.numel() for n, p in theirs.named_parameters() if p.requires_grad}
    assert {n: p.numel() for n, p in ours.named_parameters() if p.requires_grad} == their_trainable
    assert_matches_peft(theirs, ours, batch(generator), logits=(1e-5, 1e-5), loss=(1e-5, 1e-6), grads=(1e-4, 1e-6),
                        steps=4, step_losses=(1e-4, 1e-5))  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ten_steps_of_update_and_allocate_give_peft_rank_pattern(arch, generator, tmp_path):
    theirs, ours = adalora_pair(arch, generator)
    inputs = batch(generator)
    their_losses = run_allocation(theirs, inputs, 10, theirs.base_model.update_and_allocate)
    our_losses = run_allocation(ours, inputs, 10, lambda step: peftkern.update_and_allocate(ours, step))
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(their_losses), rtol=1e-4, atol=1e-5)
    want = theirs.peft_config["default"].rank_pattern
    assert rank_pattern(ours) == want
    assert 0 < sum(map(sum, want.values())) < SCHEDULE["init_r"] * len(want)  # something was pruned, not all
    for name, p in ours.named_parameters():
        if ".lora_E." in name:  # the same entries masked (0), the same ones alive
            their_e = theirs.get_parameter(PEFT_PREFIX + name)
            assert torch.equal(p == 0, their_e == 0), name
    # the pruned checkpoints: same keys, same shapes
    theirs.save_pretrained(str(tmp_path / "peft"))
    peftkern.save_adapter(ours, tmp_path / "ours")
    their_sd, our_sd = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "ours"))
    assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in their_sd.items()}
    their_cfg, our_cfg = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours"))
    assert our_cfg["rank_pattern"] == their_cfg["rank_pattern"]
    for key, value in their_sd.items():
        torch.testing.assert_close(our_sd[key], value, rtol=1e-3, atol=1e-5, msg=key)


def test_schedule_phases_as_peft(generator):
    """Before tinit nothing is masked; at total_step − tfinal the pattern is fixed; after it the
    same mask is re-applied every step (entries that regrew through Adam's momentum are zeroed)."""
    _, ours = adalora_pair("llama", generator, tinit=2, tfinal=3, total_step=9)
    inputs = batch(generator)
    seen = []
    run_allocation(ours, inputs, 2, lambda step: (peftkern.update_and_allocate(ours, step), seen.append(rank_pattern(ours))))
    assert seen == [None, None]
    run_allocation(ours, inputs, 5, lambda step: peftkern.update_and_allocate(ours, step + 2))  # steps 2..6 = final
    fixed = copy.deepcopy(rank_pattern(ours))
    run_allocation(ours, inputs, 3, lambda step: peftkern.update_and_allocate(ours, step + 7))
    assert rank_pattern(ours) == fixed
    for name, p in ours.named_parameters():
        if ".lora_E." in name:
            keep = torch.tensor(fixed[name]).unsqueeze(-1)
            assert (p[~keep] == 0).all() and (p[keep] != 0).all(), name


def test_regulariser_is_peft_and_added_without_task_type(generator):
    theirs, ours = adalora_pair("llama", generator)
    inputs = batch(generator)
    plain = tiny_model("llama")
    for name, layer in ours.named_modules():
        if isinstance(layer, SVDLinear):  # the model's own loss with the adapters, without the regulariser
            plain.get_submodule(name.rpartition(".")[0]).__setattr__(name.rpartition(".")[2], layer)
    ours_out = ours(**inputs)
    reg = orthogonal_regulariser(ours, "default")
    with torch.no_grad():
        plain_loss = plain(**inputs).loss  # the hook is on `ours` only
    torch.testing.assert_close(ours_out.loss, plain_loss + 0.3 * reg)
    assert reg.item() > 0
    # PEFT with task_type=None skips it (its trap); ours does not depend on task_type
    none = peft.get_peft_model(tiny_model("llama"), peft.AdaLoraConfig(target_modules=TARGETS["llama"], **SCHEDULE,
                                                                        lora_alpha=16, orth_reg_weight=0.3))  # fmt: skip
    none.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(none(**inputs).loss, plain_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs(**inputs).loss, ours_out.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pruned_checkpoints_both_ways(arch, generator, tmp_path):
    theirs, ours = adalora_pair(arch, generator)
    inputs = batch(generator)
    run_allocation(theirs, inputs, 10, theirs.base_model.update_and_allocate)
    run_allocation(ours, inputs, 10, lambda step: peftkern.update_and_allocate(ours, step))
    theirs.save_pretrained(str(tmp_path / "peft"))
    peftkern.save_adapter(ours, tmp_path / "ours")
    from_peft = peftkern.load_adapter(tiny_model(arch), tmp_path / "peft")
    in_peft = peft.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path / "ours"))
    for model in (theirs, ours, from_peft, in_peft):
        model.eval()
    ids = {"input_ids": inputs["input_ids"]}  # no labels: PEFT's AdaLoraModel.forward fails on a loaded
    assert_matches_peft(theirs, from_peft, ids, logits=(1e-5, 1e-5))  # (inference-mode) adapter given a loss
    assert_matches_peft(in_peft, ours, ids, logits=(1e-5, 1e-5))
    # a reloaded pruned model keeps ranknum = init_r and saves the same pruned tensors again
    layer = next(m for m in from_peft.modules() if isinstance(m, SVDLinear))
    assert layer.ranknum["default"] == SCHEDULE["init_r"] and layer.lora_A["default"].shape[0] < SCHEDULE["init_r"]
    peftkern.save_adapter(from_peft, tmp_path / "again")
    again, first = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("again", "peft"))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_a_layer_pruned_to_rank_zero_loads_both_ways(generator, tmp_path):
    theirs, _ = adalora_pair("llama", generator)
    pattern = {f"model.layers.{i}.{m}.lora_E.default": [True, False, True, False, False, True] for i in range(2)
               for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}  # fmt: skip
    pattern["model.layers.1.mlp.down_proj.lora_E.default"] = [False] * 6
    theirs.peft_config["default"].rank_pattern = pattern
    theirs.save_pretrained(str(tmp_path / "peft"))
    assert load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))[
        "base_model.model.model.layers.1.mlp.down_proj.lora_A"].shape == (0, 64)
    ours = peftkern.load_adapter(tiny_model("llama"), tmp_path / "peft")
    reloaded = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "peft"))
    ours.eval()
    reloaded.eval()
    inputs = batch(generator)
    ids = {"input_ids": inputs["input_ids"]}  # no labels (see test_pruned_checkpoints_both_ways)
    assert_matches_peft(reloaded, ours, ids, logits=(1e-5, 1e-5))
    peftkern.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "ours"))
    back.eval()
    assert_matches_peft(back, ours, ids, logits=(1e-5, 1e-5))
    ours.train()
    ours(**inputs).loss.backward()  # rank 0 trains (nothing) without error


def test_merge_unmerge_unpatch_exact(generator):
    base = tiny_model("gpt2")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    _, ours = adalora_pair("gpt2", generator)
    ours.eval()
    inputs = {"input_ids": batch(generator)["input_ids"]}
    with torch.no_grad():
        want = ours(**inputs).logits
        peftkern.merge(ours)
        torch.testing.assert_close(ours(**inputs).logits, want, rtol=1e-5, atol=1e-5)
        peftkern.unmerge(ours)
        torch.testing.assert_close(ours(**inputs).logits, want, rtol=0, atol=0)
        merged = peftkern.merge_and_unload(copy.deepcopy(ours))
        torch.testing.assert_close(merged(**inputs).logits, want, rtol=1e-5, atol=1e-5)
        assert not any(isinstance(m, SVDLinear) for m in merged.modules())
        peftkern.merge(ours)
        peftkern.unpatch(ours)
    state = ours.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], v) for k, v in original.items())
    assert not hasattr(ours, "peftkern_rank_allocator") and not ours._forward_hooks


def test_trainer_callback_calls_it_once_per_optimizer_step(generator, tmp_path):
    theirs, ours = adalora_pair("llama", generator, total_step=6, tinit=0, tfinal=2)
    inputs = batch(generator)
    data = [{"input_ids": inputs["input_ids"][i], "labels": inputs["labels"][i]} for i in range(3)] * 4
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[],
                                          use_cpu=True, save_strategy="no", lr_scheduler_type="constant",
                                          dataloader_drop_last=True)  # fmt: skip
    calls = []
    allocator = ours.peftkern_rank_allocator
    original = allocator.update_and_allocate
    allocator.update_and_allocate = lambda model, step: (calls.append(step), original(model, step))
    transformers.Trainer(model=ours, args=args, train_dataset=data, callbacks=[peftkern.AdaLoraCallback()]).train()
    assert calls == [0, 1, 2, 3, 4, 5]  # once per optimizer step, not per micro-batch
    assert rank_pattern(ours) is not None


def test_training_without_update_and_allocate_warns_once(generator):
    _, ours = adalora_pair("llama", generator)
    inputs = batch(generator)
    with pytest.warns(UserWarning, match="update_and_allocate"):
        for _ in range(8):
            ours(**inputs)
    ours.eval()
    ours(**inputs)  # eval forwards never count


def test_nf4_base_matches_the_dequantized_dense_model(generator):
    config = {"peft_type": "ADALORA", **SCHEDULE, "init_lora_weights": False, "target_modules": TARGETS["llama"]}
    ours = peftkern.patch(tiny_model("llama"), config, quantize="nf4")
    dense = tiny_model("llama")
    for name, module in ours.named_modules():
        if isinstance(module, SVDLinear):
            with torch.no_grad():
                dense.get_submodule(name).weight.copy_(module.dense_weight(torch.float32))
    dense = peftkern.patch(dense, config)
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
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, dense_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    peftkern.update_and_allocate(ours, 3)


def test_bf16_autocast_and_compile(generator):
    _, ours = adalora_pair("llama", generator)
    inputs = batch(generator)
    with torch.no_grad():
        want = ours(**inputs).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(**inputs)
    torch.testing.assert_close(out.logits.float(), want, rtol=5e-2, atol=5e-2)
    out.loss.backward()
    ours.zero_grad()
    assert_compiled_matches_eager(ours, inputs)


@pytest.mark.parametrize("config, error, message", [
    ({"init_r": 0}, ValueError, "must be positive"),
    ({"init_r": 4, "target_r": 8}, ValueError, r"init_r \(4\) must be >= target_r"),
    ({"init_r": 2.5}, TypeError, "init_r must be an integer"),
    ({"total_step": None}, ValueError, "total_step"),
    ({"total_step": 0}, ValueError, "total_step"),
    ({"tinit": 8, "tfinal": 3}, ValueError, "budgeting phase"),
    ({"use_dora": True}, ValueError, "DoRA"),
    ({"beta1": 1.0}, ValueError, "beta1"),
    ({"orth_reg_weight": -1.0}, ValueError, "orth_reg_weight"),
    ({"use_rslora": True}, NotImplementedError, "use_rslora"),
    ({"target_modules": None, "model": "mistral"}, ValueError, "no default for model type 'mistral'"),
])  # fmt: skip
def test_bad_config_is_refused_and_the_model_left_alone(config, error, message):
    config = dict(config)
    model = tiny_model(config.pop("model", "llama"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        peftkern.patch(model, {"peft_type": "ADALORA", **SCHEDULE, **config})
    assert model.state_dict().keys() == state.keys() and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not hasattr(model, "_peftkern_patch_record") and not model._forward_hooks
    assert all(p.requires_grad for p in model.parameters())


def test_update_and_allocate_needs_an_adalora_model():
    model = peftkern.patch(tiny_model("llama"), {"r": 2, "target_modules": ["q_proj"]})
    with pytest.raises(TypeError, match="for AdaLoRA models"):
        peftkern.update_and_allocate(model, 0)
    with pytest.raises(RuntimeError, match="not patched"):
        peftkern.update_and_allocate(tiny_model("llama"), 0)
