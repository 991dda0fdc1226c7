"""LoRA's rank-r products (csrc/rank_product/), ours against ATen's GEMMs (MKL on CPU: what PEFT and
our own code ran before) in one run, float32, CPU:

* out_grads: grad_xa = s·grad_out·B and grad_B = s·grad_outᵀ·xa (one read of grad_out) vs two mm +
  the scaling;
* input_grads: grad_x += grad_xa·A and grad_A = grad_xaᵀ·x (one read of x, grad_x read and
  written once) vs addmm_ + mm;
* project: x·Aᵀ through `lora_dropout_project` at p = 0 (op call included) vs x @ A.t();
* the two backward pairs again with the caches flushed before every call ("cold": 64 MB written,
  as when a training step comes back to a layer's saved x), where a column walk is latency-bound.

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


def _run(benchmark, record, name, shape, impl, ours, aten, bytes_moved, flops):
    benchmark.group = f"{name} {_ids(shape)}"
    benchmark.pedantic(ours if impl == "peftkern" else aten, rounds=ROUNDS, warmup_rounds=3, iterations=5)
    record(f"{name} {_ids(shape)} fp32 cpu", impl, bytes_moved, "cpu", flops=flops)


@pytest.mark.parametrize("impl", ["peftkern", "aten"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_out_grads(benchmark, record, shape, impl):
    m, n, r = shape
    g, xa, b = torch.randn(m, n), torch.randn(m, r), torch.randn(n, r)
    _run(benchmark, record, "out_grads", shape, impl, lambda: rank_ops.lora_out_grads(g, xa, b, 2.0),
         lambda: ((g @ b).mul_(2.0), (g.t() @ xa).mul_(2.0)), g.numel() * 4, 2 * 2 * m * n * r)  # fmt: skip


@pytest.mark.parametrize("impl", ["peftkern", "aten"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_input_grads(benchmark, record, shape, impl):
    m, k, r = shape
    x, gxa, a, grad_x = torch.randn(m, k), torch.randn(m, r), torch.randn(r, k), torch.randn(m, k)
    _run(benchmark, record, "input_grads", shape, impl, lambda: rank_ops.lora_input_grads_(grad_x, x, gxa, a, 0.0, 0, 0),
         lambda: (grad_x.addmm_(gxa, a), gxa.t() @ x), 3 * x.numel() * 4, 2 * 2 * m * k * r)  # fmt: skip


@pytest.mark.parametrize("impl", ["peftkern", "aten"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_project(benchmark, record, shape, impl):
    m, k, r = shape
    x, a = torch.randn(m, k), torch.randn(r, k)
    _run(benchmark, record, "x.At", shape, impl, lambda: dropout_ops.lora_dropout_project(x, a, 0.0, 0, 0),
         lambda: x @ a.t(), x.numel() * 4, 2 * m * k * r)  # fmt: skip


COLD_SHAPES = [(256, 576, 16), (256, 1536, 16), (512, 4096, 16)]
_FLUSH = torch.empty(64 * 1024 * 1024 // 4)


def _flush_caches():
    _FLUSH.add_(1.0)  # 64 MB written: past the L3 of these machines (32 MB)


@pytest.mark.parametrize("impl", ["peftkern", "aten"])
@pytest.mark.parametrize("pair", ["out_grads", "input_grads"])
@pytest.mark.parametrize("shape", COLD_SHAPES, ids=_ids)
def test_cold(benchmark, record, shape, pair, impl):
    m, d, r = shape
    big, other, thin, a, b = torch.randn(m, d), torch.randn(m, d), torch.randn(m, r), torch.randn(r, d), torch.randn(d, r)
    if pair == "out_grads":
        ours, aten = lambda: rank_ops.lora_out_grads(big, thin, b, 2.0), lambda: ((big @ b).mul_(2.0), (big.t() @ thin).mul_(2.0))
    else:
        ours = lambda: rank_ops.lora_input_grads_(other, big, thin, a, 0.0, 0, 0)  # noqa: E731
        aten = lambda: (other.addmm_(thin, a), thin.t() @ big)  # noqa: E731
    benchmark.group = f"{pair} cold {_ids(shape)}"
    benchmark.pedantic(ours if impl == "peftkern" else aten, setup=_flush_caches, rounds=40,
                       warmup_rounds=2, iterations=1)  # fmt: skip
    record(f"{pair} cold {_ids(shape)} fp32 cpu", impl, big.numel() * 4, "cpu", flops=2 * 2 * m * d * r)
