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


# --------------------------------------------------------------------------------------------
# Training / prefill on CPU: the fused dequant + GEMM (nf4_lora_linear_fwd / _bwd_input) against
# dequantize-whole + GEMM, per direction, on the real shapes (out, in): SmolLM2-135M's (the demo's
# model) and a 7B-like MLP's; 16-4096 tokens, float32, r = 16. These are the numbers behind
# qlora.FUSED_MIN_TOKENS (DESIGN.md "QLoRA"). PEFTKERN_BENCH_FUSED_TOKENS="16,512" narrows the sweep.
# --------------------------------------------------------------------------------------------

import os  # noqa: E402

FUSED_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (5632, 2048), (2048, 5632)]
FUSED_TOKENS = [int(t) for t in os.environ.get("PEFTKERN_BENCH_FUSED_TOKENS", "16,64,256,1024,4096").split(",")]


def fused_case(out_f, in_f, tokens):
    torch.manual_seed(0)
    nf4 = peftkern.nf4_quantize(torch.randn(out_f, in_f) * 0.02, 64, double_quant=True)
    a, b = torch.randn(RANK, in_f) / in_f**0.5, torch.randn(out_f, RANK) / RANK**0.5
    x, g = torch.randn(tokens, in_f), torch.randn(tokens, out_f)
    return nf4, a, b, x, g, x @ a.t()


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("impl", ["fused", "deq+gemm"])
@pytest.mark.parametrize("tokens", FUSED_TOKENS)
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_qlora_fused_vs_dequant(benchmark, record, shape, tokens, impl, direction):
    """One direction of the QLoRA layer (forward: out and xa; backward: grad x, A, B), fused vs
    dequantize-whole + peftkern::lora_linear_fwd/bwd (the path before the fused op)."""
    out_f, in_f = shape
    nf4, a, b, x, g, xa = fused_case(out_f, in_f, tokens)
    s = ALPHA / RANK
    if impl == "fused":
        fwd = lambda: qlora_ops.nf4_lora_linear_fused_fwd(x, nf4, None, a, b, s, None, 1.0)  # noqa: E731
        bwd = lambda: qlora_ops.nf4_lora_linear_fused_bwd(g, x, nf4, a, b, xa, s, None, 1.0)  # noqa: E731
    else:
        fwd = lambda: torch.ops.peftkern.lora_linear_fwd(x, nf4.dequantize(x.dtype), None, a, b, s, None, 1.0)  # noqa: E731
        bwd = lambda: torch.ops.peftkern.lora_linear_bwd(g, x, nf4.dequantize(g.dtype), a, b, xa, s, None, 1.0)  # noqa: E731
    big = tokens * in_f * out_f > 2e9
    benchmark.pedantic(fwd if direction == "fwd" else bwd, rounds=3 if big else 10, warmup_rounds=1, iterations=1)
    record(f"qlora {direction} {out_f}x{in_f} {tokens}tok float32 cpu", impl, out_f * in_f // 2, "cpu",
           flops=2 * tokens * in_f * out_f, memory_mb=peak_cpu_mb(fwd if direction == "fwd" else bwd))  # fmt: skip


def peak_cpu_mb(fn) -> float:
    """Peak CPU memory allocated while fn runs, MB above what was live when it started: every
    allocation and free through PyTorch's CPU allocator (torch.profiler's memory events, which
    include those made inside our C++ ops), summed in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]  # fmt: skip
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


@pytest.mark.parametrize("path", ["fused", "deq+gemm"])
@pytest.mark.parametrize("model", ["smollm2-135m-4layers", "llama7b-mlp-1layer"])
def test_qlora_step_peak_memory(benchmark, record, monkeypatch, model, path):
    """Peak CPU memory of one QLoRA training step (forward, backward, AdamW) of a Llama quantized by
    peftkern.patch(quantize="nf4"), with the fused path and with dequantize-whole forced
    (FUSED_MIN_TOKENS above the token count). SmolLM2-135M's dimensions (4 of its 30 layers, its
    49152 vocabulary), and one 7B-like layer (2048 / 5632, vocabulary 4096). 2 × 128 tokens."""
    import transformers

    torch.manual_seed(0)
    if model.startswith("smollm"):
        config = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                                          num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                          tie_word_embeddings=True, attn_implementation="sdpa")  # fmt: skip
    else:
        config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=1,
                                          num_attention_heads=16, num_key_value_heads=16, vocab_size=4096,
                                          attn_implementation="sdpa")  # fmt: skip
    net = peftkern.patch(transformers.LlamaForCausalLM(config), {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
                         quantize="nf4")  # fmt: skip
    net.train()
    monkeypatch.setattr(qlora_ops, "FUSED_MIN_TOKENS", 1 if path == "fused" else 10**9)
    ids = torch.randint(0, config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)

    def step():
        net(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
    record(f"qlora step peak memory {model} float32 cpu", path, 0, "cpu", memory_mb=peak_cpu_mb(step))
