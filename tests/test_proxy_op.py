"""Proxy-tuning's decode-step op (peftkern::proxy_logits, csrc/proxy/): filtered logits equal to its
reference (peftkern.ops.proxy) and to transformers' Temperature / TopK / TopP warpers applied in that
order, on random rows: every input dtype pair, odd and tiny vocabularies, padded and strided expert
rows, ties, min_tokens_to_keep, NaN / inf rows, empty shapes; opcheck; bad input. Runs a second
time against the CUDA kernel under the emulation (tests/conftest.py, EMULATED_MODULES)."""

import math

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from peftkern import _ext
from peftkern.ops import proxy as proxy_ops

ops = torch.ops.peftkern
pytestmark = pytest.mark.skipif(not _ext.has_kernel("proxy_logits", "cpu"), reason="needs the compiled op")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (temperature, top_k, top_p, min_tokens_to_keep): greedy's plain combine, each filter alone, all
FILTERS = [(1.0, 0, 1.0, 1), (0.7, 0, 1.0, 1), (1.0, 5, 1.0, 1), (1.3, 0, 0.8, 1), (0.6, 10, 0.9, 1),
           (1.0, 3, 0.5, 4), (2.0, 0, 0.05, 2), (1.0, 1, 1.0, 1)]  # fmt: skip


def random_rows(rows, vocab, generator, dtype=torch.float32, expert_dtype=None, pad=0, scale=3.0):
    """base [rows, vocab]; expert / anti-expert [rows, vocab + pad], the anti-expert a strided view."""
    base = (torch.randn(rows, vocab, generator=generator) * scale).to(dtype)
    expert = (torch.randn(rows, vocab + pad, generator=generator) * scale).to(expert_dtype or dtype)
    anti = (torch.randn(vocab + pad, rows, generator=generator) * scale).to(expert_dtype or dtype).t()
    return base, expert, anti


def assert_same_filtering(got, want):
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()), "NaN rows differ"
    assert torch.equal(got == -math.inf, want == -math.inf), "the removed tokens differ"
    kept = torch.isfinite(want)
    # float32 z is exact against the CPU reference; PyTorch may divide by the temperature as a
    # multiplication by its reciprocal (one rounding more), hence one ulp of room.
    torch.testing.assert_close(got[kept], want[kept], rtol=2e-7, atol=0)


@pytest.mark.parametrize("filters", FILTERS, ids=str)
def test_matches_reference(filters, generator):
    temperature, top_k, top_p, keep = filters
    for rows, vocab, pad in [(3, 37, 5), (1, 1, 0), (2, 300, 0), (2, 8, 3)]:
        alpha = float(torch.rand((), generator=generator)) * 2
        base, expert, anti = random_rows(rows, vocab, generator, pad=pad)
        got = ops.proxy_logits(base, expert, anti, alpha, temperature, top_k, top_p, keep)
        want = proxy_ops.proxy_logits_reference(base, expert, anti, alpha, temperature, top_k, top_p, keep)
        assert_same_filtering(got, want)
        if vocab >= 8 and ((top_k and top_k < vocab) or top_p < 0.9):
            assert (got == -math.inf).any()  # the filter did something


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("expert_dtype", DTYPES, ids=str)
def test_dtypes(dtype, expert_dtype, generator):
    base, expert, anti = random_rows(2, 53, generator, dtype, expert_dtype, pad=2)
    got = ops.proxy_logits(base, expert, anti, 1.5, 0.8, 7, 0.9, 1)
    assert_same_filtering(got, proxy_ops.proxy_logits_reference(base, expert, anti, 1.5, 0.8, 7, 0.9, 1))


def hf_warpers(z, temperature, top_k, top_p, keep):
    ids = torch.zeros(z.shape[0], 1, dtype=torch.long)
    z = TemperatureLogitsWarper(temperature)(ids, z) if temperature != 1.0 else z
    z = TopKLogitsWarper(top_k, min_tokens_to_keep=keep)(ids, z) if top_k else z
    return TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(ids, z) if top_p < 1.0 else z


def near_top_p_boundary(z, top_k, top_p, keep):
    """Whether some cumulative probability lies within float32 rounding of 1 − top_p (where the
    warper's float32 sums and the op's float64 ones may rightly disagree)."""
    if top_p >= 1.0:
        return False
    if top_k:
        z = TopKLogitsWarper(top_k, min_tokens_to_keep=keep)(None, z)
    cumulative = torch.sort(z, stable=True)[0].double().softmax(-1).cumsum(-1)
    return bool(((cumulative - (1 - top_p)).abs() < 1e-5).any())


@pytest.mark.parametrize("filters", FILTERS, ids=str)
def test_matches_transformers_warpers(filters, generator):
    temperature, top_k, top_p, keep = filters
    checked = 0
    for _ in range(6):
        base, expert, anti = random_rows(2, 200, generator)
        alpha = 1.0
        z = base + alpha * (expert - anti)
        if near_top_p_boundary(z / temperature, top_k, top_p, keep):
            continue
        got = ops.proxy_logits(base, expert, anti, alpha, temperature, top_k, top_p, keep)
        assert_same_filtering(got, hf_warpers(z, temperature, top_k, top_p, keep))
        checked += 1
    assert checked >= 3


def test_ties():
    """Integer logits: many ties at the top-k value (all kept, as TopKLogitsWarper) and across the
    top-p boundary (removed in index order, the stable ascending sort)."""
    g = torch.Generator().manual_seed(0)  # fixed: the tie layout is the point of the test
    base = torch.randint(-3, 3, (4, 64), generator=g).float()
    zero = torch.zeros(4, 64)
    for top_k, top_p, keep in [(5, 1.0, 1), (0, 0.7, 1), (0, 0.3, 1), (9, 0.5, 3), (0, 0.95, 1), (2, 0.2, 20)]:
        got = ops.proxy_logits(base, zero, zero, 1.0, 1.0, top_k, top_p, keep)
        want = proxy_ops.proxy_logits_reference(base, zero, zero, 1.0, 1.0, top_k, top_p, keep)
        assert_same_filtering(got, want)
        if top_p == 1.0:
            assert_same_filtering(got, hf_warpers(base.clone(), 1.0, top_k, 1.0, keep))
    # a tie straddling the top-p boundary: three equal tokens, only the first removed
    row = torch.tensor([[0.0, 0.0, 0.0, 5.0]])
    p = torch.softmax(row, -1)[0]
    top_p = 1 - float(p[0]) * 1.5  # cumulative sums: p0 <= 1 - top_p < 2·p0
    got = ops.proxy_logits(row, torch.zeros_like(row), torch.zeros_like(row), 1.0, 1.0, 0, top_p, 1)
    assert torch.equal(got == -math.inf, torch.tensor([[True, False, False, False]]))


def test_min_tokens_to_keep_beyond_the_vocabulary(generator):
    base, expert, anti = random_rows(2, 6, generator)
    got = ops.proxy_logits(base, expert, anti, 1.0, 1.0, 2, 0.1, 10)
    assert torch.isfinite(got).all()
    assert_same_filtering(got, proxy_ops.proxy_logits_reference(base, expert, anti, 1.0, 1.0, 2, 0.1, 10))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_unusable_rows_come_out_nan(bad, generator):
    base, expert, anti = random_rows(3, 40, generator)
    expert[1, 7] = bad
    for top_k, top_p in [(0, 1.0), (5, 0.9)]:
        got = ops.proxy_logits(base, expert, anti, 1.0, 1.0, top_k, top_p, 1)
        assert got[1].isnan().all() and not got[[0, 2]].isnan().any()
        assert_same_filtering(got, proxy_ops.proxy_logits_reference(base, expert, anti, 1.0, 1.0, top_k, top_p, 1))
    # -inf in the base alone is a token the base rules out: it stays -inf, never sampled
    base[0, 3] = -math.inf
    got = ops.proxy_logits(base, expert, anti, 1.0, 1.0, 0, 0.9, 1)
    assert got[0, 3] == -math.inf and torch.isfinite(got[0]).any()


def test_empty_shapes():
    for rows, vocab in [(0, 10), (3, 0)]:
        got = ops.proxy_logits(torch.zeros(rows, vocab), torch.zeros(rows, vocab + 2), torch.zeros(rows, vocab), 1.0,
                               1.0, 3, 0.9, 1)  # fmt: skip
        assert got.shape == (rows, vocab) and got.dtype == torch.float32


def test_logits_slices_of_a_model_output(generator):
    """The rows the decoder hands over: the last position of [B, L, V] logits (row stride L·V)."""
    logits = [torch.randn(3, 4, v, generator=generator) for v in (50, 64, 64)]
    base, expert, anti = (t[:, -1, :] for t in logits)
    got = ops.proxy_logits(base, expert, anti, 0.5, 1.0, 8, 0.9, 1)
    assert_same_filtering(got, proxy_ops.proxy_logits_reference(base, expert, anti, 0.5, 1.0, 8, 0.9, 1))


def test_opcheck(generator):
    base, expert, anti = random_rows(2, 30, generator, pad=3)
    torch.library.opcheck(ops.proxy_logits.default, (base, expert.contiguous(), anti.contiguous(), 1.0, 0.9, 4, 0.8, 1))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"base": torch.zeros(2, 5, dtype=torch.int32)}, "base must be"),
        ({"base": torch.zeros(10)}, r"base must be \[batch, vocab\]"),
        ({"expert": torch.zeros(2, 4)}, "expert has 4 vocabulary columns, fewer than base's 5"),
        ({"anti_expert": torch.zeros(3, 5)}, "anti_expert has 3 rows but base has 2"),
        ({"anti_expert": torch.zeros(2, 5, dtype=torch.float16)}, "anti_expert is Half but expert is Float"),
        ({"alpha": math.nan}, "alpha must be finite"),
        ({"alpha": -math.inf}, "alpha must be finite"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"temperature": math.inf}, "temperature must be a finite number > 0"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.01}, r"top_p must be in \(0, 1\]"),
        ({"top_p": math.nan}, r"top_p must be in \(0, 1\]"),
        ({"min_tokens_to_keep": 0}, "min_tokens_to_keep must be >= 1"),
    ],
)
def test_bad_input(change, message):
    args = {"base": torch.zeros(2, 5), "expert": torch.zeros(2, 5), "anti_expert": torch.zeros(2, 5), "alpha": 1.0,
            "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_tokens_to_keep": 1}  # fmt: skip
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        ops.proxy_logits(*args.values())
    if "Half but expert" not in message:  # the reference reads any dtype pair
        with pytest.raises(ValueError, match=message.split()[0]):
            proxy_ops.proxy_logits_reference(*args.values())
