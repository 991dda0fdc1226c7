"""bitsandbytes as a test oracle, with the same verdict on every x86-64 CPU.

bitsandbytes 0.50.2 picks its CPU kernels by machine, and two of them do not compute what its
format defines (measured, see DESIGN.md "Testing against bitsandbytes"):
- on CPUs where torch reports the AVX512 capability, `dequantize_4bit` runs a native kernel that
  is wrong for some shapes (rows shorter than a quantization block, or not a whole number of
  blocks, e.g. [40, 16] or [40, 96] with blocksize 64: errors of 1.5-2.0 where NF4's own error is
  0.36); on other CPUs it runs its reference backend, which is right;
- on AVX-512-BF16 CPUs, `Linear4bit` in inference repacks its weight for a bfloat16 kernel
  (`packing_format_for_cpu`), which differs from `x·deq(W)ᵀ` by up to 0.17 on a SmolLM2 layer.

`pin_to_reference()` (called by tests/conftest.py for the whole session) makes bitsandbytes take
its reference path on every machine: `dequantize_4bit` on the CPU redispatches to bitsandbytes'
own default (pure PyTorch) implementation, and `Linear4bit` does not repack. The oracle is still
bitsandbytes' code, only never the machine-specific kernels; `native_dequantize_4bit` keeps the
native kernel reachable, so that a test pins the defect and says when a release fixes it.
"""

from __future__ import annotations

import torch

_DEFAULT_BACKEND = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
PINNED: list[str] = []  # what pin_to_reference changed on this machine, for the session header


def machine_takes_native_dequantize() -> bool:
    """Whether bitsandbytes' CPU backend picks its native dequantize_4bit here (AVX512 machines)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def native_dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' native CPU NF4 dequantize (libbitsandbytes_cpu), as its CPU backend calls it
    on AVX512 machines, bypassing the pin: float32, 2-D states, the absmax already decoded."""
    import ctypes

    from bitsandbytes.cextension import lib
    from bitsandbytes.functional import dequantize_blockwise, get_ptr

    absmax = state.absmax
    if state.nested:
        absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
    rows, cols = state.shape
    out = torch.empty(state.shape, dtype=torch.float32)
    lib.cdequantize_blockwise_cpu_nf4_fp32(get_ptr(packed.view(torch.uint8).reshape(rows, cols // 2)),
                                           get_ptr(absmax.float().contiguous()), get_ptr(out),
                                           ctypes.c_longlong(state.blocksize), ctypes.c_longlong(rows),
                                           ctypes.c_longlong(cols))  # fmt: skip
    return out


def _reference_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    return torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
        _DEFAULT_BACKEND, A, absmax, blocksize, quant_type, shape, dtype
    )


def pin_to_reference() -> None:
    """Make bitsandbytes compute by its format's definition on this machine (idempotent)."""
    if PINNED:
        return
    import bitsandbytes  # noqa: F401  (registers its kernels)
    import bitsandbytes.nn.modules as bnb_modules

    if machine_takes_native_dequantize():
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", _reference_dequantize_4bit)
        PINNED.append("dequantize_4bit -> its reference backend (this CPU has AVX512)")
    if bnb_modules.has_avx512bf16():
        # Linear4bit reads this name at construction: no bfloat16 repacking in inference.
        bnb_modules.has_avx512bf16 = lambda: False
        PINNED.append("Linear4bit without its AVX-512-BF16 repacking")
    PINNED.append("done")
