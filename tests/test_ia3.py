"""peftkern.patch with IA³ against Hugging Face PEFT's IA³ on tiny Llama (GQA), Qwen2, Mistral and
GPT-2 models: same targets, same input/output scaling per module, same parameter names and
shapes; with the same (random, non-trivial) vectors the logits, loss, gradients and a few
optimizer steps agree; merge/unmerge as PEFT; checkpoints load both ways."""

import copy

import pytest
import torch

import peftkern
from peftkern.demo import to_bnb_4bit as with_bnb_linear4bit
from peftkern.methods.ia3 import IA3Linear
from peftkern.nf4 import NF4Linear

from .helpers import assert_compiled_matches_eager, assert_matches_peft, batch, tiny_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PREFIX = "base_model.model."
ARCHS = ["llama", "qwen2", "mistral", "gpt2"]
# Explicit configs beside PEFT's defaults: lists, a regex feedforward spec, Conv1D bases.
EXPLICIT = {
    "llama": {"target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"], "feedforward_modules": ["down_proj", "up_proj"]},
    "qwen2": {"target_modules": ["k_proj", "o_proj", "gate_proj"], "feedforward_modules": ["gate_proj"]},
    "mistral": {"target_modules": r".*\.(v_proj|down_proj)", "feedforward_modules": r".*\.down_proj"},
    "gpt2": {"target_modules": ["c_attn", "c_fc", "c_proj"], "feedforward_modules": ["c_proj"]},
}


def ia3_names(model, peft_model: bool) -> dict[str, bool]:
    """{module name: scales input (feedforward)} for every IA³ layer."""
    if peft_model:
        return {n.removeprefix(PREFIX): m.is_feedforward for n, m in model.named_modules()
                if isinstance(m, peft.tuners.ia3.IA3Layer)}  # fmt: skip
    return {n: m.is_feedforward for n, m in model.named_modules() if isinstance(m, IA3Linear)}


def pair(arch, base=None, **config):
    """(PEFT model, peftkern-patched model) from one base, PEFT's random vectors (init_ia3_weights
    False: randn) copied into ours."""
    base = base if base is not None else tiny_model(arch)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(init_ia3_weights=False, **config))
    ours = peftkern.patch(copy.deepcopy(base), {"peft_type": "IA3", **config})
    their_l = {k[len(PREFIX):]: v for k, v in theirs.state_dict().items() if "ia3_l" in k}
    our_l = {k: v for k, v in ours.state_dict().items() if "ia3_l" in k}
    assert their_l.keys() == our_l.keys() and their_l  # same modules, same names
    with torch.no_grad():
        for key, value in their_l.items():
            assert our_l[key].shape == value.shape and our_l[key].dtype == value.dtype, key
            our_l[key].copy_(value)
    assert ia3_names(theirs, True) == ia3_names(ours, False)
    return theirs, ours


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("explicit", [False, True], ids=["defaults", "explicit"])
def test_logits_loss_gradients_and_steps_match_peft(arch, explicit, generator):
    theirs, ours = pair(arch, **(EXPLICIT[arch] if explicit else {}))
    _, our_grads = assert_matches_peft(theirs, ours, batch(generator), logits=(1e-5, 1e-5), loss=(1e-5, 1e-6),
                                       grads=(1e-4, 1e-6), steps=4, step_losses=(1e-4, 1e-5))  # fmt: skip
    assert all(".ia3_l." in n for n in our_grads)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bfloat16_model_matches_peft(arch, generator):
    """bf16 activations with PEFT's float32 vectors: each product is computed in float32 and
    rounded once to bf16, as PEFT's `(x.to(l.dtype) * l).to(x.dtype)`; Qwen2's k/v biases ride
    in our epilogue instead of addmm (one bf16 rounding apart at most)."""
    theirs, ours = pair(arch, base=tiny_model(arch).to(torch.bfloat16), **EXPLICIT[arch])
    assert {p.dtype for n, p in ours.named_parameters() if p.requires_grad} == {torch.float32}
    assert_matches_peft(theirs, ours, batch(generator), logits=(2e-2, 2e-2), loss=(1e-2, 1e-2), grads_of_max=5e-2)


def test_autocast_matches_peft(generator):
    theirs, ours = pair("llama", **EXPLICIT["llama"])

    def forward_in_bf16(model, inputs):  # the forward under autocast, the backward after it
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**inputs)

    assert_matches_peft(theirs, ours, batch(generator), logits=(2e-2, 2e-2), grads_of_max=5e-2, forward=forward_in_bf16)


@pytest.mark.parametrize(
    "config",
    [
        {},  # PEFT's defaults for the architecture (targets and feedforward)
        {"target_modules": ["k_proj", "v_proj", "down_proj"]},  # feedforward from the defaults
        {"target_modules": ["q_proj", "up_proj"], "feedforward_modules": []},
        {"target_modules": r".*\.layers\.1\..*_proj", "feedforward_modules": r".*mlp\..*"},
        {"target_modules": "all-linear", "feedforward_modules": ["down_proj"], "exclude_modules": ["o_proj"]},
        {"target_modules": r".*\.(v_proj|down_proj)", "feedforward_modules": ["proj"]},  # PEFT's plain endswith
    ],
)
def test_same_targets_and_feedforward_modules_as_peft(config):
    base = tiny_model("llama")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**config))
    ours = peftkern.patch(copy.deepcopy(base), peftkern.IA3Config(**config))
    assert ia3_names(ours, False) == ia3_names(theirs, True) and ia3_names(ours, False)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_and_merge_and_unload_match_peft(arch, generator):
    theirs, ours = pair(arch, **EXPLICIT[arch])
    inputs = batch(generator)
    with torch.no_grad():
        before = ours(**inputs).logits
        original = {k: v.clone() for k, v in ours.state_dict().items()}
        peftkern.merge(ours)
        theirs.merge_adapter()
        their_weights = {k.removeprefix(PREFIX).replace(".base_layer", ""): v for k, v in theirs.state_dict().items()
                         if "ia3_l" not in k}  # fmt: skip
        our_weights = {k.replace(".base_layer", ""): v for k, v in ours.state_dict().items() if "ia3_l" not in k}
        assert their_weights.keys() == our_weights.keys()
        for key in our_weights:  # W ⊙ l (and b ⊙ l for output scaling): PEFT's merge exactly
            assert torch.equal(our_weights[key], their_weights[key]), key
        torch.testing.assert_close(ours(**inputs).logits, before, rtol=1e-5, atol=1e-5)
        merged = {k: v.clone() for k, v in our_weights.items()}

        # unmerge: ours restores the weights bit for bit; PEFT divides back by l + 1e-8 (rounds)
        peftkern.unmerge(ours)
        theirs.unmerge_adapter()
        for key, value in ours.state_dict().items():
            assert torch.equal(value, original[key]), key
            # PEFT's W·l / (l + 1e-8) is off by about 1e-8 / |l| + 2 ulp relative
            torch.testing.assert_close(value, theirs.state_dict()[PREFIX + key], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours(**inputs).logits, before, rtol=1e-5, atol=1e-5)

        unloaded = peftkern.merge_and_unload(ours)
        assert not any(isinstance(m, IA3Linear) for m in unloaded.modules())
        torch.testing.assert_close(unloaded(**inputs).logits, before, rtol=1e-5, atol=1e-5)
        for key, value in unloaded.state_dict().items():  # PEFT's merge of the original, exactly
            assert torch.equal(value, merged[key]), key
        their_unloaded = theirs.merge_and_unload()  # merged again after its rounding unmerge: close
        for key, value in unloaded.state_dict().items():
            torch.testing.assert_close(value, their_unloaded.state_dict()[key], rtol=1e-4, atol=1e-6)


def test_bias_is_scaled_only_for_output_scaling():
    """GPT-2's Conv1D layers have biases: merge scales the bias of output-scaled c_attn, not the
    bias of input-scaled mlp.c_proj ((x ⊙ l)·W + b leaves b alone)."""
    _, ours = pair("gpt2", **EXPLICIT["gpt2"])
    attn, mlp = ours.transformer.h[0].attn.c_attn, ours.transformer.h[0].mlp.c_proj
    attn_bias, mlp_bias = attn.base_layer.bias.clone(), mlp.base_layer.bias.clone()
    peftkern.merge(ours)
    assert torch.equal(mlp.base_layer.bias, mlp_bias)
    torch.testing.assert_close(attn.base_layer.bias, attn_bias * attn.ia3_l["default"].detach().flatten())


def test_unpatch_restores_the_model_exactly(generator):
    base = tiny_model("gpt2")
    base.transformer.wte.weight.requires_grad_(False)  # a flag unpatch must restore too
    original = copy.deepcopy(base)
    model = peftkern.patch(base, {"peft_type": "IA3"})
    assert sum(isinstance(m, IA3Linear) for m in model.modules()) == 4
    with torch.no_grad():  # learned-looking vectors, away from 0 (where dividing back is inexact)
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.uniform_(0.5, 1.5, generator=generator)
    peftkern.merge(model)  # unpatch unmerges first
    peftkern.unmerge(model)
    restored = peftkern.unpatch(model)
    assert [type(m) for m in restored.modules()] == [type(m) for m in original.modules()]
    want = {n: p.requires_grad for n, p in original.named_parameters()}
    assert {n: p.requires_grad for n, p in restored.named_parameters()} == want
    restored_state = restored.state_dict()
    for key, value in original.state_dict().items():  # unmerge divides back: close, not bitwise
        torch.testing.assert_close(restored_state[key], value, rtol=1e-6, atol=1e-7, msg=key)

    fresh = copy.deepcopy(original)
    peftkern.unpatch(peftkern.patch(fresh, {"peft_type": "IA3"}))
    for key, value in original.state_dict().items():  # never merged: bit-exact
        assert torch.equal(fresh.state_dict()[key], value), key
    inputs = batch(generator)
    torch.testing.assert_close(fresh(**inputs).logits, original(**inputs).logits, rtol=0, atol=0)


def test_trainable_parameters_are_exactly_the_ia3_vectors(capsys):
    theirs, ours = pair("llama")
    our_trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert our_trainable == {n.removeprefix(PREFIX) for n, p in theirs.named_parameters() if p.requires_grad}
    assert all(n.endswith(".ia3_l.default") for n in our_trainable)
    peftkern.print_trainable_parameters(ours)
    ours_line = capsys.readouterr().out.strip()
    theirs.print_trainable_parameters()
    assert ours_line == capsys.readouterr().out.strip()


def test_init_ia3_weights_true_gives_ones_and_an_unchanged_model(generator):
    base = tiny_model("qwen2")
    inputs = batch(generator)
    want = base(**inputs).logits
    model = peftkern.patch(base, peftkern.IA3Config())
    vectors = [p for n, p in model.named_parameters() if "ia3_l" in n]
    assert vectors and all(torch.equal(v, torch.ones_like(v)) for v in vectors)
    torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-6, atol=1e-6)


def untouched(model, snapshot, flags):
    assert not any(isinstance(m, IA3Linear) for m in model.modules())
    assert not getattr(model, "_peftkern_patch_record", None)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshot[key])


@pytest.mark.parametrize(
    "config, error, message",
    [
        ({"target_modules": ["k_proj", "v_proj"], "feedforward_modules": ["down_proj"]}, ValueError,
         r"feedforward_modules must be a subset of target_modules: \['down_proj'\]"),
        ({"feedforward_modules": ["up_proj"]}, ValueError,  # targets from the llama defaults
         r"feedforward_modules must be a subset of target_modules: \['up_proj'\]"),
        ({"target_modules": ["no_such_module"]}, ValueError, "no module of LlamaForCausalLM matches"),
        ({"target_modules": ["embed_tokens"]}, TypeError, "module 'model.embed_tokens' .* Embedding"),
        ({"modules_to_save": ["lm_head"]}, NotImplementedError, "modules_to_save"),
        ({"target_modules": 3}, TypeError, "target_modules must be a list of names or a regex"),
    ],
)
def test_bad_config_raises_clearly_and_leaves_the_model_untouched(config, error, message):
    model = tiny_model("llama")
    snapshot = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(error, match=message):
        peftkern.patch(model, {"peft_type": "IA3", **config})
    untouched(model, snapshot, flags)


def test_peft_rejects_the_same_feedforward_config():
    with pytest.raises(ValueError, match="subset"):
        peft.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])


def test_no_default_for_an_unknown_architecture():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="feedforward_modules is not set and there is no default"):
        peftkern.patch(model, {"peft_type": "IA3", "target_modules": ["0"]})
    peftkern.patch(model, {"peft_type": "IA3", "target_modules": ["0"], "feedforward_modules": []})
    assert isinstance(model[0], IA3Linear) and not model[0].is_feedforward


def test_accepts_peft_config_objects():
    config = peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    model = peftkern.patch(tiny_model("llama"), config)
    assert ia3_names(model, False) == {
        f"model.layers.{i}.{name}": ff for i in range(2) for name, ff in (("self_attn.k_proj", False), ("mlp.down_proj", True))
    }


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpoints_load_both_ways_with_peft(arch, tmp_path, generator):
    theirs, ours = pair(arch, **EXPLICIT[arch])
    inputs = batch(generator)
    base = tiny_model(arch)

    peftkern.save_adapter(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert ia3_names(loaded, True) == ia3_names(ours, False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, ours(**inputs).logits, rtol=0, atol=0)

    theirs.save_pretrained(tmp_path / "theirs")
    ours_loaded = peftkern.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert ia3_names(ours_loaded, False) == ia3_names(theirs, True)
    with torch.no_grad():
        torch.testing.assert_close(ours_loaded(**inputs).logits, theirs(**inputs).logits, rtol=1e-6, atol=1e-6)
    for key, value in peftkern.io.adapter_state_dict(ours_loaded).items():
        assert torch.equal(value, theirs.state_dict()[key.replace(".ia3_l", ".ia3_l.default")]), key


def test_nf4_bases_match_peft_with_bitsandbytes(generator):
    pytest.importorskip("bitsandbytes")
    targets = ["k_proj", "v_proj", "up_proj", "down_proj"]
    base = with_bnb_linear4bit(tiny_model("llama"), targets)
    base.is_loaded_in_4bit = True  # what transformers sets; PEFT picks its Linear4bit layer by it
    theirs, ours = pair("llama", base=base, target_modules=targets, feedforward_modules=["down_proj"])
    assert sum(isinstance(m, IA3Linear) and m.quantized for m in ours.modules()) == 8
    assert_matches_peft(theirs, ours, batch(generator), logits=(1e-4, 1e-5), grads=(1e-3, 1e-6))
    with pytest.raises(NotImplementedError, match="re-quantize"):
        peftkern.merge(ours)


def test_peftkern_nf4linear_bases_match_the_dequantized_dense_model(generator):
    dense = tiny_model("llama")
    quantized = copy.deepcopy(dense)
    for i in range(2):
        for parent, name in ((quantized.model.layers[i].self_attn, "v_proj"), (quantized.model.layers[i].mlp, "down_proj")):
            nf4 = NF4Linear.from_linear(getattr(parent, name))
            setattr(parent, name, nf4)
            target = getattr(dense.model.layers[i].self_attn if name == "v_proj" else dense.model.layers[i].mlp, name)
            target.weight.data = nf4.nf4_weight().dequantize(torch.float32)
    config = {"peft_type": "IA3", "target_modules": ["v_proj", "down_proj"], "init_ia3_weights": False}
    torch.manual_seed(1)
    ours = peftkern.patch(quantized, config)
    torch.manual_seed(1)
    want = peftkern.patch(dense, config)
    inputs = batch(generator)
    out, ref = ours(**inputs), want(**inputs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for (name, p), (_, q) in zip(((n, p) for n, p in ours.named_parameters() if p.requires_grad),
                                 ((n, p) for n, p in want.named_parameters() if p.requires_grad)):  # fmt: skip
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_quantize_nf4_option(generator):
    dense = tiny_model("llama")
    model = peftkern.patch(copy.deepcopy(dense), {"peft_type": "IA3"}, quantize="nf4")
    layers = [m for m in model.modules() if isinstance(m, IA3Linear)]
    assert len(layers) == 6 and all(m.quantized and isinstance(m.base_layer, NF4Linear) for m in layers)
    inputs = batch(generator)
    out = model(**inputs)
    out.loss.backward()
    assert all(m.ia3_l["default"].grad is not None and m.ia3_l["default"].grad.abs().sum() > 0 for m in layers)
    peftkern.unpatch(model)
    assert isinstance(model.model.layers[0].mlp.down_proj, NF4Linear)
    with pytest.raises(ValueError, match="quantize must be None or 'nf4'"):
        peftkern.patch(tiny_model("llama"), {"peft_type": "IA3"}, quantize="int8")


def test_torch_compile_patched_model(generator):
    _, model = pair("qwen2", **EXPLICIT["qwen2"])  # output scaling with biases, input scaling
    assert_compiled_matches_eager(model, batch(generator))
