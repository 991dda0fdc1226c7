"""The LoRA-on-dense-base op: outputs and hand-written gradients against the reference (autograd
through plain PyTorch, given the op's dropout decisions as a mask), gradcheck in float64,
opcheck, torch.compile, bad input, no mask saved for backward."""

import pytest
import torch

from peftkern.testing import LORA_SHAPES, lora_linear_errors, random_lora_inputs
from peftkern.ops import lora as lora_ops

from .conftest import OpsCalled, requires_cuda

ops = torch.ops.peftkern
SHAPES = LORA_SHAPES  # (tokens, in, out, r): odd sizes, one token, r larger than a dimension, r = 1


def make_inputs(m, k, n, r, dtype, generator, device="cpu", bias=True, dropout=False):
    x, w, b, a, bb, drop = random_lora_inputs((m, k, n, r), dtype, device, generator, bias=bias, dropout=dropout)
    return x.requires_grad_(), w, b, a.requires_grad_(), bb.requires_grad_(), drop


def check_output_and_gradients(x, w, b, a, bb, drop, scaling, generator):
    """Output and gradients for x, A, B within the dtype's rounding tolerance of the float64
    reference (see peftkern.testing.lora_linear_errors for the bound)."""
    errors = lora_linear_errors(x, w, b, a, bb, drop, scaling, generator)
    assert all(e <= 1.0 for e in errors.values()), errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bias, dropout", [(True, False), (False, True), (True, True)])
def test_matches_reference(dtype, bias, dropout, generator, cpu_gemm):
    for m, k, n, r in SHAPES:
        x, w, b, a, bb, drop = make_inputs(m, k, n, r, dtype, generator, bias=bias, dropout=dropout)
        check_output_and_gradients(x, w, b, a, bb, drop, 0.75, generator)


def test_strided_x_draws_what_its_contiguous_copy_draws(generator):
    """The decision of element (i, j) depends on its index i·K + j, not on where x's memory is."""
    base = torch.randn(40, 70, generator=generator, dtype=torch.float64)
    x = base[::2, 3:60]  # row stride 140, K = 57
    w, a, bb = (torch.randn(s, generator=generator, dtype=torch.float64) for s in ((9, 57), (4, 57), (9, 4)))
    drop = (0.4, 12345, 6)
    strided = ops.lora_linear_fwd(x, w, None, a, bb, 0.5, *drop)
    contiguous = ops.lora_linear_fwd(x.contiguous(), w, None, a, bb, 0.5, *drop)
    assert torch.equal(strided[1], contiguous[1])  # xa = xd·Aᵀ: the same xd, the same GEMM
    torch.testing.assert_close(strided[0], contiguous[0])  # the base GEMM reads x in place (BLAS order)
    x = x.requires_grad_()
    check_output_and_gradients(x, w, None, a.requires_grad_(), bb.requires_grad_(), drop, 0.5, generator)


def test_wrapper_handles_leading_dims_and_fan_in_fan_out(generator, cpu_gemm):
    x = torch.randn(2, 3, 10, generator=generator)
    w = torch.randn(6, 10, generator=generator)
    a, bb = torch.randn(4, 10, generator=generator), torch.randn(6, 4, generator=generator)
    want = lora_ops.lora_linear_reference(x, w, None, a, bb, 2.0)
    torch.testing.assert_close(lora_ops.lora_linear(x, w, None, a, bb, 2.0), want)
    # GPT-2's Conv1D stores [in, out]
    torch.testing.assert_close(lora_ops.lora_linear(x, w.t().contiguous(), None, a, bb, 2.0, fan_in_fan_out=True),
                               want)  # fmt: skip


def test_dropout_only_in_training_and_only_on_the_lora_branch(generator):
    x = torch.randn(50, 40, generator=generator)
    w, a, bb = (torch.randn(s, generator=generator) for s in ((30, 40), (8, 40), (30, 8)))
    # the rank-r products sum in another order than the reference's GEMMs (csrc/rank_product/): a
    # float32 bound on the summed magnitudes (outputs cancel down from terms of ~50)
    magnitude = x.abs() @ w.abs().t() + (x.abs() @ a.abs().t()) @ bb.abs().t()
    torch.testing.assert_close(lora_ops.lora_linear(x, w, None, a, bb, 1.0, dropout=0.5, training=False),
                               lora_ops.lora_linear_reference(x, w, None, a, bb, 1.0), rtol=1e-5,
                               atol=1e-5 * magnitude.max().item())  # fmt: skip
    base_only = lora_ops.lora_linear(x, w, None, a, torch.zeros_like(bb), 1.0, dropout=0.5, training=True)
    torch.testing.assert_close(base_only, x @ w.t())
    out = lora_ops.lora_linear(x, w, None, a, bb, 1.0, dropout=0.5, training=True)
    assert not torch.allclose(out, lora_ops.lora_linear_reference(x, w, None, a, bb, 1.0))


def test_wrapper_is_reproducible_under_manual_seed_and_saves_no_mask(generator):
    """torch.manual_seed fixes the dropout draws (seed from torch's CPU generator); what autograd
    keeps for backward is x (an alias), W, A, B and xa, and no bool tensor or [tokens, in] copy."""
    x = torch.randn(3, 17, 40, generator=generator).requires_grad_()
    w, a, bb = torch.randn(30, 40, generator=generator), torch.randn(8, 40, generator=generator), torch.randn(30, 8)
    a.requires_grad_()

    def run(seed):
        torch.manual_seed(seed)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = lora_ops.lora_linear(x, w, None, a, bb, 1.0, dropout=0.3, training=True)
        return out, torch.autograd.grad(out.sum(), (x, a)), saved

    out1, grads1, saved = run(7)
    out2, grads2, _ = run(7)
    out3, _, _ = run(8)
    assert torch.equal(out1, out2) and all(torch.equal(g1, g2) for g1, g2 in zip(grads1, grads2))
    assert not torch.equal(out1, out3)
    assert not any(t.dtype == torch.bool for t in saved)
    assert sorted(tuple(t.shape) for t in saved) == sorted([(51, 40), (30, 40), (8, 40), (30, 8), (51, 8)])


@pytest.mark.parametrize("bias, dropout", [(True, False), (False, True)])
def test_gradcheck_float64(bias, dropout, generator):
    x, w, b, a, bb, drop = make_inputs(6, 5, 4, 3, torch.float64, generator, bias=bias, dropout=dropout)
    if b is not None:
        b.requires_grad_()  # a trainable bias (PEFT's bias="all") gets its gradient too

    def f(x, a, bb, b):  # the same (seed, offset) on every call: the same decisions
        return ops.lora_linear_fwd(x, w, b, a, bb, 1.7, *drop)[0]

    assert torch.autograd.gradcheck(f, (x, a, bb, b))


@pytest.mark.parametrize("dropout", [False, True])
def test_gradcheck_float64_through_both_outputs(dropout, generator):
    """xa = dropout(x)·Aᵀ is an output too: a gradient into it alone (out's undefined) or into
    both reaches x and A through the same dropped projection (the C++ autograd's second branch)."""
    x, w, b, a, bb, drop = make_inputs(6, 5, 4, 3, torch.float64, generator, bias=False, dropout=dropout)
    assert torch.autograd.gradcheck(lambda x, a, bb: ops.lora_linear_fwd(x, w, None, a, bb, 0.7, *drop), (x, a, bb))
    assert torch.autograd.gradcheck(lambda x, a: ops.lora_linear_fwd(x, w, None, a, bb.detach(), 0.7, *drop)[1], (x, a))


@pytest.mark.parametrize("dropout", [False, True])
def test_input_without_grad_skips_its_gradient_and_keeps_the_rest(dropout, generator):
    """x needing no gradient (a frozen base's first layer): backward skips grad x (the base GEMM)
    and gives the same grad A, grad B and trainable-bias gradient, bit for bit."""
    x, w, b, a, bb, drop = make_inputs(37, 24, 19, 4, torch.float32, generator, dropout=dropout)
    b.requires_grad_()
    g = torch.randn(37, 19, generator=generator)
    results, called = [], []
    for x_grad in (True, False):
        leaves = [t.detach().clone().requires_grad_(x_grad or i > 0) for i, t in enumerate((x, b, a, bb))]
        out = ops.lora_linear_fwd(leaves[0], w, leaves[1], leaves[2], leaves[3], 0.8, *drop)[0]
        with OpsCalled() as ops_called:
            out.backward(g)
        results.append([t.grad for t in leaves])
        called.append(ops_called.names)
    assert results[1][0] is None and results[0][0] is not None
    assert "peftkern.lora_linear_bwd" in called[0]
    assert "peftkern.lora_linear_bwd" not in called[1]  # the base GEMM skipped
    for got, want in zip(results[1][1:], results[0][1:]):
        assert torch.equal(got, want)


def test_trainable_base_weight_gets_its_gradient(generator):
    x, w, b, a, bb, _ = make_inputs(5, 4, 3, 2, torch.float64, generator)
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda w: ops.lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, 0, 0)[0], (w,))


def test_opcheck(generator):
    x, w, b, a, bb, drop = make_inputs(7, 9, 5, 3, torch.float32, generator, dropout=True)
    torch.library.opcheck(ops.lora_linear_fwd.default, (x, w, b, a, bb, 0.5, *drop))
    out, xa = ops.lora_linear_fwd(x, w, b, a, bb, 0.5, *drop)
    g = torch.randn_like(out)
    torch.library.opcheck(ops.lora_linear_bwd.default, (g, x.detach(), w, a.detach(), bb.detach(), xa.detach(), 0.5,
                                                        *drop))  # fmt: skip


def test_torch_compile_fullgraph(generator):
    torch._dynamo.reset()
    x, w, b, a, bb, _ = make_inputs(8, 16, 12, 4, torch.float32, generator)

    def step(x, a, bb):
        return lora_ops.lora_linear(x, w, b, a, bb, 0.5).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, a, bb), (x, a, bb))
    want = torch.autograd.grad(step(x, a, bb), (x, a, bb))
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: {**t, "x": t["x"].unsqueeze(0)}, "x must be 2-D"),
        (lambda t: {**t, "w": t["w"][:, :-1]}, "weight is"),
        (lambda t: {**t, "a": t["a"][:, :-1]}, "lora_a is"),
        (lambda t: {**t, "bb": t["bb"][:-1]}, "lora_b is"),
        (lambda t: {**t, "a": t["a"].double()}, "lora_a is Double but x is Float"),
        (lambda t: {**t, "b": t["b"][:-1]}, "bias must have"),
        (lambda t: {**t, "p": 1.0}, r"p must be in \[0, 1\)"),
        (lambda t: {**t, "p": -0.1}, r"p must be in \[0, 1\)"),
        (lambda t: {**t, "x": t["x"].int()}, "x must be"),
    ],
)
def test_bad_input_gets_a_clear_error(mutate, message, generator):
    x, w, b, a, bb, drop = make_inputs(4, 6, 5, 2, torch.float32, generator, dropout=True)
    t = mutate({"x": x.detach(), "w": w, "b": b, "a": a.detach(), "bb": bb.detach(), "p": drop[0]})
    with pytest.raises(RuntimeError, match=message):
        ops.lora_linear_fwd(t["x"], t["w"], t["b"], t["a"], t["bb"], 1.0, t["p"], *drop[1:])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype, generator):
    for m, k, n, r in SHAPES:
        x, w, b, a, bb, drop = make_inputs(m, k, n, r, dtype, generator, device="cuda", dropout=True)
        check_output_and_gradients(x, w, b, a, bb, drop, 0.5, generator)
