"""Child-Tuning's optimizer step on one float32 tensor: the fused masked AdamW
(peftkern::masked_adamw_, mode D with the mask as bits, mode F drawing it in the kernel) side by
side with torch's AdamW after `grad.mul_(mask)` (what the ChildTuning wrapper does) and with the
unfused ChildTuningAdamW (the reference's torch ops), on 1M and 16M parameters.

    python -m pytest bench/bench_child_tuning.py     # CPU (and CUDA where a GPU is visible)

Bytes counted (the floor of any AdamW step): read param, grad and both moments, write param and
both moments: 28 B per element (+ n/8 B of mask bits for D). The unfused paths also read and
write the gradient for the mask, a mask (D: a bool tensor, n B; F: a float tensor drawn each
step, 4n B) and their temporaries (denom = sqrt(v) + eps, 4n B).
Memory column: on a GPU the peak allocated during the step minus before it; on a CPU the peak
resident set during the step minus before it (VmHWM after resetting it), i.e. the step's
temporaries.
"""

import pytest
import torch

from peftkern import child_tuning
from peftkern.ops import masked_adamw as ma

SIZES = {"1M": 1 << 20, "16M": 1 << 24}
LR, BETAS, EPS, WD, RESERVE_P = 1e-3, (0.9, 0.999), 1e-6, 0.01, 0.3
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def peak_memory_mb(fn, device):
    """The step's temporaries: peak minus the level before it (see the module doc)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        before = _status_kb("VmRSS:")
        fn()
        return (_status_kb("VmHWM:") - before) / 1024
    except OSError:
        return None


def make_step(impl, mode, n, device):
    gen = torch.Generator(device=device).manual_seed(0)
    param = torch.nn.Parameter(torch.randn(n, device=device, generator=gen))
    param.grad = torch.randn(n, device=device, generator=gen)
    mask = torch.rand(n, device=device, generator=gen) < RESERVE_P
    if impl == "peftkern" or impl == "ChildTuningAdamW":
        kw = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, reserve_p=RESERVE_P if mode == "F" else 1.0, mode=mode)
        opt = child_tuning.ChildTuningAdamW([param], gradient_mask={param: mask} if mode == "D" else None,
                                            fused=impl == "peftkern", **kw)  # fmt: skip
    else:
        opt = child_tuning.ChildTuning(torch.optim.AdamW([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD),
                                       reserve_p=RESERVE_P, mode=mode, gradient_mask={param: mask} if mode == "D" else None)  # fmt: skip
    del mask  # what the fused D path keeps is its bits

    # The unfused paths mask p.grad in place, so F rescales it by 1/p again every round (7 rounds:
    # no overflow); D re-masks an already masked gradient. Nothing else is timed.
    opt.step()  # state allocated outside the timed / measured step
    return opt.step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["peftkern", "torch AdamW+mask", "ChildTuningAdamW"])
@pytest.mark.parametrize("mode", ["D", "F"])
@pytest.mark.parametrize("size", list(SIZES))
def test_masked_adamw_step(benchmark, record, size, mode, impl, device):
    n = SIZES[size]
    step = make_step(impl, mode, n, device)
    benchmark.group = f"child-tuning {mode} step {size} fp32 {device}"

    def timed():
        step()
        sync(device)

    memory = peak_memory_mb(timed, device)
    benchmark.pedantic(timed, rounds=5, warmup_rounds=1, iterations=1)
    record(benchmark.group, impl, 28 * n + (n // 8 if mode == "D" else 0), device, memory_mb=memory)
