"""IA³ on a dense base: peftkern's ia3_linear (fused scale prologue/epilogue, one-pass backward)
side by side with Hugging Face PEFT's IA³ layer and the plain-PyTorch reference (autograd), in one
run, on the two kinds of targets of a 1B-class model (hidden 2048): the output-scaled k/v
projection (2048 -> 512, GQA) and the input-scaled feedforward down projection (5632 -> 2048), at
decode (1 and 8 tokens) and training (512 tokens) sizes; float32 on CPU (bfloat16 too where a GPU
runs it).

    python -m pytest bench/bench_ia3.py

Floors: a forward must read W once (in*out*bytes), the time to beat at decode sizes (reported as
GB/s against memcpy); at 512 tokens the base GEMM's 2*tokens*in*out FLOP (forward; backward adds
one GEMM for dx), reported as GFLOP/s. The IA³ scaling itself is one extra pass over x or y.
"""

import pytest
import torch

from peftkern.ops import ia3 as ia3_ops

try:
    from peft import IA3Config as PeftIA3Config
    from peft.tuners.ia3 import Linear as PeftIA3Linear
except ImportError:
    PeftIA3Linear = None

LAYERS = {"kv 2048->512 (output)": (2048, 512, False), "down 5632->2048 (input)": (5632, 2048, True)}
TOKENS = [1, 8, 512]
CASES = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def make_layer(impl, layer, device, dtype):
    in_features, out_features, feedforward = LAYERS[layer]
    torch.manual_seed(0)
    base = torch.nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype).requires_grad_(False)
    shape = (1, in_features) if feedforward else (out_features, 1)
    l = (1 + 0.1 * torch.randn(shape, device=device)).requires_grad_()  # float32, as PEFT's get_peft_model keeps it
    if impl == "peftkern":
        return lambda x: ia3_ops.ia3_linear(x, base.weight, None, l, feedforward)
    if impl == "reference":
        return lambda x: ia3_ops.ia3_linear_reference(x, base.weight, None, l, feedforward)
    if PeftIA3Linear is None:
        pytest.skip("peft not installed")
    config = PeftIA3Config(target_modules=["x"], feedforward_modules=["x"] if feedforward else [])
    module = PeftIA3Linear(base, "default", config, is_feedforward=feedforward)
    with torch.no_grad():
        module.ia3_l["default"].data = l.detach().clone()
    module.ia3_l["default"].requires_grad_(True)
    return module


@pytest.mark.parametrize("device, dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("impl", ["peftkern", "peft", "reference"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_ia3_linear(benchmark, record, mode, layer, tokens, impl, device, dtype):
    module = make_layer(impl, layer, device, dtype)
    in_features, out_features, _ = LAYERS[layer]
    x = torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=mode != "forward")

    def step():
        if mode == "forward":
            with torch.no_grad():
                module(x)
        else:
            module(x).sum().backward()
        sync(device)

    benchmark.group = f"ia3 {mode} {layer} {tokens} tok {device}"
    benchmark.pedantic(step, rounds=5 if tokens >= 512 else 30, warmup_rounds=2, iterations=1)
    weight_bytes = in_features * out_features * x.element_size()
    flops = 2 * tokens * in_features * out_features * (1 if mode == "forward" else 2)
    name = f"ia3 {'fwd' if mode == 'forward' else 'fwd+bwd'} {layer.split()[0]} {tokens}tok {str(dtype)[6:]} {device}"
    record(name, impl, weight_bytes, device, flops=flops, routing=("ia3", tokens))
