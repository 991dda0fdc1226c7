"""ReLoRA's NF4 merge: the fused per-block kernel (peftkern::nf4_merge_lowrank, then the 8-bit
re-quantization of the absmax) side by side with what the reference does (dequantize, add s·B·A,
bitsandbytes' quantize_4bit) and with the same through peftkern's own ops, on 1B-class shapes.

    python -m pytest bench/bench_relora.py     # CPU (and CUDA where a GPU is visible)

Bytes counted (the floor of the fused merge): read the packed codes (n/2 B) and absmax, read A and
B, write the codes and absmax again. The unfused paths also write and read a dense float32 weight
(8 B per element) and the delta.
"""

import pytest
import torch

import peftkern
from peftkern.ops import relora as relora_ops

try:
    import bitsandbytes.functional as bnb_functional
except ImportError:
    bnb_functional = None

SHAPES = {"mlp 5632x2048": (5632, 2048), "attn 2048x2048": (2048, 2048)}
RANK, SCALING, BLOCKSIZE = 16, 2.0, 64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and peftkern.has_cuda_kernels() else [])


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "dequant+add+bitsandbytes", "dequant+add+peftkern"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_nf4_merge(benchmark, record, shape_name, impl, device):
    out, inp = SHAPES[shape_name]
    weight = peftkern.nf4_quantize((torch.randn(out, inp) * 0.02).to(device), BLOCKSIZE, double_quant=True)
    a = torch.randn(RANK, inp, device=device) / inp**0.5
    b = torch.randn(out, RANK, device=device) * 0.01
    benchmark.group = f"relora nf4 merge {shape_name} r={RANK} {device}"
    if impl == "fused":
        fn = lambda: relora_ops.nf4_merge_lowrank_(weight, a, b, SCALING)  # noqa: E731
    else:
        if impl == "dequant+add+bitsandbytes" and bnb_functional is None:
            pytest.skip("bitsandbytes not installed")

        def fn():
            dense = weight.dequantize(torch.float32) + SCALING * (b @ a)
            if impl == "dequant+add+bitsandbytes":
                return bnb_functional.quantize_4bit(dense, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
            return peftkern.nf4_quantize(dense, BLOCKSIZE, double_quant=True)

    def timed():
        fn()
        sync(device)

    benchmark.pedantic(timed, rounds=5, warmup_rounds=1, iterations=1)
    n = out * inp
    record(f"relora nf4 merge {shape_name} {device}", impl, n + 2 * n // BLOCKSIZE + 4 * RANK * (out + inp), device)
