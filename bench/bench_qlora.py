"""QLoRA (LoRA over an NF4 base) on the up-projection of a 1B-class model (2048 -> 5632, r = 16,
blocksize 64, double quantization), side by side in one run: peftkern's nf4_lora_linear vs Hugging
Face PEFT's LoRA layer over a bitsandbytes Linear4bit (the baseline a user would pick), at decode
(1 and 8 tokens, inference) and training (512 tokens, forward + backward) sizes; plus the two
decode strategies of peftkern itself: the GEMV kernel that reads the 4-bit weight once
(`nf4_lora_gemv`) and dequantize-then-GEMM.

    python -m pytest bench/bench_qlora.py
    python -m pytest bench/bench_qlora.py -k decode     # the decode rows only

CPU SIMD paths: "peftkern-gemv-<isa>" forces each path this CPU supports (scalar, avx2, avx512;
peftkern-gemv is the one chosen at load); "bnb-matmul_4bit" is bitsandbytes' own 4-bit matmul
(no LoRA term, which peftkern's rows include); "memcpy" copies as many bytes as the GEMV must read,
in the same run, so "of memcpy (same size)" is the GEMV's share of the machine's copy bandwidth.

Floors: at decode sizes the op must read the 4-bit weight (out·in/2 bytes) plus one absmax byte
per 64 elements: GB/s is that over the time, compared with memcpy measured in the same run. At
training sizes, forward + backward do 4·tokens·in·out FLOP in the base GEMMs.
"""

import contextlib

import pytest
import torch

import peftkern
from peftkern.ops import lora as lora_ops
from peftkern.ops import qlora as qlora_ops

IN, OUT, RANK, ALPHA = 2048, 5632, 16, 32
CASES = [("cpu", torch.float32), ("cpu", torch.bfloat16)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])
ISAS = ["scalar", "avx2", "avx512"]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def weights(device, dtype):
    torch.manual_seed(0)
    w = torch.randn(OUT, IN, dtype=dtype) * 0.02
    a = (torch.randn(RANK, IN, dtype=dtype) / IN**0.5).to(device).requires_grad_()
    b = (torch.randn(OUT, RANK, dtype=dtype) / RANK**0.5).to(device).requires_grad_()
    return w, a, b


@contextlib.contextmanager
def forced_isa(isa):
    """Runs the body on CPU SIMD path `isa` (None: the one chosen at load)."""
    if isa is None:
        yield
        return
    if isa not in peftkern.supported_cpu_isas():
        pytest.skip(f"this CPU has no {isa} path")
    before = peftkern.cpu_isa()
    peftkern.set_cpu_isa(isa)
    try:
        yield
    finally:
        peftkern.set_cpu_isa(before)


def make(impl, device, dtype):
    w, a, b = weights(device, dtype)
    scaling = ALPHA / RANK
    if impl.startswith("peftkern"):
        nf4 = peftkern.nf4_quantize(w.to(device), 64, double_quant=True)
        if impl.startswith("peftkern-gemv"):
            isa = impl.removeprefix("peftkern-gemv").removeprefix("-") or None

            def gemv(x):
                x2 = x.reshape(-1, IN)
                with forced_isa(isa):
                    return qlora_ops.nf4_lora_gemv(x2, nf4, None, x2 @ a.t(), b, scaling)
            return gemv
        if impl == "peftkern-deq+gemm":
            return lambda x: lora_ops.lora_linear(x, nf4.dequantize(x.dtype), None, a, b, scaling)
        return lambda x: qlora_ops.nf4_lora_linear(x, nf4, None, a, b, scaling)
    bnb = pytest.importorskip("bitsandbytes")
    if impl == "bnb-matmul_4bit":
        import bitsandbytes.functional as F

        packed, state = F.quantize_4bit(w.to(device), blocksize=64, quant_type="nf4", compress_statistics=True)
        return lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=state)
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    base = bnb.nn.Linear4bit(IN, OUT, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
    base = base.to(device)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False)
    layer = PeftLinear4bit(base, "default", config, r=RANK, lora_alpha=ALPHA, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return layer.to(device)


@pytest.mark.parametrize("device, dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("impl", ["peftkern", "peftkern-gemv", *(f"peftkern-gemv-{isa}" for isa in ISAS),
                                  "peftkern-deq+gemm", "peft+bnb", "bnb-matmul_4bit", "memcpy"])
@pytest.mark.parametrize("tokens", [1, 8])
def test_qlora_decode(benchmark, record, tokens, impl, device, dtype):
    weight_bytes = OUT * IN // 2 + OUT * IN // 64
    if impl.startswith("peftkern-gemv-") and device != "cpu":
        pytest.skip("the ISA paths are the CPU kernel's")
    if impl == "memcpy":  # the floor: a copy moving as many bytes (read + write) as the GEMV reads
        src = torch.empty(weight_bytes // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        layer = lambda x: dst.copy_(src)  # noqa: E731
    else:
        layer = make(impl, device, dtype)
    x = torch.randn(tokens, IN, device=device, dtype=dtype)

    def step():
        with torch.no_grad():
            layer(x)
        sync(device)

    benchmark.pedantic(step, rounds=5 if impl.endswith("scalar") else 30, warmup_rounds=3, iterations=1)
    record(f"qlora decode {tokens}tok {str(dtype)[6:]} {device}", impl, weight_bytes, device,
           flops=2 * tokens * IN * OUT)  # fmt: skip


@pytest.mark.parametrize("device, dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("impl", ["peftkern", "peft+bnb"])
def test_qlora_training(benchmark, record, impl, device, dtype):
    layer = make(impl, device, dtype)
    x = torch.randn(512, IN, device=device, dtype=dtype, requires_grad=True)

    def step():
        layer(x).sum().backward()
        sync(device)

    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    record(f"qlora fwd+bwd 512tok {str(dtype)[6:]} {device}", impl, OUT * IN // 2, device, flops=4 * 512 * IN * OUT)
