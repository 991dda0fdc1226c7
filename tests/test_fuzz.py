"""A standing property suite: every op family on shapes, dtypes and layouts that hypothesis
draws (empty and odd sizes included), against its reference, with the same judges as the
self-check (peftkern.testing: error / allowed rounding <= 1, NaN never passes); and the config
parsers on drawn configs, which either patch or raise a TypeError / ValueError /
NotImplementedError, leaving the model as it was. Small enough for CI (derandomized: the same
examples every run; hypothesis prints a failing example with the @reproduce_failure blob)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peftkern
from peftkern import _ext, testing
from peftkern.ops import adapter as adapter_ops
from peftkern.ops import dora as dora_ops
from peftkern.ops import nf4 as nf4_ops
from peftkern.ops import qlora as qlora_ops

pytestmark = pytest.mark.skipif(not _ext.available(), reason="op library not built")

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
dtypes = st.sampled_from(testing.DTYPES)
seeds = st.integers(0, 2**31 - 1)
small = st.integers(0, 19)
positive = st.integers(1, 40)


def gen(seed):
    return torch.Generator().manual_seed(seed)


@FUZZ
@given(m=small, k=positive, n=positive, r=st.integers(1, 9), dtype=dtypes, dropout=st.booleans(), seed=seeds)
def test_lora_linear(m, k, n, r, dtype, dropout, seed):
    g = gen(seed)
    x, w, b, a, bb, drop = testing.random_lora_inputs((m, k, n, r), dtype, "cpu", g, dropout=dropout)
    errors = testing.lora_linear_errors(x, w, b, a, bb, drop, 0.75, g)
    assert max(errors.values()) <= 1.0, errors


@FUZZ
@given(m=small, k=positive, n=positive, dtype=dtypes, scale_input=st.booleans(), bias=st.booleans(), seed=seeds)
def test_ia3_linear(m, k, n, dtype, scale_input, bias, seed):
    g = gen(seed)
    x, w, b, l = testing.random_ia3_inputs((m, k, n), dtype, "cpu", g, scale_input, bias=bias)
    errors = testing.ia3_linear_errors(x, w, b, l, scale_input, g)
    assert max(errors.values()) <= 1.0, errors


@FUZZ
@given(m=small, d=positive, r=st.integers(1, 12), dtype=dtypes, activation=st.sampled_from(["relu", "gelu", "gelu_new", "silu"]),
       learned=st.booleans(), seed=seeds)  # fmt: skip
def test_adapter_bottleneck(m, d, r, dtype, activation, learned, seed):
    g = gen(seed)

    def rand(*size, gain=1.0):
        t = torch.randn(size, generator=g, dtype=torch.float64) * gain / max(size[-1], 1) ** 0.5
        return t.to(dtype)

    x, residual = rand(m, d, gain=d**0.5), rand(m, d, gain=d**0.5)
    params = [rand(r, d), rand(r, gain=r**0.5), rand(d, r), rand(d, gain=d**0.5)]
    scale = torch.tensor([0.8], dtype=dtype) if learned else None
    errors = testing.adapter_errors(x, residual, params, scale, 1.5, adapter_ops.activation_code(activation), g)
    assert max(errors.values(), default=0.0) <= 1.0, errors


@FUZZ
@given(t=small, k=positive, n=positive, adapters=st.integers(0, 4), r=st.integers(0, 6), dtype=dtypes,
       strided=st.booleans(), f32_weights=st.booleans(), seed=seeds)  # fmt: skip
def test_grouped_ops(t, k, n, adapters, r, dtype, strided, f32_weights, seed):
    g = gen(seed)
    weight_dtype = torch.float32 if f32_weights else dtype
    inputs = testing.random_grouped_inputs((t, k, n, adapters, r), dtype, "cpu", g, strided, weight_dtype)
    errors = testing.grouped_errors(*inputs, g)
    assert max(errors.values(), default=0.0) <= 1.0, errors


@FUZZ
@given(shape=st.lists(st.integers(0, 300), min_size=1, max_size=2).map(tuple), blocksize=st.sampled_from(testing.BLOCKSIZES),
       dtype=dtypes, double_quant=st.booleans(), seed=seeds)  # fmt: skip
def test_nf4_quantize_and_dequantize_are_the_references(shape, blocksize, dtype, double_quant, seed):
    w = torch.randn(shape, generator=gen(seed)).to(dtype) * 3
    packed, absmax = torch.ops.peftkern.nf4_quantize(w, blocksize)
    want_packed, want_absmax = nf4_ops.nf4_quantize_reference(w, blocksize)
    assert torch.equal(packed, want_packed) and torch.equal(absmax, want_absmax)
    weight = peftkern.nf4_quantize(w, blocksize, double_quant=double_quant)
    got = weight.dequantize(dtype)
    if double_quant and weight.nested is not None:
        nested = weight.nested
        want = nf4_ops.nf4_dequantize_nested_reference(weight.packed, weight.absmax, nested.absmax, nested.code,
                                                       nested.offset, blocksize, nested.blocksize, shape, dtype)  # fmt: skip
    else:
        want = nf4_ops.nf4_dequantize_reference(weight.packed, weight.absmax, blocksize, shape, dtype)
    assert torch.equal(got, want)


@FUZZ
@given(n=st.integers(0, 70), k=st.integers(1, 300), tokens=st.integers(1, 11), blocksize=st.sampled_from([64, 128, 256]),
       nested=st.booleans(), dtype=dtypes, seed=seeds)  # fmt: skip
def test_qlora_decode_gemv(n, k, tokens, blocksize, nested, dtype, seed):
    g = gen(seed)
    weight = peftkern.nf4_quantize(torch.randn(n, k, generator=g) * 0.05, blocksize, double_quant=nested)
    x, bias, xa, lora_b = (torch.randn(s, generator=g).to(dtype) for s in ((tokens, k), (n,), (tokens, 3), (n, 3)))
    got = qlora_ops.nf4_lora_gemv(x, weight, bias, xa, lora_b, 0.5)
    want = qlora_ops.nf4_lora_gemv_reference(x, weight, bias, xa, lora_b, 0.5)
    scale = want.double().abs().max().item() if want.numel() else 1.0
    allowed = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert not torch.isnan(got).any()
    assert (got.double() - want.double()).abs().max().item() <= allowed * max(scale, 1e-30) if want.numel() else True


@FUZZ
@given(n=st.integers(0, 40), k=positive, r=st.integers(1, 8), dtype=dtypes, seed=seeds)
def test_dora_weight_norm(n, k, r, dtype, seed):
    g = gen(seed)
    w, a, b = (torch.randn(s, generator=g).to(dtype) for s in ((n, k), (r, k), (n, r)))
    got = torch.ops.peftkern.dora_weight_norm(w, a, b, 0.7).double()
    want = dora_ops.dora_weight_norm_reference(w.double(), a.double(), b.double(), 0.7)
    allowed = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert not torch.isnan(got).any()
    assert n == 0 or ((got - want).abs() / want.clamp_min(1e-30)).max().item() <= allowed


# --- config parsers ------------------------------------------------------------------------------
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


values = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(-2, 70), st.just(float("nan")), st.text(max_size=6),
                   st.lists(st.sampled_from(["q_proj", "v_proj", "x", 3]), max_size=3))  # fmt: skip
LORA_FIELDS = ["r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "use_dora", "init_lora_weights",
               "fan_in_fan_out", "lora_bias", "use_qalora", "layers_to_transform", "target_modulez"]  # fmt: skip


@settings(max_examples=40, deadline=None, derandomize=True, print_blob=True)
@given(config=st.dictionaries(st.sampled_from(LORA_FIELDS), values, max_size=4))
def test_drawn_lora_configs_patch_or_raise_a_clear_error(config):
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        peftkern.patch(model, {"target_modules": ["q_proj"], **config})
    except (TypeError, ValueError, NotImplementedError) as error:
        assert str(error), "an error must say what is wrong"
        assert model.state_dict().keys() == state.keys() and not hasattr(model, "_peftkern_patch_record")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    else:
        peftkern.unpatch(model)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


OTHER_CONFIGS = {
    "IA3": (["target_modules", "feedforward_modules", "init_ia3_weights", "fan_in_fan_out", "modules_to_save",
             "layers_to_transform", "feedforward_modulez"], {"target_modules": ["k_proj"], "feedforward_modules": []}),
    "PREFIX_TUNING": (["num_virtual_tokens", "prefix_projection", "encoder_hidden_size", "num_layers", "token_dim",
                       "num_attention_heads", "task_type", "prefix_projektion"], {"num_virtual_tokens": 3}),
    "PROMPT_TUNING": (["num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text", "token_dim",
                       "num_layers", "task_type", "inference_mode"], {"num_virtual_tokens": 3}),
}  # fmt: skip


@settings(max_examples=30, deadline=None, derandomize=True, print_blob=True)
@given(peft_type=st.sampled_from(sorted(OTHER_CONFIGS)), data=st.data())
def test_drawn_ia3_prefix_and_prompt_configs_patch_or_raise_a_clear_error(peft_type, data):
    fields, required = OTHER_CONFIGS[peft_type]
    config = data.draw(st.dictionaries(st.sampled_from(fields), values, max_size=3))
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        peftkern.patch(model, {"peft_type": peft_type, **required, **config})
    except (TypeError, ValueError, NotImplementedError) as error:
        assert str(error), "an error must say what is wrong"
        assert model.state_dict().keys() == state.keys() and not hasattr(model, "_peftkern_patch_record")
    else:
        peftkern.unpatch(model)
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
