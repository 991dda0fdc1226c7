"""NF4 kernels against their plain-PyTorch reference (the spec), the op layer (opcheck,
torch.compile), the reference fallback, bad input, and NF4Weight serialization."""

import pytest
import torch

import peftkern
from peftkern import _ext
from peftkern.nf4 import NF4Weight
from peftkern.ops import nf4 as nf4_ops

from .conftest import requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Odd sizes, partial blocks, smaller than a block, one element, empty, a projection-like matrix.
SHAPES = [(1,), (2,), (31,), (65,), (3, 5), (127, 129), (64, 64), (0,), (4, 0), (2, 3, 67), (513, 96)]
BLOCKSIZES = [32, 64, 128, 256, 1024, 4096]
ops = torch.ops.peftkern


def random_weight(shape, dtype, generator, device="cpu"):
    return (torch.randn(shape, generator=generator) * 0.05).to(device=device, dtype=dtype)


def test_extension_is_built():
    """CI builds the library: a silent fallback to the references would hide every kernel."""
    assert _ext.available(), f"compiled library missing: {_ext.load_error()}"
    info = peftkern.build_info()
    assert info["extension"] and info["torch"] == torch.__version__


def test_code_table_is_the_spec():
    table = ops.nf4_code_table()
    assert table.dtype == torch.float32
    assert torch.equal(table, nf4_ops.nf4_code())
    assert torch.all(table[1:] > table[:-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_and_dequantize_match_reference(dtype, blocksize, generator, cpu_isa):
    for shape in SHAPES:
        w = random_weight(shape, dtype, generator)
        packed, absmax = ops.nf4_quantize(w, blocksize)
        ref_packed, ref_absmax = nf4_ops.nf4_quantize_reference(w, blocksize)
        assert packed.shape == ref_packed.shape == ((w.numel() + 1) // 2, 1)
        assert torch.equal(packed, ref_packed), shape
        assert torch.equal(absmax, ref_absmax), shape

        out = ops.nf4_dequantize(packed, absmax, blocksize, list(shape), dtype)
        assert torch.equal(out, nf4_ops.nf4_dequantize_reference(packed, absmax, blocksize, shape, dtype))
        if w.numel():  # NF4's worst case: half the widest gap between codes, times absmax
            err = (out.float() - w.float()).abs().max().item()
            assert err <= 0.17 * absmax.max().item() + 1e-2 * w.float().abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_blockwise_8bit_takes_every_float_dtype(dtype, generator):
    """The 8-bit blockwise quantizer (double quantization of the absmax) takes half inputs too,
    read as float32: the reference's codes and absmax exactly, partial last blocks included."""
    code = nf4_ops.dynamic_code_8bit()
    for n, blocksize in [(1, 256), (300, 256), (1000, 64), (4097, 4096)]:
        x = random_weight((n,), dtype, generator)
        codes, absmax = ops.quantize_blockwise_8bit(x, code, blocksize)
        ref_codes, ref_absmax = nf4_ops.quantize_blockwise_8bit_reference(x, code, blocksize)
        assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax), (n, blocksize)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nested_dequantize_matches_reference(dtype, generator, cpu_isa):
    code = nf4_ops.dynamic_code_8bit()
    for shape in SHAPES + [(300, 257)]:  # > 256 blocks: several nested blocks, one partial
        for blocksize in (32, 64, 4096):
            w = random_weight(shape, dtype, generator)
            packed, absmax = ops.nf4_quantize(w, blocksize)
            offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
            codes, nested = ops.quantize_blockwise_8bit(absmax - offset, code, 256)
            ref_codes, ref_nested = nf4_ops.quantize_blockwise_8bit_reference(absmax - offset, code, 256)
            assert torch.equal(codes, ref_codes) and torch.equal(nested, ref_nested)
            decoded = ops.dequantize_blockwise_8bit(codes, nested, code, 256)
            assert torch.equal(decoded, nf4_ops.dequantize_blockwise_8bit_reference(codes, nested, code, 256))
            args = (packed, codes, nested, code, offset, blocksize, 256)
            out = ops.nf4_dequantize_nested(*args, list(shape), dtype)
            assert torch.equal(out, nf4_ops.nf4_dequantize_nested_reference(*args, shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain-absmax", "nested-absmax"])
def test_dequantize_into_a_buffer_equals_dequantize(dtype, nested, generator, cpu_isa):
    """`NF4Weight.dequantize(out=...)` (the op nf4_dequantize_into) writes exactly what dequantize
    returns, into the caller's buffer of any shape with the weight's element count; every element
    written (the buffer starts as NaN)."""
    for shape in SHAPES + [(300, 257)]:
        for blocksize in (32, 64, 4096):
            weight = NF4Weight.quantize(random_weight(shape, torch.float32, generator), blocksize, double_quant=nested)
            want = weight.dequantize(dtype)
            out = torch.full((want.numel(),), float("nan"), dtype=dtype)
            assert weight.dequantize(out=out) is out
            assert torch.equal(out, want.reshape(-1)), (shape, blocksize)


def test_dequantize_into_refuses_a_bad_buffer(generator):
    weight = NF4Weight.quantize(random_weight((8, 64), torch.float32, generator), 64, double_quant=True)
    n = weight.nested
    args = (weight.packed, weight.absmax, n.absmax, n.code, n.offset.reshape(1), 64, n.blocksize)
    for out, message in [
        (torch.empty(8, 128)[:, ::2], "out must be contiguous"),
        (torch.empty(512, dtype=torch.int32), "out must be"),
        (torch.empty(510), "must have"),
        (torch.empty(512, device="meta"), "device|meta"),
    ]:
        with pytest.raises((RuntimeError, ValueError), match=message):
            ops.nf4_dequantize_into(out, *args)
    with pytest.raises(RuntimeError, match="go together"):
        ops.nf4_dequantize_into(torch.empty(512), weight.packed, weight.absmax, n.absmax, None, None, 64, 256)
    with pytest.raises(ValueError, match="out has 511 elements"):
        weight.dequantize(out=torch.empty(511))
    with pytest.raises(ValueError, match="dtype"):
        weight.dequantize(torch.float16, out=torch.empty(512))


def test_strided_input_quantizes_its_logical_values(generator):
    base = random_weight((96, 70), torch.bfloat16, generator)
    for view in (base.t(), base[:, ::3], base[5:90:2]):
        assert not view.is_contiguous()
        assert all(torch.equal(a, b) for a, b in zip(ops.nf4_quantize(view, 64), ops.nf4_quantize(view.contiguous(), 64)))


def test_zero_and_constant_blocks():
    w = torch.zeros(200)
    w[64:128] = 3.0  # one constant block; the others all zero (absmax 0 must not divide by zero)
    packed, absmax = ops.nf4_quantize(w, 64)
    assert torch.equal(packed, nf4_ops.nf4_quantize_reference(w, 64)[0])
    assert absmax[0] == 0 and absmax[1] == 3.0 and absmax[3] == 1e-38  # tail block stores the clamp
    assert torch.equal(ops.nf4_dequantize(packed, absmax, 64, [200], torch.float32), w)


def test_nf4_weight_round_trip(tmp_path, generator):
    w = random_weight((130, 77), torch.bfloat16, generator)
    for double_quant in (False, True):
        q = peftkern.nf4_quantize(w, blocksize=128, double_quant=double_quant)
        assert (q.nested is not None) == double_quant and q.shape == w.shape and q.dtype == w.dtype
        dense = peftkern.nf4_dequantize(q)
        assert dense.dtype == torch.bfloat16 and dense.shape == w.shape
        assert torch.equal(peftkern.nf4_dequantize(q, torch.float32).to(torch.bfloat16), dense)
        exact_absmax = nf4_ops.nf4_quantize_reference(w, 128)[1]
        if double_quant:  # 8-bit dynamic codes keep the absmax to well under 1%
            torch.testing.assert_close(q.block_absmax(), exact_absmax, rtol=1e-2, atol=1e-4)
        else:
            assert torch.equal(q.block_absmax(), exact_absmax)
        path = tmp_path / f"w{double_quant}.safetensors"
        q.save(path, prefix="model.layers.0.mlp.up_proj.weight")
        loaded = NF4Weight.load(path, prefix="model.layers.0.mlp.up_proj.weight")
        assert torch.equal(loaded.dequantize(), dense)
        assert loaded.state_dict().keys() == q.state_dict().keys()


def test_state_dict_rejects_corruption(generator):
    q = peftkern.nf4_quantize(random_weight((64, 32), torch.float32, generator))
    sd = q.state_dict()
    with pytest.raises(KeyError, match="missing"):
        NF4Weight.from_state_dict({k: v for k, v in sd.items() if not k.endswith("absmax")})
    bad = dict(sd, **{"weight.absmax": sd["weight.absmax"][:-1]})
    with pytest.raises(ValueError, match="absmax has"):
        NF4Weight.from_state_dict(bad)


def test_reference_fallback_gives_the_same_result(monkeypatch, generator):
    """Where no kernel exists for a device, the wrappers run the reference: same answer."""
    w = random_weight((33, 65), torch.float16, generator)
    with_kernels = peftkern.nf4_quantize(w, 64)
    monkeypatch.setattr(nf4_ops._ext, "has_kernel", lambda op, device: False)
    fallback = peftkern.nf4_quantize(w, 64)
    for a, b in [(with_kernels.packed, fallback.packed), (with_kernels.absmax, fallback.absmax)]:
        assert torch.equal(a, b)
    assert torch.equal(with_kernels.dequantize(), fallback.dequantize())


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ops.nf4_quantize(torch.ones(8, dtype=torch.int32), 64), "weight must be Float or Half or BFloat16"),
        (lambda: ops.nf4_quantize(torch.ones(8), 48), "blocksize must be a power of two"),
        (lambda: ops.nf4_quantize(torch.ones(8), 8192), "blocksize must be a power of two"),
        (lambda: ops.nf4_dequantize(torch.zeros(4, 1, dtype=torch.uint8), torch.ones(2), 64, [8], torch.float32),
         "absmax must have 1 elements"),
        (lambda: ops.nf4_dequantize(torch.zeros(3, 1, dtype=torch.uint8), torch.ones(1), 64, [8], torch.float32),
         "packed must have 4 elements"),
        (lambda: ops.nf4_dequantize(torch.zeros(4, 1, dtype=torch.uint8), torch.ones(1), 64, [8], torch.int8),
         "dtype must be float32, float16 or bfloat16"),
        (lambda: ops.nf4_dequantize(torch.zeros(4, 1, dtype=torch.uint8), torch.ones(1, dtype=torch.half), 64, [8],
                                    torch.float32), "absmax must be Float"),
        (lambda: ops.quantize_blockwise_8bit(torch.ones(8), torch.ones(255), 256), "code must have 256 elements"),
    ],
)  # fmt: skip
def test_bad_input_gets_a_clear_error(call, message, cpu_isa):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_python_api_rejects_bad_input():
    with pytest.raises(TypeError, match="weight must be a float32/float16/bfloat16 tensor"):
        peftkern.nf4_quantize(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="blocksize must be one of"):
        peftkern.nf4_quantize(torch.ones(4), blocksize=100)


def _sample_args(generator):
    w = random_weight((37, 70), torch.bfloat16, generator)
    packed, absmax = ops.nf4_quantize(w, 64)
    code = nf4_ops.dynamic_code_8bit()
    offset = absmax.mean()
    codes, nested = ops.quantize_blockwise_8bit(absmax - offset, code, 256)
    return {
        "nf4_quantize": (w, 64),
        "nf4_dequantize": (packed, absmax, 64, [37, 70], torch.bfloat16),
        "nf4_dequantize_nested": (packed, codes, nested, code, offset, 64, 256, [37, 70], torch.float16),
        "nf4_dequantize_into": (torch.empty(37, 70, dtype=torch.float16), packed, codes, nested, code,
                                offset.reshape(1), 64, 256),  # fmt: skip
        "quantize_blockwise_8bit": (absmax - offset, code, 256),
        "dequantize_blockwise_8bit": (codes, nested, code, 256),
    }


def test_opcheck_every_op(generator):
    for name, args in _sample_args(generator).items():
        torch.library.opcheck(getattr(ops, name).default, args)


def test_torch_compile_fullgraph(generator):
    """The ops trace without graph breaks (fake implementations) and give the eager result."""
    torch._dynamo.reset()
    w = random_weight((64, 48), torch.float32, generator)

    def roundtrip(weight):
        q = peftkern.nf4_quantize(weight, 64, double_quant=True)
        return q.dequantize()

    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(w), roundtrip(w))


def test_torch_compile_inductor_dequantize_matmul(generator):
    """The QLoRA use: dequantize feeding a matmul, compiled by inductor (the default backend)."""
    torch._dynamo.reset()
    q = peftkern.nf4_quantize(random_weight((40, 72), torch.float32, generator), 64)
    x = torch.randn(5, 72, generator=generator)

    def project(inputs):
        return inputs @ q.dequantize().t()

    torch.testing.assert_close(torch.compile(project, fullgraph=True)(x), project(x), rtol=1e-5, atol=1e-6)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_match_cpu(dtype, generator):
    code = nf4_ops.dynamic_code_8bit()
    for shape in SHAPES + [(4096, 4097)]:
        for blocksize in BLOCKSIZES:
            w = random_weight(shape, dtype, generator)
            packed, absmax = ops.nf4_quantize(w, blocksize)
            packed_gpu, absmax_gpu = ops.nf4_quantize(w.cuda(), blocksize)
            assert torch.equal(packed_gpu.cpu(), packed) and torch.equal(absmax_gpu.cpu(), absmax)
            out = ops.nf4_dequantize(packed_gpu, absmax_gpu, blocksize, list(shape), dtype)
            assert torch.equal(out.cpu(), ops.nf4_dequantize(packed, absmax, blocksize, list(shape), dtype))
            offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
            codes, nested = ops.quantize_blockwise_8bit(absmax - offset, code, 256)
            codes_gpu, nested_gpu = ops.quantize_blockwise_8bit((absmax - offset).cuda(), code.cuda(), 256)
            assert torch.equal(codes_gpu.cpu(), codes) and torch.equal(nested_gpu.cpu(), nested)
            args = (packed, codes, nested, code, offset, blocksize, 256)
            want = ops.nf4_dequantize_nested(*args, list(shape), dtype)
            got = ops.nf4_dequantize_nested(*[a.cuda() if torch.is_tensor(a) else a for a in args], list(shape), dtype)
            assert torch.equal(got.cpu(), want)


@requires_cuda
def test_cuda_strided_and_offset_inputs(generator):
    w = random_weight((300, 130), torch.float16, generator, device="cuda")
    view = w[1:, 3:]  # neither contiguous nor aligned to the allocation
    assert all(torch.equal(a.cpu(), b) for a, b in zip(ops.nf4_quantize(view, 64), ops.nf4_quantize(view.cpu(), 64)))
