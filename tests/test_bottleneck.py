"""Bottleneck adapters (peftkern.SeqBnConfig / DoubleSeqBnConfig / ParBnConfig) on tiny Llama,
Qwen2, Mistral, GPT-2 and BERT models built from configs, against an independent plain-PyTorch
reference written from AdapterHub's documented math (adapters/methods/modeling.py: Adapter /
ParallelAdapter pre_forward, forward, post_forward), installed with hooks on a copy of the model."""

import copy
import json
import types

import pytest
import torch
import torch.nn.functional as F

import peftkern
from peftkern.methods.bottleneck import BottleneckLayer
from peftkern.record import PatchRecord

from .helpers import batch, tiny_model, train_steps

transformers = pytest.importorskip("transformers")
from transformers.activations import get_activation  # noqa: E402  (what AdapterHub calls)

DECODERS = ["llama", "qwen2", "mistral", "gpt2"]
# Per architecture: [(site, location, norm in front (pre-LN) or None (post-LN))], as docs/bottleneck.md says.
SITES = {
    "llama": [("self_attn", "mh_adapter", "input_layernorm"), ("mlp", "output_adapter", "post_attention_layernorm")],
    "gpt2": [("attn", "mh_adapter", "ln_1"), ("mlp", "output_adapter", "ln_2")],
    "bert": [("attention.output", "mh_adapter", None), ("output", "output_adapter", None)],
}
SITES["qwen2"] = SITES["mistral"] = SITES["llama"]
LAYERS = {"llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers", "gpt2": "transformer.h",
          "bert": "encoder.layer"}  # fmt: skip


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                      max_position_embeddings=64)  # fmt: skip
    return transformers.BertModel(config, add_pooling_layer=False)


def base_model(arch):
    return tiny_bert() if arch == "bert" else tiny_model(arch)


def forward_loss(model, arch, inputs, probe):
    if arch == "bert":
        out = model(input_ids=inputs["input_ids"]).last_hidden_state
    else:
        out = model(input_ids=inputs["input_ids"]).logits
    return out, (out * probe).sum()


def randomize(model, generator):
    """Random non-zero adapter weights (a fresh adapter's up-projection is zero)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * (0.3 if "scaling" not in name else 1.0) + 
                        (1.0 if "scaling" in name else 0.0))  # fmt: skip


# ---- the reference: AdapterHub's math, hooks on a copy of the bare model ------------------------


def adapterhub_site(config, params, h, x, layer_norm):
    """Adapter.pre_forward -> forward -> post_forward (sequential) or ParallelAdapter's."""
    act = get_activation(config.non_linearity.lower())

    def bottleneck(z):  # adapter_down (Linear + act) -> adapter_up -> * scaling
        return F.linear(act(F.linear(z, params["down_w"], params["down_b"])), params["up_w"], params["up_b"]) * params["s"]

    if config.is_parallel:
        out = bottleneck(x) + h  # ParallelAdapter: input and residual are input_tensor; post_forward adds h
    else:
        residual = h if config.residual_before_ln is True else None
        hidden = h
        if config.original_ln_before:
            hidden = h + x
            if layer_norm is not None:
                if config.residual_before_ln == "post_add":
                    residual = hidden
                hidden = layer_norm(hidden)
        if not config.residual_before_ln:
            residual = hidden
        out = bottleneck(hidden) + residual
    if config.original_ln_after:
        out = layer_norm(out + x) if layer_norm is not None else out + x
    return out


def reference_model(base, arch, config, params_by_site):
    """A copy of `base` whose sites compute AdapterHub's output with `params_by_site` (leaf tensors)."""
    model = copy.deepcopy(base)
    for index, layer in enumerate(model.get_submodule(LAYERS[arch])):
        for site, location, norm in SITES[arch]:
            if not getattr(config, location) or index in config.leave_out:
                continue
            name = f"{LAYERS[arch]}.{index}.{site}"
            params = params_by_site[name]
            module = layer.get_submodule(site)
            if norm is None:  # post-LN: the module computes dense -> dropout -> LN(h + x); replace it all

                def forward(self, hidden_states, input_tensor, params=params):
                    h = self.dropout(self.dense(hidden_states))
                    return adapterhub_site(config, params, h, input_tensor, self.LayerNorm)

                module.forward = types.MethodType(forward, module)
                continue
            stash = {}
            getattr(layer, norm).register_forward_pre_hook(lambda m, args, stash=stash: stash.update(x=args[0]))

            def hook(module, args, output, params=params, stash=stash):
                # AdapterHub's decoder layer returns its adapter output as is; HF's adds x: take it off
                h = output[0] if isinstance(output, tuple) else output
                y = adapterhub_site(config, params, h, stash["x"], None) - stash["x"]
                return (y, *output[1:]) if isinstance(output, tuple) else y

            module.register_forward_hook(hook)
    return model


def site_params(patched, adapter_name="default"):
    """{site name: {down_w, down_b, up_w, up_b, s}} as fresh leaves copied from the patched model."""
    found = {}
    for name, layer in patched.named_modules():
        if isinstance(layer, BottleneckLayer):
            a = layer.adapters[adapter_name]
            s = a.scaling
            found[name] = {
                "down_w": a.adapter_down.weight.detach().clone().requires_grad_(),
                "down_b": a.adapter_down.bias.detach().clone().requires_grad_(),
                "up_w": a.adapter_up.weight.detach().clone().requires_grad_(),
                "up_b": a.adapter_up.bias.detach().clone().requires_grad_(),
                "s": s.detach().clone().requires_grad_() if isinstance(s, torch.nn.Parameter) else s,
            }
    return found


CONFIGS = {
    "seq": lambda: peftkern.SeqBnConfig(reduction_factor=4),
    "double_seq": lambda: peftkern.DoubleSeqBnConfig(reduction_factor=4),
    "par": lambda: peftkern.ParBnConfig(),
    "seq_residual_after_ln": lambda: peftkern.SeqBnConfig(reduction_factor=4, residual_before_ln=False),
    "seq_learned_gelu": lambda: peftkern.SeqBnConfig(reduction_factor=8, scaling="learned", non_linearity="gelu"),
    "double_seq_ln_before_gelu_new": lambda: peftkern.DoubleSeqBnConfig(reduction_factor=4, original_ln_before=True,
                                                                        non_linearity="gelu_new", leave_out=[0]),
    "par_learned_silu": lambda: peftkern.ParBnConfig(scaling="learned", non_linearity="silu", mh_adapter=True),
}
# LayerNorm placements that only exist where the site holds the LayerNorm (post-LN BERT)
BERT_ONLY = {
    "seq_no_ln_after": lambda: peftkern.SeqBnConfig(reduction_factor=4, original_ln_after=False),
    "seq_post_add": lambda: peftkern.SeqBnConfig(reduction_factor=4, residual_before_ln="post_add"),
    "double_seq_no_ln_after_residual_after_ln": lambda: peftkern.DoubleSeqBnConfig(
        reduction_factor=4, original_ln_before=True, original_ln_after=False, residual_before_ln=False),
}
CASES = [(a, c) for a in DECODERS + ["bert"] for c in CONFIGS] + [("bert", c) for c in BERT_ONLY]


@pytest.mark.parametrize("arch", DECODERS + ["bert"])
@pytest.mark.parametrize("config", ["seq", "double_seq", "par", "seq_learned_gelu"])
def test_fresh_adapter_is_the_identity(arch, config, generator):
    base = base_model(arch)
    inputs = batch(generator)
    probe = 0
    want, _ = forward_loss(base, arch, inputs, probe)
    patched = peftkern.patch(copy.deepcopy(base), CONFIGS[config]())
    got, _ = forward_loss(patched, arch, inputs, probe)
    assert any(isinstance(m, BottleneckLayer) for m in patched.modules())
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch, config", CASES)
def test_outputs_and_gradients_match_adapterhub_math(arch, config, generator):
    base = base_model(arch)
    cfg = {**CONFIGS, **BERT_ONLY}[config]()
    ours = peftkern.patch(copy.deepcopy(base), cfg)
    randomize(ours, generator)
    params = site_params(ours)
    expected_sites = {f"{LAYERS[arch]}.{i}.{site}" for i in range(2) if i not in cfg.leave_out
                      for site, location, _ in SITES[arch] if getattr(cfg, location)}  # fmt: skip
    assert set(params) == expected_sites
    reference = reference_model(base, arch, cfg, params)

    inputs = batch(generator)
    out_ref, _ = forward_loss(reference, arch, inputs, 0)
    probe = torch.randn(out_ref.shape, generator=generator)
    out_ours, loss_ours = forward_loss(ours, arch, inputs, probe)
    out_ref, loss_ref = forward_loss(reference, arch, inputs, probe)
    torch.testing.assert_close(out_ours, out_ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out_ours, forward_loss(base, arch, inputs, probe)[0])  # the adapters do something
    loss_ours.backward()
    loss_ref.backward()
    trainable = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    checked = 0
    for site, p in params.items():
        prefix = f"{site}.adapters.default."
        pairs = {"down_w": "adapter_down.weight", "down_b": "adapter_down.bias", "up_w": "adapter_up.weight",
                 "up_b": "adapter_up.bias", "s": "scaling"}  # fmt: skip
        for key, ours_name in pairs.items():
            if not isinstance(p[key], torch.Tensor):
                continue
            grad = trainable[prefix + ours_name].grad
            torch.testing.assert_close(grad, p[key].grad, rtol=1e-4, atol=1e-5, msg=prefix + ours_name)
            checked += 1
    assert checked == len(trainable)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_unpatch_restores_the_model_exactly(arch, generator):
    base = base_model(arch)
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = {n: type(m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    peftkern.patch(model, peftkern.ParBnConfig(mh_adapter=True, scaling="learned"))
    peftkern.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == types_before
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    inputs = batch(generator)
    assert torch.equal(forward_loss(model, arch, inputs, 0)[0], forward_loss(base, arch, inputs, 0)[0])


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_save_load_round_trip(arch, tmp_path, generator):
    base = base_model(arch)
    config = peftkern.SeqBnConfig(reduction_factor={"1": 8, "default": 4}, scaling="learned", non_linearity="gelu_new")
    ours = peftkern.patch(copy.deepcopy(base), config)
    randomize(ours, generator)
    peftkern.save_adapter(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["original_ln_before"] is True
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    site = f"base_model.model.{LAYERS[arch]}.1.{SITES[arch][1][0]}"
    assert {f"{site}.adapter_down.weight", f"{site}.adapter_down.bias", f"{site}.adapter_up.weight",
            f"{site}.adapter_up.bias", f"{site}.adapter_scaling"} <= keys  # fmt: skip
    assert load_file(str(tmp_path / "adapter_model.safetensors"))[f"{site}.adapter_down.weight"].shape == (32 // 8, 32)

    loaded = peftkern.load_adapter(copy.deepcopy(base), tmp_path)
    inputs = batch(generator)
    torch.testing.assert_close(forward_loss(loaded, arch, inputs, 0)[0], forward_loss(ours, arch, inputs, 0)[0],
                               rtol=0, atol=0)  # fmt: skip
    # a checkpoint does not fit a model with other sizes: refused, model untouched
    other = tiny_model("llama") if arch == "bert" else base_model("bert")
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises((KeyError, ValueError)):
        peftkern.load_adapter(other, tmp_path)
    assert other.state_dict().keys() == state.keys() and not hasattr(other, "_peftkern_patch_record")


def test_training_steps_reduce_the_loss(generator):
    model = peftkern.patch(tiny_model("llama"), peftkern.DoubleSeqBnConfig(reduction_factor=4, scaling="learned"))
    losses = train_steps(model, batch(generator), 5)
    assert losses[-1] < losses[0]


def test_config_round_trips_through_dicts():
    config = peftkern.ParBnConfig(non_linearity="swish", leave_out=[1])
    again = peftkern.BnConfig.from_any({**json.loads(json.dumps(config.__dict__)), "peft_type": "BOTTLENECK"})
    assert again == peftkern.BnConfig(**config.__dict__)
    assert peftkern.SeqBnConfig().original_ln_before and not peftkern.DoubleSeqBnConfig().original_ln_before
    assert peftkern.ParBnConfig().scaling == 4.0 and peftkern.ParBnConfig().is_parallel


@pytest.mark.parametrize(
    "arch, config, error, match",
    [
        ("llama", peftkern.SeqBnConfig(reduction_factor=64), ValueError, r"bottleneck size .* = 0 \(< 1 unit\)"),
        ("llama", peftkern.SeqBnConfig(non_linearity="tanhh"), ValueError, "non_linearity 'tanhh'"),
        ("llama", peftkern.SeqBnConfig(ln_after=True), NotImplementedError, "ln_after"),
        ("llama", peftkern.SeqBnConfig(scaling="channel"), NotImplementedError, "channel"),
        ("llama", peftkern.SeqBnConfig(dropout=0.1), NotImplementedError, "dropout"),
        ("llama", peftkern.SeqBnConfig(original_ln_after=False), ValueError, "drop the pre-trained residual"),
        ("gpt2", peftkern.SeqBnConfig(residual_before_ln="post_add"), ValueError, "post_add"),
        ("llama", peftkern.SeqBnConfig(reduction_factor=-2), ValueError, "positive number"),
        ("llama", peftkern.SeqBnConfig(output_adapter=False), ValueError, "no adapter would be added"),
        ("llama", peftkern.SeqBnConfig(leave_out=[0, 1]), ValueError, "no adapter site left"),
        ("llama", peftkern.SeqBnConfig(reduction_factor={"0": 4}), ValueError, "neither layer 1 nor a 'default'"),
        ("t5", peftkern.SeqBnConfig(), ValueError, "support model types"),
    ],
)
def test_bad_input_raises_and_leaves_the_model_untouched(arch, config, error, match):
    if arch == "t5":
        torch.manual_seed(0)
        model = transformers.T5Model(transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                           num_heads=2))  # fmt: skip
    else:
        model = base_model(arch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(error, match=match):
        peftkern.patch(model, config)
    assert {n: type(m) for n, m in model.named_modules()} == modules
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert all(p.requires_grad for p in model.parameters()) and not hasattr(model, "_peftkern_patch_record")
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_adapterhub_style_dict_selects_bottleneck(generator):
    """AdapterHub's config dicts (SeqBnConfig().to_dict()) carry "architecture": "bottleneck" and no
    peft_type: they must select the bottleneck method, not fall back to LoRA."""
    adapterhub_dict = {"architecture": "bottleneck", "mh_adapter": False, "output_adapter": True,
                       "reduction_factor": 4, "non_linearity": "relu", "original_ln_before": True,
                       "original_ln_after": True, "residual_before_ln": True, "init_weights": "mam_adapter",
                       "is_parallel": False, "scaling": 1.0, "phm_dim": 4, "hypercomplex_nonlinearity": "glorot-uniform"}  # fmt: skip
    model = peftkern.patch(tiny_model("llama"), adapterhub_dict)
    assert sum(isinstance(m, BottleneckLayer) for m in model.modules()) == 2
    assert PatchRecord.of(model).config == peftkern.BnConfig(**{
        k: v for k, v in adapterhub_dict.items() if k not in ("phm_dim", "hypercomplex_nonlinearity")})


def test_gradient_checkpointing_gives_the_same_gradients(generator):
    """The residual-input pre-hook fires again when a checkpointed layer is recomputed."""
    base = tiny_model("llama")
    plain = peftkern.patch(copy.deepcopy(base), peftkern.ParBnConfig(mh_adapter=True, scaling="learned"))
    randomize(plain, generator)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain.train()
    checkpointed.train()
    inputs = batch(generator)
    plain(**inputs).loss.backward()
    checkpointed(**inputs).loss.backward()
    grads = {n: p.grad for n, p in checkpointed.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for name, p in plain.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
