"""Size routing: where a fused kernel does not beat the plain-PyTorch (ATen) path beside it, the
wrapper takes that path instead. A fused op that loses to its own reference at some size is a
bug (issue 13): below a measured size the work is too small to repay the fixed cost of a custom
op (a dispatcher round trip and a Python autograd node: ~50-100 µs per layer and step, measured
with scripts/measure_routing.py), and the saved-activation memory the kernel exists for is
negligible there.

The thresholds are token counts (rows of the flattened input), measured on CPU with
`python scripts/measure_routing.py` (the crossover, rounded up to a power of two) and recorded in
DESIGN.md ("Size routing"). CUDA keeps its kernels at every size: no GPU has measured otherwise.
The reference path is the spec every kernel is tested against, so routing never changes results
beyond the stated tolerances.

Tests force the kernels (`kernels_always()`, applied session-wide by tests/conftest.py) so that
small test shapes exercise the kernels, not the reference they are compared with.
"""

from __future__ import annotations

import contextlib

# Fewer tokens than this on CPU: the reference path. Measured 2026-12-02, 2-core AVX-512-BF16 Xeon;
# confirmed the same day on a 2-core AMD EPYC after the -fopenmp build (DESIGN.md "Size routing").
CPU_MIN_TOKENS = {
    "ia3": 2048,
    "adapter": 2048,
    # LoRA on a dense base (ops/lora.py), training: its GEMMs are ATen's either way, so the op wins
    # the saved-activation memory and a pass or two. With its backward in C++ it is at parity or
    # ahead from 32-128 tokens (2026-12-03, 2-core EPYC, DESIGN.md "Size routing").
    "lora": 128,
}

# Where nothing needs a gradient (no_grad, inference) a family may route differently: the op's
# forward alone has less to win. Families not listed use CPU_MIN_TOKENS.
CPU_MIN_TOKENS_NO_GRAD = {
    "lora": 512,
}

_force_kernels = False


def use_kernel(family: str, tokens: int, device_type: str, needs_grad: bool = True) -> bool:
    """Whether op `family` runs its compiled kernel for `tokens` rows on `device_type` (the
    caller has already checked that a kernel exists there); `needs_grad`: whether autograd will
    record the call (grad mode on and some input requires grad)."""
    if _force_kernels or device_type != "cpu":
        return True
    if not needs_grad and family in CPU_MIN_TOKENS_NO_GRAD:
        return tokens >= CPU_MIN_TOKENS_NO_GRAD[family]
    return tokens >= CPU_MIN_TOKENS[family]


@contextlib.contextmanager
def kernels_always():
    """Within this block every op family takes its kernel at every size (tests, self-check)."""
    global _force_kernels
    previous, _force_kernels = _force_kernels, True
    try:
        yield
    finally:
        _force_kernels = previous
