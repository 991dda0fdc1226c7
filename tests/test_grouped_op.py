"""The grouped (mixed-adapter) inference ops lora_grouped_fwd and ia3_grouped_scale: outputs and
gradients against the reference on fresh random inputs (G = 0, 1, 3, 8 and 40, the last two
kernel-call chunks; adapters as lists with ranks that differ, 0 included; float32 adapters with
half activations; rows of different adapters interleaved, -1 rows; no rows, one row, odd sizes;
strided inputs; every dtype), the reference itself against PEFT's per-adapter sub-batch loop,
gradcheck in float64 through the compiled ops, opcheck, torch.compile, the wrappers (leading
dims, autocast, fallback), bad input. Output poisoning is on (tests/conftest.py): an element a
kernel leaves unwritten is NaN and fails."""

import pytest
import torch
import torch.nn.functional as F

from peftkern import _ext
from peftkern.testing import GROUPED_SHAPES, grouped_errors, random_grouped_inputs
from peftkern.ops import grouped as grouped_ops
from peftkern.ops.common import acc_dtype

from .conftest import requires_cuda

ops = torch.ops.peftkern
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
HALF = [torch.bfloat16, torch.float16]
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-12}
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float64: 1e-12}
# (tokens, in, out, adapters, max rank): the self-check's shapes plus eight adapters of rank 16.
SHAPES = [*GROUPED_SHAPES, (1, 16, 8, 8, 4), (50, 64, 48, 8, 16), (0, 4, 3, 0, 1)]


def lora_inputs(shape, dtype, generator, device="cpu", strided=False, weight_dtype=None):
    base_out, x, a, b, scaling, row_adapter, _ = random_grouped_inputs(
        shape, dtype, device, generator, strided, weight_dtype
    )
    return base_out, x, a, b, scaling, row_adapter


def ia3_inputs(shape, dtype, generator, device="cpu", strided=False):
    base_out, _, _, _, _, row_adapter, scales = random_grouped_inputs(shape, dtype, device, generator, strided)
    return base_out, scales, row_adapter


def peft_loop_lora(base_out, x, lora_a, lora_b, scaling, row_adapter):
    """PEFT's mixed-batch forward (LoraLayer._mixed_batch_forward): for each adapter, the sub-batch
    of its rows through lora_B(lora_A(x)) * scaling, added into the result at those rows. Float64."""
    result = base_out.double().clone()
    for g, (a, b, s) in enumerate(zip(lora_a, lora_b, scaling)):
        idx = (row_adapter == g).nonzero().flatten()
        result[idx] += F.linear(F.linear(x.double()[idx], a.double()), b.double()) * s
    return result


def flat(base_out, x, a, b):
    """The op's tensor inputs as one list of leaves (for gradcheck / autograd.grad)."""
    return [base_out, x, *a, *b]


def unflat(leaves, adapters):
    return leaves[0], leaves[1], list(leaves[2 : 2 + adapters]), list(leaves[2 + adapters :])


# ---- lora_grouped_fwd -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_within_rounding_of_float64_reference_with_gradients(dtype, strided, generator):
    """Both ops and their gradients, judged as the self-check judges them."""
    for shape in SHAPES:
        inputs = random_grouped_inputs(shape, dtype, "cpu", generator, strided=strided)
        errors = grouped_errors(*inputs, generator)
        assert all(e <= 1.0 for e in errors.values()), (shape, errors)


@pytest.mark.parametrize("dtype", HALF)
def test_float32_adapters_with_half_activations(dtype, generator):
    """PEFT's usual mix: float32 adapters on a half model, read as float32 (no rounding of the
    weights to the half dtype), gradients back in float32."""
    for shape in SHAPES:
        inputs = random_grouped_inputs(shape, dtype, "cpu", generator, weight_dtype=torch.float32)
        errors = grouped_errors(*inputs, generator)
        assert all(e <= 1.0 for e in errors.values()), (shape, errors)
        base_out, x, a, b, s, ra, _ = inputs
        out = ops.lora_grouped_fwd(base_out, x, a, b, s, ra)
        assert out.dtype == dtype
        # the same as the reference, which reads the float32 weights as they are (not rounded)
        torch.testing.assert_close(out, grouped_ops.lora_grouped_reference(base_out, x, a, b, s, ra),
                                   rtol=RTOL[dtype], atol=ATOL[dtype])  # fmt: skip


def test_float32_adapters_with_float64_activations(generator):
    """float64 activations (gradcheck's dtype) with float32 adapters: accumulated in float64."""
    for shape in SHAPES:
        base_out, x, a, b, s, ra, _ = random_grouped_inputs(shape, torch.float64, "cpu", generator, weight_dtype=torch.float32)
        out = ops.lora_grouped_fwd(base_out, x, a, b, s, ra)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, grouped_ops.lora_grouped_reference(base_out, x, a, b, s, ra), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_matches_reference(dtype, generator):
    for shape in SHAPES:
        base_out, x, a, b, s, ra = lora_inputs(shape, dtype, generator)
        out = ops.lora_grouped_fwd(base_out, x, a, b, s, ra)
        want = grouped_ops.lora_grouped_reference(base_out, x, a, b, s, ra)
        assert out.shape == base_out.shape and out.dtype == dtype and out.is_contiguous()
        torch.testing.assert_close(out, want, rtol=RTOL[dtype], atol=ATOL[dtype], msg=str(shape))


def test_reference_matches_peft_per_adapter_loop(generator):
    for shape in SHAPES:
        base_out, x, a, b, s, ra = lora_inputs(shape, torch.float64, generator)
        want = peft_loop_lora(base_out, x, a, b, s, ra)
        torch.testing.assert_close(grouped_ops.lora_grouped_reference(base_out, x, a, b, s, ra), want)
        torch.testing.assert_close(ops.lora_grouped_fwd(base_out, x, a, b, s, ra), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [6, 240], ids=["row-kernel", "gemm-path"])
def test_row_layouts(dtype, rows, generator):
    """One adapter for all rows (one contiguous run: sliced, not gathered), sorted runs, fully
    interleaved rows, runs broken by -1 rows, every row -1, reversed runs: same as the reference,
    and rows without an adapter are base_out bit for bit. 6 rows take the CPU's row-by-row kernel
    (< 8 rows per adapter), 240 rows its per-adapter GEMMs."""
    g = 3
    base_out, x, a, b, s, _ = lora_inputs((rows, 20, 12, g, 6), dtype, generator)
    third = rows // 3
    layouts = {
        "one adapter": [1] * rows,
        "sorted runs": [0] * third + [1] * third + [2] * third,
        "interleaved": [i % g for i in range(rows)],
        "runs with -1": [0] * third + [-1] * (third // 2) + [0] * (third - third // 2) + [2] * third,
        "all -1": [-1] * rows,
        "reversed": [2] * third + [1] * third + [0] * third,
    }
    for name, adapter_of_row in layouts.items():
        ra = torch.tensor(adapter_of_row, dtype=torch.int32)
        out = ops.lora_grouped_fwd(base_out, x, a, b, s, ra)
        want = grouped_ops.lora_grouped_reference(base_out, x, a, b, s, ra)
        torch.testing.assert_close(out, want, rtol=RTOL[dtype], atol=ATOL[dtype], msg=name)
        none = ra < 0
        assert torch.equal(out[none], base_out[none]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [70, 800], ids=["row-kernel", "gemm-path"])
def test_more_adapters_than_one_kernel_call(dtype, rows, generator):
    """G = 40 > kMaxAdapters (32): two chunks. Every row is written once, by its own adapter's
    chunk (so each is rounded once): a row's output is bit for bit what a call holding only its
    adapter gives."""
    adapters = 40
    base_out, x, a, b, s, _ = lora_inputs((rows, 12, 10, adapters, 4), dtype, generator)
    ra = torch.tensor([(7 * i) % (adapters + 1) - 1 for i in range(rows)], dtype=torch.int32)  # -1 .. 39, mixed
    assert {-1, 0, 31, 32, 39} <= set(ra.tolist())
    out = ops.lora_grouped_fwd(base_out, x, a, b, s, ra)
    want = grouped_ops.lora_grouped_reference(base_out, x, a, b, s, ra)
    torch.testing.assert_close(out, want, rtol=RTOL[dtype], atol=ATOL[dtype])
    assert torch.equal(out[ra < 0], base_out[ra < 0])
    for g in (0, 31, 32, 39):
        mine = ra == g
        alone = ops.lora_grouped_fwd(base_out[mine], x[mine], [a[g]], [b[g]], [s[g]], torch.zeros_like(ra[mine]))
        assert torch.equal(out[mine], alone), g


@pytest.mark.parametrize("rows", [17, 170], ids=["row-kernel", "gemm-path"])
def test_strided_x_and_base_out(rows, generator):
    """x as a transposed view (column stride != 1) and as a row-sliced view; base_out sliced."""
    base_out, x, a, b, s, ra = lora_inputs((rows, 12, 10, 3, 4), torch.float32, generator)
    want = grouped_ops.lora_grouped_reference(base_out, x, a, b, s, ra)
    x_t = x.t().contiguous().t()  # same values, strides (1, rows)
    x_rows = torch.zeros(2 * rows, 12).index_copy_(0, torch.arange(0, 2 * rows, 2), x)[::2]  # row stride 24
    base_wide = torch.zeros(rows, 30)[:, 5:15].copy_(base_out)  # row stride 30
    for name, xx, bb in [("transposed x", x_t, base_out), ("row-sliced x", x_rows, base_out),
                         ("sliced base_out", x, base_wide), ("both", x_t, base_wide)]:  # fmt: skip
        assert not (xx.is_contiguous() and bb.is_contiguous())
        torch.testing.assert_close(ops.lora_grouped_fwd(bb, xx, a, b, s, ra), want, rtol=1e-5, atol=1e-5, msg=name)


def test_strided_adapter_tensors_are_accepted(generator):
    """Adapter tensors that are views (a transposed B, a column slice of A) give the same result
    as contiguous ones (the host code copies them contiguous: a no-op for nn.Linear weights)."""
    base_out, x, a, b, s, ra = lora_inputs((11, 12, 10, 3, 4), torch.float32, generator)
    want = ops.lora_grouped_fwd(base_out, x, a, b, s, ra)
    a_views = [torch.zeros(t.shape[0], 2 * t.shape[1])[:, ::2].copy_(t) for t in a]
    b_views = [t.t().contiguous().t() for t in b]
    assert not any(t.is_contiguous() for t in a_views if t.numel() > 1)
    assert torch.equal(ops.lora_grouped_fwd(base_out, x, a_views, b_views, s, ra), want)


def test_base_out_is_not_modified(generator):
    base_out, x, a, b, s, ra = lora_inputs((9, 8, 7, 2, 3), torch.float32, generator)
    before = base_out.clone()
    out = ops.lora_grouped_fwd(base_out, x, a, b, s, ra)
    assert torch.equal(base_out, before) and out.data_ptr() != base_out.data_ptr()


@pytest.mark.parametrize("rows", [5, 40], ids=["row-kernel", "gemm-path"])
def test_rank_zero_no_adapters_no_rows_no_columns(rows, generator):
    base_out = torch.randn(rows, 4, generator=generator)
    x = torch.randn(rows, 6, generator=generator)
    ra = torch.tensor([0, -1, 1, 1, -1] * (rows // 5), dtype=torch.int32)
    zeros_a, zeros_b = [torch.zeros(0, 6)] * 2, [torch.zeros(4, 0)] * 2
    out = ops.lora_grouped_fwd(base_out, x, zeros_a, zeros_b, [1.0, 2.0], ra)
    assert torch.equal(out, base_out)  # every rank 0: nothing to add
    out = ops.lora_grouped_fwd(base_out, x, [], [], [], torch.full((rows,), -1, dtype=torch.int32))
    assert torch.equal(out, base_out)  # G = 0: every row is -1
    out = ops.lora_grouped_fwd(torch.randn(0, 4), torch.randn(0, 6), zeros_a, zeros_b, [1.0, 1.0],
                               torch.zeros(0, dtype=torch.int32))  # fmt: skip
    assert out.shape == (0, 4)
    out = ops.lora_grouped_fwd(torch.randn(rows, 0), x, [torch.ones(2, 6)], [torch.ones(0, 2)], [1.0], ra.clamp(max=0))
    assert out.shape == (rows, 0)


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize(
    "adapter_of_row",
    [[2, -1, 0, 2, 1, 0, -1], [2, 0] * 8 + [-1, -1]],  # < 8 rows per adapter; 8 per adapter, interleaved
    ids=["row-kernel", "gemm-path"],
)
def test_gradcheck_float64_through_the_compiled_op(strided, adapter_of_row, generator):
    ra = torch.tensor(adapter_of_row, dtype=torch.int32)
    base_out, x, a, b, s, _ = lora_inputs((len(ra), 5, 4, 3, 3), torch.float64, generator, strided=strided)
    a[2], b[2] = torch.randn(2, 5, dtype=torch.float64, generator=generator), torch.randn(4, 2, dtype=torch.float64)
    leaves = [t.detach().requires_grad_() for t in flat(base_out, x, a, b)]
    assert torch.autograd.gradcheck(lambda *t: ops.lora_grouped_fwd(*unflat(t, 3), s, ra), leaves)
    if len(ra) < 10:
        assert torch.autograd.gradcheck(lambda *t: grouped_ops.lora_grouped(*unflat(t, 3), s, ra), leaves)


def test_gradients_match_reference_autograd_some_frozen(generator):
    """Gradients of every input that needs one, through register_autograd's Tensor[] handling:
    adapters 1 and 5 frozen (needs_input_grad is False for them), base_out frozen."""
    base_out, x, a, b, s, ra = lora_inputs((40, 24, 20, 8, 6), torch.float32, generator)

    def leaves():
        ts = [t.detach().clone() for t in flat(base_out, x, a, b)]
        for i, t in enumerate(ts):
            t.requires_grad_(i not in (0, 2 + 1, 2 + 5, 2 + 8 + 1))  # base_out, A[1], A[5], B[1]
        return ts

    ours, refs = leaves(), leaves()
    out = ops.lora_grouped_fwd(*unflat(ours, 8), s, ra)
    ref = grouped_ops.lora_grouped_reference(*unflat(refs, 8), s, ra)
    g = torch.randn(out.shape, generator=generator)
    trainable = [i for i, t in enumerate(ours) if t.requires_grad]
    got = torch.autograd.grad(out, [ours[i] for i in trainable], g)
    want = torch.autograd.grad(ref, [refs[i] for i in trainable], g)
    for i, got_i, want_i in zip(trainable, got, want):
        torch.testing.assert_close(got_i, want_i, rtol=1e-5, atol=1e-5, msg=str(i))


def test_wrapper_leading_dims_row_adapter_forms_and_tuples(generator):
    base_out, x, a, b, s, ra = lora_inputs((24, 10, 6, 3, 4), torch.float32, generator)
    want = grouped_ops.lora_grouped_reference(base_out, x, a, b, s, ra)
    out = grouped_ops.lora_grouped(base_out.view(4, 6, 6), x.view(4, 6, 10), tuple(a), tuple(b), tuple(s),
                                   ra.view(4, 6).long())  # fmt: skip
    assert out.shape == (4, 6, 6)
    torch.testing.assert_close(out.view(24, 6), want)
    assert grouped_ops.lora_grouped(torch.randn(2, 0, 6), torch.randn(2, 0, 10), a, b, s, []).shape == (2, 0, 6)


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16], ids=["f32-adapters", "f16-adapters"])
def test_wrapper_under_autocast_casts_activations(adapter_dtype, generator):
    """Under bfloat16 autocast: activations go to bfloat16; float32 adapters stay float32 (read
    as such); adapters of another dtype are cast to bfloat16."""
    base_out, x, a, b, s, ra = lora_inputs((12, 10, 6, 3, 4), torch.float32, generator, weight_dtype=adapter_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = grouped_ops.lora_grouped(base_out, x, a, b, s, ra)
    assert out.dtype == torch.bfloat16
    w = torch.float32 if adapter_dtype == torch.float32 else torch.bfloat16
    want = grouped_ops.lora_grouped_reference(base_out.bfloat16(), x.bfloat16(), [t.to(w) for t in a],
                                              [t.to(w) for t in b], s, ra)  # fmt: skip
    torch.testing.assert_close(out, want, rtol=RTOL[torch.bfloat16], atol=ATOL[torch.bfloat16])


def test_fallback_without_kernel_is_the_reference(generator, monkeypatch):
    base_out, x, a, b, s, ra = lora_inputs((13, 10, 6, 3, 4), torch.float32, generator)
    t, scales, _ = ia3_inputs((13, 10, 6, 3, 4), torch.float32, generator)
    with_kernel = grouped_ops.lora_grouped(base_out, x, a, b, s, ra), grouped_ops.ia3_grouped_scale(t, scales, ra)
    monkeypatch.setattr(_ext, "has_kernel", lambda op, device: False)
    without = grouped_ops.lora_grouped(base_out, x, a, b, s, ra), grouped_ops.ia3_grouped_scale(t, scales, ra)
    for got, want in zip(with_kernel, without):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shape", [(9, 8, 6, 3, 4), (5, 4, 3, 0, 1)], ids=["G=3", "G=0"])
def test_opcheck(shape, generator):
    base_out, x, a, b, s, ra = lora_inputs(shape, torch.float32, generator)
    args = (base_out.requires_grad_(), x.requires_grad_(), [t.requires_grad_() for t in a],
            [t.requires_grad_() for t in b], s, ra)  # fmt: skip
    torch.library.opcheck(ops.lora_grouped_fwd.default, args)
    t, scales, ra = ia3_inputs((9, 8, 6, 3, 4), torch.float32, generator)
    torch.library.opcheck(ops.ia3_grouped_scale.default, (t.requires_grad_(), scales.requires_grad_(), ra))


def test_torch_compile_fullgraph_inference(generator):
    base_out, x, a, b, s, ra = lora_inputs((16, 12, 10, 3, 4), torch.float32, generator)
    _, scales, _ = ia3_inputs((16, 12, 10, 3, 4), torch.float32, generator)

    def layer(base_out, x):
        return grouped_ops.ia3_grouped_scale(grouped_ops.lora_grouped(base_out, x, a, b, s, ra), scales, ra)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(base_out, x), layer(base_out, x))


def test_torch_compile_fullgraph_with_backward(generator):
    """The backward formulas depend on no tensor values (no host sync): they trace too."""
    base_out, x, a, b, s, ra = lora_inputs((16, 12, 10, 3, 4), torch.float32, generator)
    _, scales, _ = ia3_inputs((16, 12, 10, 3, 4), torch.float32, generator)
    leaves = [t.requires_grad_() for t in (x, *a, *b, scales)]

    def step(x, *rest):
        a, b, scales = list(rest[:3]), list(rest[3:6]), rest[6]
        out = grouped_ops.ia3_grouped_scale(grouped_ops.lora_grouped(base_out, x, a, b, s, ra), scales, ra)
        return out.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(torch.autograd.grad(compiled(*leaves), leaves), torch.autograd.grad(step(*leaves), leaves)):
        torch.testing.assert_close(got, want)


def _lora_case(generator):
    base_out, x, a, b, s, ra = lora_inputs((6, 5, 4, 3, 2), torch.float32, generator)
    a[1], b[1] = torch.randn(2, 5, generator=generator), torch.randn(4, 2, generator=generator)  # rank 2
    return {"base_out": base_out, "x": x, "a": a, "b": b, "s": s, "ra": ra}


def _with(t, key, index, value):
    items = list(t[key])
    items[index] = value
    return {**t, key: items}


def _expected_error(message, kernels):
    """The CPU kernel checks row_adapter values on the host; the CUDA kernel trusts them (a host
    check would cost a device sync) and stops at a device-side assert, which the emulation reports."""
    if kernels == "cuda-emulated" and "is outside" in message:
        return r"device-side assert triggered at csrc/grouped/grouped_cuda.cu:\d+: row_adapter value outside \[-1, adapters\)"
    return message


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: {**t, "x": t["x"].int()}, "x must be"),
        (lambda t: {**t, "x": t["x"].unsqueeze(0)}, "x must be 2-D"),
        (lambda t: {**t, "base_out": t["base_out"][:-1]}, r"base_out must be \[6, out_features\]"),
        (lambda t: {**t, "base_out": t["base_out"].double()}, "base_out is Double but x is Float"),
        (lambda t: _with(t, "a", 1, t["a"][1][:, :-1]), r"lora_a\[1\] must be \[rank, 5\]"),
        (lambda t: _with(t, "b", 1, t["b"][1][:-1]), r"lora_b\[1\] must be \[4, 2\]"),
        (lambda t: _with(t, "b", 1, t["b"][1].t()), r"lora_b\[1\] must be \[4, 2\]"),  # B transposed
        (lambda t: {**t, "a": [v.half() for v in t["a"]], "b": [v.half() for v in t["b"]]},
         "the adapter weights are Half but x is Float"),  # fmt: skip
        (lambda t: _with(t, "b", 1, t["b"][1].double()), "all adapter weights must share one dtype"),
        (lambda t: {**t, "b": t["b"][:-1]}, "lora_a has 3 tensors, lora_b 2 and scaling 3 values"),
        (lambda t: {**t, "s": t["s"][:-1]}, "lora_a has 3 tensors, lora_b 3 and scaling 2 values"),
        (lambda t: {**t, "ra": t["ra"].long()}, "row_adapter must be Int"),
        (lambda t: {**t, "ra": t["ra"][:-1]}, r"row_adapter must be \[6\]"),
        (lambda t: {**t, "ra": torch.tensor([0, 1, 3, 0, 0, 0], dtype=torch.int32)},
         r"row_adapter\[2\] = 3 is outside \[-1, 3\)"),  # fmt: skip
        (lambda t: {**t, "ra": torch.tensor([0, 1, 2, 0, -2, 0], dtype=torch.int32)},
         r"row_adapter\[4\] = -2 is outside \[-1, 3\)"),  # fmt: skip
    ],
)
def test_lora_bad_input_gets_a_clear_error(mutate, message, kernels, generator):
    t = mutate(_lora_case(generator))
    with pytest.raises(RuntimeError, match=_expected_error(message, kernels)):
        ops.lora_grouped_fwd(t["base_out"], t["x"], t["a"], t["b"], t["s"], t["ra"])


def test_lora_bad_input_with_float32_adapters_on_half(generator):
    """float32 adapters on bfloat16 activations are fine; float16 ones are not (neither x's dtype
    nor float32), nor is a mix of float32 and bfloat16 adapters."""
    t = _lora_case(generator)
    base, x = t["base_out"].bfloat16(), t["x"].bfloat16()
    assert ops.lora_grouped_fwd(base, x, t["a"], t["b"], t["s"], t["ra"]).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="the adapter weights are Half but x is BFloat16"):
        ops.lora_grouped_fwd(base, x, [v.half() for v in t["a"]], [v.half() for v in t["b"]], t["s"], t["ra"])
    mixed = _with(t, "a", 2, t["a"][2].bfloat16())
    with pytest.raises(RuntimeError, match="all adapter weights must share one dtype"):
        ops.lora_grouped_fwd(base, x, mixed["a"], t["b"], t["s"], t["ra"])


def test_wrapper_bad_input(generator):
    t = _lora_case(generator)
    with pytest.raises(ValueError, match="must share their leading dims"):
        grouped_ops.lora_grouped(t["base_out"][:-1], t["x"], t["a"], t["b"], t["s"], t["ra"])
    with pytest.raises(ValueError, match=r"lora_b\[1\] has shape \(2, 4\), expected \[4, 2\]"):
        grouped_ops.lora_grouped(t["base_out"], t["x"], t["a"], _with(t, "b", 1, t["b"][1].t())["b"], t["s"], t["ra"])
    with pytest.raises(ValueError, match=r"lora_a\[0\] has shape \(\d+, 4\), expected \[rank, 5\]"):
        grouped_ops.lora_grouped(t["base_out"], t["x"], [v[:, :4] for v in t["a"]], t["b"], t["s"], t["ra"])
    with pytest.raises(ValueError, match=r"row_adapter has 5 entries, expected one per row \(6\)"):
        grouped_ops.lora_grouped(t["base_out"], t["x"], t["a"], t["b"], t["s"], t["ra"][:-1])
    with pytest.raises(ValueError, match="row_adapter is on meta but the activations are on cpu"):
        grouped_ops.lora_grouped(t["base_out"], t["x"], t["a"], t["b"], t["s"], t["ra"].to("meta"))
    with pytest.raises(TypeError, match="row_adapter must be an integer tensor"):
        grouped_ops.lora_grouped(t["base_out"], t["x"], t["a"], t["b"], t["s"], t["ra"].float())
    with pytest.raises(ValueError, match="lora_a has 3 tensors, lora_b 3 and scaling 2 values"):
        grouped_ops.lora_grouped(t["base_out"], t["x"], t["a"], t["b"], [1.0, 2.0], t["ra"])
    with pytest.raises(ValueError, match=r"scales has shape \(3, 5\), expected \[adapters, 4\]"):
        grouped_ops.ia3_grouped_scale(t["base_out"], torch.ones(3, 5), t["ra"])


# ---- ia3_grouped_scale ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_ia3_is_bitwise_the_reference_rounding(dtype, strided, generator):
    """Each element is t·l in float32 (float64) rounded once: exactly the reference's (and PEFT's
    `(x.to(l.dtype) * l).to(x.dtype)`) bits; rows without an adapter come back unchanged."""
    for shape in SHAPES:
        t, scales, ra = ia3_inputs(shape, dtype, generator, strided=strided)
        out = ops.ia3_grouped_scale(t, scales, ra)
        assert out.shape == t.shape and out.dtype == dtype and out.is_contiguous()
        assert torch.equal(out, grouped_ops.ia3_grouped_scale_reference(t, scales, ra)), shape
        acc = acc_dtype(dtype)
        for r in range(t.shape[0]):  # PEFT's way, row by row
            g = int(ra[r])
            want = t[r] if g < 0 else (t[r].to(acc) * scales[g]).to(dtype)
            assert torch.equal(out[r], want), (shape, r)


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_ia3_gradcheck_float64_through_the_compiled_op(strided, generator):
    t, scales, _ = ia3_inputs((9, 6, 5, 3, 2), torch.float64, generator, strided=strided)
    ra = torch.tensor([2, -1, 0, 2, 1, 0, -1, 1, 2], dtype=torch.int32)
    leaves = [t.detach().requires_grad_(), scales.detach().requires_grad_()]
    assert torch.autograd.gradcheck(lambda *v: ops.ia3_grouped_scale(*v, ra), leaves)
    assert torch.autograd.gradcheck(lambda *v: grouped_ops.ia3_grouped_scale(*v, ra), leaves)


def test_ia3_wrapper_leading_dims_and_scales_dtype(generator):
    t, scales, ra = ia3_inputs((12, 6, 5, 3, 2), torch.bfloat16, generator)
    want = grouped_ops.ia3_grouped_scale_reference(t, scales, ra)
    out = grouped_ops.ia3_grouped_scale(t.view(3, 4, 5), scales.bfloat16().float(), ra.view(3, 4))
    assert out.shape == (3, 4, 5)
    want = grouped_ops.ia3_grouped_scale_reference(t, scales.bfloat16().float(), ra)
    assert torch.equal(out.view(12, 5), want)
    leaf = scales.detach().bfloat16().requires_grad_()  # a bf16 vector: read as float32, grad back in bf16
    (grad,) = torch.autograd.grad(grouped_ops.ia3_grouped_scale(t.view(3, 4, 5), leaf, ra).float().sum(), leaf)
    assert grad.dtype == torch.bfloat16 and grad.shape == leaf.shape


@pytest.mark.parametrize(
    "args, message",
    [
        (lambda t, s, r: (t.int(), s, r), "t must be"),
        (lambda t, s, r: (t[None], s, r), "t must be 2-D"),
        (lambda t, s, r: (t, s.half(), r), "scales must be Float for Float t"),
        (lambda t, s, r: (t.double(), s, r), "scales must be Double for Double t"),
        (lambda t, s, r: (t, s[:, :-1], r), r"scales must be \[adapters, 5\]"),
        (lambda t, s, r: (t, s, r.long()), "row_adapter must be Int"),
        (lambda t, s, r: (t, s, r[1:]), r"row_adapter must be \[6\]"),
        (lambda t, s, r: (t, s, torch.tensor([0, 0, 0, 0, 0, 3], dtype=torch.int32)),
         r"ia3_grouped_scale: row_adapter\[5\] = 3 is outside \[-1, 3\)"),  # fmt: skip
    ],
)
def test_ia3_bad_input_gets_a_clear_error(args, message, kernels, generator):
    t, scales, ra = ia3_inputs((6, 4, 5, 3, 2), torch.float32, generator)
    with pytest.raises(RuntimeError, match=_expected_error(message, kernels)):
        ops.ia3_grouped_scale(*args(t, scales, ra))


# ---- CUDA (skipped without a GPU and a CUDA build) ----------------------------------------------


def _cuda(inputs):
    return [[t.cuda() for t in v] if isinstance(v, list) and v and isinstance(v[0], torch.Tensor)
            else v.cuda() if isinstance(v, torch.Tensor) else v for v in inputs]  # fmt: skip


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_cuda_within_rounding_of_float64_reference(dtype, strided, generator):
    shapes = [*SHAPES, (1000, 256, 130, 8, 16), (300, 5, 1, 2, 64), (3, 4096, 4100, 2, 8), (200, 64, 48, 70, 8)]
    weight_dtypes = [dtype, torch.float32] if dtype in HALF else [dtype]
    for shape in shapes:
        for weight_dtype in weight_dtypes:
            inputs = random_grouped_inputs(shape, dtype, "cuda", generator, strided, weight_dtype)
            errors = grouped_errors(*inputs, generator)
            assert all(e <= 1.0 for e in errors.values()), (shape, weight_dtype, errors)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_kernels(dtype, generator):
    # 70000 rows: more than one grid's worth of y; 40 adapters: two chunks
    for shape in [(257, 64, 33, 3, 8), (70000, 8, 6, 3, 4), (500, 32, 24, 40, 6)]:
        base_out, x, a, b, s, ra = lora_inputs(shape, dtype, generator)
        _, scales, _ = ia3_inputs(shape, dtype, generator)
        cpu = ops.lora_grouped_fwd(base_out, x, a, b, s, ra)
        cuda = ops.lora_grouped_fwd(*_cuda((base_out, x, a, b, s, ra)))
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=RTOL[dtype], atol=ATOL[dtype])
        none = ra < 0
        assert torch.equal(cuda.cpu()[none], base_out[none])
        ia3_cpu = ops.ia3_grouped_scale(base_out, scales, ra)
        assert torch.equal(ops.ia3_grouped_scale(base_out.cuda(), scales.cuda(), ra.cuda()).cpu(), ia3_cpu)


@requires_cuda
def test_cuda_wrappers_and_gradients(generator):
    base_out, x, a, b, s, ra = lora_inputs((40, 24, 20, 8, 6), torch.float64, generator, device="cuda", strided=True)
    leaves = [t.detach().requires_grad_() for t in flat(base_out, x, a, b)]
    assert torch.autograd.gradcheck(lambda *t: grouped_ops.lora_grouped(*unflat(t, 8), s, ra), leaves)
    t, scales, ra = ia3_inputs((40, 24, 20, 8, 6), torch.float64, generator, device="cuda", strided=True)
    leaves = [t.detach().requires_grad_(), scales.detach().requires_grad_()]
    assert torch.autograd.gradcheck(lambda *v: grouped_ops.ia3_grouped_scale(*v, ra), leaves)


@requires_cuda
def test_cuda_adapter_on_the_wrong_device_gets_a_clear_error(generator):
    base_out, x, a, b, s, ra = _cuda(lora_inputs((6, 5, 4, 3, 2), torch.float32, generator))
    a[0] = a[0].cpu()
    with pytest.raises(RuntimeError, match="adapter 0's weights are on cpu / cuda:0 but x is on cuda:0"):
        ops.lora_grouped_fwd(base_out, x, a, b, s, ra)
