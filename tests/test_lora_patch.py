"""peftkern.patch with LoRA against Hugging Face PEFT itself, on tiny randomly initialised Llama
(GQA), Qwen2, Mistral and GPT-2 models built from configs: the same modules are targeted, and
with the same adapter weights the logits, loss, gradients and a few optimizer steps agree."""

import copy

import pytest
import torch

import peftkern

from .helpers import TARGETS, TINY, assert_compiled_matches_eager, assert_matches_peft, batch, lora_pair, tiny_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_logits_loss_gradients_and_steps_match_peft(arch, use_rslora, generator):
    theirs, ours = lora_pair(arch, target_modules=TARGETS[arch], use_rslora=use_rslora)
    # the same logits, loss and gradients, and four optimizer steps keep the same loss curve
    assert_matches_peft(theirs, ours, batch(generator), logits=(1e-5, 1e-5), loss=(1e-5, 1e-6), grads=(1e-4, 1e-6),
                        steps=4, step_losses=(1e-4, 1e-5))  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": ["q_proj", "v_proj"]},
        {"target_modules": r".*\.layers\.1\.self_attn\.(q|k)_proj"},
        {"target_modules": "all-linear"},
        {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1]},
        {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
        {"target_modules": "all-linear", "exclude_modules": ["o_proj", "gate_proj"]},
        {},  # PEFT's default targets for the architecture
    ],
)
def test_same_targets_as_peft(config):
    base = tiny_model("llama")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, **config))
    ours = peftkern.patch(copy.deepcopy(base), {"r": 2, **config})
    their_names = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    our_names = {n for n, m in ours.named_modules() if isinstance(m, peftkern.methods.lora.LoraLinear)}
    assert our_names == their_names and our_names


def test_trainable_parameters_are_exactly_the_adapters(capsys):
    theirs, ours = lora_pair("llama", target_modules=["q_proj", "v_proj"])
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad
    }
    peftkern.print_trainable_parameters(ours)
    ours_line = capsys.readouterr().out.strip()
    theirs.print_trainable_parameters()
    assert ours_line == capsys.readouterr().out.strip()


def test_unpatch_restores_the_model_exactly(generator):
    model = tiny_model("gpt2")
    model.transformer.wte.weight.requires_grad_(False)  # a user's own freezing survives
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    peftkern.patch(model, {"r": 4, "target_modules": ["c_attn", "c_fc"], "init_lora_weights": False})
    peftkern.merge(model)
    peftkern.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in modules.items()}
    assert all(model.get_submodule(n) is m for n, m in modules.items() if n)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("arch, extra", [("llama", {}), ("gpt2", {"use_dora": True}), ("llama", {"use_dora": True})])
def test_merge_unmerge_and_merge_and_unload(arch, extra, generator):
    _, model = lora_pair(arch, target_modules=TARGETS[arch][:2], **extra)
    inputs = batch(generator)
    model.eval()
    with torch.no_grad():
        want = model(**inputs).logits
        peftkern.merge(model)
        torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-4, atol=1e-5)
        peftkern.unmerge(model)
        torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-4, atol=1e-5)
        plain = peftkern.merge_and_unload(model)
        assert not any(isinstance(m, peftkern.methods.lora.LoraLinear) for m in plain.modules())
        torch.testing.assert_close(plain(**inputs).logits, want, rtol=1e-4, atol=1e-5)


def test_dropout_is_active_in_train_mode_only(generator):
    _, model = lora_pair("llama", target_modules=["q_proj"], lora_dropout=0.5)
    inputs = batch(generator)
    model.eval()
    with torch.no_grad():
        a, b = model(**inputs).logits, model(**inputs).logits
        model.train()
        c = model(**inputs).logits
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize(
    "config, error, message",
    [
        ({"r": 4, "target_modules": ["no_such_module"]}, ValueError, "matches target_modules"),
        ({"r": 0, "target_modules": ["q_proj"]}, ValueError, "r must be a positive integer"),
        ({"r": 4, "target_modules": ["q_proj", "embed_tokens"]}, TypeError, "'model.embed_tokens'.*Embedding"),
        ({"r": 4, "target_modules": ["q_proj"], "bias": "some"}, ValueError, "bias must be"),
        ({"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["no_head"]}, ValueError, "modules_to_save.*no_head"),
        ({"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["q_proj"]}, ValueError, "overlaps"),
        ({"r": 4, "target_modules": ["q_proj"], "rank_pattern": {"q_proj": 0}}, ValueError, "rank_pattern"),
        ({"r": 4, "target_modules": ["q_proj"], "init_lora_weights": "olora"}, NotImplementedError, "olora"),
        ({"r": 4, "target_modules": ["q_proj"], "lora_dropout": 1.0}, ValueError, "lora_dropout"),
    ],
)
def test_bad_config_leaves_the_model_untouched(config, error, message):
    model = tiny_model("llama")
    before = {n: (type(m), m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(error, match=message):
        peftkern.patch(model, config)
    assert {n: (type(m), m) for n, m in model.named_modules()} == before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_accepts_peft_config_objects():
    model = peftkern.patch(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["k_proj"]))
    assert sum(isinstance(m, peftkern.methods.lora.LoraLinear) for m in model.modules()) == 2
    with pytest.raises(RuntimeError, match="already patched"):
        peftkern.patch(model, {"r": 2, "target_modules": ["q_proj"]})


def test_autocast_bf16_as_accurate_as_peft(generator):
    theirs, ours = lora_pair("llama", target_modules=TARGETS["llama"])
    inputs = batch(generator)
    with torch.no_grad():
        exact = ours(**inputs).logits  # float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_ours, out_theirs = ours(**inputs).logits, theirs(**inputs).logits
    assert out_ours.dtype == out_theirs.dtype

    def error(t):
        return ((t.float() - exact).norm() / exact.norm()).item()

    assert error(out_ours) <= 2 * error(out_theirs) + 1e-3, (error(out_ours), error(out_theirs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours(**inputs).loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in ours.parameters() if p.requires_grad)


def test_gradient_checkpointing_gives_the_same_gradients(generator):
    _, plain = lora_pair("llama", target_modules=TARGETS["llama"], lora_dropout=0.1)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = batch(generator)
    grads = []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(1234)  # the same dropout masks in both runs (checkpointing replays the RNG)
        model(**inputs).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_torch_compile_patched_model(generator):
    _, model = lora_pair("llama", target_modules=TARGETS["llama"])
    assert_compiled_matches_eager(model, batch(generator))


def classifier_model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(config)


@pytest.mark.parametrize(
    "options",
    [
        {"bias": "all"},
        {"bias": "lora_only"},
        {"modules_to_save": ["lm_head"]},
        {"rank_pattern": {"v_proj": 2, "layers.1.self_attn.q_proj": 3}, "alpha_pattern": {"q_proj": 16}},
        {"init_lora_weights": "pissa"},
        {"task_type": "SEQ_CLS"},
    ],
    ids=["bias-all", "bias-lora_only", "modules_to_save", "rank_alpha_pattern", "pissa", "seq_cls"],
)
def test_more_lora_options_match_peft(options, generator, tmp_path):
    """Same trainable parameters, logits, loss, gradients and checkpoint keys as PEFT; the
    checkpoint loads into PEFT with the same logits; unpatch restores the base exactly."""
    base = classifier_model() if options.get("task_type") == "SEQ_CLS" else tiny_model("qwen2")  # qwen2: biases
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **options}
    original = copy.deepcopy(base.state_dict())
    pristine = copy.deepcopy(base)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = peftkern.patch(base, config)
    prefix = "base_model.model."
    their_state = {k.removeprefix(prefix): v for k, v in theirs.state_dict().items()}
    assert their_state.keys() == ours.state_dict().keys()
    pissa = options.get("init_lora_weights") == "pissa"
    with torch.no_grad():
        for key, value in ours.state_dict().items():
            if pissa or "lora_" not in key:  # bases (pissa: the residual) and pissa's A, B agree as built
                torch.testing.assert_close(value, their_state[key], rtol=1e-4, atol=1e-5, msg=key)
            elif "lora_B" in key:  # random, non-zero B so the adapters matter
                their_state[key].normal_(generator=generator)
            value.copy_(their_state[key])
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n.removeprefix(prefix) for n, p in theirs.named_parameters() if p.requires_grad}
    assert any("lora_" not in n for n in trainable) or "rank_pattern" in options or "init_lora_weights" in options

    ids = torch.randint(1, 96, (3, 11), generator=generator)
    labels = torch.randint(0, 3, (3,), generator=generator) if "task_type" in options else ids
    assert_matches_peft(theirs, ours, {"input_ids": ids, "labels": labels}, logits=(1e-5, 1e-5), grads=(1e-4, 1e-6))

    from peft.utils import get_peft_model_state_dict

    assert set(peftkern.io.adapter_state_dict(ours)) == set(get_peft_model_state_dict(theirs))
    peftkern.save_adapter(ours, tmp_path)
    # (pissa: the config says so, and loading recomputes the residual from the original base)
    reloaded = peft.PeftModel.from_pretrained(pristine, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)

    peftkern.unpatch(ours)
    if options.get("bias") is None:  # trained biases are the base's own, as in PEFT: not undone
        for key, value in ours.state_dict().items():
            assert torch.equal(value, original[key]), key
