"""The float32 GEMM y = x·wᵀ of a LoRA / QLoRA layer's base on this CPU, through ATen (MKL) and
through oneDNN (PyTorch's mkldnn::_linear_pointwise, what csrc/common/cpu_gemm.h calls), median of
20 calls each, GFLOP/s; the weight as [N, K] (forward) and as a transposed view (backward's grad_out·W).
The numbers behind the PEFTKERN_CPU_GEMM default (DESIGN.md "CPU GEMM library").

    python scripts/measure_cpu_gemm.py
"""

import statistics
import time

import torch


def median_ms(fn, calls: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    onednn = torch.ops.mkldnn._linear_pointwise
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GFLOP/s")
    print(f"{'M':>5} {'K':>5} {'N':>5}   W [N, K]: aten  onednn   W = [K, N]ᵀ: aten  onednn")
    generator = torch.Generator().manual_seed(0)
    for m, k, n in [(16, 576, 1536), (64, 576, 1536), (256, 576, 1536), (1024, 576, 1536), (4096, 576, 1536),
                    (256, 1536, 576), (256, 2048, 5632), (1024, 2048, 5632)]:  # fmt: skip
        x = torch.randn(m, k, generator=generator)
        w = torch.randn(n, k, generator=generator)
        wt = torch.randn(k, n, generator=generator).t()
        gflop = 2 * m * k * n / 1e6
        row = [gflop / median_ms(lambda w=w: torch.mm(x, w.t())), gflop / median_ms(lambda w=w: onednn(x, w, None, "none", [], "")),
               gflop / median_ms(lambda: torch.mm(x, wt.t())), gflop / median_ms(lambda: onednn(x, wt, None, "none", [], ""))]  # fmt: skip
        print(f"{m:5d} {k:5d} {n:5d}   {row[0]:14.0f} {row[1]:7.0f}   {row[2]:17.0f} {row[3]:7.0f}")


if __name__ == "__main__":
    main()
