"""The CPU SIMD paths (csrc/common/cpu_isa.h: scalar, AVX2, AVX-512) of the NF4 decode primitive
and of the QLoRA decode GEMV, each against the scalar path (the spec, bit for bit for the decode)
and the plain-PyTorch reference; plus the ISA dispatch itself (forcing, errors, build_info).

The decode is reached through `nf4_decode_range` (any start, odd = mid-byte, any length), the
entry every CPU kernel shares; the dequantize ops' own tests run per ISA in test_nf4.py and
test_nf4_nonfinite.py, the GEMV's in test_qlora_gemv.py."""

import os
import subprocess
import sys

import pytest
import torch

import peftkern
from peftkern import _ext
from peftkern.ops import nf4 as nf4_ops
from peftkern.ops import qlora as qlora_ops

pytestmark = pytest.mark.skipif(not _ext.has_kernel("nf4_decode_range", "cpu"), reason="op library not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def decode_range(q, first, count, dtype):
    n = q.numel
    if q.nested is None:
        return torch.ops.peftkern.nf4_decode_range(q.packed, q.absmax, None, None, None, q.blocksize, 256, n, first,
                                                   count, dtype)  # fmt: skip
    m = q.nested
    return torch.ops.peftkern.nf4_decode_range(q.packed, q.absmax, m.absmax, m.code, m.offset.reshape(1), q.blocksize,
                                               m.blocksize, n, first, count, dtype)  # fmt: skip


def reference(q, dtype):
    if q.nested is None:
        return nf4_ops.nf4_dequantize_reference(q.packed, q.absmax, q.blocksize, (q.numel,), dtype)
    m = q.nested
    return nf4_ops.nf4_dequantize_nested_reference(q.packed, q.absmax, m.absmax, m.code, m.offset, q.blocksize,
                                                   m.blocksize, (q.numel,), dtype)  # fmt: skip


def on_scalar_path(fn):
    before = _ext.cpu_isa()
    _ext.set_cpu_isa("scalar")
    try:
        return fn()
    finally:
        _ext.set_cpu_isa(before)


def assert_same_bits(got, want, context):
    assert got.shape == want.shape, context
    assert torch.equal(got.view(BITS[got.dtype]), want.view(BITS[want.dtype])), context


def ranges(n, generator):
    """Starts even and odd (mid-byte), at and inside block starts; lengths 0, shorter than a vector,
    a vector +- 1, to the end; plus random ones."""
    picks = [(0, n), (1, n - 1), (n - 1, 1), (0, 0), (n, 0), (3, 29), (31, 33), (64, 32), (63, 66), (65, 127)]
    picks += [(int(a), int(b)) for a, b in torch.randint(0, n, (12, 2), generator=generator)]
    return [(first, min(count, n - first)) for first, count in picks if first <= n]


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_range_is_the_scalar_paths_bits_and_the_references(generator, cpu_isa, dtype, blocksize, nested):
    for n in (1, 7, 33, 64 * 9 + 1, 4096 + 129):
        q = peftkern.nf4_quantize(torch.randn(n, generator=generator) * 0.05, blocksize, double_quant=nested)
        want = reference(q, dtype)
        for first, count in ranges(n, generator):
            got = decode_range(q, first, count, dtype)
            context = (cpu_isa, n, first, count)
            assert_same_bits(got, want[first:first + count], context)
            assert_same_bits(got, on_scalar_path(lambda: decode_range(q, first, count, dtype)), context)


@pytest.mark.parametrize("special", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_absmax_decodes_as_the_scalar_path(generator, cpu_isa, dtype, nested, special):
    """NaN / inf absmax (the blocks of a weight holding NaN / inf): the scalar path's bits, NaN
    sign and payload included (bf16 NaN is 0x7FC0, fp16 NaN sign | 0x7E00, as c10 rounds), and
    the reference's values."""
    n = 64 * 40 + 17
    w = torch.randn(n, generator=generator)
    w[[5, 64 * 3 + 2, n - 3]] = special
    q = peftkern.nf4_quantize(w, 64, double_quant=nested)
    for first, count in [(0, n), (1, n - 2), (64 * 3 + 1, 70)]:
        got = decode_range(q, first, count, dtype)
        assert_same_bits(got, on_scalar_path(lambda: decode_range(q, first, count, dtype)), (cpu_isa, first))
        torch.testing.assert_close(got, reference(q, dtype)[first:first + count], rtol=0, atol=0, equal_nan=True)


def test_decode_range_passes_opcheck(generator):
    q = peftkern.nf4_quantize(torch.randn(300, generator=generator), 64)
    m = q.nested
    torch.library.opcheck(torch.ops.peftkern.nf4_decode_range,
                          (q.packed, q.absmax, m.absmax, m.code, m.offset.reshape(1), 64, 256, 300, 37, 101, torch.bfloat16))


def test_decode_range_bad_input_is_refused_clearly(generator):
    q = peftkern.nf4_quantize(torch.randn(100, generator=generator), 64, double_quant=False)
    op = torch.ops.peftkern.nf4_decode_range
    for first, count in [(-1, 2), (0, 101), (99, 2), (5, -1)]:
        with pytest.raises(RuntimeError, match="must lie inside the 100 elements"):
            op(q.packed, q.absmax, None, None, None, 64, 256, 100, first, count, torch.float32)
    with pytest.raises(RuntimeError, match="packed must have 50 elements"):
        op(q.packed[:40], q.absmax, None, None, None, 64, 256, 100, 0, 1, torch.float32)
    with pytest.raises(RuntimeError, match="go together"):
        op(q.packed, q.absmax, torch.ones(1), None, None, 64, 256, 100, 0, 1, torch.float32)


@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 5, 8, 9])
def test_gemv_summation_stays_within_the_float32_bound(generator, cpu_isa, dtype, tokens, blocksize):
    """The documented contract (csrc/qlora/qlora_cpu_x86.cpp): each path sums in its own fixed order
    in float32, the AVX-512 chunked kernel applying each block's absmax to a partial sum, so
    |out - exact| <= gamma(K + 2) * sum_i |x_i * deq(W)_i| (+ the output's rounding),
    gamma(n) = n u / (1 - n u), u = 2^-24, checked against a float64 sum at K up to 4096: rows of
    whole 128-code chunks (the chunked kernel), rows straddling blocks, rows starting mid-byte."""
    for out_f, in_f in [(67, 4096), (21, 384), (33, 2049), (16, 777), (9, 160)]:
        w = torch.randn(out_f, in_f, generator=generator) * 0.05
        q = peftkern.nf4_quantize(w, blocksize, double_quant=(in_f % 2 == 0))
        x = torch.randn(tokens, in_f, generator=generator).to(dtype)
        got = qlora_ops.nf4_lora_gemv(x, q).double()
        w = q.dequantize(torch.float32).double()
        exact = x.double() @ w.t()
        magnitude = x.double().abs() @ w.abs().t()
        u = 2.0**-24
        gamma = (in_f + 2) * u / (1 - (in_f + 2) * u)
        output_rounding = exact.abs() * (2.0**-8 if dtype == torch.bfloat16 else 0.0)
        excess = (got - exact).abs() - (gamma * magnitude + output_rounding * 1.01)
        assert excess.max().item() <= 0, (cpu_isa, out_f, in_f)


def test_every_supported_path_can_be_forced_and_is_reported():
    supported = peftkern.supported_cpu_isas()
    assert supported[0] == "scalar" and set(supported) <= {"scalar", "avx2", "avx512"}
    assert peftkern.build_info()["cpu_isas_supported"] == supported
    before = peftkern.cpu_isa()
    try:
        for isa in supported:
            peftkern.set_cpu_isa(isa)
            assert peftkern.cpu_isa() == isa and peftkern.build_info()["cpu_isa"] == isa
    finally:
        peftkern.set_cpu_isa(before)
    with pytest.raises(RuntimeError, match=r"unknown CPU ISA 'sse9'.*this CPU supports: scalar"):
        peftkern.set_cpu_isa("sse9")
    assert peftkern.cpu_isa() == before  # a refused request changes nothing


def run_with_env(value, code):
    env = dict(os.environ, PEFTKERN_CPU_ISA=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_environment_variable_forces_the_path_at_load():
    supported = peftkern.supported_cpu_isas()
    for isa in supported:
        result = run_with_env(isa, "import peftkern; print(peftkern.cpu_isa())")
        assert result.returncode == 0 and result.stdout.strip() == isa, result.stderr
    # an unknown name, or a path this CPU lacks: the first op says so, naming what the CPU supports
    lacking = [isa for isa in ("avx2", "avx512") if isa not in supported] or ["avx1024"]
    code = "import peftkern, torch\npeftkern.nf4_quantize(torch.ones(64), 64).dequantize()"
    result = run_with_env(lacking[0], code)
    assert result.returncode != 0
    assert "PEFTKERN_CPU_ISA" in result.stderr and f"supports: {', '.join(supported)}" in result.stderr
