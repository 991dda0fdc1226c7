"""bench/bench_e2e.py's training step (small Llama, LoRA r=16 on every linear, AdamW), every
implementation built once in one process and timed in interleaved rounds (median wall time): the
comparison that survives run-to-run drift, which on a shared 2-core machine is larger than the
differences bench_e2e's sequential rounds try to show. Also with LoRA dropout 0, so the cost of
dropout itself is visible. --autocast-bf16 runs every step under torch.autocast("cpu", bfloat16)
(float32 weights, as bench_e2e's autocast-bf16 rows). The frozen base is transformers' model with no
adapter: its nn.Linear GEMMs are ATen's (MKL in float32), while peftkern's layers run theirs through
oneDNN on AMD CPUs (csrc/common/cpu_gemm.h), so there peftkern's step can be below this "floor".

    python scripts/interleaved_e2e.py [--rounds 7] [--autocast-bf16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_e2e  # noqa: E402

IMPLS = ["frozen-base", "peftkern", "peft", "peftkern-nf4", "peft+bnb"]


def step_of(impl: str, dropout: float, autocast: bool):
    bench_e2e.LORA["lora_dropout"] = dropout
    model = bench_e2e.build(impl, "cpu", torch.float32)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    ids = torch.randint(0, 4096, (bench_e2e.BATCH, bench_e2e.SEQ), generator=torch.Generator().manual_seed(1))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--autocast-bf16", action="store_true", help="the steps under bf16 autocast")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds, "
          f"batch {bench_e2e.BATCH} x {bench_e2e.SEQ} tokens, "
          f"{'float32 weights under bf16 autocast' if args.autocast_bf16 else 'float32'}")  # fmt: skip
    for dropout in (0.05, 0.0):
        steps = {impl: step_of(impl, dropout, args.autocast_bf16) for impl in IMPLS}
        times = {impl: [] for impl in IMPLS}
        for step in steps.values():
            step()
        for _ in range(args.rounds):
            for impl, step in steps.items():
                start = time.perf_counter()
                step()
                times[impl].append(time.perf_counter() - start)
        median = {impl: statistics.median(t) * 1e3 for impl, t in times.items()}
        floor = median["frozen-base"]
        print(f"\nlora_dropout {dropout}: median ms (overhead over the frozen-base floor)")
        for impl, ms in median.items():
            print(f"  {impl:<14}{ms:8.1f}" + ("" if impl == "frozen-base" else f"   +{ms - floor:.1f} ({(ms - floor) / floor:+.0%})"))
        print(f"  peftkern / PEFT speed {median['peft'] / median['peftkern']:.2f}x, "
              f"peftkern-nf4 / PEFT+bnb {median['peft+bnb'] / median['peftkern-nf4']:.2f}x; "
              f"overhead ratio (peftkern / baseline): LoRA {(median['peftkern'] - floor) / (median['peft'] - floor):.2f}, "
              f"QLoRA {(median['peftkern-nf4'] - floor) / (median['peft+bnb'] - floor):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
