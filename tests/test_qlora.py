"""QLoRA: LoRA over NF4 bases, against PEFT + bitsandbytes (same NF4 bytes: we read bitsandbytes'
Linear4bit without copying) and against the dense computation on the dequantized weight."""

import copy

import pytest
import torch

import peftkern
from peftkern.demo import to_bnb_4bit as with_bnb_linear4bit
from peftkern.methods.lora import LoraLinear
from peftkern.nf4 import NF4Linear
from peftkern.ops import lora as lora_ops
from peftkern.ops import qlora as qlora_ops

from .helpers import QLORA_TARGETS as TARGETS
from .helpers import assert_matches_peft, batch, tiny_model

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


def test_nf4_lora_linear_matches_dense_and_stores_no_dense_weight(generator):
    w = torch.randn(48, 40, generator=generator) * 0.1
    q = peftkern.nf4_quantize(w, 64)
    dense = q.dequantize()
    x = torch.randn(2, 7, 40, generator=generator, requires_grad=True)
    a = (torch.randn(4, 40, generator=generator) * 0.1).requires_grad_()
    b = (torch.randn(48, 4, generator=generator) * 0.1).requires_grad_()
    bias = torch.randn(48, generator=generator)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = qlora_ops.nf4_lora_linear(x, q, bias, a, b, 0.5)
    assert torch.Size([48, 40]) not in saved  # the dequantized weight is recomputed in backward
    want = lora_ops.lora_linear_reference(x, dense, bias, a, b, 0.5)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn(out.shape, generator=generator)
    for got, exp in zip(torch.autograd.grad(out, (x, a, b), g), torch.autograd.grad(want, (x, a, b), g)):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)


def test_matches_peft_with_bitsandbytes(generator):
    base = with_bnb_linear4bit(tiny_model("llama"), TARGETS)
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = peftkern.patch(copy.deepcopy(base), config)
    prefix = "base_model.model."
    their_lora = {k[len(prefix):]: v for k, v in theirs.state_dict().items() if "lora_" in k}
    our_lora = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    assert their_lora.keys() == our_lora.keys() and all(v.dtype == torch.float32 for v in our_lora.values())
    with torch.no_grad():
        for key, value in their_lora.items():
            our_lora[key].copy_(value)
    assert sum(isinstance(m, LoraLinear) and m.quantized for m in ours.modules()) == 4 * 2

    assert_matches_peft(theirs, ours, batch(generator), logits=(1e-4, 1e-5), grads=(1e-4, 1e-6))


def test_quantize_nf4_option(generator):
    model = tiny_model("llama")
    config = {"r": 4, "target_modules": TARGETS, "init_lora_weights": False}
    quantized = peftkern.patch(copy.deepcopy(model), config, quantize="nf4")
    layers = [m for m in quantized.modules() if isinstance(m, LoraLinear)]
    assert layers and all(isinstance(m.base_layer, NF4Linear) for m in layers)

    # The same adapters on a dense model whose weights are the dequantized NF4 ones: same logits.
    dense = peftkern.patch(copy.deepcopy(model), config)
    with torch.no_grad():
        for (name, q_layer), d_layer in zip(
            [(n, m) for n, m in quantized.named_modules() if isinstance(m, LoraLinear)],
            [m for m in dense.modules() if isinstance(m, LoraLinear)],
        ):
            d_layer.base_layer.weight.copy_(q_layer.base_layer.nf4_weight().dequantize())
            d_layer.lora_A["default"].weight.copy_(q_layer.lora_A["default"].weight)
            d_layer.lora_B["default"].weight.copy_(q_layer.lora_B["default"].weight)
    inputs = batch(generator)
    torch.testing.assert_close(quantized(**inputs).logits, dense(**inputs).logits, rtol=1e-5, atol=1e-5)

    quantized.to(torch.bfloat16)  # the NF4 state must not be cast
    nf4 = layers[0].base_layer
    assert nf4.packed.dtype == torch.uint8 and nf4.absmax.dtype == torch.uint8 and nf4.nested_absmax.dtype == torch.float32
    peftkern.unpatch(quantized)
    assert not any(isinstance(m, LoraLinear) for m in quantized.modules())
    assert any(isinstance(m, NF4Linear) for m in quantized.modules())  # the dense weights were released


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_into_an_nf4_base_gives_a_dense_weight(generator, use_dora):
    """merge() swaps in a dense weight (the NF4 weight's original dtype) holding W + s·BA; unmerge
    gives back the very NF4 module; merge_and_unload leaves dense nn.Linear bases."""
    config = {"r": 4, "target_modules": TARGETS, "init_lora_weights": False, "use_dora": use_dora}
    model = peftkern.patch(tiny_model("llama"), config, quantize="nf4")
    inputs = batch(generator)
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, LoraLinear)):
            layer.lora_B["default"].weight.normal_(generator=generator)
        before = model(**inputs).logits
        nf4_bases = [m.base_layer for m in model.modules() if isinstance(m, LoraLinear)]
        peftkern.merge(model)
        layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
        assert all(type(m.base_layer) is torch.nn.Linear and m.base_layer.weight.dtype == torch.float32 for m in layers)
        torch.testing.assert_close(model(**inputs).logits, before, rtol=1e-4, atol=1e-4)
        peftkern.unmerge(model)
        assert [m.base_layer for m in layers] == nf4_bases and all(m.quantized for m in layers)
        torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=0)
        plain = peftkern.merge_and_unload(model)
    assert not any(isinstance(m, (LoraLinear, NF4Linear)) for m in plain.modules())
    assert not hasattr(plain, "_peftkern_patch_record")
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, before, rtol=1e-4, atol=1e-4)


def test_bad_quantize_argument_leaves_model_untouched():
    model = tiny_model("llama")
    before = {n: m for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="quantize must be"):
        peftkern.patch(model, {"r": 2, "target_modules": ["q_proj"]}, quantize="int8")
    assert {n: m for n, m in model.named_modules()} == before


def test_qlora_under_autocast_bf16(generator):
    model = peftkern.patch(tiny_model("llama"), {"r": 4, "target_modules": TARGETS, "init_lora_weights": False},
                           quantize="nf4")  # fmt: skip
    inputs = batch(generator)
    with torch.no_grad():
        exact = model(**inputs).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs)
    assert ((out.logits.float() - exact).norm() / exact.norm()).item() < 2e-2
    out.loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)
