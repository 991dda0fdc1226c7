"""Bottleneck adapter: peftkern's fused op (our bias+activation and scale+residual epilogues
around the GEMMs, hand-written backward that recomputes the activation) against the unfused
PyTorch module AdapterHub runs (nn.Linear -> activation -> nn.Linear -> * scaling -> + residual),
hidden 768 and 2048 with reduction_factor 16, 8 and 512 tokens; plus the inference latency a SeqBn
adapter adds to a bare tiny Llama.

    python -m pytest -q bench/bench_adapter.py

The adapter is memory-bound at these sizes: GB/s counts the bytes it must touch (x and residual
read, out written, both weights read; backward also the pre-activation and the gradients).
"""

import copy

import pytest
import torch

import peftkern
from peftkern.ops import adapter as adapter_ops

HIDDEN = [768, 2048]
REDUCTION = 16
TOKENS = [8, 512]
CASES = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class UnfusedAdapter(torch.nn.Module):
    """What AdapterHub's `Adapter.forward` computes for a SeqBn adapter (no layer norms, no gating)."""

    def __init__(self, hidden, bottleneck, scaling, device, dtype):
        super().__init__()
        self.adapter_down = torch.nn.Sequential(torch.nn.Linear(hidden, bottleneck, device=device, dtype=dtype),
                                                torch.nn.ReLU())  # fmt: skip
        self.adapter_up = torch.nn.Linear(bottleneck, hidden, device=device, dtype=dtype)
        self.scaling = scaling

    def forward(self, x, residual):
        return self.adapter_up(self.adapter_down(x)) * self.scaling + residual


def make(impl, hidden, device, dtype):
    torch.manual_seed(0)
    module = UnfusedAdapter(hidden, hidden // REDUCTION, 1.0, device, dtype)
    with torch.no_grad():
        module.adapter_up.weight.normal_(std=0.02)
    if impl == "unfused":
        return module
    down, up = module.adapter_down[0], module.adapter_up
    return lambda x, r: adapter_ops.adapter_bottleneck(x, r, down.weight, down.bias, up.weight, up.bias, 1.0,
                                                       activation="relu")  # fmt: skip


@pytest.mark.parametrize("device, dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("impl", ["peftkern", "unfused"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_adapter(benchmark, record, mode, hidden, tokens, impl, device, dtype):
    layer = make(impl, hidden, device, dtype)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=mode != "forward")
    residual = torch.randn(tokens, hidden, device=device, dtype=dtype)

    def step():
        if mode == "forward":
            with torch.no_grad():
                layer(x, residual)
        else:
            layer(x, residual).sum().backward()
        sync(device)

    benchmark.group = f"adapter {mode} h{hidden} {tokens} tok {device}"
    benchmark.pedantic(step, rounds=10 if tokens >= 512 else 40, warmup_rounds=3, iterations=1)
    m, size = hidden // REDUCTION, x.element_size()
    io = (3 * tokens * hidden + 2 * hidden * m + tokens * m) * size  # x, residual, out, weights, pre
    if mode != "forward":
        io = 2 * io + tokens * hidden * size  # + grad_out read, grads written (roughly twice forward)
    flops = 4 * tokens * hidden * m * (1 if mode == "forward" else 3)
    record(f"adapter {mode} h{hidden} {tokens}tok {str(dtype)[6:]} {device}", impl, io, device, flops=flops,
           routing=("adapter", tokens))  # fmt: skip


@pytest.mark.parametrize("model_impl", ["bare", "peftkern SeqBn"])
@pytest.mark.parametrize("tokens", [1, 64])
def test_seqbn_inference_latency(benchmark, record, model_impl, tokens):
    """Whole-model forward of a tiny Llama (hidden 256, 4 layers) with and without a SeqBn adapter."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    if model_impl != "bare":
        model = peftkern.patch(copy.deepcopy(model), peftkern.SeqBnConfig(reduction_factor=16))
    ids = torch.randint(0, 1024, (1, tokens))

    def step():
        with torch.no_grad():
            model(input_ids=ids)

    benchmark.group = f"tiny llama forward {tokens} tok"
    benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    impl = "peftkern" if model_impl != "bare" else "bare model"
    record(f"tiny llama (h256, 4 layers) fwd {tokens}tok cpu", impl, weight_bytes, "cpu")
