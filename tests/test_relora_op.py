"""ReLoRA's fused NF4 merge op (peftkern::nf4_merge_lowrank, csrc/relora/): bytes and absmax equal
to quantizing deq(W) + s·B·A (its reference, peftkern's nf4_quantize, bitsandbytes' quantize_4bit)
on random shapes (odd, below one block, partial last block, empty), ranks (0 included) and block
sizes; double quantization through the in-place merge; NaN; opcheck; bad input. Runs a second
time against the CUDA kernel under the emulation (tests/conftest.py, EMULATED_MODULES)."""

import random

import pytest
import torch

import peftkern
from peftkern import _ext
from peftkern.ops import nf4 as nf4_ops
from peftkern.ops import relora as relora_ops

from . import bnb_oracle

ops = torch.ops.peftkern

pytestmark = pytest.mark.skipif(not _ext.has_kernel("nf4_merge_lowrank", "cpu"), reason="needs the compiled op")

# (out, in, rank, blocksize): odd sizes, fewer elements than a block, a partial last block, rank 0
CASES = [(7, 9, 3, 64), (1, 5, 1, 32), (33, 70, 4, 64), (40, 96, 8, 128), (17, 300, 16, 4096), (64, 64, 0, 64),
         (3, 1001, 2, 256), (96, 32, 4, 32)]  # fmt: skip


def random_inputs(out, inp, rank, blocksize, generator, double_quant=False):
    weight = torch.randn(out, inp, generator=generator) * 0.05
    nf4 = peftkern.nf4_quantize(weight, blocksize, double_quant)
    a = torch.randn(rank, inp, generator=generator) / max(inp, 1) ** 0.5
    b = torch.randn(out, rank, generator=generator) * 0.05
    scaling = float(torch.rand((), generator=generator)) * 4 + 0.25
    return nf4, a, b, scaling


def dense_sum(nf4, a, b, scaling):
    """deq(W) in float32 + s·B·A formed in float64 and rounded once (the op's definition)."""
    return nf4.dequantize(torch.float32) + (scaling * (b.double() @ a.double())).float()


@pytest.mark.parametrize("out,inp,rank,blocksize", CASES)
def test_matches_reference_and_nf4_quantize(out, inp, rank, blocksize, generator):
    nf4, a, b, scaling = random_inputs(out, inp, rank, blocksize, generator)
    packed, absmax = ops.nf4_merge_lowrank(nf4.packed, nf4.absmax, a, b, scaling, blocksize, [out, inp])
    ref_packed, ref_absmax = relora_ops.nf4_merge_lowrank_reference(nf4.packed, nf4.absmax, a, b, scaling,
                                                                    blocksize, (out, inp))  # fmt: skip
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
    want = peftkern.nf4_quantize(dense_sum(nf4, a, b, scaling), blocksize, double_quant=False)
    assert torch.equal(packed, want.packed) and torch.equal(absmax, want.absmax)
    if rank:  # the merge changed something (a test that cannot tell a no-op apart would pass anyway)
        assert not (torch.equal(packed, nf4.packed) and torch.equal(absmax, nf4.absmax))


@pytest.mark.parametrize("out,inp,rank,blocksize", CASES[:5])
def test_equals_bitsandbytes(out, inp, rank, blocksize, generator):
    """Bytes, absmax, nested absmax and offset equal bitsandbytes' quantize_4bit of the dense sum
    (double quantization re-done by the existing 8-bit op in nf4_merge_lowrank_)."""
    pytest.importorskip("bitsandbytes")
    nf4, a, b, scaling = random_inputs(out, inp, rank, blocksize, generator, double_quant=True)
    expected = dense_sum(nf4, a, b, scaling)
    relora_ops.nf4_merge_lowrank_(nf4, a, b, scaling)
    packed, codes, nested_absmax, offset = bnb_oracle.quantize_4bit_reference(expected, blocksize)
    assert torch.equal(nf4.packed.reshape(-1), packed.reshape(-1))
    assert torch.equal(nf4.absmax, codes)
    assert torch.equal(nf4.nested.absmax, nested_absmax)
    assert torch.equal(nf4.nested.offset.reshape(()), offset.reshape(()))


def test_random_shapes_with_double_quant(generator):
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=generator)))
    for _ in range(12):
        out, inp, rank = rng.randint(1, 80), rng.randint(1, 200), rng.randint(0, 9)
        blocksize = rng.choice(nf4_ops.VALID_BLOCKSIZES[:5])
        nf4, a, b, scaling = random_inputs(out, inp, rank, blocksize, generator, double_quant=True)
        want = peftkern.nf4_quantize(dense_sum(nf4, a, b, scaling), blocksize, double_quant=True)
        relora_ops.nf4_merge_lowrank_(nf4, a, b, scaling)
        assert torch.equal(nf4.packed, want.packed), (out, inp, rank, blocksize)
        assert torch.equal(nf4.absmax, want.absmax) and torch.equal(nf4.nested.absmax, want.nested.absmax)
        assert torch.equal(nf4.nested.offset, want.nested.offset)


def test_empty_weight():
    packed, absmax = ops.nf4_merge_lowrank(torch.empty(0, 1, dtype=torch.uint8), torch.empty(0), torch.empty(2, 5),
                                           torch.empty(0, 2), 1.0, 64, [0, 5])  # fmt: skip
    assert packed.shape == (0, 1) and absmax.shape == (0,)


def test_nan_in_adapter_matches_reference(generator):
    nf4, a, b, scaling = random_inputs(9, 70, 2, 64, generator)
    a[1, 3] = float("nan")
    packed, absmax = ops.nf4_merge_lowrank(nf4.packed, nf4.absmax, a, b, scaling, 64, [9, 70])
    ref_packed, ref_absmax = relora_ops.nf4_merge_lowrank_reference(nf4.packed, nf4.absmax, a, b, scaling, 64, (9, 70))
    assert torch.equal(packed, ref_packed)
    assert torch.equal(absmax.isnan(), ref_absmax.isnan()) and absmax.isnan().any()
    assert torch.equal(absmax.nan_to_num(), ref_absmax.nan_to_num())


def test_opcheck(generator):
    nf4, a, b, scaling = random_inputs(13, 70, 3, 64, generator)
    torch.library.opcheck(ops.nf4_merge_lowrank.default, (nf4.packed, nf4.absmax, a, b, scaling, 64, [13, 70]))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(a=torch.zeros(3, 71)), "lora_a must be"),
        (dict(b=torch.zeros(12, 3)), "lora_b must be"),
        (dict(a=torch.zeros(3, 70, dtype=torch.float64)), "lora_a"),
        (dict(absmax=torch.zeros(3)), "absmax"),
        (dict(blocksize=48), "blocksize"),
        (dict(shape=[13, 70, 1]), "shape"),
    ],
)
def test_bad_input(change, match, generator):
    nf4, a, b, scaling = random_inputs(13, 70, 3, 64, generator)
    args = dict(packed=nf4.packed, absmax=nf4.absmax, a=a, b=b, scaling=scaling, blocksize=64, shape=[13, 70]) | change
    with pytest.raises(RuntimeError, match=match):
        ops.nf4_merge_lowrank(*args.values())


def test_in_place_merge_refuses_a_mismatched_adapter(generator):
    nf4, a, b, scaling = random_inputs(13, 70, 3, 64, generator)
    before = nf4.packed.clone()
    with pytest.raises(ValueError, match="do not fit"):
        relora_ops.nf4_merge_lowrank_(nf4, a[:, :69], b, scaling)
    assert torch.equal(nf4.packed, before)
