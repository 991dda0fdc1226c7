"""The decode path of QLoRA, `nf4_lora_gemv`: the compiled kernel (CPU here, CUDA where a GPU
runs) against its plain-PyTorch reference, for every dtype, plain and double-quantized absmax,
shapes whose rows straddle quantization blocks or bytes (odd in_features), 16-byte-aligned rows
(the CUDA vector path), 1 to 11 tokens, strided rows, no bias / no adapter, empty shapes."""

import pytest
import torch

import peftkern
from peftkern import _ext
from peftkern.ops import qlora as qlora_ops

from .conftest import requires_cuda

pytestmark = pytest.mark.skipif(not _ext.has_kernel("nf4_lora_gemv", "cpu"), reason="op library not built")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}  # fmt: skip
# (out, in, blocksize); (40, 256, 64), (24, 384, 32), (20, 2304, 64), (7, 4096, 32) and (9, 1024, 256):
# rows of whole 128-code chunks (the AVX-512 chunked kernel), with 4, 12, 36 (two groups of 16
# block scales and a partial one), 128 and 4 blocks a row; (48, 64, 64), (19, 576, 64) and
# (6, 320, 32): rows ending in a 64-code half chunk (only that one, at 64)
SHAPES = [(48, 64, 64), (37, 45, 64), (5, 33, 32), (64, 96, 128), (3, 1, 64), (130, 256, 4096), (40, 256, 64),
          (24, 384, 32), (20, 2304, 64), (7, 4096, 32), (9, 1024, 256), (19, 576, 64), (6, 320, 32)]  # fmt: skip


def inputs(generator, out_f, in_f, tokens, dtype, device, rank=4, nested=True, with_bias=True, blocksize=64,
           strided=False):  # fmt: skip
    w = torch.randn(out_f, in_f, generator=generator) * 0.05
    weight = peftkern.nf4_quantize(w.to(device), blocksize, double_quant=nested)
    x = torch.randn(tokens, in_f + (8 if strided else 0), generator=generator).to(device, dtype)
    x = x[:, :in_f] if strided else x
    bias = torch.randn(out_f, generator=generator).to(device, dtype) if with_bias else None
    xa = torch.randn(tokens, rank, generator=generator).to(device, dtype) if rank else None
    lora_b = torch.randn(out_f, rank, generator=generator).to(device, dtype) if rank else None
    return x, weight, bias, xa, lora_b


def check(generator, device, dtype, shape, tokens, **options):
    x, weight, bias, xa, lora_b = inputs(generator, *shape[:2], tokens, dtype, device, blocksize=shape[2], **options)
    got = qlora_ops.nf4_lora_gemv(x, weight, bias, xa, lora_b, 0.75)
    want = qlora_ops.nf4_lora_gemv_reference(x, weight, bias, xa, lora_b, 0.75)
    assert got.dtype == dtype and got.shape == (tokens, shape[0])
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, **TOL[dtype])


CASES = [
    pytest.param(dtype, shape, tokens, id=f"{str(dtype)[6:]}-{'x'.join(map(str, shape))}-{tokens}tok")
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
    for shape in SHAPES
    for tokens in (1, 2, 3, 8, 11)
]


@pytest.mark.parametrize("dtype, shape, tokens", CASES)
def test_cpu_kernel_matches_reference(generator, dtype, shape, tokens, cpu_isa):
    check(generator, "cpu", dtype, shape, tokens)


@pytest.mark.parametrize("tokens", [1, 2, 3])
def test_cpu_kernel_does_not_depend_on_the_thread_count(generator, tokens, cpu_isa):
    """Bit-identical at 1, 2 and 3 threads: how rows are split between threads (and, in the AVX-512
    kernel, paired within a thread) must not change any row's summation order. Odd row counts."""
    x, weight, bias, xa, lora_b = inputs(generator, 75, 2304, tokens, torch.float32, "cpu")
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(qlora_ops.nf4_lora_gemv(x, weight, bias, xa, lora_b, 0.75))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("options", [dict(nested=False), dict(rank=0), dict(with_bias=False), dict(strided=True)],
                         ids=["plain-absmax", "no-adapter", "no-bias", "strided-rows"])  # fmt: skip
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_variants(generator, device, options, cpu_isa):
    for shape in [(37, 45, 64), (64, 96, 128)]:
        check(generator, device, torch.float32, shape, 3, **options)


@requires_cuda
@pytest.mark.parametrize("dtype, shape, tokens", CASES)
def test_cuda_kernel_matches_reference(generator, dtype, shape, tokens):
    check(generator, "cuda", dtype, shape, tokens)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_empty_shapes(generator, device, cpu_isa):
    for out_f, in_f, tokens in [(0, 64, 2), (16, 64, 0), (16, 0, 2)]:
        x, weight, bias, xa, lora_b = inputs(generator, out_f, in_f, tokens, torch.float32, device)
        got = qlora_ops.nf4_lora_gemv(x, weight, bias, xa, lora_b, 0.5)
        torch.testing.assert_close(got, qlora_ops.nf4_lora_gemv_reference(x, weight, bias, xa, lora_b, 0.5))


def test_bad_input_is_refused_clearly(generator, cpu_isa):
    x, weight, bias, xa, lora_b = inputs(generator, 16, 64, 2, torch.float32, "cpu")
    op = torch.ops.peftkern.nf4_lora_gemv
    n = weight.nested
    args = [x, weight.packed, weight.absmax, n.absmax, n.code, n.offset.reshape(1), 64, 256, 16, bias, xa, lora_b, 1.0]
    for index, value, message in [
        (0, x.double(), "x must be"),
        (0, x.t(), "x rows must be contiguous"),
        (8, 17, "packed must have"),
        (9, bias.half(), "bias must have x's dtype"),
        (11, lora_b[:, :3].contiguous(), "lora_b must be"),
        (3, None, "go together"),
        (6, 48, "blocksize must be a power of two"),
    ]:
        bad = list(args)
        bad[index] = value
        with pytest.raises(RuntimeError, match=message):
            op(*bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decode_projection_is_one_rounding_of_the_exact_product(generator, dtype):
    """The decode path's xa = x·Aᵀ (float32 arithmetic for half dtypes on CPU): within one rounding
    to the dtype of the exact float64 product, plus float32 accumulation."""
    x = torch.randn(3, 2048, generator=generator).to(dtype)
    a = torch.randn(16, 2048, generator=generator).to(dtype)
    xa = qlora_ops.decode_projection(x, a)
    exact = x.double() @ a.double().t()
    assert xa.dtype == dtype and xa.shape == (3, 16)
    unit = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}[dtype]
    bound = unit * exact.abs() + 2048 * 2.0**-24 * (x.double().abs() @ a.double().abs().t())
    assert ((xa.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_path_of_nf4_lora_linear_matches_the_training_path(generator, dtype, device):
    """nf4_lora_linear under no_grad with <= 8 tokens takes the GEMV (CPU and CUDA): same result as the
    dequantize + GEMM path (with grad enabled)."""
    x, weight, bias, _, _ = inputs(generator, 96, 128, 4, dtype, device)
    a = torch.randn(8, 128, generator=generator).to(device, dtype)
    b = torch.randn(96, 8, generator=generator).to(device, dtype)
    assert qlora_ops.use_gemv(x, (bias, a, b), None, None)
    with torch.no_grad():
        fast = qlora_ops.nf4_lora_linear(x, weight, bias, a, b, 0.5)
    slow = qlora_ops.nf4_lora_linear(x.requires_grad_(), weight, bias, a, b, 0.5).detach()
    # The two paths sum in different orders: bounded by the magnitudes of the summed terms, not of
    # the result (an output where x·Wᵀ and the LoRA term of ~10 cancel failed a fixed atol of 1e-5
    # by 2.2e-5 with seed 2042806737)
    xf, af, bf = x.detach().float().abs(), a.float().abs(), b.float().abs()
    terms = xf @ weight.dequantize(torch.float32).abs().t() + bias.float().abs() + 0.5 * (xf @ af.t()) @ bf.t()
    tol = TOL[dtype]
    assert not fast.isnan().any()
    assert ((fast.float() - slow.float()).abs() <= tol["rtol"] * terms + tol["atol"]).all()
