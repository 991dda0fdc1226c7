"""LoRA's rank-r products (csrc/rank_product/), ours against ATen's GEMMs (MKL on CPU: what PEFT and
our own code ran before) in one run, float32, CPU:

* out_grads: grad_xa = s·grad_out·B and grad_B = s·grad_outᵀ·xa (one read of grad_out) vs two mm +
  the scaling;
* input_grads: grad_x += grad_xa·A and grad_A = grad_xaᵀ·x (one read of x, grad_x read and
  written once) vs addmm_ + mm;
* project: x·Aᵀ through `lora_dropout_project` at p = 0 (op call included) vs x @ A.t().

Shapes: SmolLM2-135M's (576 / 1536 features, the demo's 256 tokens) and a 7B-like layer (4096 /
11008, 512 tokens), r = 16, and r = 64 once. GFLOP/s counts 2·M·D·r per product; the summary's
GB/s counts the big matrices' bytes once (what a fused pass must move at least).

    python -m pytest bench/bench_rank_product.py
"""

import pytest
import torch

from peftkern.ops import dropout as dropout_ops
from peftkern.ops import rank_product as rank_ops

SHAPES = [(256, 576, 16), (256, 1536, 16), (512, 4096, 16), (512, 11008, 16), (256, 1536, 64)]
ROUNDS = 30


def _ids(shape):
    m, d, r = shape
    return f"{m}x{d}-r{r}"


@pytest.mark.parametrize("impl", ["peftkern", "aten"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_out_grads(benchmark, record, shape, impl):
    m, n, r = shape
    g = torch.randn(m, n)
    xa = torch.randn(m, r)
    b = torch.randn(n, r)
    if impl == "peftkern":
        step = lambda: rank_ops.lora_out_grads(g, xa, b, 2.0)  # noqa: E731
    else:
        step = lambda: ((g @ b).mul_(2.0), (g.t() @ xa).mul_(2.0))  # noqa: E731
    benchmark.group = f"out_grads {_ids(shape)}"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=3, iterations=5)
    record(f"out_grads {_ids(shape)} fp32 cpu", impl, g.numel() * 4, "cpu", flops=2 * 2 * m * n * r)


@pytest.mark.parametrize("impl", ["peftkern", "aten"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_input_grads(benchmark, record, shape, impl):
    m, k, r = shape
    x = torch.randn(m, k)
    gxa = torch.randn(m, r)
    a = torch.randn(r, k)
    grad_x = torch.randn(m, k)
    if impl == "peftkern":
        step = lambda: rank_ops.lora_input_grads_(grad_x, x, gxa, a, 0.0, 0, 0)  # noqa: E731
    else:
        step = lambda: (grad_x.addmm_(gxa, a), gxa.t() @ x)  # noqa: E731
    benchmark.group = f"input_grads {_ids(shape)}"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=3, iterations=5)
    record(f"input_grads {_ids(shape)} fp32 cpu", impl, 3 * x.numel() * 4, "cpu", flops=2 * 2 * m * k * r)


@pytest.mark.parametrize("impl", ["peftkern", "aten"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_project(benchmark, record, shape, impl):
    m, k, r = shape
    x = torch.randn(m, k)
    a = torch.randn(r, k)
    if impl == "peftkern":
        step = lambda: dropout_ops.lora_dropout_project(x, a, 0.0, 0, 0)  # noqa: E731
    else:
        step = lambda: x @ a.t()  # noqa: E731
    benchmark.group = f"x·Aᵀ {_ids(shape)}"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=3, iterations=5)
    record(f"x.At {_ids(shape)} fp32 cpu", impl, x.numel() * 4, "cpu", flops=2 * m * k * r)
