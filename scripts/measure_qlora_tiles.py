"""The CPU fused NF4 dequant + GEMM (`nf4_lora_linear_fwd` / `nf4_lora_linear_bwd_input`) on
SmolLM2-135M's projection shapes, interleaved with the dense GEMM it replaces (the floor),
dequantize-whole + GEMM, and the tile policy before 2026-12-02 (tiles capped at an eighth of the
dense weight, at least 512 KiB) passed as an explicit tile_bytes. Median ms of interleaved rounds,
float32, no LoRA term.

    python scripts/measure_qlora_tiles.py [--tokens 256] [--rounds 40]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from peftkern.nf4 import nf4_quantize
from peftkern.ops import qlora

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in): q/o, k/v, gate/up, down


def interleaved_medians(fns: dict, rounds: int) -> dict:
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn(), fn()  # warm-up (and the decode buffer grown)
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, float32; median ms")
    torch.manual_seed(0)
    for n, k in SHAPES:
        dense = torch.randn(n, k) / k**0.5
        weight = nf4_quantize(dense)
        x, g = torch.randn(args.tokens, k), torch.randn(args.tokens, n)
        old_tile = max(512 << 10, n * k * 4 // 8)
        t = interleaved_medians({
            "dense fwd": lambda: x @ dense.t(),
            "fused fwd": lambda: qlora.nf4_lora_linear_fwd(x, weight),
            "eighth-tile fwd": lambda: qlora.nf4_lora_linear_fwd(x, weight, tile_bytes=old_tile),
            "deq+mm fwd": lambda: x @ weight.dequantize(torch.float32).t(),
            "dense bwd": lambda: g @ dense,
            "fused bwd": lambda: qlora.nf4_lora_linear_bwd_input(g, weight),
            "eighth-tile bwd": lambda: qlora.nf4_lora_linear_bwd_input(g, weight, tile_bytes=old_tile),
            "deq+mm bwd": lambda: g @ weight.dequantize(torch.float32),
        }, args.rounds)  # fmt: skip
        print(f"{n}x{k}: " + "  ".join(f"{name} {ms:.3f}" for name, ms in t.items()))


if __name__ == "__main__":
    main()
