"""NF4 and 8-bit blockwise quantization of NaN and ±Inf: the kernels give the reference's bytes
and absmax (which are bitsandbytes' too). The rule, from torch.amax / torch.clamp /
torch.bucketize in the reference: a block holding a NaN has absmax NaN and every element stored
as the last code; a block holding ±Inf has absmax +Inf, the Inf element stored as the last code
(so -Inf comes back +Inf: bitsandbytes does the same) and the finite ones as 0 (NaN after
dequantizing, Inf·0)."""

import pytest
import torch

import peftkern
from peftkern import _ext
from peftkern.ops import nf4 as nf4_ops

from .conftest import requires_cuda

pytestmark = pytest.mark.skipif(not _ext.has_kernel("nf4_quantize", "cpu"), reason="op library not built")

SPECIALS = [float("nan"), float("inf"), float("-inf")]


def weights(generator, special, n, where):
    w = torch.randn(n, generator=generator)
    w[where] = special
    return w


def assert_same(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("special", SPECIALS, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("n, where", [(256, [3]), (256, [70, 200]), (150, [140]), (7, [0])])  # full blocks, tail
def test_nf4_quantize_of_nan_and_inf_is_the_references(generator, device, dtype, special, n, where, cpu_isa):
    w = weights(generator, special, n, where).to(device, dtype)
    packed, absmax = torch.ops.peftkern.nf4_quantize(w, 64)
    want_packed, want_absmax = nf4_ops.nf4_quantize_reference(w, 64)
    assert torch.equal(packed, want_packed)
    assert_same(absmax, want_absmax)
    # and its dequantization is the reference's
    got = torch.ops.peftkern.nf4_dequantize(packed, absmax, 64, [n], torch.float32)
    assert_same(got, nf4_ops.nf4_dequantize_reference(want_packed, want_absmax, 64, (n,), torch.float32))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("special", SPECIALS, ids=["nan", "inf", "-inf"])
def test_8bit_quantize_of_nan_and_inf_is_the_references(generator, device, special):
    x = weights(generator, special, 600, [5, 300]).abs().to(device)
    code = nf4_ops.dynamic_code_8bit(device)
    codes, absmax = torch.ops.peftkern.quantize_blockwise_8bit(x, code, 256)
    want_codes, want_absmax = nf4_ops.quantize_blockwise_8bit_reference(x, code, 256)
    assert torch.equal(codes, want_codes)
    assert_same(absmax, want_absmax)


def test_double_quantized_nf4_weight_with_nan_is_the_references(generator, cpu_isa):
    w = weights(generator, float("nan"), 64 * 300, [64 * 7 + 1])
    quantized = peftkern.nf4_quantize(w, 64, double_quant=True)
    nested = quantized.nested
    want = nf4_ops.nf4_dequantize_nested_reference(
        quantized.packed, quantized.absmax, nested.absmax, nested.code, nested.offset, 64, nested.blocksize,
        quantized.shape, torch.float32,
    )  # fmt: skip
    assert_same(quantized.dequantize(torch.float32), want)


@pytest.mark.bnb
@pytest.mark.parametrize("special", SPECIALS, ids=["nan", "inf", "-inf"])
def test_nf4_bytes_of_nan_and_inf_equal_bitsandbytes(generator, special):
    F = pytest.importorskip("bitsandbytes.functional")
    w = weights(generator, special, 256, [3, 130])
    packed, absmax = torch.ops.peftkern.nf4_quantize(w, 64)
    their_packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(packed.reshape(-1), their_packed.reshape(-1))
    assert_same(absmax, state.absmax)
