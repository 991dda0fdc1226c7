"""UniPELT (`peftkern.UniPELTConfig`): AdapterHub's defaults, the gates of LoRA, bottleneck
adapters and prefix tuning against a plain-PyTorch rewrite of AdapterHub's formula (values and
gradients), training, checkpoints (gates included), exact unpatch, generate(), bad input."""

import copy
import json

import pytest
import torch
from torch.nn import functional as F

import peftkern
from peftkern.methods.bottleneck import BottleneckAdapter
from peftkern.methods.lora import LoraLinear

from .helpers import assert_unchanged, snapshot, tiny_model, train_steps

transformers = pytest.importorskip("transformers")


def inputs(generator, rows=3, length=9):
    ids = torch.randint(3, 96, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # one left-padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def adapterhub_gate(x, weight, bias):
    """AdapterHub: torch.mean(torch.sigmoid(gate(x)), dim=1) -> [batch, outputs]."""
    return torch.mean(torch.sigmoid(x @ weight.t() + bias), dim=1)


def randomise(model, generator):
    """Every trainable tensor random (LoRA's B and the adapters' up-projections start at zero)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3)


def test_unipelt_config_has_adapterhub_defaults():
    model = peftkern.patch(tiny_model("llama"), peftkern.UniPELTConfig())
    encoder = model.prompt_encoder["default_prefix_tuning"]
    assert encoder.embedding.weight.shape[0] == 10 and encoder.transform[0].out_features == 512  # flat=False, 512
    assert [tuple(g.weight.shape) for g in encoder.gates] == [(1, 32)] * 2  # Linear(hidden, 1): shared_gating
    layer = model.model.layers[0]
    for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
        assert isinstance(proj, LoraLinear) and proj.lora_A["default_lora"].out_features == 8
        assert proj.lora_gate["default_lora"].weight.shape == (1, 32)
    assert not isinstance(layer.self_attn.k_proj, LoraLinear)
    adapter = layer.mlp.adapters["default_bottleneck"]
    assert adapter.adapter_down.out_features == 2 and adapter.gate.weight.shape == (1, 32)  # 32 // 16
    assert layer.mlp.bn_config.use_gating and not layer.mlp.bn_config.is_parallel
    assert torch.equal(adapter.gate.bias, torch.zeros(1))  # "bert" init: zero bias, weights ~ N(0, 0.02)
    gates = torch.cat([g.weight for g in encoder.gates] + [adapter.gate.weight])
    assert 0 < gates.std() < 0.05
    union = peftkern.UniPELTConfig()
    assert union.use_gating and [c.peft_type for c in union.configs] == ["PREFIX_TUNING", "BOTTLENECK", "LORA"]
    assert union.to_dict()["use_gating"] is True


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_gated_lora_is_adapterhubs_formula(dtype, tol, generator):
    """y = x·Wᵀ + b + G·(x·Aᵀ)·Bᵀ with G = mean_seq σ(x·W_gᵀ + b_g) per sequence, α/r dropped."""
    base = torch.nn.Linear(24, 20).to(dtype)
    layer = LoraLinear(base, "a", peftkern.LoraConfig(r=4, lora_alpha=16))
    layer.add_gate("a")
    randomise(layer, generator)
    params = [layer.lora_A["a"].weight, layer.lora_B["a"].weight, layer.lora_gate["a"].weight, layer.lora_gate["a"].bias]
    x = torch.randn(3, 7, 24, generator=generator).to(dtype).requires_grad_()
    out = layer(x)
    grad = torch.randn(out.shape, generator=generator).to(dtype)
    got = torch.autograd.grad(out, [x, *params], grad)
    a, b, gw, gb = (p.detach().double().requires_grad_() for p in params)
    x64 = x.detach().double().requires_grad_()
    gate = adapterhub_gate(x64, gw, gb)
    want = F.linear(x64, base.weight.double(), base.bias.double()) + (x64 @ a.t() @ b.t()) * gate.unsqueeze(-1)
    wants = torch.autograd.grad(want, [x64, a, b, gw, gb], grad.double())
    assert torch.isfinite(out).all()
    # bf16 rounds the base and the LoRA terms before they are summed: where they cancel, the error is
    # a fraction of the terms' magnitude, not of the output (seed 2122265023: 0.018 on an output of 0.013)
    x_abs = x64.detach().abs()
    magnitude = F.linear(x_abs, base.weight.double().abs(), base.bias.double().abs()) + (
        x_abs @ a.detach().abs().t() @ b.detach().abs().t()
    ) * gate.detach().unsqueeze(-1)
    assert ((out.double() - want.detach()).abs() <= tol * magnitude + tol).all()
    for g, w in zip(got, wants):
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol * 10)


def test_gated_lora_gradcheck_float64(generator):
    layer = LoraLinear(torch.nn.Linear(6, 5).double(), "a", peftkern.LoraConfig(r=2))
    layer.add_gate("a")
    randomise(layer, generator)
    names = ["lora_A.a.weight", "lora_B.a.weight", "lora_gate.a.weight", "lora_gate.a.bias"]
    params = dict(layer.named_parameters())

    def f(x, *tensors):
        return torch.func.functional_call(layer, dict(zip(names, tensors)), (x,))

    x = torch.randn(2, 3, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, *(params[n].detach().requires_grad_() for n in names)))


@pytest.mark.parametrize("config", [peftkern.SeqBnConfig(reduction_factor=4, init_weights="bert", use_gating=True),
                                    peftkern.ParBnConfig(reduction_factor=4, use_gating=True, non_linearity="gelu")])
def test_gated_adapter_is_adapterhubs_formula(config, generator):
    """y = residual + G·s·up(act(down(z))), G = mean_seq σ(z·W_gᵀ + b_g) (Adapter.forward)."""
    adapter = BottleneckAdapter(16, 4, config, dtype=torch.float64)
    randomise(adapter, generator)
    z = torch.randn(3, 5, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(3, 5, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    out = adapter(z, residual)
    act = F.relu if config.non_linearity == "relu" else F.gelu
    params = [adapter.adapter_down.weight, adapter.adapter_down.bias, adapter.adapter_up.weight,
              adapter.adapter_up.bias, adapter.gate.weight, adapter.gate.bias]  # fmt: skip
    up = F.linear(act(F.linear(z, params[0], params[1])), params[2], params[3]) * config.scaling
    want = residual + up * adapterhub_gate(z, params[4], params[5]).unsqueeze(-1)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    for g, w in zip(torch.autograd.grad(out, [z, residual, *params], grad),
                    torch.autograd.grad(want, [z, residual, *params], grad)):  # fmt: skip
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)
    names = ["gate.weight", "gate.bias", "adapter_up.weight"]

    def f(z, *tensors):
        return torch.func.functional_call(adapter, dict(zip(names, tensors)), (z, residual.detach()))

    assert torch.autograd.gradcheck(f, (z, *(dict(adapter.named_parameters())[n].detach().requires_grad_() for n in names)))


def test_gated_prefix_is_adapterhubs_formula(generator, monkeypatch):
    """Each layer's prefix keys (values) are scaled by G = mean_seq σ(h·W_gᵀ + b_g), h the
    attention's input; real keys follow unchanged (PrefixTuningLayer.compose_single)."""
    model = peftkern.patch(tiny_model("llama"), peftkern.UniPELTConfig())
    randomise(model, generator)
    encoder = model.prompt_encoder["default_prefix_tuning"]
    hidden = {}
    handles = [layer.self_attn.register_forward_pre_hook(
        lambda m, args, kwargs: hidden.__setitem__(m.layer_idx, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]),
        with_kwargs=True) for layer in model.model.layers]  # fmt: skip
    from peftkern.methods.gated_prefix import GatedPrefixLayer

    seen = []
    update = GatedPrefixLayer.update
    monkeypatch.setattr(GatedPrefixLayer, "update",
                        lambda self, k, v, *a, **kw: seen.append((k, v, update(self, k, v, *a, **kw))) or seen[-1][2])
    batch = inputs(generator)
    model(**batch).loss.backward()
    assert len(seen) == 2
    kv = encoder.prefixes().detach().view(10, 4, 2, 8).permute(1, 2, 0, 3)  # [layers*2, kv heads, P, head_dim]
    for index, (keys, values, (got_keys, got_values)) in enumerate(seen):
        g = encoder.gates[index]
        gate = adapterhub_gate(hidden[index].detach(), g.weight.detach(), g.bias.detach()).view(-1, 1, 1, 1)
        torch.testing.assert_close(got_keys, torch.cat((gate * kv[2 * index], keys), dim=2), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_values, torch.cat((gate * kv[2 * index + 1], values), dim=2), rtol=1e-5, atol=1e-6)
    for handle in handles:
        handle.remove()
    for gate in encoder.gates:  # every layer's gate takes part in the loss
        assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_gates_gradient_through_the_model_float64(generator, monkeypatch):
    """d(logits)/d(gates) of the whole model against finite differences, in float64 (Llama's
    RMSNorm rounds through float32: replaced by the same math in the input's dtype here)."""

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(transformers.models.llama.modeling_llama.LlamaRMSNorm, "forward", rms_norm)
    model = peftkern.patch(tiny_model("llama").double(), peftkern.UniPELTConfig())
    model.prompt_encoder.double()  # the prefix encoder is float32 on any model, as PEFT's
    randomise(model, generator)
    batch = {k: v[:2, :5] for k, v in inputs(generator).items() if k != "labels"}
    names = ["prompt_encoder.default_prefix_tuning.gates.1.weight", "prompt_encoder.default_prefix_tuning.gates.0.bias",
             "model.layers.0.self_attn.v_proj.lora_gate.default_lora.bias", "model.layers.1.mlp.adapters.default_bottleneck.gate.bias"]
    params = dict(model.named_parameters())

    def f(*tensors):
        return torch.func.functional_call(model, dict(zip(names, tensors)), kwargs=batch).logits[:, -2:, :3]

    assert torch.autograd.gradcheck(f, tuple(params[n].detach().clone().requires_grad_() for n in names))


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_unipelt_trains_and_unpatches_exactly(arch, generator):
    model = tiny_model(arch)
    snap = snapshot(model)
    batch = inputs(generator)
    with torch.no_grad():
        want = model(**batch).logits
    peftkern.patch(model, peftkern.UniPELTConfig())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum("gate" in n for n in trainable) == 2 * 4 * 2  # 2 layers: q, v, adapter, prefix; W and b
    assert all(any(m in n for m in ("lora_", "adapters.", "prompt_encoder")) for n in trainable)
    losses = train_steps(model, batch, 4)
    assert losses[-1] < losses[0] - 1e-3, losses
    gates = [p for n, p in model.named_parameters() if "gate" in n]
    assert all(torch.isfinite(p).all() for p in gates)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        peftkern.merge(model)
    assert not any(getattr(m, "merged", False) for m in model.modules())
    peftkern.unpatch(model)
    assert_unchanged(model, snap)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, want)


def test_gated_lora_does_not_merge():
    """The gate depends on the input, so there is no weight to merge into (AdapterHub refuses too)."""
    model = peftkern.patch(tiny_model("llama"), peftkern.ConfigUnion(peftkern.LoraConfig(), use_gating=True))
    with pytest.raises(NotImplementedError, match="gated .UniPELT. LoRA layers cannot be merged"):
        peftkern.merge(model)
    assert not any(getattr(m, "merged", False) for m in model.modules())
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.model.layers[0].self_attn.q_proj.merge()


def test_unipelt_checkpoint_holds_the_gates_and_reloads(tmp_path, generator):
    model = tiny_model("llama")
    fresh, other = copy.deepcopy(model), copy.deepcopy(model)
    peftkern.patch(model, peftkern.UniPELTConfig())
    batch = inputs(generator)
    train_steps(model, batch, 2)
    peftkern.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == {
        "peft_type": "UNION", "components": ["prefix_tuning", "bottleneck", "lora"], "use_gating": True}
    from safetensors.torch import load_file

    lora_gates = load_file(tmp_path / "lora" / "gates.safetensors")
    assert torch.equal(lora_gates["model.layers.1.self_attn.v_proj.loras.gate.weight"],
                       model.model.layers[1].self_attn.v_proj.lora_gate["default_lora"].weight)  # fmt: skip
    assert len(lora_gates) == 8
    prefix_gates = load_file(tmp_path / "prefix_tuning" / "gates.safetensors")
    assert torch.equal(prefix_gates["model.layers.1.self_attn.prefix_tuning.prefix_gates.weight"],
                       model.prompt_encoder["default_prefix_tuning"].gates[1].weight)  # fmt: skip
    bottleneck = load_file(tmp_path / "bottleneck" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.mlp.gate.weight" in bottleneck
    assert "loras" not in str(load_file(tmp_path / "lora" / "adapter_model.safetensors").keys())  # PEFT's own keys only
    peftkern.load_adapter(fresh, tmp_path)  # the prefix loads folded, as PEFT loads a projected prefix
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)
    snap = snapshot(other)  # a gated union without its gates, or gates it does not take: untouched
    (tmp_path / "lora" / "gates.safetensors").rename(tmp_path / "gates.bak")
    with pytest.raises(KeyError, match="lora/gates.safetensors is missing"):
        peftkern.load_adapter(other, tmp_path)
    assert_unchanged(other, snap)
    (tmp_path / "gates.bak").rename(tmp_path / "lora" / "gates.safetensors")
    described = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**described, "use_gating": False}))
    with pytest.raises(KeyError):  # the bottleneck's own config still says use_gating: its gate keys fit
        peftkern.load_adapter(other, tmp_path)
    assert_unchanged(other, snap)


def test_generate_with_prefix_gating(generator, monkeypatch):
    """generate() runs the gated prefix on every step (AdapterHub's semantics: each call's gates
    see that call's tokens); its first token is the forward's argmax; unpatch leaves no trace."""
    from peftkern.methods.gated_prefix import GatedPrefixLayer

    model = tiny_model("llama")
    snap = snapshot(model)
    peftkern.patch(model, peftkern.UniPELTConfig())
    randomise(model, generator)
    model.eval()
    batch = {k: v for k, v in inputs(generator).items() if k != "labels"}
    lengths = []
    update = GatedPrefixLayer.update
    monkeypatch.setattr(GatedPrefixLayer, "update",
                        lambda self, k, v, *a, **kw: lengths.append(k.shape[2]) or update(self, k, v, *a, **kw))
    with torch.no_grad():
        first = model(**batch).logits[:, -1].argmax(-1)
        lengths.clear()
        model.generation_config.eos_token_id = None  # four steps whatever the random model emits
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    # rows without padding (generate numbers a left-padded row's tokens by its mask, a forward does not)
    assert torch.equal(out[[0, 2], 9], first[[0, 2]])
    assert lengths == [9, 9] + [1, 1] * 3  # prefill, then one token per step, per layer
    peftkern.unpatch(model)
    assert_unchanged(model, snap)


def test_gate_changes_the_prefix_contribution(generator):
    """A prefix gate closed (σ → 0) and open (σ → 1) give different logits; open equals the
    ungated union with the same tensors (G = 1 is AdapterHub's ungated prefix)."""
    base = tiny_model("llama")
    prefix = peftkern.PrefixTuningConfig(num_virtual_tokens=4)
    gated = peftkern.patch(copy.deepcopy(base), peftkern.ConfigUnion(prefix, use_gating=True))
    plain = peftkern.patch(copy.deepcopy(base), peftkern.ConfigUnion(prefix))
    randomise(gated, generator)
    batch = {k: v for k, v in inputs(generator).items() if k != "labels"}
    ours = gated.prompt_encoder["default_prefix_tuning"]
    with torch.no_grad():
        plain.prompt_encoder["default_prefix_tuning"].embedding.weight.copy_(ours.embedding.weight)
        for gate in ours.gates:
            gate.weight.zero_()
            gate.bias.fill_(100.0)
        torch.testing.assert_close(gated(**batch).logits, plain(**batch).logits, rtol=1e-5, atol=1e-5)
        for gate in ours.gates:
            gate.bias.fill_(-100.0)
        assert not torch.allclose(gated(**batch).logits, plain(**batch).logits, atol=1e-3)


@pytest.mark.parametrize(
    "union, error, message",
    [
        (lambda: peftkern.UniPELTConfig(prefix_tuning=peftkern.PromptTuningConfig(num_virtual_tokens=2)),
         NotImplementedError, "PROMPT_TUNING, which has no UniPELT gate"),
        (lambda: peftkern.ConfigUnion(peftkern.LoraConfig(target_modules=["q_proj"]),
                                      peftkern.IA3Config(target_modules=["k_proj"], feedforward_modules=[]), use_gating=True),
         NotImplementedError, "IA3, which has no UniPELT gate"),
        (lambda: peftkern.UniPELTConfig(lora=peftkern.LoraConfig(target_modules=["q_proj"], use_dora=True)),
         NotImplementedError, "DoRA"),
        (lambda: peftkern.ConfigUnion(peftkern.PrefixTuningConfig(num_virtual_tokens=2),
                                      peftkern.PrefixTuningConfig(num_virtual_tokens=3), use_gating=True),
         ValueError, "two prompt-learning components"),
        (lambda: peftkern.UniPELTConfig(lora=peftkern.LoraConfig(target_modules=["q_proj"]),
                                        adapter=peftkern.LoraConfig(target_modules=["q_proj"])),
         ValueError, "both claim module 'model.layers.0.self_attn.q_proj'"),
        (lambda: peftkern.UniPELTConfig(adapter={"peft_type": "LOHA"}), ValueError, "LOHA"),
        (lambda: peftkern.UniPELTConfig(adapter=3), TypeError, "component 1 is a int"),
        (lambda: {"peft_type": "UNION", "configs": [], "use_gating": "yes"}, TypeError, "use_gating"),
        (lambda: peftkern.ConfigUnion(peftkern.ConfigUnion(peftkern.SeqBnConfig(), use_gating=True)),
         ValueError, "gated union inside an ungated one"),
        (lambda: peftkern.MAMConfig(prefix_convention="hf"), ValueError, "prefix_convention must be"),
        (lambda: peftkern.ConfigUnion(peftkern.PromptTuningConfig(num_virtual_tokens=2), prefix_convention="adapterhub"),
         ValueError, "applies to prefix tuning"),
    ],
)
def test_bad_gated_unions_are_refused_before_anything_changes(union, error, message):
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(error, match=message):
        peftkern.patch(model, union())
    assert_unchanged(model, snap)


def test_unipelt_as_a_dict_patches_the_same_model(generator):
    batch = inputs(generator)
    torch.manual_seed(1)
    one = peftkern.patch(tiny_model("llama"), peftkern.UniPELTConfig())
    torch.manual_seed(1)
    two = peftkern.patch(tiny_model("llama"), json.loads(json.dumps(peftkern.UniPELTConfig().to_dict())))
    assert one.state_dict().keys() == two.state_dict().keys()
    two.load_state_dict(one.state_dict())
    with torch.no_grad():
        assert torch.equal(one(**batch).logits, two(**batch).logits)


def test_mam_with_adapterhubs_prefix_convention(tmp_path, generator):
    """prefix_convention="adapterhub": a [P, hidden] embedding under grouped-query attention
    (AdapterHub's wte; PEFT's is [P, KV width]) and the real tokens numbered from 0: the logits
    are PEFT's convention given positions 0.. (PEFT shifts given positions by P: pass them less P)."""
    base = tiny_model("llama")  # 4 heads of 8, 2 KV heads: KV width 16, hidden 32
    model = peftkern.patch(copy.deepcopy(base), peftkern.MAMConfig(prefix_convention="adapterhub"))
    encoder = model.prompt_encoder["default_prefix_tuning"]
    assert encoder.embedding.weight.shape == (30, 32) and encoder.transform[0].in_features == 32
    assert encoder.transform[2].out_features == 2 * 2 * 16
    peft_mam = peftkern.patch(copy.deepcopy(base), peftkern.MAMConfig())
    assert peft_mam.prompt_encoder["default_prefix_tuning"].embedding.weight.shape == (30, 16)

    flat = peftkern.PrefixTuningConfig(num_virtual_tokens=5)
    ours = peftkern.patch(copy.deepcopy(base), peftkern.ConfigUnion(flat, prefix_convention="adapterhub"))
    theirs = peftkern.patch(copy.deepcopy(base), peftkern.ConfigUnion(flat))
    randomise(ours, generator)
    theirs.load_state_dict(ours.state_dict())
    batch = {k: v for k, v in inputs(generator).items() if k != "labels"}
    positions = torch.arange(9).expand(3, 9)
    with torch.no_grad():
        got = ours(**batch).logits
        torch.testing.assert_close(got, theirs(**batch, position_ids=positions - 5).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, ours(**batch, position_ids=positions).logits, rtol=0, atol=0)
        assert not torch.allclose(got, theirs(**batch).logits, atol=1e-3)  # PEFT: positions from 5
        full = {"input_ids": batch["input_ids"][[0, 2]], "attention_mask": torch.ones(2, 9, dtype=torch.long)}
        ours.generation_config.eos_token_id = None
        out = ours.generate(**full, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(out[:, 9], ours(**full).logits[:, -1].argmax(-1))
        step = ours(input_ids=out[:, :10], attention_mask=torch.ones(2, 10, dtype=torch.long)).logits[:, -1]
        assert torch.equal(out[:, 10], step.argmax(-1))  # decoding numbers the new token 9, as a forward does

    train_steps(model, inputs(generator), 2)
    peftkern.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["prefix_convention"] == "adapterhub"
    fresh = peftkern.load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)


def test_unipelt_on_nf4_bases(generator):
    """quantize="nf4" reaches UniPELT's LoRA (QLoRA + gates): each gated layer is its dequantized
    base plus G·(x·Aᵀ)·Bᵀ, and the union trains."""
    model = peftkern.patch(tiny_model("llama"), peftkern.UniPELTConfig(), quantize="nf4")
    randomise(model, generator)
    layer = model.model.layers[1].self_attn.v_proj
    assert layer.quantized
    x = torch.randn(2, 5, 32, generator=generator)
    gate = layer.lora_gate["default_lora"]
    want = F.linear(x, layer.dense_weight(torch.float32)) + adapterhub_gate(x, gate.weight, gate.bias).unsqueeze(-1) * (
        x @ layer.lora_A["default_lora"].weight.t() @ layer.lora_B["default_lora"].weight.t())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    losses = train_steps(model, inputs(generator), 3)
    assert losses[-1] < losses[0], losses


def test_a_deep_copy_of_a_unipelt_model_has_its_own_gates(generator):
    """copy.deepcopy re-points the prefix-gate hooks at the copy's gates (functools.partial)."""
    model = peftkern.patch(tiny_model("llama"), peftkern.UniPELTConfig())
    randomise(model, generator)
    twin = copy.deepcopy(model)
    batch = {k: v for k, v in inputs(generator).items() if k != "labels"}
    with torch.no_grad():
        want = model(**batch).logits
        torch.testing.assert_close(twin(**batch).logits, want, rtol=0, atol=0)
        twin.prompt_encoder["default_prefix_tuning"].gates[0].bias.fill_(-50.0)
        assert not torch.allclose(twin(**batch).logits, want)
        torch.testing.assert_close(model(**batch).logits, want, rtol=0, atol=0)
    peftkern.unpatch(twin)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, want, rtol=0, atol=0)
