"""Measures the CPU size-routing thresholds of peftkern/ops/routing.py: for each op family, the
kernel path and the plain-PyTorch reference path timed side by side (interleaved rounds, median
wall time, forward + backward as training runs them, and forward alone under no_grad) on the
bench shapes, at token counts 1, 2, 4, ... 1024. Prints each ratio and the smallest power of two
from which the kernel is at least as fast as the reference at every larger size measured.

    python scripts/measure_routing.py [--rounds 15]

Run it on a quiet machine: the ratios are what matter, and other load skews them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_adapter  # noqa: E402
import bench_ia3  # noqa: E402

from peftkern.ops import lora as lora_ops  # noqa: E402
from peftkern.ops import routing  # noqa: E402

TOKENS = [2**i for i in range(11)]


def interleaved_medians(fns: dict, rounds: int) -> dict:
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn(), fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def step(module, x, extra, train):
    if train:
        return lambda: module(x, *extra).sum().backward()

    def forward():
        with torch.no_grad():
            module(x, *extra)

    return forward


# LoRA on a dense base (out, in): bench_lora's up-projection of a 1B-class model and two of the
# demo model's (SmolLM2-135M) projections; r = 16, dropout off and at the demo's 0.05.
LORA_SHAPES = {"lora 5632x2048": (5632, 2048), "lora 1536x576": (1536, 576), "lora 576x576": (576, 576)}


def make_lora(impl: str, out_features: int, in_features: int, dropout: float):
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features) / in_features**0.5
    a = (torch.randn(16, in_features) / in_features**0.5).requires_grad_()
    b = (torch.randn(out_features, 16) / 4).requires_grad_()
    if impl == "kernel":
        return lambda x: lora_ops.lora_linear(x, weight, None, a, b, 2.0, dropout, training=True)
    drop = lora_ops.prepare_dropout(torch.empty(1, in_features), dropout, True, "lora_linear")[1]
    return lambda x: lora_ops.lora_linear_reference(x, weight, None, a, b, 2.0,
                                                    *lora_ops.reference_mask(x, drop))  # fmt: skip


def cases():
    for name, (out_features, in_features) in LORA_SHAPES.items():
        for p in (0.0, 0.05):
            yield "lora", f"{name} p{p}", in_features, lambda: make_lora("kernel", out_features, in_features, p), lambda: make_lora("reference", out_features, in_features, p), False  # noqa: E501
    for layer, (in_features, _, _) in bench_ia3.LAYERS.items():
        yield "ia3", f"ia3 {layer.split()[0]}", in_features, lambda: bench_ia3.make_layer("peftkern", layer, "cpu", torch.float32), lambda: bench_ia3.make_layer("reference", layer, "cpu", torch.float32), False  # noqa: E501
    for hidden in bench_adapter.HIDDEN:
        yield "adapter", f"adapter h{hidden}", hidden, lambda: bench_adapter.make("peftkern", hidden, "cpu", torch.float32), lambda: bench_adapter.make("unfused", hidden, "cpu", torch.float32), True  # noqa: E501


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--only", default="", help="measure only the families whose name starts with this")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratio = reference time / kernel time")
    suggestions: dict[str, int] = {}
    no_grad_suggestions: dict[str, int] = {}
    for family, name, width, make_kernel, make_reference, residual in cases():
        if not name.startswith(args.only):
            continue
        for train in (True, False):
            ratios = {}
            for tokens in TOKENS:
                x = torch.randn(tokens, width, requires_grad=train)
                extra = (torch.randn(tokens, width),) if residual else ()
                with routing.kernels_always():
                    kernel, reference = make_kernel(), make_reference()
                    t = interleaved_medians({"kernel": step(kernel, x, extra, train),
                                             "reference": step(reference, x, extra, train)}, args.rounds)  # fmt: skip
                ratios[tokens] = t["reference"] / t["kernel"]
            wins_from = next((tok for tok in TOKENS if all(ratios[t] >= 1.0 for t in TOKENS if t >= tok)), None)
            mode = "fwd+bwd" if train else "fwd"
            print(f"{name:<24}{mode:<8}" + " ".join(f"{t}:{r:.2f}" for t, r in ratios.items())
                  + f"   kernel >= reference from {wins_from}")  # fmt: skip
            if wins_from is None:
                wins_from = 2 * TOKENS[-1]
            table = suggestions if train else no_grad_suggestions
            table[family] = max(table.get(family, 1), wins_from)
    print("suggested CPU_MIN_TOKENS (training):", suggestions, " (in use:", routing.CPU_MIN_TOKENS, ")")
    print("suggested under no_grad:", no_grad_suggestions, " (in use: CPU_MIN_TOKENS_NO_GRAD =",
          routing.CPU_MIN_TOKENS_NO_GRAD, ")")  # fmt: skip


if __name__ == "__main__":
    main()
