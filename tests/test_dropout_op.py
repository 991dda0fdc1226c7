"""The mask-free LoRA-dropout ops (csrc/dropout/): the Philox generator against Random123's
known-answer vectors and against the plain-PyTorch Philox, the decisions and the dropout passes
bit for bit against the reference (on the CPU kernels and, as [cuda-emulated], the CUDA kernels:
both bit-equal to one reference, hence to each other; also compared directly), statistics (keep
rate within binomial bounds, no correlation across rows, columns, words of a block, offsets,
calls), reproducibility under torch.manual_seed, p = 0 and p near 1, odd / empty / strided
shapes, gradcheck, opcheck, bad input."""

import math

import pytest
import torch

from peftkern.ops import dropout as dropout_ops
from peftkern.testing import PHILOX_KAT, check_dropout

from .conftest import emulation_enabled

ops = torch.ops.peftkern
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

KAT = PHILOX_KAT  # Random123 1.14 kat_vectors, "philox4x32 10": counter words, key words, output words


def _i64(v):
    return dropout_ops._as_int64(v)


def _kat_args(counter, key):
    """(group, seed, offset) as the ops take them: counter = (group lo, hi, offset lo, hi)."""
    group = counter[0] | counter[1] << 32
    offset = counter[2] | counter[3] << 32
    return _i64(group), _i64(key[0] | key[1] << 32), _i64(offset)


def _draw(generator):
    seed, offset = (int(v) for v in torch.randint(-(2**62), 2**62, (2,), generator=generator))
    return seed, offset


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_random123_known_answers(counter, key, expected):
    group, seed, offset = _kat_args(counter, key)
    got = ops.philox_words(torch.tensor([group]), seed, offset)
    assert got.tolist() == [list(expected)]
    assert dropout_ops.philox_words_reference(torch.tensor([group]), seed, offset).tolist() == [list(expected)]


def test_uniforms_are_the_known_answer_words_scaled():
    """Elements 0..3 of stream (seed 0, offset 0) are counter block 0 under key 0: KAT 1."""
    u = ops.philox_uniform(torch.empty(4), 0, 0)
    want = torch.tensor([(w >> 8) * 2.0**-24 for w in KAT[0][2]], dtype=torch.float32)
    assert torch.equal(u, want)


def test_words_match_the_plain_pytorch_philox(generator, cpu_isa):
    groups = torch.randint(-(2**63), 2**63 - 1, (1001,), generator=generator)
    groups[:3] = torch.tensor([0, -1, 2**32])  # first block, the last one, a carry into the high word
    for _ in range(3):
        seed, offset = _draw(generator)
        got = ops.philox_words(groups, seed, offset)
        assert torch.equal(got, dropout_ops.philox_words_reference(groups, seed, offset))
        assert ops.philox_words(groups[:0], seed, offset).shape == (0, 4)


def test_consecutive_counters_take_the_vector_path_and_carry(generator, cpu_isa):
    """Runs of 16 consecutive counters go through the kernels' vector Philox (the op uses it for
    them): runs across 2³² (a carry into the counter's high word) and across the int64 sign."""
    starts = [0, 2**32 - 7, 2**33 - 16, 2**63 - 9, -5]
    groups = torch.cat([torch.arange(s, s + 37) if s < 2**63 - 40 else torch.tensor([s + i - 2**64 if s + i >= 2**63
                        else s + i for i in range(37)]) for s in starts])  # fmt: skip
    seed, offset = _draw(generator)
    assert torch.equal(ops.philox_words(groups, seed, offset), dropout_ops.philox_words_reference(groups, seed, offset))


@pytest.mark.parametrize("shape", [(0,), (1,), (3, 5), (7, 0), (257, 129), (2, 3, 7)])
def test_mask_and_uniform_match_the_reference_bit_for_bit(shape, generator, cpu_isa):
    seed, offset = _draw(generator)
    x = torch.empty(shape)
    u = ops.philox_uniform(x, seed, offset)
    assert u.dtype == torch.float32 and u.shape == x.shape
    assert torch.equal(u, dropout_ops.philox_uniform_reference(shape, seed, offset))
    for p in (0.0, 0.3, 0.999):
        mask = ops.lora_dropout_mask(x, p, seed, offset)
        assert mask.dtype == torch.bool and torch.equal(mask, dropout_ops.lora_dropout_mask_reference(shape, p, seed, offset))


def _inputs(shape, dtype, generator, layout):
    """x [M, K] contiguous, a strided slice, or a transposed view, with the same values."""
    m, k = shape
    base = torch.randn(2 * m + 1, k + 3, generator=generator, dtype=torch.float64).to(dtype)
    if layout == "contiguous":
        return base[:m, :k].contiguous()
    if layout == "strided":
        return base[1::2, 2 : k + 2]
    return base[:m, :k].t().contiguous().t()  # column-major


SHAPES = [(1, 1), (3, 5), (13, 33), (64, 96), (0, 7), (7, 0), (5, 1030)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
def test_dropout_matches_the_reference_bit_for_bit(dtype, layout, generator, cpu_isa):
    for shape in SHAPES:
        x = _inputs(shape, dtype, generator, layout)
        seed, offset = _draw(generator)
        for p in (0.0, 0.05, 0.5, 0.9999):
            got = ops.lora_dropout(x, p, seed, offset)
            assert got.is_contiguous() and got.dtype == dtype
            assert torch.equal(got, dropout_ops.lora_dropout_reference(x, p, seed, offset)), (shape, p)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_accumulate_matches_the_reference_bit_for_bit(dtype, layout, generator, cpu_isa):
    """out += x ⊙ m/(1−p), computed in the accumulation dtype and rounded once."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for shape in SHAPES:
        x = _inputs(shape, dtype, generator, layout)
        out = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        seed, offset = _draw(generator)
        p = 0.3
        mask = dropout_ops.lora_dropout_mask_reference(shape, p, seed, offset)
        scale = torch.tensor(1.0 / (1.0 - p), dtype=acc)
        want = (out.to(acc) + (x.to(acc) * mask) * scale).to(dtype)
        ops.lora_dropout_accumulate_(out, x, p, seed, offset)
        assert torch.equal(out, want), shape


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
def test_backward_matches_the_reference_bit_for_bit(dtype, layout, generator, cpu_isa):
    """One draw for both: grad_x += grad_xd ⊙ m/(1−p) (accumulation dtype, rounded once) and xd =
    x ⊙ m/(1−p), the same decisions as lora_dropout's; x and grad_xd in any layout."""
    for shape in SHAPES:
        x = _inputs(shape, dtype, generator, layout)
        grad_xd = _inputs(shape, dtype, generator, "strided" if layout == "contiguous" else "contiguous")
        grad_x = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        seed, offset = _draw(generator)
        for p in (0.05, 0.5):
            want_grad_x, want_xd = dropout_ops.lora_dropout_backward_reference(grad_x, grad_xd, x, p, seed, offset)
            got_grad_x = grad_x.clone()
            xd = ops.lora_dropout_backward_(got_grad_x, grad_xd, x, p, seed, offset)
            assert xd.is_contiguous() and xd.dtype == dtype
            assert torch.equal(xd, want_xd), (shape, p)
            assert torch.equal(xd, ops.lora_dropout(x, p, seed, offset)), (shape, p)
            assert torch.equal(got_grad_x, want_grad_x), (shape, p)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
def test_project_matches_the_reference(dtype, layout, generator, cpu_isa):
    """lora_dropout_project = lora_dropout(x)·Aᵀ: on the AVX-512 path one pass (xd exactly
    lora_dropout's elements, products accumulated in float), elsewhere the dropout op then the GEMM.
    Ranks below, at and above one 16-lane register; row counts below, at and above the 8-row group;
    rows that start mid Philox block (odd K)."""
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    for (m, k), r in [((1, 1), 1), ((3, 5), 16), ((13, 33), 17), ((8, 96), 40), ((17, 576), 16), ((0, 7), 3),
                      ((5, 9), 0), ((7, 0), 4), ((9, 1030), 8)]:  # fmt: skip
        x = _inputs((m, k), dtype, generator, layout)
        lora_a = torch.randn(r, k, generator=generator, dtype=torch.float64).to(dtype)
        seed, offset = _draw(generator)
        for p in (0.0, 0.1, 0.5):
            got = ops.lora_dropout_project(x, lora_a, p, seed, offset)
            assert got.shape == (m, r) and got.dtype == dtype and got.is_contiguous()
            assert not got.isnan().any(), (m, k, r, p)
            xd = dropout_ops.lora_dropout_reference(x, p, seed, offset).double()
            want = xd @ lora_a.double().t()
            # relative to the size of the terms summed, as any reordered dot product is
            bound = tol * (xd.abs() @ lora_a.double().abs().t() + 1e-30)
            assert ((got.double() - want).abs() <= bound).all(), (m, k, r, p, (got.double() - want).abs().max())


def test_project_gradcheck_float64(generator):
    x = _inputs((6, 7), torch.float64, generator, "strided").requires_grad_()
    lora_a = torch.randn(3, 7, generator=generator, dtype=torch.float64).requires_grad_()
    seed, offset = _draw(generator)
    assert torch.autograd.gradcheck(lambda x, a: ops.lora_dropout_project(x, a, 0.4, seed, offset), (x, lora_a))


def test_cpu_and_cuda_emulated_kernels_draw_the_same_bits(kernels, request, generator):
    """Direct comparison of the two implementations (the test above holds each to the reference)."""
    if kernels != "cpu" or not emulation_enabled():
        pytest.skip("compares the CPU kernels with the emulated CUDA kernels once, from the [cpu] run")
    request.getfixturevalue("emulation_library")
    emu = torch.ops.peftkern_emu
    seed, offset = _draw(generator)
    x = _inputs((37, 91), torch.bfloat16, generator, "strided")
    assert torch.equal(ops.lora_dropout(x, 0.2, seed, offset), emu.lora_dropout(x, 0.2, seed, offset))
    assert torch.equal(ops.lora_dropout_mask(x, 0.2, seed, offset), emu.lora_dropout_mask(x, 0.2, seed, offset))
    grad_xd, grad_x = torch.randn_like(x), torch.randn(x.shape, generator=generator).to(x.dtype)
    grad_x_emu = grad_x.clone()
    assert torch.equal(ops.lora_dropout_backward_(grad_x, grad_xd, x, 0.2, seed, offset),
                       emu.lora_dropout_backward_(grad_x_emu, grad_xd, x, 0.2, seed, offset))  # fmt: skip
    assert torch.equal(grad_x, grad_x_emu)
    assert torch.equal(ops.philox_uniform(x, seed, offset), emu.philox_uniform(x, seed, offset))
    groups = torch.randint(-(2**63), 2**63 - 1, (50,), generator=generator)
    assert torch.equal(ops.philox_words(groups, seed, offset), emu.philox_words(groups, seed, offset))


def test_dropped_non_finite_inputs_stay_non_finite():
    """x·0 for a dropped NaN / inf is NaN, as torch's x·mask/(1−p): dropout never hides them."""
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1.0] * 64])
    out = ops.lora_dropout(x, 0.5, 3, 4)
    mask = ops.lora_dropout_mask(x, 0.5, 3, 4)
    assert 0 < int(mask.sum()) < mask.numel()
    assert torch.isnan(out[~mask & torch.isfinite(x).logical_not()]).all()
    assert torch.equal(out[~mask & torch.isfinite(x)], torch.zeros(int((~mask & torch.isfinite(x)).sum())))


def test_self_check_entry_passes_on_cpu(generator):
    results = check_dropout("cpu", generator)
    assert all(r.passed for r in results), [r for r in results if not r.passed]
    counts = {op: sum(r.op == op for r in results) for op in ("lora_dropout", "lora_dropout_project")}
    assert len(results) == 3 + 4 * 4 * 2 and counts == {"lora_dropout": 16, "lora_dropout_project": 16}


# --- Statistics ----------------------------------------------------------------------------------
N_STAT = 1 << 20


def _z_bound(n):
    """A 6-sigma bound on a correlation of n independent pairs (false alarm ~1e-9 per test)."""
    return 6.0 / math.sqrt(n)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5, 0.9, 0.999])
def test_keep_rate_within_binomial_bounds(p, generator):
    seed, offset = _draw(generator)
    kept = int(ops.lora_dropout_mask(torch.empty(N_STAT), p, seed, offset).sum())
    q = math.ceil((1 - p) * 2**24) / 2**24  # the exact keep probability of a 24-bit uniform
    mean, sigma = N_STAT * q, math.sqrt(N_STAT * q * (1 - q))
    assert abs(kept - mean) <= 6 * sigma + 1, (kept, mean, sigma)


def test_p_zero_keeps_everything_and_p_near_one_almost_nothing(generator):
    seed, offset = _draw(generator)
    x = torch.randn(512, 512, generator=generator)
    assert torch.equal(ops.lora_dropout(x, 0.0, seed, offset), x)
    assert bool(ops.lora_dropout_mask(x, 0.0, seed, offset).all())
    p = 1 - 2**-20  # keep probability 2^-20: ~0.25 of 262,144 elements
    kept = int(ops.lora_dropout_mask(x, p, seed, offset).sum())
    assert kept <= 8
    out = ops.lora_dropout(x, p, seed, offset)
    assert int((out != 0).sum()) == kept and torch.allclose(out[out != 0], x[out != 0] * 2**20)


def _corr(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_uniforms_are_uniform_and_uncorrelated_within_and_across_blocks(generator):
    seed, offset = _draw(generator)
    u = ops.philox_uniform(torch.empty(N_STAT), seed, offset)
    counts = torch.histc(u, bins=256, min=0.0, max=1.0)
    expected = N_STAT / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 255 + 6 * math.sqrt(2 * 255), chi2  # chi-square, 255 degrees of freedom
    for lag in (1, 2, 3, 4, 5):  # words of one Philox block (lag < 4) and of neighbouring blocks
        assert abs(_corr(u[:-lag], u[lag:])) < _z_bound(N_STAT), lag


def test_no_correlation_across_rows_columns_offsets_and_seeds(generator):
    seed, offset = _draw(generator)
    m, k = 1024, 1023  # an odd row length: rows start at every position of a Philox block
    mask = ops.lora_dropout_mask(torch.empty(m, k), 0.5, seed, offset)
    bound = _z_bound((m - 1) * k)
    assert abs(_corr(mask[:-1], mask[1:])) < bound  # row i vs row i + 1
    assert abs(_corr(mask[:, :-1], mask[:, 1:])) < bound  # column j vs column j + 1
    row_rates = mask.double().mean(1)
    assert abs(_corr(row_rates[:-1], row_rates[1:])) < _z_bound(m - 1)
    for other in ((seed, offset + 1), (seed + 1, offset), (seed ^ (1 << 40), offset)):
        other_mask = ops.lora_dropout_mask(torch.empty(m, k), 0.5, *other)
        assert abs(_corr(mask, other_mask)) < _z_bound(m * k), other


def test_steps_draw_fresh_decisions_reproducibly_under_manual_seed():
    """Each call draws a fresh (seed, offset) from torch's generator: successive calls (layers,
    steps) are uncorrelated, torch.manual_seed replays them, another seed changes them."""
    x = torch.empty(512, 1000)

    def masks(seed):
        torch.manual_seed(seed)
        return [ops.lora_dropout_mask(x, 0.5, *dropout_ops.draw_seed(x.device)) for _ in range(3)]

    first, again, other = masks(11), masks(11), masks(12)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for a, b in ((first[0], first[1]), (first[1], first[2]), (first[0], other[0])):
        assert abs(_corr(a, b)) < _z_bound(x.numel())


# --- Autograd, opcheck, errors ------------------------------------------------------------------


def test_gradcheck_float64(generator):
    x = _inputs((6, 7), torch.float64, generator, "strided").requires_grad_()
    seed, offset = _draw(generator)
    assert torch.autograd.gradcheck(lambda x: ops.lora_dropout(x, 0.4, seed, offset), (x,))
    assert torch.autograd.gradcheck(lambda x: dropout_ops.lora_dropout(x, 0.4, seed, offset), (x,))


def test_opcheck(generator):
    x = torch.randn(9, 13, generator=generator)
    seed, offset = _draw(generator)
    torch.library.opcheck(ops.lora_dropout.default, (x.requires_grad_(), 0.3, seed, offset))
    torch.library.opcheck(ops.lora_dropout_accumulate_.default, (torch.randn(9, 13), x.detach(), 0.3, seed, offset))
    torch.library.opcheck(ops.lora_dropout_backward_.default,
                          (torch.randn(9, 13), torch.randn(9, 13), x.detach(), 0.3, seed, offset))  # fmt: skip
    torch.library.opcheck(ops.lora_dropout_mask.default, (x.detach(), 0.3, seed, offset))
    torch.library.opcheck(ops.philox_uniform.default, (x.detach(), seed, offset))
    torch.library.opcheck(ops.philox_words.default, (torch.arange(5), seed, offset))
    torch.library.opcheck(ops.lora_dropout_project.default,
                          (x.detach().requires_grad_(), torch.randn(4, 13, requires_grad=True), 0.3, seed, offset))  # fmt: skip


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: ops.lora_dropout(x, 1.0, 0, 0), r"p must be in \[0, 1\)"),
        (lambda x: ops.lora_dropout(x, -0.5, 0, 0), r"p must be in \[0, 1\)"),
        (lambda x: ops.lora_dropout(x, float("nan"), 0, 0), r"p must be in \[0, 1\)"),
        (lambda x: ops.lora_dropout(x.int(), 0.1, 0, 0), "x must be"),
        (lambda x: ops.lora_dropout(x[0], 0.1, 0, 0), "x must be 2-D"),
        (lambda x: ops.lora_dropout_accumulate_(torch.zeros(3, 4), x, 0.1, 0, 0), "out is"),
        (lambda x: ops.lora_dropout_accumulate_(x.double(), x, 0.1, 0, 0), "out is Double but x is Float"),
        (lambda x: ops.lora_dropout_accumulate_(torch.zeros(5, 4).t(), x, 0.1, 0, 0), "out must be contiguous"),
        (lambda x: ops.lora_dropout_backward_(torch.zeros(4, 5), x[:, :4], x, 0.1, 0, 0), "grad_xd is"),
        (lambda x: ops.lora_dropout_backward_(torch.zeros(4, 4), x, x, 0.1, 0, 0), "grad_x is"),
        (lambda x: ops.lora_dropout_backward_(torch.zeros(5, 4).t(), x, x, 0.1, 0, 0), "grad_x must be contiguous"),
        (lambda x: ops.lora_dropout_backward_(x, x.clone(), x, 0.1, 0, 0), "must not overlap"),
        (lambda x: ops.lora_dropout_backward_(torch.zeros(4, 5), x.double(), x, 0.1, 0, 0), "grad_xd is Double"),
        (lambda x: ops.lora_dropout_backward_(torch.zeros(4, 5), x, x, 1.0, 0, 0), r"p must be in \[0, 1\)"),
        (lambda x: ops.lora_dropout_mask(x, 1.5, 0, 0), r"p must be in \[0, 1\)"),
        (lambda x: ops.lora_dropout_project(x, torch.randn(2, 4), 0.1, 0, 0), r"lora_a is \[2, 4\], expected \[r, 5\]"),
        (lambda x: ops.lora_dropout_project(x, torch.randn(2, 5).double(), 0.1, 0, 0), "lora_a is Double but x is Float"),
        (lambda x: ops.lora_dropout_project(x, torch.randn(5), 0.1, 0, 0), "lora_a is"),
        (lambda x: ops.lora_dropout_project(x, torch.randn(2, 5), 1.0, 0, 0), r"p must be in \[0, 1\)"),
        (lambda x: ops.lora_dropout_project(x[0], torch.randn(2, 5), 0.1, 0, 0), "x must be 2-D"),
        (lambda x: ops.philox_words(torch.zeros(3), 0, 0), "groups must be Long"),
        (lambda x: ops.philox_words(torch.zeros(3, 1, dtype=torch.long), 0, 0), "groups must be 1-D"),
    ],
)
def test_bad_input_gets_a_clear_error(call, message):
    with pytest.raises(RuntimeError, match=message):
        call(torch.randn(4, 5))
