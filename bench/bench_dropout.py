"""LoRA dropout without a mask (issue 13, item 0), in one run:

* the dropout pass alone on a LoRA input [512, 2048]: peftkern's `lora_dropout` (Philox, writes
  xd) vs torch's bernoulli mask + multiply (what `prepare_dropout` and PEFT's nn.Dropout do),
  reported as GB/s of x read + xd written against memcpy;
* a LoRA layer's forward+backward (2048 -> 5632, r = 16, 512 tokens, fp32) with dropout 0.05 and
  0.0, peftkern and PEFT side by side: the dropout's cost is the difference;
* bench_e2e's LoRA and QLoRA training step under torch.profiler: the share of the step spent in
  dropout (peftkern::lora_dropout / lora_dropout_backward_ / aten::bernoulli_ self time over
  the step's wall time), printed, and the bytes saved for backward with dropout 0.05 vs 0.0
  (memory column; no bool mask is among them).

    python -m pytest bench/bench_dropout.py
"""

import time

import pytest
import torch

import peftkern
from peftkern.ops import dropout as dropout_ops
from peftkern.ops import lora as lora_ops

from bench_e2e import BATCH, LORA, SEQ, saved_for_backward_mb, small_llama

try:
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear
except ImportError:
    PeftLoraLinear = None

IN, OUT, RANK, ALPHA, TOKENS = 2048, 5632, 16, 32, 512
# lora_dropout_project is the A-projection with the decisions drawn inside (forward on CPU): all of
# its time is counted, its rank-r GEMM included, so the share is an upper bound.
DROPOUT_EVENTS = ("peftkern::lora_dropout", "peftkern::lora_dropout_backward_", "peftkern::lora_dropout_accumulate_",
                  "peftkern::lora_dropout_project", "aten::bernoulli_")  # fmt: skip


@pytest.mark.parametrize("impl", ["peftkern", "bernoulli"])
def test_dropout_pass(benchmark, record, impl):
    x = torch.randn(TOKENS, IN)
    p = 0.05

    def step():
        if impl == "peftkern":
            return dropout_ops.lora_dropout(x, p, *dropout_ops.draw_seed(x.device))
        mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)
        return x * mask * (1.0 / (1.0 - p))

    benchmark.group = f"dropout pass {TOKENS}x{IN} fp32"
    benchmark.pedantic(step, rounds=50, warmup_rounds=5, iterations=1)
    record(f"dropout pass {TOKENS}x{IN} fp32 cpu", impl, 2 * x.numel() * x.element_size(), "cpu")


def make_layer(impl, p):
    torch.manual_seed(0)
    base = torch.nn.Linear(IN, OUT, bias=False).requires_grad_(False)
    a = (torch.randn(RANK, IN) / IN**0.5).requires_grad_()
    b = (torch.randn(OUT, RANK) / RANK**0.5).requires_grad_()
    if impl == "peftkern":
        return lambda x: lora_ops.lora_linear(x, base.weight, None, a, b, ALPHA / RANK, dropout=p, training=True)
    if PeftLoraLinear is None:
        pytest.skip("peft not installed")
    layer = PeftLoraLinear(base, "default", PeftLoraConfig(r=RANK, lora_alpha=ALPHA), r=RANK, lora_alpha=ALPHA,
                           lora_dropout=p)  # fmt: skip
    layer.train()
    return layer


@pytest.mark.parametrize("p", [0.0, 0.05])
@pytest.mark.parametrize("impl", ["peftkern", "peft"])
def test_lora_layer_fwd_bwd(benchmark, record, impl, p):
    layer = make_layer(impl, p)
    x = torch.randn(TOKENS, IN, requires_grad=True)
    benchmark.group = f"lora fwd+bwd {TOKENS} tok, dropout {p}"
    benchmark.pedantic(lambda: layer(x).sum().backward(), rounds=5, warmup_rounds=2, iterations=1)
    record(f"lora fwd+bwd {TOKENS}tok dropout {p} fp32 cpu", impl, IN * OUT * 4, "cpu",
           flops=4 * TOKENS * IN * OUT)  # fmt: skip


@pytest.mark.parametrize("p", [0.0, 0.05])
@pytest.mark.parametrize("impl", ["peftkern", "peftkern-nf4"])
def test_training_step_dropout_share(benchmark, record, impl, p):
    """bench_e2e's training step (fp32, CPU); prints the profiler's dropout share of the step."""
    model = small_llama("cpu", torch.float32)
    model = peftkern.patch(model, {**LORA, "lora_dropout": p}, quantize="nf4" if impl.endswith("nf4") else None)
    model.train()
    ids = torch.randint(0, 4096, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "labels": ids}
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)

    def step():
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    steps = 3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - start
    events = {e.key: e for e in prof.key_averages()}
    dropout_us = sum(events[k].self_cpu_time_total for k in DROPOUT_EVENTS if k in events)
    calls = {k: events[k].count for k in DROPOUT_EVENTS if k in events}
    print(f"\n{impl} dropout={p}: dropout {dropout_us / 1e3 / steps:.2f} ms of a {wall / steps * 1e3:.1f} ms step "
          f"({100 * dropout_us / 1e6 / wall:.2f}%, profiled), calls per {steps} steps {calls}")  # fmt: skip
    memory_mb = saved_for_backward_mb(model, inputs)
    benchmark.group = f"train step {impl} fp32, dropout {p}"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    record(f"train step {impl} fp32 cpu", f"dropout {p}", 0, "cpu", memory_mb=memory_mb)


def _min_time(fn, rounds=40):
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def test_dropout_work_per_training_step():
    """Best-of-40 time of all the dropout work in one bench_e2e training step (28 LoRA layers:
    24 with in = 512, 4 with in = 1408, 256 tokens, fp32), min-of-N being the least disturbed by
    other jobs on a shared machine: peftkern's work per layer (forward the A-projection with the
    decisions drawn inside, `lora_dropout_project`; backward xd and the grad_x accumulate in one
    draw) against the mask path it replaced (bernoulli_, x·mask·scale then the projection in
    forward, x·mask·scale again in backward, addcmul into grad_x), each less the plain x·Aᵀ. Divide by a quiet step time (bench_e2e)
    for the share."""
    p, scale = 0.05, 1 / 0.95
    shapes = [(BATCH * SEQ, 512)] * 24 + [(BATCH * SEQ, 1408)] * 4
    xs = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    lora_as = [torch.randn(LORA["r"], s[1]) for s in shapes]

    def ours():  # forward: the A-projection with the decisions drawn inside; backward: one draw for both terms
        for x, g, a in zip(xs, grads, lora_as):
            seed, offset = dropout_ops.draw_seed(x.device)
            torch.ops.peftkern.lora_dropout_project(x, a, p, seed, offset)
            torch.ops.peftkern.lora_dropout_backward_(g, x, x, p, seed, offset)

    def projection():  # what forward costs without dropout: x·Aᵀ, subtracted from both paths
        for x, a in zip(xs, lora_as):
            x @ a.t()

    def mask_path():
        for x, g, a in zip(xs, grads, lora_as):
            mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
            (x * mask * scale) @ a.t()
            x * mask * scale
            g.addcmul_(x, mask, value=scale)

    t_proj = _min_time(projection)
    t_ours, t_mask = _min_time(ours) - t_proj, _min_time(mask_path) - t_proj
    print(f"\ndropout work per training step (best of 40 each, {torch.get_num_threads()} threads, the x·Aᵀ "
          f"projection's {t_proj * 1e3:.2f} ms subtracted): peftkern {t_ours * 1e3:.2f} ms, bernoulli mask path "
          f"{t_mask * 1e3:.2f} ms ({t_mask / t_ours:.1f}x)")  # fmt: skip
