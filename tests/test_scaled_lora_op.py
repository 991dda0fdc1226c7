"""The scaled-LoRA op (VeRA, AdaLoRA): outputs and hand-written gradients against the float64
reference for every mix of scales and trained / frozen A and B, gradcheck in float64, opcheck,
torch.compile, frozen A/B costing no GEMM, deterministic scale gradients, NF4 bases, bad input."""

import pytest
import torch

from peftkern import NF4Weight, _ext
from peftkern.ops import scaled_lora as ops_py
from peftkern.ops.lora import NO_DROPOUT
from peftkern.testing import (
    SCALED_LORA_SHAPES,
    SCALED_LORA_VARIANTS,
    check_scaled_lora,
    random_scaled_lora_inputs,
    scaled_lora_errors,
)

from .conftest import requires_cuda

ops = torch.ops.peftkern


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rank_scale, out_scale, train_ab", SCALED_LORA_VARIANTS)
@pytest.mark.parametrize("dropout, strided", [(False, False), (True, True), (False, True)])
def test_matches_reference(dtype, rank_scale, out_scale, train_ab, dropout, strided, generator):
    for shape in SCALED_LORA_SHAPES:
        x, w, b, a, bb, rs, os_, drop = random_scaled_lora_inputs(shape, dtype, "cpu", generator, rank_scale,
                                                                  out_scale, dropout, strided)  # fmt: skip
        errors = scaled_lora_errors(x, w, b, a, bb, rs, os_, drop, 0.8, train_ab, generator)
        assert all(e <= 1.0 for e in errors.values()), (shape, errors)


def test_the_judge_fails_a_wrong_result_and_a_nan(generator, monkeypatch):
    """The error judge is not blind: a 0.1% error in the scaling, or one NaN, fails it."""
    x, w, b, a, bb, rs, os_, _ = random_scaled_lora_inputs((13, 33, 17, 4), torch.float32, "cpu", generator)
    reference = ops_py.scaled_lora_linear_reference
    monkeypatch.setattr(ops_py, "scaled_lora_linear_reference",
                        lambda *args, **kw: reference(*args[:5], args[5] * 1.001, *args[6:], **kw))  # fmt: skip
    assert max(scaled_lora_errors(x, w, b, a, bb, rs, os_, NO_DROPOUT, 0.8, True, generator).values()) > 1.0
    monkeypatch.setattr(ops_py, "scaled_lora_linear_reference", reference)
    x = x.clone()
    x[3, 5] = float("nan")
    errors = scaled_lora_errors(x, w, b, a, bb, rs, os_, NO_DROPOUT, 0.8, True, generator)
    assert errors["out"] == float("inf")


def test_self_check_entry_passes_on_cpu(generator):
    results = check_scaled_lora("cpu", generator)
    assert len(results) == 3 * len(SCALED_LORA_SHAPES) * len(SCALED_LORA_VARIANTS) * 2
    assert all(r.passed for r in results), [r for r in results if not r.passed][:3]


def test_without_scales_it_is_the_lora_op(generator):
    x, w, b, a, bb, _, _, _ = random_scaled_lora_inputs((9, 12, 7, 3), torch.float32, "cpu", generator)
    drop = (0.4, 99, 3)  # and draws the same dropout decisions
    got = ops.scaled_lora_linear_fwd(x, w, b, a, bb, None, None, 0.7, *drop)[0]
    torch.testing.assert_close(got, ops.lora_linear_fwd(x, w, b, a, bb, 0.7, *drop)[0])


@pytest.mark.parametrize("rank_scale, out_scale, train_ab", SCALED_LORA_VARIANTS)
def test_gradcheck_float64(rank_scale, out_scale, train_ab, generator):
    x, w, b, a, bb, rs, os_, drop = random_scaled_lora_inputs((6, 5, 4, 3), torch.float64, "cpu", generator,
                                                              rank_scale, out_scale, dropout=True, strided=True)  # fmt: skip
    inputs = [t.detach().requires_grad_() if t is not None else None for t in (x, a, bb, rs, os_, b)]
    if not train_ab:
        inputs[1], inputs[2] = a, bb

    def f(x, a, bb, rs, os_, b):
        return ops.scaled_lora_linear_fwd(x, w, b, a, bb, rs, os_, 1.7, *drop)[0]

    assert torch.autograd.gradcheck(f, tuple(inputs))


def test_opcheck(generator):
    x, w, b, a, bb, rs, os_, drop = random_scaled_lora_inputs((7, 9, 5, 3), torch.float32, "cpu", generator,
                                                              dropout=True, strided=True)  # fmt: skip
    torch.library.opcheck(ops.scaled_lora_linear_fwd.default, (x, w, b, a, bb, rs, os_, 0.5, *drop))
    torch.library.opcheck(ops.scaled_lora_linear_fwd.default,
                          (x.requires_grad_(), w, b, a, bb, rs.requires_grad_(), None, 0.5, *NO_DROPOUT))  # fmt: skip
    out, xa = ops.scaled_lora_linear_fwd(x.detach(), w, b, a, bb, rs, os_, 0.5, *drop)
    g = torch.randn_like(out)
    for wanted in ([True, True, True, True], [False, False, True, True], [True, False, False, True]):
        torch.library.opcheck(ops.scaled_lora_linear_bwd.default,
                              (g, x.detach(), w, a, bb, xa.detach(), rs.detach(), os_, 0.5, *drop, wanted))  # fmt: skip


def _gemms_in_backward(out) -> int:
    """aten::mm / addmm calls made by out's backward (the kernels' own GEMMs included: the profiler
    sees ATen calls made inside our C++ ops, which a Python dispatch mode does not)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.backward(torch.ones_like(out))
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))


def test_frozen_a_and_b_cost_no_gradient_gemm(kernels, generator):
    """VeRA's case: with A and B frozen the backward runs no dA / dB GEMM (two fewer than with them
    trained) and A and B get no gradient; the scales get theirs. (The emulated CUDA kernel's host
    code runs once per schedule, so its GEMMs count that many times.)"""
    from peftkern import emulation

    runs = len(emulation.DEFAULT_SCHEDULES) if kernels == "cuda-emulated" else 1
    x, w, b, a, bb, rs, os_, _ = random_scaled_lora_inputs((9, 24, 16, 4), torch.float32, "cpu", generator)
    x, rs, os_ = (t.requires_grad_() for t in (x, rs, os_))
    frozen = _gemms_in_backward(ops_py.scaled_lora_linear(x, w, b, a, bb, 1.0, rs, os_))
    assert a.grad is None and bb.grad is None and rs.grad is not None and os_.grad is not None
    a2, bb2 = a.clone().requires_grad_(), bb.clone().requires_grad_()
    trained = _gemms_in_backward(ops_py.scaled_lora_linear(x, w, b, a2, bb2, 1.0, rs, os_))
    assert a2.grad is not None and bb2.grad is not None
    # dx: g·W and dxa·A; gs·B; v = u·Bᵀ for dλ_b; plus dA and dB when trained
    assert (frozen, trained) == (4 * runs, 6 * runs)


def test_backward_saves_x_and_xa_only_no_dropout_mask(generator):
    m, k, n, r = 9, 24, 16, 5
    x, w, b, a, bb, rs, os_, _ = random_scaled_lora_inputs((m, k, n, r), torch.float32, "cpu", generator)
    x, rs, os_ = (t.requires_grad_() for t in (x, rs, os_))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops_py.scaled_lora_linear(x, w, b, a, bb, 1.0, rs, os_, dropout=0.3, training=True)
    shapes = [tuple(t.shape) for t in saved]
    assert (m, n) not in shapes  # neither v nor the output scaled: recomputed
    assert not any(t.dtype == torch.bool for t in saved)  # the dropout decisions are drawn again
    assert sorted(shapes) == sorted([(m, k), (n, k), (r, k), (n, r), (m, r), (r,), (n,)]), shapes


def test_scale_gradients_are_deterministic(generator):
    """Same bits whatever the thread count: rows are summed in fixed blocks, in a fixed order."""
    x, w, b, a, bb, rs, os_, _ = random_scaled_lora_inputs((1000, 48, 40, 8), torch.float32, "cpu", generator)
    rs, os_ = rs.requires_grad_(), os_.requires_grad_()
    g = torch.randn(1000, 40, generator=generator)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            grads.append(torch.autograd.grad(ops_py.scaled_lora_linear(x, w, b, a, bb, 0.5, rs, os_), (rs, os_), g))
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        assert all(torch.equal(o, f) for o, f in zip(other, grads[0]))


def test_wrapper_leading_dims_fan_in_fan_out_and_fallback(generator, monkeypatch):
    x = torch.randn(2, 3, 10, generator=generator)
    w, a, bb = torch.randn(6, 10, generator=generator), torch.randn(4, 10, generator=generator), torch.randn(6, 4)
    e, lam = torch.randn(4, 1, generator=generator), torch.randn(6, generator=generator)
    want = ops_py.scaled_lora_linear_reference(x, w, None, a, bb, 2.0, e, lam)
    torch.testing.assert_close(ops_py.scaled_lora_linear(x, w, None, a, bb, 2.0, e, lam), want)
    got = ops_py.scaled_lora_linear(x, w.t().contiguous(), None, a, bb, 2.0, e, lam, fan_in_fan_out=True)
    torch.testing.assert_close(got, want)
    monkeypatch.setattr(_ext, "has_kernel", lambda op, device: False)
    torch.testing.assert_close(ops_py.scaled_lora_linear(x, w, None, a, bb, 2.0, e, lam), want)


def test_autocast_bfloat16(generator):
    x, w, b, a, bb, rs, os_, _ = random_scaled_lora_inputs((5, 16, 12, 4), torch.float32, "cpu", generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops_py.scaled_lora_linear(x, w, b, a, bb, 1.0, rs.requires_grad_(), os_)
    assert out.dtype == torch.bfloat16
    want = ops_py.scaled_lora_linear_reference(x.double(), w.double(), b.double(), a.double(), bb.double(), 1.0,
                                               rs.double(), os_.double())  # fmt: skip
    torch.testing.assert_close(out.double(), want, rtol=3e-2, atol=3e-2)
    out.float().sum().backward()
    assert rs.grad is not None and rs.grad.dtype == torch.float32


def test_torch_compile_fullgraph(generator):
    torch._dynamo.reset()
    x, w, b, a, bb, rs, os_, _ = random_scaled_lora_inputs((8, 16, 12, 4), torch.float32, "cpu", generator)
    leaves = [t.requires_grad_() for t in (x, rs, os_)]

    def step(x, rs, os_):
        return ops_py.scaled_lora_linear(x, w, b, a, bb, 0.5, rs, os_).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(step(*leaves), leaves)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_base_matches_the_dequantized_dense_base(dtype, generator):
    x, w, b, a, bb, rs, os_, _ = random_scaled_lora_inputs((13, 64, 48, 4), dtype, "cpu", generator)
    nf4 = NF4Weight.quantize(w, blocksize=64)
    dense = nf4.dequantize(dtype)
    ours = [t.detach().requires_grad_() for t in (x.view(1, 13, 64), b, a, bb, rs, os_)]
    want = [t.detach().clone().requires_grad_() for t in ours]
    out = ops_py.nf4_scaled_lora_linear(ours[0], nf4, ours[1], ours[2], ours[3], 0.7, ours[4], ours[5])
    ref = ops_py.scaled_lora_linear_reference(want[0], dense, want[1], want[2], want[3], 0.7, want[4], want[5])
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    g = torch.randn(out.shape, generator=generator).to(dtype)
    for got, expected in zip(torch.autograd.grad(out, ours, g), torch.autograd.grad(ref, want, g)):
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: {**t, "x": t["x"].unsqueeze(0)}, "x must be 2-D"),
        (lambda t: {**t, "x": t["x"].int()}, "x must be"),
        (lambda t: {**t, "w": t["w"][:, :-1]}, "weight is"),
        (lambda t: {**t, "a": t["a"][:, :-1]}, "lora_a is"),
        (lambda t: {**t, "bb": t["bb"][:-1]}, "lora_b is"),
        (lambda t: {**t, "a": t["a"].double()}, "lora_a is Double but x is Float"),
        (lambda t: {**t, "b": t["b"][:-1]}, "bias must have"),
        (lambda t: {**t, "rs": t["rs"][:-1]}, "rank_scale must have 2 elements"),
        (lambda t: {**t, "os": t["os"][:-1]}, "out_scale must have 5 elements"),
        (lambda t: {**t, "os": t["os"].int()}, "out_scale must be"),
        (lambda t: {**t, "p": 1.0}, r"p must be in \[0, 1\)"),
    ],
)
def test_bad_input_gets_a_clear_error(mutate, message, generator):
    x, w, b, a, bb, rs, os_, drop = random_scaled_lora_inputs((4, 6, 5, 2), torch.float32, "cpu", generator,
                                                              dropout=True)  # fmt: skip
    t = mutate({"x": x, "w": w, "b": b, "a": a, "bb": bb, "rs": rs, "os": os_, "p": drop[0]})
    with pytest.raises(RuntimeError, match=message):
        ops.scaled_lora_linear_fwd(t["x"], t["w"], t["b"], t["a"], t["bb"], t["rs"], t["os"], 1.0, t["p"], *drop[1:])


def test_backward_refuses_a_scale_gradient_without_the_scale(generator):
    x, w, b, a, bb, rs, os_, _ = random_scaled_lora_inputs((4, 6, 5, 2), torch.float32, "cpu", generator)
    out, xa = ops.scaled_lora_linear_fwd(x, w, b, a, bb, None, None, 1.0, *NO_DROPOUT)
    with pytest.raises(RuntimeError, match="no out_scale"):
        ops.scaled_lora_linear_bwd(out, x, w, a, bb, xa, None, None, 1.0, *NO_DROPOUT, [True, True, False, True])
    with pytest.raises(RuntimeError, match="xa is"):
        ops.scaled_lora_linear_bwd(out, x, w, a, bb, xa[:, :1], rs, os_, 1.0, *NO_DROPOUT, [True] * 4)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype, generator):
    for shape in SCALED_LORA_SHAPES:
        for rank_scale, out_scale, train_ab in SCALED_LORA_VARIANTS:
            x, w, b, a, bb, rs, os_, drop = random_scaled_lora_inputs(shape, dtype, "cuda", generator, rank_scale,
                                                                      out_scale, dropout=True, strided=True)  # fmt: skip
            errors = scaled_lora_errors(x, w, b, a, bb, rs, os_, drop, 0.5, train_ab, generator)
            assert all(e <= 1.0 for e in errors.values()), (shape, errors)
