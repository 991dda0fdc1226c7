"""The rank-r products of LoRA (csrc/rank_product/): `lora_out_grads` and `lora_input_grads_`
against float64 references on every CPU ISA path (AVX-512: our kernels; the others: ATen), odd
and empty shapes, ranks 1-64 and past the kernels' 64, strided and expanded inputs, dropout drawn
again, thread-count independence, opcheck and bad input. The forward's products (x·Aᵀ through
`lora_dropout_project` at p = 0, and out += s·xa·Bᵀ inside lora_linear_fwd and the QLoRA tiles)
are checked here through those ops against the same references."""

import pytest
import torch

from peftkern.ops import dropout as dropout_ops
from peftkern.ops import rank_product as rank_ops
from peftkern.testing import check_rank_product

ops = torch.ops.peftkern

# (M, D, r): row groups of 8 / 4 / 2 with a tail row, D past and short of a 16-lane vector, every
# count of 16-lane vectors of r (1-4) with a masked last one, and r = 65 past the kernels (ATen)
SHAPES = [
    (1, 1, 1), (2, 15, 7), (9, 17, 16), (8, 64, 17), (7, 65, 33), (37, 200, 48), (5, 31, 64), (33, 130, 8),
    (4, 48, 65), (256, 576, 16),
]  # fmt: skip


def _bound(*terms):
    """An error bound for float32 sums of these products: 1e-5 of the summed magnitudes (|a|·|b|)
    plus a floor for exact zeros."""
    return 1e-5 * sum(terms) + 1e-6


def _close(got, want64, bound):
    assert got.dtype == torch.float32
    assert not torch.isnan(got).any()
    err = (got.double() - want64).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, bound at that element {bound.flatten()[err.argmax()].item():.3g}"


@pytest.mark.parametrize("m, n, r", SHAPES)
def test_out_grads_match_the_reference(generator, cpu_isa, m, n, r):
    grad_out = torch.randn(m, n, generator=generator)
    xa = torch.randn(m, r, generator=generator)
    lora_b = torch.randn(n, r, generator=generator)
    scaling = 0.75
    grad_xa, grad_b = ops.lora_out_grads(grad_out, xa, lora_b, scaling)
    want_xa, want_b = rank_ops.lora_out_grads_reference(grad_out.double(), xa.double(), lora_b.double(), scaling)
    _close(grad_xa, want_xa, _bound(scaling * grad_out.double().abs() @ lora_b.double().abs()))
    _close(grad_b, want_b, _bound(scaling * grad_out.double().abs().t() @ xa.double().abs()))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("m, k, r", SHAPES)
def test_input_grads_match_the_reference(generator, cpu_isa, m, k, r, p):
    x = torch.randn(m, k, generator=generator)
    grad_xa = torch.randn(m, r, generator=generator)
    lora_a = torch.randn(r, k, generator=generator)
    grad_x0 = torch.randn(m, k, generator=generator)
    seed, offset = (int(v) for v in torch.randint(0, 2**62, (2,), generator=generator))
    grad_x = grad_x0.clone()
    grad_a = ops.lora_input_grads_(grad_x, x, grad_xa, lora_a, p, seed, offset)
    want_x, want_a = rank_ops.lora_input_grads_reference(grad_x0.double(), x.double(), grad_xa.double(),
                                                         lora_a.double(), p, seed, offset)  # fmt: skip
    scale = 1.0 / (1.0 - p)
    _close(grad_x, want_x, _bound(grad_x0.double().abs(), scale * grad_xa.double().abs() @ lora_a.double().abs()))
    _close(grad_a, want_a, _bound(scale * grad_xa.double().abs().t() @ x.double().abs()))


def test_strided_and_expanded_inputs(generator, cpu_isa):
    """A column slice (row stride past the row length) takes the kernels; a transposed or expanded
    big matrix takes ATen: the same answers either way."""
    m, n, r = 19, 40, 16
    wide = torch.randn(m, n + 9, generator=generator)
    grad_out = wide[:, 3 : 3 + n]
    xa = torch.randn(m, r, generator=generator)
    lora_b = torch.randn(n, r, generator=generator)
    for g in (grad_out, grad_out.t().contiguous().t(), torch.randn(1, n, generator=generator).expand(m, n)):
        got = ops.lora_out_grads(g, xa, lora_b, 2.0)
        want = rank_ops.lora_out_grads_reference(g.double(), xa.double(), lora_b.double(), 2.0)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    x = wide[:, 5 : 5 + n]
    lora_a = torch.randn(r, n, generator=generator)
    big_gx = torch.randn(m, n + 4, generator=generator)
    grad_x = big_gx[:, 2 : 2 + n]  # accumulated in place through the strided view
    want_x, want_a = rank_ops.lora_input_grads_reference(grad_x.double(), x.double(), xa.double(), lora_a.double(),
                                                         0.0, 0, 0)  # fmt: skip
    grad_a = ops.lora_input_grads_(grad_x, x, xa, lora_a, 0.0, 0, 0)
    torch.testing.assert_close(big_gx[:, 2 : 2 + n].double(), want_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_a.double(), want_a, rtol=1e-5, atol=1e-5)


def test_empty_shapes(cpu_isa):
    for m, d, r in [(0, 8, 4), (5, 0, 4), (5, 8, 0)]:
        grad_xa, grad_b = ops.lora_out_grads(torch.randn(m, d), torch.randn(m, r), torch.randn(d, r), 1.0)
        assert grad_xa.shape == (m, r) and grad_b.shape == (d, r)
        assert not grad_xa.any() and not grad_b.any()
        grad_x = torch.ones(m, d)
        grad_a = ops.lora_input_grads_(grad_x, torch.randn(m, d), torch.randn(m, r), torch.randn(r, d), 0.0, 0, 0)
        assert grad_a.shape == (r, d) and not grad_a.any() and (grad_x == 1).all()


def test_results_do_not_depend_on_the_thread_count(generator):
    """The kernels split the work by a fixed plan (rank_product_cpu.cpp): bit-equal at 1 and 2 threads."""
    grad_out = torch.randn(96, 1000, generator=generator)
    xa = torch.randn(96, 16, generator=generator)
    lora_b = torch.randn(1000, 16, generator=generator)
    x = torch.randn(96, 1000, generator=generator)
    lora_a = torch.randn(16, 1000, generator=generator)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, max(2, threads)):
            torch.set_num_threads(t)
            gx = torch.zeros(96, 1000)
            results.append((*ops.lora_out_grads(grad_out, xa, lora_b, 2.0),
                            ops.lora_input_grads_(gx, x, xa, lora_a, 0.0, 0, 0), gx))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_forward_products_through_the_ops(generator, cpu_isa):
    """x·Aᵀ (lora_dropout_project at p = 0) and out += s·xa·Bᵀ (lora_linear_fwd) on the kernels."""
    for m, k, r in SHAPES:
        x = torch.randn(m, k, generator=generator)
        lora_a = torch.randn(r, k, generator=generator)
        got = ops.lora_dropout_project(x, lora_a, 0.0, 0, 0)
        _close(got, x.double() @ lora_a.double().t(), _bound(x.double().abs() @ lora_a.double().abs().t()))
        weight = torch.randn(k + 3, k, generator=generator)
        lora_b = torch.randn(k + 3, r, generator=generator)
        out, xa = ops.lora_linear_fwd(x, weight, None, lora_a, lora_b, 0.5, 0.0, 0, 0)
        want = x.double() @ weight.double().t() + 0.5 * (x.double() @ lora_a.double().t()) @ lora_b.double().t()
        mag = x.double().abs() @ weight.double().abs().t() + 0.5 * (
            (x.double().abs() @ lora_a.double().abs().t()) @ lora_b.double().abs().t()
        )
        _close(out, want, 2 * _bound(mag))


def test_dropout_draws_the_forward_decisions(generator):
    """With dropout, grad_a uses the same xd as lora_dropout and grad_x gets the dropped term only."""
    m, k, r, p = 24, 70, 16, 0.5
    x = torch.randn(m, k, generator=generator)
    grad_xa = torch.randn(m, r, generator=generator)
    lora_a = torch.randn(r, k, generator=generator)
    xd = dropout_ops.lora_dropout_reference(x, p, 11, 3)
    grad_x = torch.zeros(m, k)
    grad_a = ops.lora_input_grads_(grad_x, x, grad_xa, lora_a, p, 11, 3)
    torch.testing.assert_close(grad_a, grad_xa.t() @ xd, rtol=1e-5, atol=1e-4)
    dropped = xd == 0
    assert dropped.any() and (grad_x[dropped] == 0).all() and (grad_x[~dropped] != 0).all()


def test_opcheck(generator):
    grad_out = torch.randn(9, 33, generator=generator)
    xa = torch.randn(9, 17, generator=generator)
    lora_b = torch.randn(33, 17, generator=generator)
    torch.library.opcheck(ops.lora_out_grads.default, (grad_out, xa, lora_b, 0.5))
    x = torch.randn(9, 33, generator=generator)
    lora_a = torch.randn(17, 33, generator=generator)
    torch.library.opcheck(ops.lora_input_grads_.default, (torch.randn(9, 33, generator=generator), x, xa, lora_a,
                                                          0.1, 5, 0))  # fmt: skip


def test_bad_input():
    g, xa, b = torch.randn(4, 8), torch.randn(4, 2), torch.randn(8, 2)
    with pytest.raises(RuntimeError, match="lora_b is"):
        ops.lora_out_grads(g, xa, torch.randn(7, 2), 1.0)
    with pytest.raises(RuntimeError, match="xa is"):
        ops.lora_out_grads(g, torch.randn(3, 2), b, 1.0)
    with pytest.raises(RuntimeError, match="dtype|Half|Float"):
        ops.lora_out_grads(g, xa.half(), b, 1.0)
    with pytest.raises(RuntimeError, match="lora_a is"):
        ops.lora_input_grads_(torch.randn(4, 8), torch.randn(4, 8), xa, torch.randn(2, 9), 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="grad_x is"):
        ops.lora_input_grads_(torch.randn(4, 9), torch.randn(4, 8), xa, torch.randn(2, 8), 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.lora_input_grads_(torch.randn(8, 4).t(), torch.randn(4, 8), xa, torch.randn(2, 8), 0.2, 0, 0)
    with pytest.raises(RuntimeError, match="p"):
        ops.lora_input_grads_(torch.randn(4, 8), torch.randn(4, 8), xa, torch.randn(2, 8), 1.0, 0, 0)


def test_self_check_entry_passes_on_cpu(generator, cpu_isa):
    """`python -m peftkern.check`'s entry: every dtype, 5 shapes, out_grads and input_grads at p = 0 / 0.3."""
    results = check_rank_product("cpu", generator)
    assert all(r.passed for r in results), [r for r in results if not r.passed]
    assert len(results) == 3 * 5 * 3
