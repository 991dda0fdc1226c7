"""LoRA on a dense base: peftkern's lora_linear (hand-written backward) side by side with Hugging
Face PEFT's LoRA layer and the plain-PyTorch reference (autograd), in one run, on the up-projection
of a 1B-class model (2048 -> 5632, r = 16) at decode (1 and 8 tokens) and training (512 tokens)
sizes, float32 on CPU (bfloat16 too where a GPU runs it).

    python -m pytest bench/bench_lora.py

Floors: a forward must read W once (in*out*bytes): at decode sizes that is the time to beat
(reported as GB/s against memcpy); at training sizes it is 2*tokens*in*out FLOP for the base GEMM
(forward) and as much again for dx (backward), reported as GFLOP/s.
"""

import pytest
import torch

from peftkern.ops import lora as lora_ops

try:
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear
except ImportError:
    PeftLoraLinear = None

IN, OUT, RANK, ALPHA = 2048, 5632, 16, 32
TOKENS = [1, 8, 512]
CASES = [("cpu", torch.float32)] + (
    [("cuda", torch.bfloat16)] if torch.cuda.is_available() else []
)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def make_layer(impl, device, dtype):
    torch.manual_seed(0)
    base = torch.nn.Linear(IN, OUT, bias=False, device=device, dtype=dtype).requires_grad_(False)
    a = (torch.randn(RANK, IN, device=device, dtype=dtype) / IN**0.5).requires_grad_()
    b = (torch.randn(OUT, RANK, device=device, dtype=dtype) / RANK**0.5).requires_grad_()
    scaling = ALPHA / RANK
    if impl == "peftkern":
        return lambda x: lora_ops.lora_linear(x, base.weight, None, a, b, scaling)
    if impl == "reference":
        return lambda x: lora_ops.lora_linear_reference(x, base.weight, None, a, b, scaling)
    if PeftLoraLinear is None:
        pytest.skip("peft not installed")
    config = PeftLoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0)
    layer = PeftLoraLinear(base, "default", config, r=RANK, lora_alpha=ALPHA)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return layer


@pytest.mark.parametrize("device, dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("impl", ["peftkern", "peft", "reference"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_lora_linear(benchmark, record, mode, tokens, impl, device, dtype):
    layer = make_layer(impl, device, dtype)
    x = torch.randn(tokens, IN, device=device, dtype=dtype, requires_grad=mode != "forward")

    def step():
        if mode == "forward":
            with torch.no_grad():
                layer(x)
        else:
            layer(x).sum().backward()
        sync(device)

    benchmark.group = f"lora {mode} {tokens} tok {device}"
    benchmark.pedantic(step, rounds=5 if tokens >= 512 else 30, warmup_rounds=2, iterations=1)
    weight_bytes = IN * OUT * x.element_size()
    flops = 2 * tokens * IN * OUT * (1 if mode == "forward" else 2)  # base GEMM(s); LoRA adds ~1%
    record(f"lora {mode} {tokens}tok {str(dtype)[6:]} {device}", impl, weight_bytes, device, flops=flops,
           routing=("lora", tokens))  # fmt: skip


def make_dora_layer(impl, device, dtype):
    torch.manual_seed(0)
    base = torch.nn.Linear(IN, OUT, bias=False, device=device, dtype=dtype).requires_grad_(False)
    config = {"r": RANK, "lora_alpha": ALPHA, "use_dora": True, "init_lora_weights": False}
    if impl == "peftkern":
        from peftkern.methods.lora import LoraConfig, LoraLinear

        return LoraLinear(base, "default", LoraConfig(**config))
    if PeftLoraLinear is None:
        pytest.skip("peft not installed")
    return PeftLoraLinear(base, "default", PeftLoraConfig(**config), r=RANK, lora_alpha=ALPHA, use_dora=True,
                          init_lora_weights=False)  # fmt: skip


@pytest.mark.parametrize("device, dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("impl", ["peftkern", "peft"])
@pytest.mark.parametrize("tokens", [8, 512])
def test_dora_forward_backward(benchmark, record, tokens, impl, device, dtype):
    """DoRA layer forward + backward. Both compute ||W + s·BA|| every step; PEFT forms the
    [out, in] matrix W + s·BA to do it, peftkern's dora_weight_norm never does."""
    layer = make_dora_layer(impl, device, dtype)
    layer.train()
    x = torch.randn(tokens, IN, device=device, dtype=dtype, requires_grad=True)

    def step():
        layer(x).sum().backward()
        sync(device)

    benchmark.group = f"dora forward+backward {tokens} tok {device}"
    benchmark.pedantic(step, rounds=5, warmup_rounds=2, iterations=1)
    flops = 2 * tokens * IN * OUT * 2
    record(f"dora fwd+bwd {tokens}tok {str(dtype)[6:]} {device}", impl, IN * OUT * x.element_size(), device, flops=flops)
