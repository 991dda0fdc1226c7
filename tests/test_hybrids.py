"""Hybrid methods: `peftkern.ConfigUnion` (several methods in one model), trained together, saved
one folder per component, reloaded, unpatched exactly; LoRA + prompt / prefix tuning against PEFT
composed as the spec describes; conflicts refused before anything changes."""

import copy
import json
import warnings

import pytest
import torch

import peftkern
from peftkern.nf4 import NF4Linear

from .helpers import assert_unchanged, snapshot, tiny_model, train_steps

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "position ids are not supported" for prompt tuning
        return fn(*args, **kwargs)


def inputs(generator, rows=3, length=9):
    ids = torch.randint(3, 96, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # one left-padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


LORA = {"r": 4, "lora_alpha": 8, "init_lora_weights": False}
UNIONS = {  # (architecture, components, patch options)
    "lora+seqbn": ("llama", [peftkern.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], **LORA),
                             peftkern.SeqBnConfig(reduction_factor=4, init_weights="bert")], {}),
    "qlora+seqbn": ("llama", [peftkern.LoraConfig(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], **LORA),
                              peftkern.SeqBnConfig(reduction_factor=4, init_weights="bert")], {"quantize": "nf4"}),
    "lora+parbn": ("gpt2", [peftkern.LoraConfig(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, **LORA),
                            peftkern.ParBnConfig(reduction_factor=4, init_weights="bert")], {}),
    "lora+ia3+doubleseqbn": ("qwen2", [peftkern.LoraConfig(target_modules=["q_proj", "o_proj"], **LORA),
                                       peftkern.IA3Config(target_modules=["k_proj", "down_proj"],
                                                          feedforward_modules=["down_proj"]),
                                       peftkern.DoubleSeqBnConfig(reduction_factor=4, init_weights="bert")], {}),
    "lora+prompt": ("llama", [peftkern.LoraConfig(target_modules=["q_proj", "v_proj"], **LORA),
                              peftkern.PromptTuningConfig(num_virtual_tokens=4)], {}),
    "lora+prefix": ("mistral", [peftkern.LoraConfig(target_modules=["q_proj", "v_proj"], **LORA),
                                peftkern.PrefixTuningConfig(num_virtual_tokens=4)], {}),
    "lora+seqbn+prefix-projection": ("gpt2", [peftkern.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True, **LORA),
                                              peftkern.SeqBnConfig(reduction_factor=4, init_weights="bert"),
                                              peftkern.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True,
                                                                          encoder_hidden_size=16)], {}),
}  # fmt: skip


def base_for(arch, options):
    model = tiny_model(arch)
    if options.get("quantize"):  # QLoRA: the base arrives quantized; unpatch gives back the NF4 layers
        peftkern.unpatch(peftkern.patch(model, peftkern.LoraConfig(target_modules=["q_proj", "v_proj", "up_proj",
                                                                                   "down_proj"]), quantize="nf4"))  # fmt: skip
        assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 8
        options = {}
    return model, options


@pytest.mark.parametrize("case", list(UNIONS))
def test_union_trains_together_and_unpatches_exactly(case, generator):
    arch, parts, options = UNIONS[case]
    model, options = base_for(arch, options)
    batch = inputs(generator)
    snap = snapshot(model)
    with torch.no_grad():
        want = model(**batch).logits
    peftkern.patch(model, peftkern.ConfigUnion(*copy.deepcopy(parts)), **options)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    markers = {"LORA": "lora_", "IA3": "ia3_l", "BOTTLENECK": "adapter_", "PREFIX_TUNING": "prompt_encoder",
               "PROMPT_TUNING": "prompt_encoder"}  # fmt: skip
    for part in parts:  # every component trains, and nothing else
        assert any(markers[part.peft_type] in n for n in trainable), part.peft_type
    assert all(any(m in n for m in markers.values()) for n in trainable)
    losses = quiet(train_steps, model, batch, 4)
    assert losses[-1] < losses[0] - 1e-3, losses
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
    peftkern.unpatch(model)
    assert_unchanged(model, snap)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, want)


def test_lora_inside_an_adapter_is_the_two_applied_in_turn(generator):
    """LoRA + SeqBn (LoRA inside the adapted FFN) equals LoRA merged into a dense model, then the
    same adapter patched on alone."""
    base = tiny_model("llama")
    lora, bn = UNIONS["lora+seqbn"][1]
    union = peftkern.patch(copy.deepcopy(base), peftkern.ConfigUnion(lora, bn))
    batch = inputs(generator)
    with torch.no_grad():
        for _, p in union.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.2, generator=generator)
    sequential = peftkern.patch(copy.deepcopy(base), lora)
    ours = dict(union.named_parameters())
    with torch.no_grad():
        for name, p in sequential.named_parameters():
            if p.requires_grad:
                p.copy_(ours[name.replace("mlp.", "mlp.base_layer.").replace(".default.", ".default_lora.")])
    peftkern.merge_and_unload(sequential)
    peftkern.patch(sequential, bn)
    with torch.no_grad():
        for name, p in sequential.named_parameters():
            if p.requires_grad:
                p.copy_(ours[name.replace(".default.", ".default_bottleneck.")])
        got, want = union(**batch).logits, sequential(**batch).logits
    assert not torch.allclose(want, base(**batch).logits, atol=1e-2)  # both parts move the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def peft_composed(base, kind, n, lora):
    """PEFT as the spec composes LoRA with prompt learning: inject_adapter_in_model(LoraConfig),
    then get_peft_model(PromptTuningConfig | PrefixTuningConfig), then LoRA's grads back on."""
    model = peft.inject_adapter_in_model(peft.LoraConfig(**lora), copy.deepcopy(base))
    config = {"prompt": peft.PromptTuningConfig, "prefix": peft.PrefixTuningConfig}[kind]
    model = quiet(peft.get_peft_model, model, config(task_type="CAUSAL_LM", num_virtual_tokens=n))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    return model


def our_name(kind, their_name):
    """PEFT's name of a trainable parameter -> ours (a prompt-learning PeftModel's base_model is
    the model itself; our components are adapters named default_<method>)."""
    if their_name.startswith("prompt_encoder.default."):
        return their_name.replace(".default.", f".default_{kind}_tuning.")
    return their_name.removeprefix("base_model.").replace(".default.", ".default_lora.")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_lora_with_prompt_learning_matches_peft_composed(arch, kind, generator):
    base = tiny_model(arch)
    n = 4
    lora = {"target_modules": ["c_attn"], "fan_in_fan_out": True} if arch == "gpt2" else {"target_modules": ["q_proj", "v_proj"]}
    lora.update(LORA)
    theirs = peft_composed(base, kind, n, lora)
    prompt = {"prompt": peftkern.PromptTuningConfig, "prefix": peftkern.PrefixTuningConfig}[kind](num_virtual_tokens=n)
    ours = peftkern.patch(copy.deepcopy(base), peftkern.ConfigUnion(lora, prompt))
    their_params = {our_name(kind, k): p for k, p in theirs.named_parameters() if p.requires_grad}
    our_params = {k: p for k, p in ours.named_parameters() if p.requires_grad}
    assert their_params.keys() == our_params.keys()
    with torch.no_grad():
        for name, p in their_params.items():
            our_params[name].copy_(p)
    batch = inputs(generator)
    out_theirs, out_ours = quiet(theirs, **batch), quiet(ours, **batch)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-5, atol=1e-5)
    out_theirs.loss.backward()
    out_ours.loss.backward()
    for name, p in their_params.items():
        torch.testing.assert_close(our_params[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    theirs.zero_grad()
    ours.zero_grad()
    their_losses, our_losses = quiet(train_steps, theirs, batch, 4), quiet(train_steps, ours, batch, 4)
    assert our_losses[-1] < our_losses[0]
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(their_losses), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["lora+seqbn", "qlora+seqbn", "lora+ia3+doubleseqbn", "lora+prefix", "lora+prompt"])
def test_union_checkpoint_reloads_into_a_fresh_model(case, tmp_path, generator):
    arch, parts, options = UNIONS[case]
    model, _ = base_for(arch, options)
    fresh = copy.deepcopy(model)
    peftkern.patch(model, peftkern.ConfigUnion(*copy.deepcopy(parts)))
    batch = inputs(generator)
    quiet(train_steps, model, batch, 2)  # every component away from its init
    peftkern.save_adapter(model, tmp_path)
    folders = [p.peft_type.lower() for p in parts]
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == {"peft_type": "UNION", "components": folders}
    for folder in folders:  # each folder is a checkpoint of its own method
        config = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        assert config["peft_type"] == folder.upper()
    peftkern.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(quiet(fresh, **batch).logits, quiet(model, **batch).logits, rtol=0, atol=0)


def test_union_component_folders_load_in_their_own_libraries(tmp_path, generator):
    """LoRA (inside the adapted FFN) + SeqBn + prefix: the LoRA and prefix folders are PEFT
    checkpoints holding the union's live tensors under PEFT's names (the adapter's wrapper does
    not show in them), and the bottleneck folder loads alone into peftkern."""
    base = tiny_model("llama")
    lora, bn = UNIONS["lora+seqbn"][1]
    prefix = peftkern.PrefixTuningConfig(num_virtual_tokens=3)
    model = peftkern.patch(copy.deepcopy(base), peftkern.ConfigUnion(lora, bn, prefix))
    quiet(train_steps, model, inputs(generator), 2)
    peftkern.save_adapter(model, tmp_path)
    theirs = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), str(tmp_path / "lora"))
    live = {n.replace(".base_layer.down_proj", ".down_proj").replace(".default_lora.", ".default."): p
            for n, p in model.named_parameters() if "lora_" in n}  # fmt: skip
    loaded = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters() if "lora_" in n}
    assert loaded.keys() == live.keys() and len(live) == 12  # q, v, down: A and B, 2 layers
    assert all(torch.equal(loaded[n], live[n]) for n in live)
    theirs = quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), str(tmp_path / "prefix_tuning"))
    assert torch.equal(theirs.prompt_encoder["default"].embedding.weight,
                       model.prompt_encoder["default_prefix_tuning"].embedding.weight)  # fmt: skip
    alone = peftkern.load_adapter(copy.deepcopy(base), tmp_path / "bottleneck")
    assert torch.equal(alone.model.layers[1].mlp.adapters["default"].adapter_up.weight,
                       model.model.layers[1].mlp.adapters["default_bottleneck"].adapter_up.weight)  # fmt: skip


def test_a_checkpoint_that_does_not_fit_leaves_no_trace(tmp_path):
    model = peftkern.patch(tiny_model("llama"), peftkern.ConfigUnion(*UNIONS["lora+seqbn"][1]))
    peftkern.save_adapter(model, tmp_path)
    other = tiny_model("llama")
    snap = snapshot(other)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match="checkpoint shape"):
        peftkern.load_adapter(other, tmp_path)
    assert_unchanged(other, snap)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "UNION", "components": ["../lora"]}))
    with pytest.raises(ValueError, match="folder names"):
        peftkern.load_adapter(other, tmp_path)
    assert_unchanged(other, snap)


LLAMA_LORA = peftkern.LoraConfig(target_modules=["q_proj", "down_proj"])


@pytest.mark.parametrize(
    "arch, parts, error, message",
    [
        ("llama", [peftkern.PromptTuningConfig(num_virtual_tokens=2), peftkern.PrefixTuningConfig(num_virtual_tokens=2)],
         ValueError, "two prompt-learning components, 'prompt_tuning' and 'prefix_tuning'"),
        ("llama", [LLAMA_LORA, peftkern.LoraConfig(target_modules=["v_proj", "down_proj"])], ValueError,
         r"'lora' and 'lora_1' both claim module 'model.layers.0.mlp.down_proj' \(both replace it\)"),
        ("llama", [LLAMA_LORA, peftkern.IA3Config(target_modules=["q_proj"], feedforward_modules=[])], ValueError,
         r"'lora' and 'ia3' both claim module 'model.layers.0.self_attn.q_proj'"),
        ("llama", [peftkern.SeqBnConfig(), peftkern.ParBnConfig()], ValueError,
         r"'bottleneck' and 'bottleneck_1' both claim module 'model.layers.0.mlp' \(both wrap it\)"),
        ("llama", [LLAMA_LORA, "lora"], TypeError, "component 1 is a str"),
        ("llama", [LLAMA_LORA, peftkern.BitFitConfig()], NotImplementedError, "component 1 is BITFIT"),
        ("llama", [LLAMA_LORA, {"peft_type": "LOHA"}], ValueError, "LOHA"),
        ("llama", [peftkern.LoraConfig(target_modules=["q_proj"], bias="all")], NotImplementedError, "bias"),
        ("llama", [], ValueError, "at least one"),
        ("llama", [LLAMA_LORA, peftkern.PrefixTuningConfig(num_virtual_tokens=2, num_layers=3)], ValueError, "layers"),
        ("llama", [LLAMA_LORA, peftkern.LoraConfig(target_modules=["no_such"])], ValueError, "no_such"),
        ("bert", [LLAMA_LORA], ValueError, "q_proj"),
    ],
)
def test_conflicts_and_bad_components_are_refused_before_anything_changes(arch, parts, error, message):
    model = tiny_model("llama") if arch == "llama" else transformers.BertModel(
        transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64))  # fmt: skip
    snap = snapshot(model)
    with pytest.raises(error, match=message):
        peftkern.patch(model, peftkern.ConfigUnion(*parts))
    assert_unchanged(model, snap)


def test_adapters_at_disjoint_sites_compose(generator):
    """Two bottleneck components are allowed at disjoint sites (AdapterHub's rule): one after
    attention, one after the FFN."""
    model = tiny_model("llama")
    after_attention = peftkern.BnConfig(mh_adapter=True, output_adapter=False, reduction_factor=4, init_weights="bert")
    peftkern.patch(model, peftkern.ConfigUnion(after_attention, peftkern.SeqBnConfig(reduction_factor=4)))
    layer = model.model.layers[0]
    assert list(layer.self_attn.adapters) == ["default_bottleneck"] and list(layer.mlp.adapters) == ["default_bottleneck_1"]
    losses = train_steps(model, inputs(generator), 4)
    assert losses[-1] < losses[0] - 1e-3, losses


def test_union_quantize_option_reaches_the_lora_component(generator):
    """quantize="nf4" (QLoRA) goes to the layer methods: the LoRA bases become NF4, the adapter
    wraps the FFN around them, and the union trains."""
    model = tiny_model("llama")
    lora, bn = copy.deepcopy(UNIONS["qlora+seqbn"][1])
    peftkern.patch(model, peftkern.ConfigUnion(lora, bn), quantize="nf4")
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.base_layer.down_proj.base_layer, NF4Linear)
    assert isinstance(mlp.base_layer.gate_proj, torch.nn.Linear)  # not a LoRA target: left dense
    losses = train_steps(model, inputs(generator), 4)
    assert losses[-1] < losses[0] - 1e-3, losses
    with pytest.raises(TypeError, match="LoRA / IA³ components"):
        peftkern.patch(tiny_model("llama"), peftkern.ConfigUnion(bn), quantize="nf4")


def test_union_on_a_patched_model_and_merge_are_refused(tmp_path):
    model = peftkern.patch(tiny_model("llama"), peftkern.ConfigUnion(*copy.deepcopy(UNIONS["lora+seqbn"][1])))
    with pytest.raises(RuntimeError, match="already patched"):
        peftkern.patch(model, peftkern.ConfigUnion(peftkern.LoraConfig(target_modules=["k_proj"])))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match="BottleneckLayer layers cannot be merged"):
        peftkern.merge(model)
    assert not any(getattr(m, "merged", False) for m in model.modules())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="unpatched model only"):
        peftkern.save_adapter(model, tmp_path) or peftkern.load_adapter(model, tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mam_trains_saves_reloads_and_unpatches(arch, tmp_path, generator):
    """MAMConfig(): AdapterHub's defaults (prefix 30 tokens through an 800-unit MLP, a parallel
    adapter with reduction 2 and scaling 4 on the FFN); trains, reloads, unpatches exactly."""
    model = tiny_model(arch)
    fresh = copy.deepcopy(model)
    snap = snapshot(model)
    batch = inputs(generator)
    with torch.no_grad():
        want = model(**batch).logits
    peftkern.patch(model, peftkern.MAMConfig())
    encoder = model.prompt_encoder["default_prefix_tuning"]
    assert encoder.embedding.weight.shape[0] == 30 and encoder.transform[0].out_features == 800
    mlp = model.transformer.h[0].mlp if arch == "gpt2" else model.model.layers[0].mlp
    adapter = mlp.adapters["default_bottleneck"]
    assert adapter.adapter_down.out_features == 16 and adapter.scaling == 4.0  # hidden 32 // 2
    assert model.config.model_type == arch and mlp.bn_config.is_parallel
    losses = quiet(train_steps, model, batch, 4)
    assert losses[-1] < losses[0] - 1e-3, losses
    peftkern.save_adapter(model, tmp_path)
    peftkern.load_adapter(fresh, tmp_path)  # the prefix loads folded (as PEFT loads a projected prefix)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)
    peftkern.unpatch(model)
    assert_unchanged(model, snap)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, want)


def test_a_failure_midway_undoes_the_components_already_applied(monkeypatch):
    """The prefix component fails while applying, after LoRA and the adapter were applied: the
    model is left as it was."""
    from peftkern.methods import prefix

    def fail(*args, **kwargs):
        raise RuntimeError("planted failure")

    model = tiny_model("llama")
    snap = snapshot(model)
    monkeypatch.setattr(prefix, "PrefixEncoder", fail)
    lora, bn = copy.deepcopy(UNIONS["lora+seqbn"][1])
    with pytest.raises(RuntimeError, match="planted failure"):
        peftkern.patch(model, peftkern.ConfigUnion(lora, bn, peftkern.PrefixTuningConfig(num_virtual_tokens=2)))
    assert_unchanged(model, snap)


def test_save_pretrained_of_a_union_writes_the_union_layout(tmp_path, generator):
    """transformers' save_pretrained (what Trainer's checkpoints call) of a patched union."""
    model = peftkern.patch(tiny_model("llama"), peftkern.ConfigUnion(*copy.deepcopy(UNIONS["lora+prompt"][1])))
    quiet(train_steps, model, inputs(generator), 1)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "lora", "model.safetensors",
                                                          "prompt_tuning"]  # fmt: skip
    fresh = peftkern.load_adapter(tiny_model("llama"), tmp_path)
    batch = inputs(generator)
    with torch.no_grad():
        torch.testing.assert_close(quiet(fresh, **batch).logits, quiet(model, **batch).logits, rtol=0, atol=0)


def test_a_union_as_a_dict_patches_the_same_model(generator):
    """ConfigUnion.to_dict() (peft_type "UNION", each component's fields) patches as the union does."""
    union = peftkern.ConfigUnion(*copy.deepcopy(UNIONS["lora+ia3+doubleseqbn"][1]))
    as_dict = union.to_dict()
    json.dumps(as_dict)  # plain JSON
    a, b = peftkern.patch(tiny_model("qwen2"), union), peftkern.patch(tiny_model("qwen2"), as_dict)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    with torch.no_grad():
        for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            q.copy_(p)
        batch = inputs(generator)
        assert torch.equal(a(**batch).logits, b(**batch).logits)
