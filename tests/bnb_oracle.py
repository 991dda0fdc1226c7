"""bitsandbytes as a test oracle, with the same verdict on every x86-64 CPU.

bitsandbytes 0.50.2 picks its CPU kernels by machine, and two of them do not compute what its
format defines (measured; DESIGN.md, Testing):
- `dequantize_4bit` on the CPU runs bitsandbytes' native library, whose AVX-512 code (picked by
  CPUID on AVX-512 CPUs) is wrong for some shapes (rows shorter than a quantization block, or not
  a whole number of blocks, e.g. [40, 16] or [40, 96] with blocksize 64: errors of 1.5-2.0 where
  NF4's own error is 0.36); its code for other CPUs is right (measured there earlier: DESIGN.md);
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


def cpu_has_avx512() -> bool:
    """Whether this CPU has AVX-512 (CPUID, as bitsandbytes' native library decides; torch's
    ATEN_CPU_CAPABILITY override does not change what that library runs)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return " avx512f" in cpuinfo.read()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() == "AVX512"


def has_native_cpu_dequantize() -> bool:
    """Whether bitsandbytes registered its native CPU dequantize_4bit (it does wherever its CPU
    library loads; the library then picks AVX-512 or AVX2 code by CPUID)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("bitsandbytes::dequantize_4bit", "CPU")


def native_dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' native CPU NF4 dequantize (libbitsandbytes_cpu), as its CPU backend calls it,
    bypassing the pin: float32, 2-D states, the absmax already decoded."""
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

    if has_native_cpu_dequantize():  # on every machine, so that every machine runs the same oracle
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", _reference_dequantize_4bit)
        PINNED.append("dequantize_4bit -> its reference backend")
    if bnb_modules.has_avx512bf16():
        # Linear4bit reads this name at construction: no bfloat16 repacking in inference.
        bnb_modules.has_avx512bf16 = lambda: False
        PINNED.append("Linear4bit without its AVX-512-BF16 repacking")
    PINNED.append("done")


def quantize_4bit_reference(weight: torch.Tensor, blocksize: int):
    """bitsandbytes' NF4 quantization with double quantization of `weight`, by its reference
    rules: (packed, absmax codes, nested absmax, offset). The 4-bit codes and float32 absmax come
    from `quantize_4bit` itself; the 8-bit codes of the absmax from its reference backend's
    `quantize_blockwise` (its native CPU library picks a farther code for some values, see
    tests/test_nf4_bitsandbytes.py), reached by dispatching past the native kernel."""
    import bitsandbytes.functional as F

    packed, absmax = torch.ops.bitsandbytes.quantize_4bit(weight, blocksize, "nf4", torch.uint8)
    offset = absmax.mean()
    codes, nested_absmax = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        _DEFAULT_BACKEND, absmax - offset, F.create_dynamic_map(), 256
    )
    return packed, codes, nested_absmax, offset
