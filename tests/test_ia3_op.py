"""The IA³ ops (input scaling for feedforward modules, output scaling otherwise): outputs and
hand-written gradients against the reference, every dtype, odd sizes, one token, empty batches,
strided inputs, gradcheck in float64, opcheck, torch.compile, determinism of the dl reduction,
NF4 bases, bad input."""

import pytest
import torch

from peftkern import _ext
from peftkern.testing import IA3_SHAPES, ia3_linear_errors, random_ia3_inputs
from peftkern.nf4 import NF4Weight
from peftkern.ops import ia3 as ia3_ops

from .conftest import OpsCalled, requires_cuda

ops = torch.ops.peftkern
SIDES = pytest.mark.parametrize("scale_input", [True, False], ids=["input", "output"])


def assert_within_tolerance(x, w, b, l, scale_input, generator):
    errors = ia3_linear_errors(x, w, b, l, scale_input, generator)
    assert all(e <= 1.0 for e in errors.values()), errors


@SIDES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(dtype, scale_input, bias, generator):
    for shape in IA3_SHAPES:
        x, w, b, l = random_ia3_inputs(shape, dtype, "cpu", generator, scale_input, bias=bias)
        assert_within_tolerance(x, w, b, l, scale_input, generator)


@SIDES
def test_l_in_the_activation_dtype(scale_input, generator):
    x, w, b, l = random_ia3_inputs((17, 24, 9), torch.bfloat16, "cpu", generator, scale_input, l_dtype=torch.bfloat16)
    assert_within_tolerance(x, w, b, l, scale_input, generator)
    out = ia3_ops.ia3_linear(x, w, b, l.requires_grad_(), scale_input)
    (grad_l,) = torch.autograd.grad(out.float().sum(), l)
    assert grad_l.dtype == torch.bfloat16 and grad_l.shape == l.shape


def _wrapper_and_reference(x, w, b, l, scale_input, fan_in_fan_out=False):
    """(ours, reference) outputs and gradients for x and l, through the public wrapper."""
    x, l = x.detach().requires_grad_(), l.detach().requires_grad_()
    results = []
    for fn in (ia3_ops.ia3_linear, None):
        if fn is None:
            weight = w.t() if fan_in_fan_out else w
            out = ia3_ops.ia3_linear_reference(x, weight, b, l, scale_input)
        else:
            out = fn(x, w, b, l, scale_input, fan_in_fan_out=fan_in_fan_out)
        g = torch.ones_like(out) if out.numel() == 0 else torch.linspace(-1, 1, out.numel()).view(out.shape).to(out)
        results.append((out, *torch.autograd.grad(out, (x, l), g)))
    return results


@SIDES
def test_wrapper_leading_dims_strided_x_and_fan_in_fan_out(scale_input, generator):
    w = torch.randn(6, 10, generator=generator)
    b = torch.randn(6, generator=generator)
    l = 1 + 0.3 * torch.randn((1, 10) if scale_input else (6, 1), generator=generator)
    big = torch.randn(5, 4, 21, generator=generator)
    cases = {
        "3-D": torch.randn(2, 3, 10, generator=generator),
        "one token": torch.randn(1, 10, generator=generator),
        "empty batch": torch.randn(0, 10),
        "empty 3-D": torch.randn(2, 0, 10),
        "strided columns": big[..., 1::2],  # a view with column stride 2
        "transposed": torch.randn(10, 7, generator=generator).t(),  # column stride != 1
        "strided rows 3-D": big[:, ::2, :10],
    }
    for name, x in cases.items():
        for fan_in_fan_out in (False, True):
            weight = w.t().contiguous() if fan_in_fan_out else w  # Conv1D stores [in, out]
            ours, want = _wrapper_and_reference(x, weight, b, l, scale_input, fan_in_fan_out)
            assert ours[0].shape == (*x.shape[:-1], 6), name
            for got, expected in zip(ours, want):
                torch.testing.assert_close(got, expected, msg=f"{name}, fan_in_fan_out={fan_in_fan_out}")


@SIDES
def test_fallback_without_kernel_is_the_reference(scale_input, generator, monkeypatch):
    x, w, b, l = random_ia3_inputs((9, 12, 7), torch.float32, "cpu", generator, scale_input)
    with_kernel = _wrapper_and_reference(x, w, b, l, scale_input)[0]
    monkeypatch.setattr(_ext, "has_kernel", lambda op, device: False)
    without = _wrapper_and_reference(x, w, b, l, scale_input)[0]
    for got, expected in zip(with_kernel, without):
        torch.testing.assert_close(got, expected)


@SIDES
def test_dl_reduction_is_deterministic(scale_input, generator):
    """Same bits whatever the thread count: rows are summed in fixed blocks, in a fixed order."""
    x, w, b, l = random_ia3_inputs((1000, 48, 40), torch.float32, "cpu", generator, scale_input)
    x.requires_grad_(), l.requires_grad_()
    g = torch.randn(1000, 40, generator=generator)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            grads.append(torch.autograd.grad(ia3_ops.ia3_linear(x, w, b, l, scale_input), (x, l), g))
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        assert torch.equal(other[1], grads[0][1]) and torch.equal(other[0], grads[0][0])


@SIDES
def test_backward_saves_what_it_says_and_runs_no_extra_gemm(scale_input, generator):
    """Saved: x (input scaling) or pre (output scaling), never x for output scaling with a frozen
    base, never the dequantized NF4 weight; backward is the one fused op, no aten.mm around it."""
    m, k, n = 9, 24, 16  # k != n: x and pre are told apart by shape
    x, w, b, l = random_ia3_inputs((m, k, n), torch.float32, "cpu", generator, scale_input)
    x, l = x.requires_grad_(), l.requires_grad_()
    for weight in (w, NF4Weight.quantize(w, blocksize=64)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            if isinstance(weight, NF4Weight):
                out = ia3_ops.nf4_ia3_linear(x, weight, b, l, scale_input)
            else:
                out = ia3_ops.ia3_linear(x, weight, b, l, scale_input)
        if isinstance(weight, NF4Weight):  # a dense base weight is saved by reference (no copy)
            assert (n, k) not in saved  # the dequantized weight is not kept
        assert ((m, k) in saved) == scale_input and ((m, n) in saved) == (not scale_input), saved
        with OpsCalled() as calls:
            out.backward(torch.ones_like(out))
        fused = "peftkern.ia3_input_linear_bwd" if scale_input else "peftkern.ia3_output_linear_bwd"
        assert calls.names.count(fused) == 1 and "aten.mm" not in calls.names, calls.names


@SIDES
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(scale_input, bias, generator):
    x, w, b, l = random_ia3_inputs((7, 5, 4), torch.float64, "cpu", generator, scale_input, bias=bias)
    x_strided = torch.randn(7, 10, dtype=torch.float64, generator=generator)[:, ::2]
    for xx in (x, x_strided):
        xx = xx.detach().requires_grad_()
        l = l.detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda a, s: ia3_ops.ia3_linear(a, w, b, s, scale_input), (xx, l))


@SIDES
def test_trainable_base_weight_and_bias_get_their_gradients(scale_input, generator):
    x, w, b, l = random_ia3_inputs((6, 5, 4), torch.float64, "cpu", generator, scale_input)
    leaves = [t.detach().requires_grad_() for t in (x, w, b, l)]
    assert torch.autograd.gradcheck(lambda *t: ia3_ops.ia3_linear(*t, scale_input), leaves)


def test_opcheck(generator):
    for scale_input in (True, False):
        x, w, b, l = random_ia3_inputs((5, 6, 4), torch.float32, "cpu", generator, scale_input)
        fwd = ops.ia3_input_linear_fwd if scale_input else ops.ia3_output_linear_fwd
        torch.library.opcheck(fwd.default, (x.requires_grad_(), w, b, l.requires_grad_()))
    x, w, b, l = random_ia3_inputs((5, 6, 4), torch.float32, "cpu", generator, True)
    g = torch.randn(5, 4, generator=generator)
    torch.library.opcheck(ops.ia3_input_linear_bwd.default, (g, x, w, l))
    x, w, b, l = random_ia3_inputs((5, 6, 4), torch.float32, "cpu", generator, False)
    pre = torch.randn(5, 4, generator=generator)
    torch.library.opcheck(ops.ia3_output_linear_bwd.default, (g, pre, w, l))


@SIDES
def test_torch_compile_fullgraph(scale_input, generator):
    x, w, b, l = random_ia3_inputs((8, 12, 10), torch.float32, "cpu", generator, scale_input)
    x, l = x.requires_grad_(), l.requires_grad_()

    def step(x, l):
        return ia3_ops.ia3_linear(x, w, b, l, scale_input).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, l), (x, l))
    want = torch.autograd.grad(step(x, l), (x, l))
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2)


@SIDES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_base_matches_the_dequantized_dense_base(scale_input, dtype, generator):
    x, w, b, l = random_ia3_inputs((13, 64, 48), dtype, "cpu", generator, scale_input)
    nf4 = NF4Weight.quantize(w, blocksize=64)
    dense = nf4.dequantize(dtype)
    x3 = x.view(1, 13, 64)
    ours = [x3.detach().requires_grad_(), b.detach().requires_grad_(), l.detach().requires_grad_()]
    want = [t.detach().clone().requires_grad_() for t in ours]
    out = ia3_ops.nf4_ia3_linear(ours[0], nf4, ours[1], ours[2], scale_input)
    ref = ia3_ops.ia3_linear_reference(want[0], dense, want[1], want[2], scale_input)
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
        (lambda t: {**t, "w": t["w"].double()}, "weight is Double but x is Float"),
        (lambda t: {**t, "b": t["b"][:-1]}, "bias must have"),
        (lambda t: {**t, "b": t["b"].half()}, "bias is Half but x is Float"),
        (lambda t: {**t, "l": t["l"][:, :-1] if t["l"].shape[0] == 1 else t["l"][:-1]}, "ia3_l must have"),
        (lambda t: {**t, "l": t["l"].int()}, "ia3_l must be"),
    ],
)
@SIDES
def test_bad_input_gets_a_clear_error(mutate, message, scale_input, generator):
    x, w, b, l = random_ia3_inputs((4, 6, 5), torch.float32, "cpu", generator, scale_input)
    t = mutate({"x": x, "w": w, "b": b, "l": l})
    fwd = ops.ia3_input_linear_fwd if scale_input else ops.ia3_output_linear_fwd
    with pytest.raises(RuntimeError, match=message):
        fwd(t["x"], t["w"], t["b"], t["l"])


def test_bad_input_to_the_backward_ops_and_the_wrapper(generator):
    x, w, b, l = random_ia3_inputs((4, 6, 5), torch.float32, "cpu", generator, True)
    with pytest.raises(RuntimeError, match="grad_out is"):
        ops.ia3_input_linear_bwd(torch.randn(4, 3), x, w, l)
    with pytest.raises(RuntimeError, match="pre is"):
        ops.ia3_output_linear_bwd(torch.randn(4, 5), torch.randn(3, 5), w, torch.ones(5, 1))
    with pytest.raises(ValueError, match="ia3_l has 6 elements, expected 5 for output scaling"):
        ia3_ops.ia3_linear(x, w, b, l, scale_input=False)
    with pytest.raises(ValueError, match=r"x has shape \(4, 7\), expected \[\.\.\., 6\]"):
        ia3_ops.ia3_linear(torch.randn(4, 7), w, b, l, scale_input=True)
    with pytest.raises(ValueError, match="ia3_l is on meta but x is on cpu"):
        ia3_ops.ia3_linear(x, w, b, l.to("meta"), scale_input=True)
    with pytest.raises(TypeError, match="ia3_l must be a floating-point tensor"):
        ia3_ops.ia3_linear(x, w, b, l.long(), scale_input=True)


# ---- CUDA (skipped without a GPU and a CUDA build) ----------------------------------------------


@requires_cuda
@SIDES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cuda_matches_reference(dtype, scale_input, generator):
    for shape in [*IA3_SHAPES, (1000, 256, 130), (300, 5, 1)]:
        x, w, b, l = random_ia3_inputs(shape, dtype, "cuda", generator, scale_input)
        assert_within_tolerance(x, w, b, l, scale_input, generator)


@requires_cuda
@SIDES
def test_cuda_strided_inputs_and_deterministic_dl(scale_input, generator):
    w = torch.randn(40, 48, generator=generator).cuda()
    b = torch.randn(40, generator=generator).cuda()
    l = (1 + 0.3 * torch.randn((1, 48) if scale_input else (40, 1), generator=generator)).cuda()
    x = torch.randn(700, 96, generator=generator).cuda()[:, ::2]
    ours, want = _wrapper_and_reference(x, w, b, l, scale_input)
    for got, expected in zip(ours, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    again = _wrapper_and_reference(x, w, b, l, scale_input)[0]
    assert torch.equal(again[2], ours[2])  # dl: two-stage reduction in a fixed order


@requires_cuda
@SIDES
def test_cuda_matches_cpu_kernel(scale_input, generator):
    x, w, b, l = random_ia3_inputs((257, 64, 33), torch.float32, "cpu", generator, scale_input)
    cpu = _wrapper_and_reference(x, w, b, l, scale_input)[0]
    cuda = _wrapper_and_reference(x.cuda(), w.cuda(), b.cuda(), l.cuda(), scale_input)[0]
    for got, expected in zip(cuda, cpu):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)
