"""The fused NF4 dequant + GEMM of QLoRA training and prefill on CPU (`nf4_lora_linear_fwd`,
`nf4_lora_linear_bwd_input`) against their plain-PyTorch references (dequantize + matmul), for
every dtype, plain and double-quantized absmax, rows that straddle quantization blocks and bytes
(odd in_features), out/in features that are not a multiple of the tile (tile_bytes = 1: one row or
column per tile; the default; a few KiB), strided inputs, empty shapes, bad input; and the QLoRA
layer through the fused path (never dequantizing the whole weight) against the dense path."""

import pytest
import torch

import peftkern
from peftkern import _ext
from peftkern import nf4 as nf4_module
from peftkern.ops import qlora as qlora_ops

from .conftest import OpsCalled

pytestmark = pytest.mark.skipif(not _ext.has_kernel("nf4_lora_linear_fwd", "cpu"), reason="op library not built")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}  # fmt: skip
# (out_features, in_features, blocksize): blocks straddling rows, odd rows (mid-byte starts), one
# block spanning many rows, a tile that holds several rows.
SHAPES = [(37, 45, 64), (5, 33, 32), (64, 96, 128), (130, 256, 4096), (19, 200, 64)]
TILES = [0, 1, 3000]


def make(generator, out_f, in_f, tokens, dtype, rank=4, nested=True, blocksize=64):
    w = torch.randn(out_f, in_f, generator=generator) * 0.05
    weight = peftkern.nf4_quantize(w, blocksize, double_quant=nested)
    x = torch.randn(tokens, in_f, generator=generator).to(dtype)
    bias = torch.randn(out_f, generator=generator).to(dtype)
    xa = torch.randn(tokens, rank, generator=generator).to(dtype)
    lora_b = torch.randn(out_f, rank, generator=generator).to(dtype)
    lora_a = torch.randn(rank, in_f, generator=generator).to(dtype)
    grad_out = torch.randn(tokens, out_f, generator=generator).to(dtype)
    return weight, x, bias, xa, lora_b, lora_a, grad_out


def reference_fwd(x, weight, bias, xa, lora_b, scaling):
    """The spec in float32 over the weight as the op decodes it (rounded to x's dtype), so that a
    half-precision case measures the op's own rounding, not the reference's."""
    w = weight.dequantize(x.dtype).float()
    out = x.float() @ w.t() + (bias.float() if bias is not None else 0)
    return out + scaling * (xa.float() @ lora_b.float().t()) if xa is not None else out


def reference_bwd(grad_out, weight, grad_xa, lora_a):
    out = grad_out.float() @ weight.dequantize(grad_out.dtype).float()
    return out + grad_xa.float() @ lora_a.float() if grad_xa is not None else out


def check(got, want, dtype, shape):
    assert got.dtype == dtype and got.shape == shape
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want, **TOL[dtype])


CASES = [
    pytest.param(dtype, shape, tokens, tile, id=f"{str(dtype)[6:]}-{'x'.join(map(str, shape))}-{tokens}tok-tile{tile}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    for shape in SHAPES
    for tokens, tile in [(1, 0), (17, 1), (40, 3000), (3, 0)]
]


@pytest.mark.parametrize("dtype, shape, tokens, tile", CASES)
def test_forward_matches_reference(generator, cpu_gemm, dtype, shape, tokens, tile):
    out_f, in_f, blocksize = shape
    weight, x, bias, xa, lora_b, _, _ = make(generator, out_f, in_f, tokens, dtype, blocksize=blocksize)
    got = qlora_ops.nf4_lora_linear_fwd(x, weight, bias, xa, lora_b, 0.75, tile_bytes=tile)
    want = reference_fwd(x, weight, bias, xa, lora_b, 0.75)
    if dtype == torch.float32:
        check(got, want, dtype, (tokens, out_f))
    else:  # rounded twice to 8 (bf16) / 11 (fp16) bits: after x·Wᵀ + b, and after the LoRA term is
        # added; where the two cancel, the first rounding is of the larger term: bound by magnitudes
        w = weight.dequantize(x.dtype).float().abs()
        magnitude = x.float().abs() @ w.t() + bias.float().abs() + 0.75 * (xa.float().abs() @ lora_b.float().abs().t())
        assert got.dtype == dtype and got.shape == (tokens, out_f) and not got.isnan().any()
        excess = (got.float() - want).abs() - TOL[dtype]["rtol"] * magnitude - TOL[dtype]["atol"]
        assert (excess <= 0).all(), f"max error {(got.float() - want).abs().max().item():.3g}"
    if dtype == torch.float32:  # the public reference (in x's dtype: rounds each of its 3 terms) is the same spec
        want = qlora_ops.nf4_lora_linear_fwd_reference(x, weight, bias, xa, lora_b, 0.75)
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype, shape, tokens, tile", CASES)
def test_backward_input_matches_reference(generator, cpu_gemm, dtype, shape, tokens, tile):
    out_f, in_f, blocksize = shape
    weight, _, _, xa, _, lora_a, grad_out = make(generator, out_f, in_f, tokens, dtype, blocksize=blocksize)
    got = qlora_ops.nf4_lora_linear_bwd_input(grad_out, weight, xa, lora_a, tile_bytes=tile)
    check(got, reference_bwd(grad_out, weight, xa, lora_a), dtype, (tokens, in_f))


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("nested", [True, False], ids=["nested-absmax", "plain-absmax"])
def test_variants_no_bias_no_adapter_plain_absmax(generator, nested, tile):
    for out_f, in_f, blocksize in [(37, 45, 64), (64, 96, 128)]:
        weight, x, bias, xa, lora_b, lora_a, grad_out = make(generator, out_f, in_f, 9, torch.float32, nested=nested,
                                                             blocksize=blocksize)  # fmt: skip
        for b, a, bb in [(None, None, None), (bias, None, None), (None, xa, lora_b)]:
            got = qlora_ops.nf4_lora_linear_fwd(x, weight, b, a, bb, 0.5, tile_bytes=tile)
            check(got, reference_fwd(x, weight, b, a, bb, 0.5), torch.float32, (9, out_f))
        got = qlora_ops.nf4_lora_linear_bwd_input(grad_out, weight, tile_bytes=tile)
        check(got, reference_bwd(grad_out, weight, None, None), torch.float32, (9, in_f))


def test_strided_inputs(generator, cpu_gemm):
    """x, grad_out, xa, lora_b and lora_a as views with non-unit strides: GEMM operands as they are."""
    weight, x, bias, xa, lora_b, lora_a, grad_out = make(generator, 37, 45, 11, torch.float32)
    x_t = x.t().contiguous().t()  # column-major
    x_s = torch.randn(11, 90, generator=generator)[:, ::2]  # stride 2
    for xs in (x_t, x_s):
        got = qlora_ops.nf4_lora_linear_fwd(xs, weight, bias, xa.t().contiguous().t(), lora_b.t().contiguous().t(), 0.5,
                                            tile_bytes=1)  # fmt: skip
        check(got, reference_fwd(xs, weight, bias, xa, lora_b, 0.5), torch.float32, (11, 37))
    g_s = torch.randn(11, 74, generator=generator)[:, 1::2]
    g_expanded = torch.randn(1, 37, generator=generator).expand(11, 37)  # strides (0, 1)
    g_scalar = torch.randn((), generator=generator).expand(11, 37)  # strides (0, 0), as from loss.sum()
    for g in (g_s, g_expanded, g_scalar):
        got = qlora_ops.nf4_lora_linear_bwd_input(g, weight, xa, lora_a.t().contiguous().t(), tile_bytes=1)
        check(got, reference_bwd(g, weight, xa, lora_a), torch.float32, (11, 45))
    x_expanded = torch.randn(1, 45, generator=generator).expand(11, 45)
    got = qlora_ops.nf4_lora_linear_fwd(x_expanded, weight, bias, xa, lora_b, 0.5, tile_bytes=1)
    check(got, reference_fwd(x_expanded, weight, bias, xa, lora_b, 0.5), torch.float32, (11, 37))


@pytest.mark.parametrize("out_f, in_f, tokens", [(0, 64, 2), (16, 64, 0), (16, 0, 2), (0, 0, 3)])
def test_empty_shapes(generator, cpu_gemm, out_f, in_f, tokens):
    weight, x, bias, xa, lora_b, lora_a, grad_out = make(generator, out_f, in_f, tokens, torch.float32)
    got = qlora_ops.nf4_lora_linear_fwd(x, weight, bias, xa, lora_b, 0.5)
    assert got.shape == (tokens, out_f)
    torch.testing.assert_close(got, reference_fwd(x, weight, bias, xa, lora_b, 0.5))
    got = qlora_ops.nf4_lora_linear_bwd_input(grad_out, weight, xa, lora_a)
    assert got.shape == (tokens, in_f)
    torch.testing.assert_close(got, reference_bwd(grad_out, weight, xa, lora_a))
    torch.testing.assert_close(qlora_ops.nf4_lora_linear_bwd_input(grad_out, weight),
                               reference_bwd(grad_out, weight, None, None))  # fmt: skip


def test_bad_input_is_refused_clearly(generator):
    weight, x, bias, xa, lora_b, lora_a, grad_out = make(generator, 16, 64, 2, torch.float32)
    n = weight.nested
    state = [weight.packed, weight.absmax, n.absmax, n.code, n.offset.reshape(1), 64, 256]
    fwd = [x, *state, 16, bias, xa, lora_b, 1.0, 0]
    for index, value, message in [
        (0, x.double(), "x must be"),
        (0, x[0], "x must be 2-D"),
        (1, weight.packed[:-1], "packed must have"),
        (8, 17, "packed must have"),
        (9, bias.half(), "bias is Half but x is Float"),
        (9, bias[:8], r"bias must be \[16\]"),
        (11, None, "xa and lora_b go together"),
        (11, lora_b[:, :3], r"lora_b must be \[16, 4\]"),
        (10, xa[:1], r"xa must be \[2, 4\]"),
        (3, None, "go together"),
        (6, 48, "blocksize must be a power of two"),
        (13, -1, "tile_bytes must be >= 0"),
    ]:
        bad = list(fwd)
        bad[index] = value
        with pytest.raises(RuntimeError, match=message):
            torch.ops.peftkern.nf4_lora_linear_fwd(*bad)
    bwd = [grad_out, *state, 64, xa, lora_a, 0]
    for index, value, message in [
        (0, grad_out.double(), "grad_out must be"),
        (0, grad_out[:, :5], "packed must have"),  # grad_out's width is the weight's out_features
        (8, 65, "packed must have"),
        (9, xa.half(), "grad_xa is Half but grad_out is Float"),
        (10, None, "grad_xa and lora_a go together"),
        (10, lora_a[:, :8], r"lora_a must be \[4, 64\]"),
        (11, -5, "tile_bytes must be >= 0"),
    ]:
        bad = list(bwd)
        bad[index] = value
        with pytest.raises(RuntimeError, match=message):
            torch.ops.peftkern.nf4_lora_linear_bwd_input(*bad)


def test_opcheck(generator):
    weight, x, bias, xa, lora_b, lora_a, grad_out = make(generator, 37, 45, 5, torch.float32)
    n = weight.nested
    state = (weight.packed, weight.absmax, n.absmax, n.code, n.offset.reshape(1), 64, 256)
    torch.library.opcheck(torch.ops.peftkern.nf4_lora_linear_fwd.default, (x, *state, 37, bias, xa, lora_b, 0.5, 0))
    torch.library.opcheck(torch.ops.peftkern.nf4_lora_linear_bwd_input.default, (grad_out, *state, 45, xa, lora_a, 0))


@pytest.fixture
def no_whole_dequantize(monkeypatch):
    """NF4Weight.dequantize raises: a path that materialises the whole dense weight fails."""
    def refuse(self, dtype=None):
        raise AssertionError("the whole NF4 weight was dequantized")

    monkeypatch.setattr(nf4_module.NF4Weight, "dequantize", refuse)


def layer_step(x, weight, bias, a, b, dropout, seed):
    leaves = [t.detach().clone().requires_grad_() for t in (x, bias, a, b)]
    torch.manual_seed(seed)  # the same dropout mask on both paths
    out = qlora_ops.nf4_lora_linear(leaves[0], weight, leaves[1], leaves[2], leaves[3], 0.5, dropout=dropout,
                                    training=True)  # fmt: skip
    grad = torch.randn_like(out, generator=torch.Generator().manual_seed(seed))
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_qlora_layer_fused_path_matches_dense_path(generator, monkeypatch, dtype, dropout):
    """nf4_lora_linear in training (forward + backward: out, grad x, bias, A, B) through the fused
    ops, which never dequantize the whole weight, equals the dequantize + GEMM path."""
    weight, x, bias, _, _, _, _ = make(generator, 37, 45, 0, dtype)
    x = torch.randn(2, 13, 45, generator=generator).to(dtype)  # leading dims flattened by the layer
    a = torch.randn(4, 45, generator=generator).to(dtype)
    b = torch.randn(37, 4, generator=generator).to(dtype)
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    monkeypatch.setattr(qlora_ops, "FUSED_MIN_TOKENS", 10**9)
    dense = layer_step(x, weight, bias, a, b, dropout, seed)
    monkeypatch.setattr(qlora_ops, "FUSED_MIN_TOKENS", 1)
    monkeypatch.setattr(nf4_module.NF4Weight, "dequantize", lambda *args, **kw: pytest.fail("dense weight made"))
    fused = layer_step(x, weight, bias, a, b, dropout, seed)
    for got, want in zip(fused, dense):
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_routing_by_threshold(monkeypatch):
    """Below FUSED_MIN_TOKENS, or off CPU, or in float64, the layer keeps dequantize + GEMM."""
    weight = peftkern.nf4_quantize(torch.randn(8, 64), 64)
    monkeypatch.setattr(qlora_ops, "FUSED_MIN_TOKENS", 16)
    assert qlora_ops.use_fused_gemm(torch.zeros(16, 64), weight)
    assert not qlora_ops.use_fused_gemm(torch.zeros(15, 64), weight)
    assert not qlora_ops.use_fused_gemm(torch.zeros(16, 64, dtype=torch.float64), weight)
    assert not qlora_ops.use_fused_gemm(torch.zeros(16, 64, device="meta"), weight)


# ---- nf4_lora_linear_train: the fused path as one op, backward in C++ (csrc/qlora/qlora_train.cpp)


def _state(weight):
    n = weight.nested
    return (weight.packed, weight.absmax, n.absmax if n else None, n.code if n else None,
            n.offset.reshape(1) if n else None, weight.blocksize, n.blocksize if n else 0)  # fmt: skip


def test_train_op_opcheck(generator):
    weight, x, bias, _, lora_b, lora_a, _ = make(generator, 37, 45, 5, torch.float32)
    for t in (x, bias, lora_a, lora_b):
        t.requires_grad_()
    for drop in [(0.0, 0, 0), (0.3, 12345, 7)]:
        torch.library.opcheck(torch.ops.peftkern.nf4_lora_linear_train.default,
                              (x, *_state(weight), 37, bias, lora_a, lora_b, 0.5, *drop))  # fmt: skip


def _function_step(x, weight, bias, a, b, drop, grad):
    """The Python autograd.Function on its fused path (the op's spec): out and grads of x, bias, A, B."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, bias, a, b)]
    out = qlora_ops._NF4LoraLinear.apply(leaves[0], leaves[1], leaves[2], leaves[3], weight, 0.5, drop, None)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def _op_step(x, weight, bias, a, b, drop, grad, x_grad=True, called=None):
    leaves = [t.detach().clone().requires_grad_(x_grad or i > 0) for i, t in enumerate((x, bias, a, b))]
    out = torch.ops.peftkern.nf4_lora_linear_train(leaves[0], *_state(weight), weight.shape[0], leaves[1], leaves[2],
                                                   leaves[3], 0.5, *drop)[0]  # fmt: skip
    with OpsCalled() as ops_called:
        out.backward(grad)
    if called is not None:
        called.extend(ops_called.names)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("nested", [True, False], ids=["nested-absmax", "plain-absmax"])
def test_train_op_equals_the_python_function_bit_for_bit(generator, dtype, p, nested):
    """Same ops in the same order: out and every gradient identical, dropout drawn from the same
    (seed, offset) in forward and backward."""
    weight, x, bias, _, lora_b, lora_a, grad = make(generator, 37, 45, 23, dtype, nested=nested)
    drop = (p, int(torch.randint(0, 2**62, (1,), generator=generator)), 5) if p else (0.0, 0, 0)
    got = _op_step(x, weight, bias, lora_a, lora_b, drop, grad)
    want = _function_step(x, weight, bias, lora_a, lora_b, drop, grad)
    for name, g, w in zip(["out", "x", "bias", "lora_a", "lora_b"], got, want):
        assert not g.isnan().any(), name
        assert torch.equal(g, w), name


def test_train_op_without_x_grad_skips_it_and_keeps_the_rest(generator):
    """x needing no gradient (a frozen base's first layer): grad x is None, bias, A and B as before."""
    weight, x, bias, _, lora_b, lora_a, grad = make(generator, 37, 45, 23, torch.float32)
    drop = (0.3, int(torch.randint(0, 2**62, (1,), generator=generator)), 5)
    called_without, called_with = [], []
    got = _op_step(x, weight, bias, lora_a, lora_b, drop, grad, x_grad=False, called=called_without)
    want = _op_step(x, weight, bias, lora_a, lora_b, drop, grad, called=called_with)
    assert got[1] is None
    assert "peftkern.nf4_lora_linear_bwd_input" in called_with
    assert "peftkern.nf4_lora_linear_bwd_input" not in called_without  # decode + GEMM skipped
    for g, w in zip(got[2:], want[2:]):
        assert torch.equal(g, w)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_train_op_gradient_through_both_outputs(generator, p):
    """A gradient into xa too reaches x and A through the dropped projection: against the dense
    op (lora_linear_fwd on the dequantized weight, whose own autograd gradchecks both outputs)."""
    weight, x, bias, _, lora_b, lora_a, grad = make(generator, 37, 45, 23, torch.float32)
    grad_xa = torch.randn(23, 4, generator=generator)
    drop = (p, int(torch.randint(0, 2**62, (1,), generator=generator)), 5) if p else (0.0, 0, 0)
    results = []
    for fused in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (x, bias, lora_a, lora_b)]
        if fused:
            out, xa = torch.ops.peftkern.nf4_lora_linear_train(leaves[0], *_state(weight), 37, leaves[1], leaves[2],
                                                               leaves[3], 0.5, *drop)  # fmt: skip
        else:
            out, xa = torch.ops.peftkern.lora_linear_fwd(leaves[0], weight.dequantize(torch.float32), leaves[1],
                                                         leaves[2], leaves[3], 0.5, *drop)  # fmt: skip
        torch.autograd.backward([out, xa], [grad, grad_xa])
        results.append([out.detach(), xa.detach()] + [t.grad for t in leaves])
    for g, w in zip(*results):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


def test_train_op_rank_zero_is_a_plain_nf4_linear(generator):
    """nf4_linear (rank-0 adapters) through the op: out = x·deq(W)ᵀ + b and its gradients."""
    weight, x, bias, _, _, _, grad = make(generator, 37, 45, 9, torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (x, bias)]
    out = qlora_ops.nf4_linear(leaves[0], weight, leaves[1])
    out.backward(grad)
    dense = weight.dequantize(torch.float32)
    torch.testing.assert_close(out, x @ dense.t() + bias, **TOL[torch.float32])
    torch.testing.assert_close(leaves[0].grad, grad @ dense, **TOL[torch.float32])
    torch.testing.assert_close(leaves[1].grad, grad.sum(0), **TOL[torch.float32])


def test_train_op_compiles(generator):
    """The QLoRA layer under torch.compile (fullgraph) gives the eager gradients."""
    torch._dynamo.reset()
    weight, x, bias, _, lora_b, lora_a, _ = make(generator, 37, 45, 12, torch.float32)
    x, lora_a, lora_b = (t.detach().requires_grad_() for t in (x, lora_a, lora_b))

    def step(x, a, b):
        return qlora_ops.nf4_lora_linear(x, weight, bias, a, b, 0.5).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, lora_a, lora_b), (x, lora_a, lora_b))
    want = torch.autograd.grad(step(x, lora_a, lora_b), (x, lora_a, lora_b))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
