"""NF4 quantize / dequantize: peftkern's kernels side by side with bitsandbytes and the
plain-PyTorch reference, in one run, on the weight shapes of a 1B-class model.

    python -m pytest bench/bench_nf4.py            # CPU (and CUDA where a GPU is visible)
    python -m pytest bench/bench_nf4.py --benchmark-json bench/results/nf4-<machine>.json

"peftkern-<isa>" forces each CPU SIMD path this CPU supports (scalar, avx2, avx512; "peftkern" is
the one chosen at load). "memcpy" copies as many bytes as dequantize moves, in the same run (same
working-set size: these machines have very large L3 caches), the "of memcpy (same size)" column.
It copies into a buffer allocated once; dequantize returns a new tensor, whose pages fault on first
touch (on the 2-core VMs here ~0.4 ms per MB beyond glibc's 32 MiB mmap threshold, less below it).
"alloc+fill" (allocate and fill the bf16 output) is that other floor: no op that returns a new
tensor of this size can beat it. "peftkern-into" and "bitsandbytes-into" dequantize into a buffer
allocated once (`NF4Weight.dequantize(out=...)`, bitsandbytes' `dequantize_4bit(out=...)`): the
like-for-like comparison with memcpy.

Bytes counted (the floor): dequantize reads the packed codes (n/2 B) and the double-quantized
absmax (n/blocksize B + a few floats) and writes n * 2 B of bf16; quantize reads n * 2 B of
bf16 and writes the codes and the absmax.
"""

import pytest
import torch

import peftkern
from peftkern.ops import nf4 as nf4_ops

try:
    import bitsandbytes.functional as bnb_functional
except ImportError:  # the bench still runs, without that column
    bnb_functional = None

SHAPES = {"mlp 5632x2048": (5632, 2048), "attn 2048x2048": (2048, 2048)}
BLOCKSIZE = 64
ISAS = ["scalar", "avx2", "avx512"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and peftkern.has_cuda_kernels() else [])


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def dequant_bytes(n):
    return n // 2 + n // BLOCKSIZE + n * 2


def quant_bytes(n):
    return n * 2 + n // 2 + n // BLOCKSIZE


def run(benchmark, fn, device, rounds):
    def timed():
        fn()
        sync(device)

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["peftkern", "peftkern-into", *(f"peftkern-{isa}" for isa in ISAS), "bitsandbytes",
                                  "bitsandbytes-into", "reference", "memcpy", "alloc+fill"])  # fmt: skip
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_dequantize(benchmark, record, shape_name, impl, device):
    shape = SHAPES[shape_name]
    w = (torch.randn(shape) * 0.02).to(device=device, dtype=torch.bfloat16)
    q = peftkern.nf4_quantize(w, BLOCKSIZE, double_quant=True)
    n = w.numel()
    benchmark.group = f"dequantize {shape_name} {device}"
    if impl == "peftkern":
        fn = q.dequantize
    elif impl == "peftkern-into":
        out = torch.empty(shape, dtype=torch.bfloat16, device=device)
        fn = lambda: q.dequantize(out=out)  # noqa: E731
    elif impl.startswith("peftkern-"):
        isa = impl.removeprefix("peftkern-")
        if device != "cpu" or isa not in peftkern.supported_cpu_isas():
            pytest.skip(f"no {isa} path on {device}")

        def fn():
            before = peftkern.cpu_isa()
            peftkern.set_cpu_isa(isa)
            try:
                q.dequantize()
            finally:
                peftkern.set_cpu_isa(before)
    elif impl.startswith("bitsandbytes"):
        if bnb_functional is None:
            pytest.skip("bitsandbytes not installed")
        if impl == "bitsandbytes-into" and device == "cpu":
            pytest.skip("bitsandbytes' dequantize_4bit.out has no CPU kernel")
        state = q.to_bnb_quant_state()
        out = torch.empty(shape, dtype=torch.bfloat16, device=device) if impl == "bitsandbytes-into" else None
        fn = lambda: bnb_functional.dequantize_4bit(q.packed, state, out=out)  # noqa: E731
    elif impl == "reference":
        n2 = q.nested
        fn = lambda: nf4_ops.nf4_dequantize_nested_reference(  # noqa: E731
            q.packed, q.absmax, n2.absmax, n2.code, n2.offset, BLOCKSIZE, 256, q.shape, torch.bfloat16
        )
    elif impl == "memcpy":  # a plain copy of as many bytes as dequantize must move: its floor
        src = torch.empty(dequant_bytes(n) // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    else:  # a new bf16 tensor of the output's size, filled: the floor of any op that returns one
        # (memcpy writes into a buffer allocated once; a fresh one page-faults on first touch)
        fn = lambda: torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1.0)  # noqa: E731
    run(benchmark, fn, device, rounds=5 if impl in ("reference", "peftkern-scalar") else 20)
    record(f"dequantize bf16 {shape_name} {device}", impl, dequant_bytes(n), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["peftkern", "bitsandbytes", "reference"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_quantize(benchmark, record, shape_name, impl, device):
    shape = SHAPES[shape_name]
    w = (torch.randn(shape) * 0.02).to(device=device, dtype=torch.bfloat16)
    benchmark.group = f"quantize {shape_name} {device}"
    if impl == "peftkern":
        fn = lambda: peftkern.nf4_quantize(w, BLOCKSIZE, double_quant=True)  # noqa: E731
    elif impl == "bitsandbytes":
        if bnb_functional is None:
            pytest.skip("bitsandbytes not installed")
        fn = lambda: bnb_functional.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)  # noqa: E731
    else:
        fn = lambda: nf4_ops.nf4_quantize_reference(w, BLOCKSIZE)  # noqa: E731
    run(benchmark, fn, device, rounds=3 if impl == "reference" else 10)
    record(f"quantize bf16 {shape_name} {device}", impl, quant_bytes(w.numel()), device)
