"""peftkern.patch(peft_model) on Hugging Face PEFT models themselves: the LoRA / rsLoRA / DoRA /
IA³ / QLoRA (bitsandbytes Linear4bit) layers are swapped for peftkern's in place, sharing PEFT's
own parameter objects; logits, loss and gradients stay PEFT's; an optimizer made before patching
keeps working; save_pretrained writes PEFT's checkpoint; unpatch gives PEFT's layers back."""

import copy

import pytest
import torch

import peftkern
from peftkern.methods.from_peft import PeftIA3Linear, PeftLoraLinear
from peftkern.record import PatchRecord

from .conftest import requires_cuda
from .helpers import TARGETS, batch, tiny_model, train_steps

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IA3_TARGETS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}
KINDS = ["lora", "rslora", "dora", "ia3"]


def peft_config(arch: str, kind: str, **extra):
    if kind in ("ia3", "qia3"):
        targets, feedforward = IA3_TARGETS[arch]
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False, **extra)
    # random A and B (init_lora_weights=False), so the adapters change the output
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False,
                           use_rslora=kind == "rslora", use_dora=kind in ("dora", "qdora"), **extra)  # fmt: skip


def bnb_base(arch: str):
    pytest.importorskip("bitsandbytes")
    from peftkern.demo import to_bnb_4bit

    return to_bnb_4bit(tiny_model(arch), TARGETS[arch])


def make(arch: str, kind: str, **extra):
    base = bnb_base(arch) if kind in ("qlora", "qdora", "qia3") else tiny_model(arch)
    return peft.get_peft_model(base, peft_config(arch, kind, **extra))


def forward_backward(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


def module_ids(model):
    return [(n, id(m)) for n, m in model.named_modules()]


CASES = [(arch, kind) for arch in ("llama", "qwen2", "mistral", "gpt2") for kind in KINDS]
CASES += [("llama", "qlora"), ("llama", "qdora"), ("qwen2", "qlora"), ("llama", "qia3")]


@pytest.mark.parametrize("arch,kind", CASES)
def test_same_outputs_gradients_and_parameter_objects(arch, kind, generator):
    model = make(arch, kind)
    inputs = batch(generator)
    logits, loss, grads = forward_backward(model, inputs)
    params = dict(model.named_parameters())
    keys = list(model.state_dict().keys())
    before = module_ids(model)
    n_peft_layers = sum(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in model.modules())

    assert peftkern.patch(model) is model
    ours = PeftIA3Linear if kind in ("ia3", "qia3") else PeftLoraLinear
    swapped = [m for m in model.modules() if isinstance(m, ours)]
    assert len(swapped) == n_peft_layers > 0
    if kind in ("qlora", "qdora"):
        assert all(m.quantized for m in swapped)
    if kind == "qia3":  # down_proj / v_proj are bitsandbytes Linear4bit, k_proj stays dense
        assert {m.quantized for m in swapped} == {True, False}
    # the very same parameter objects, the same state-dict keys in the same order
    assert list(model.state_dict().keys()) == keys
    after = dict(model.named_parameters())
    assert after.keys() == params.keys() and all(after[n] is params[n] for n in params)

    our_logits, our_loss, our_grads = forward_backward(model, inputs)
    torch.testing.assert_close(our_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_loss, loss, rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(our_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)

    peftkern.unpatch(model)
    assert module_ids(model) == before  # PEFT's own layer objects are back
    assert PatchRecord.of(model) is None
    assert not {"set_adapter", "merge_and_unload"} & (vars(model).keys() | vars(model.base_model).keys())
    torch.testing.assert_close(forward_backward(model, inputs)[0], logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch,kind", [("llama", "lora"), ("gpt2", "dora"), ("qwen2", "ia3"), ("llama", "qlora")])
def test_optimizer_made_before_patch_keeps_training_and_save_pretrained_roundtrips(arch, kind, generator, tmp_path):
    inputs = batch(generator)
    model = make(arch, kind)
    twin = copy.deepcopy(model)  # trained by PEFT alone, step for step

    def optimizer(m):
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)

    opt, twin_opt = optimizer(model), optimizer(twin)
    for m, o in ((model, opt), (twin, twin_opt)):  # one step before patching: AdamW has state
        train_steps(m, inputs, 1, o)

    peftkern.patch(model)
    losses, twin_losses = train_steps(model, inputs, 3, opt), train_steps(twin, inputs, 3, twin_opt)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(twin_losses), rtol=1e-5, atol=1e-6)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # AdamW (lr 1e-2) normalises each gradient element: an element whose gradient is near zero
    # moves by up to lr times the relative difference of the two paths' gradients. Seen: 2.5e-6 on
    # a GPT-2 DoRA lora_A element (PEFTKERN_TEST_SEED=559581750, before this session's changes too).
    for name, p in twin.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(trained[name], p, rtol=1e-5, atol=1e-5, msg=name)

    # PEFT saves what peftkern trained, with PEFT's keys; it loads into a fresh base
    model.save_pretrained(tmp_path / "ours")
    twin.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    ours_sd = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_sd = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert ours_sd.keys() == theirs_sd.keys() and ours_sd
    for key in ours_sd:
        torch.testing.assert_close(ours_sd[key], theirs_sd[key], rtol=1e-5, atol=1e-5, msg=key)  # as above
    fresh = bnb_base(arch) if kind == "qlora" else tiny_model(arch)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours")
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_dropout_probability_is_read_and_disable_adapter_is_honoured(generator):
    model = make("llama", "lora", lora_dropout=0.25)
    inputs = batch(generator)
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
        with model.disable_adapter():
            base_logits = model(**inputs).logits
    assert not torch.allclose(logits, base_logits)
    peftkern.patch(model)
    layers = [m for m in model.modules() if isinstance(m, PeftLoraLinear)]
    assert layers and all(m.dropout == {"default": 0.25} for m in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, logits, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(model(**inputs).logits, base_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(**inputs).logits, logits, rtol=1e-5, atol=1e-5)
    model.train()  # dropout on: the fused op drops, training still runs
    model(**inputs).loss.backward()
    assert all(m.lora_A["default"].weight.grad is not None for m in layers)


def _embedding_target():
    return peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))


def _two_active_adapters():
    model = make("llama", "lora")
    model.add_adapter("other", peft_config("llama", "lora"))
    model.base_model.set_adapter(["default", "other"])
    return model


def _merged():
    model = make("llama", "lora")
    model.base_model.model.model.layers[1].self_attn.v_proj.merge()
    return model


def _lora_bias():
    return make("llama", "lora", lora_bias=True)


def _loha():
    return peft.get_peft_model(tiny_model("llama"), peft.LoHaConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize(
    "build,message",
    [
        (_embedding_target, "embed_tokens"),
        (_two_active_adapters, "one active adapter"),
        (_merged, "layers.1.self_attn.v_proj"),
        (_lora_bias, "lora_bias"),
        (_loha, "LOHA"),
    ],
)
def test_unsupported_peft_models_raise_and_stay_untouched(build, message, generator):
    model = build()
    inputs = batch(generator)
    with torch.no_grad():
        logits = model(**inputs).logits
    before, keys = module_ids(model), list(model.state_dict().keys())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises((NotImplementedError, ValueError, TypeError), match=message):
        peftkern.patch(model)
    assert module_ids(model) == before and list(model.state_dict().keys()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert PatchRecord.of(model) is None
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, logits, rtol=0, atol=0)


def test_a_peft_model_takes_no_config_and_a_plain_model_needs_one():
    model = make("llama", "lora")
    with pytest.raises(TypeError, match="without a config"):
        peftkern.patch(model, {"r": 2, "target_modules": ["q_proj"]})
    with pytest.raises(TypeError, match="config is required"):
        peftkern.patch(tiny_model("llama"))
    peftkern.patch(model)
    with pytest.raises(RuntimeError, match="already patched"):
        peftkern.patch(model)
    # peftkern's own save / merge_and_unload are for models peftkern patched from a config
    with pytest.raises(TypeError, match="save_pretrained"):
        peftkern.save_adapter(model, "/nonexistent")
    with pytest.raises(TypeError, match="merge_and_unload"):
        peftkern.merge_and_unload(model)
    with pytest.raises(RuntimeError, match="unpatch"):
        model.set_adapter("default")


@requires_cuda
@pytest.mark.parametrize("kind", ["lora", "dora", "ia3", "qlora"])
def test_on_cuda_same_outputs_and_gradients(kind, generator):
    """The CUDA kernels behind a patched PeftModel (fp32; QLoRA: bitsandbytes' NF4 moved to the GPU)."""
    model = make("llama", kind).to("cuda")
    inputs = {k: v.to("cuda") for k, v in batch(generator).items()}
    logits, loss, grads = forward_backward(model, inputs)
    peftkern.patch(model)
    our_logits, our_loss, our_grads = forward_backward(model, inputs)
    torch.testing.assert_close(our_logits, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(our_loss, loss, rtol=1e-4, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(our_grads[name], grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_a_deepcopy_of_a_patched_peft_model_is_patched_on_its_own(generator):
    model = make("llama", "dora")
    inputs = batch(generator)
    with torch.no_grad():
        logits = model(**inputs).logits
    peftkern.patch(model)
    twin = copy.deepcopy(model)
    peftkern.unpatch(twin)
    assert not any(isinstance(m, PeftLoraLinear) for m in twin.modules())
    assert sum(isinstance(m, PeftLoraLinear) for m in model.modules()) > 0
    twin.set_adapter("default")  # PEFT's own again
    with pytest.raises(RuntimeError, match="unpatch"):
        model.set_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(twin(**inputs).logits, logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(**inputs).logits, logits, rtol=1e-5, atol=1e-5)
    params = {n: p for n, p in model.named_parameters()}
    assert all(p is not params[n] for n, p in twin.named_parameters())
