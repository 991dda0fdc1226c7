"""Shared machinery for the pytest-benchmark suites: each benchmark records the bytes it must
move, and the session ends with one table of time, GB/s and the ratio to a plain memory copy of
the same bytes measured in the same run (the bandwidth floor)."""

import pytest
import torch

_ROWS = []
_MEMCPY_GBPS = {}
_ROUTED = {}  # group -> op family whose peftkern row took the routed (reference) path


def memcpy_gbps(device: str) -> float:
    """Bandwidth of a plain tensor copy on `device` (bytes read + bytes written per second),
    measured once per run on a buffer larger than the caches."""
    if device not in _MEMCPY_GBPS:
        import time

        src = torch.randn(64 * 2**20 // 4, device=device)  # 64 MiB
        dst = torch.empty_like(src)
        times = []
        for _ in range(12):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        times.sort()
        _MEMCPY_GBPS[device] = 2 * src.numel() * 4 / times[len(times) // 2] / 1e9
    return _MEMCPY_GBPS[device]


@pytest.fixture
def record(benchmark, request):
    """record(group, impl, bytes_moved, device, flops=None, memory_mb=None, routing=None): call after
    benchmark.pedantic(...). memory_mb: the memory figure the benchmark measured (say which in its
    docstring: peak device memory on a GPU, bytes saved for backward on a CPU). routing: (op family,
    tokens) of a peftkern row whose op is size-routed (peftkern/ops/routing.py); where that size
    goes to the plain-PyTorch path, the row runs the same ATen ops as the 'reference' row, a gap
    between the two is run-to-run noise, and the summary says so."""

    def _record(group: str, impl: str, bytes_moved: int, device: str = "cpu", flops: int | None = None,
                memory_mb: float | None = None, routing: tuple[str, int] | None = None):  # fmt: skip
        median = benchmark.stats.stats.median
        gbps = bytes_moved / median / 1e9
        floor = memcpy_gbps(device)
        gflops = flops / median / 1e9 if flops else None
        benchmark.extra_info.update(group=group, impl=impl, bytes=bytes_moved, gbps=gbps, memcpy_gbps=floor,
                                    gflops=gflops, memory_mb=memory_mb)  # fmt: skip
        _ROWS.append((group, impl, median, gbps, gbps / floor, gflops, memory_mb))
        if impl == "peftkern" and routing is not None:
            from peftkern.ops.routing import use_kernel

            if not use_kernel(routing[0], routing[1], device):
                _ROUTED[group] = routing[0]

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    write = terminalreporter.write_line
    write("")
    write("peftkern bench summary (median times; GB/s counts the bytes the op must read + write)")
    write(f"memcpy bandwidth in this run: {', '.join(f'{d} {g:.1f} GB/s' for d, g in _MEMCPY_GBPS.items())}")
    header = (f"{'case':<44}{'impl':<20}{'median ms':>11}{'GB/s':>9}{'of memcpy':>11}{'same-size':>11}{'GFLOP/s':>9}"
              f"{'vs peftkern':>13}{'MB':>9}")  # fmt: skip
    write(header)
    write("-" * len(header))
    ours = {row[0]: row[2] for row in _ROWS if row[1] == "peftkern"}
    copies = {row[0]: row[3] for row in _ROWS if row[1] == "memcpy"}  # a copy of the same bytes, same run
    for group, impl, median, gbps, fraction, gflops, memory_mb in _ROWS:
        speedup = f"{median / ours[group]:.2f}x" if group in ours else "-"
        same_size = f"{gbps / copies[group]:.0%}" if group in copies else "-"
        flops_text = f"{gflops:.1f}" if gflops else "-"
        memory_text = f"{memory_mb:.1f}" if memory_mb is not None else "-"
        write(f"{group:<44}{impl:<20}{median * 1e3:>11.3f}{gbps:>9.2f}{fraction:>10.0%}{same_size:>11}{flops_text:>9}"
              f"{speedup:>13}{memory_text:>9}")  # fmt: skip
    write("('vs peftkern' = that implementation's time / peftkern's: above 1x, peftkern is faster;")
    write(" same-size = GB/s over that of the case's 'memcpy' row, a copy of the same bytes in the same run;")
    write(" MB = peak device memory of the step on a GPU, bytes saved for backward on a CPU)")
    _write_floor_overheads(write)
    slower = [(g, i, m / ours[g]) for g, i, m, *_ in _ROWS
              if g in ours and i in _REFERENCE_IMPLS and m < ours[g]]  # fmt: skip
    if slower:
        write("")
        write("peftkern slower than the plain-PyTorch path beside it (a fused op must not lose to its own reference):")
        for group, impl, ratio in slower:
            note = (f" (routed: below routing.CPU_MIN_TOKENS['{_ROUTED[group]}'] peftkern runs the same ATen ops"
                    " as that row, so the gap is run-to-run noise)" if group in _ROUTED else "")  # fmt: skip
            write(f"  {group}: {impl} at {ratio:.2f}x of peftkern's time{note}")


# The rows that are the same math in plain PyTorch (what a fused op must never lose to).
_REFERENCE_IMPLS = ("reference", "unfused", "peftkern-deq+gemm")


def _write_floor_overheads(write):
    """For groups with a 'frozen-base' row (the same model with no adapter, backward to the inputs):
    each implementation's adapter overhead over that floor, and peftkern's as a share of the
    baseline's (the issue-13 target: at most half)."""
    floors = {row[0]: row[2] for row in _ROWS if row[1] == "frozen-base"}
    if not floors:
        return
    write("")
    write("adapter overhead over the frozen-base floor (step time - floor, as % of the floor)")
    for group, floor in floors.items():
        overheads = {impl: median - floor for g, impl, median, *_ in _ROWS if g == group and impl != "frozen-base"}
        parts = [f"{impl} {o * 1e3:+.1f} ms ({o / floor:+.0%})" for impl, o in overheads.items()]
        baseline = next((overheads[i] for i in ("peft", "peft+bnb") if i in overheads), None)
        if baseline and "peftkern" in overheads and baseline > 0:
            parts.append(f"peftkern/baseline overhead {overheads['peftkern'] / baseline:.2f}")
        write(f"  {group:<34} floor {floor * 1e3:.1f} ms: " + ", ".join(parts))
