"""Loads the compiled op library `peftkern._C` and says what it holds.

Importing `_C` registers every op as `torch.ops.peftkern.*` (CPU kernels always, CUDA kernels in a
CUDA build). Where the library is missing, or lacks a kernel for a device, the Python wrappers in
`peftkern.ops` run the op's plain-PyTorch reference instead, so the package always works.
"""

from __future__ import annotations

import json
import warnings

import torch

try:
    from . import _C  # noqa: F401  (loading it registers the ops)

    _LOAD_ERROR: Exception | None = None
except ImportError as error:  # no compiled library: a source checkout that was never built
    _C = None
    _LOAD_ERROR = error

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def available() -> bool:
    """True when the compiled op library loaded."""
    return _C is not None


def load_error() -> Exception | None:
    """Why the compiled library did not load (None when it did)."""
    return _LOAD_ERROR


def _kernels_by_device() -> dict[str, frozenset[str]]:
    # Read once at import: a plain set lookup is all torch.compile has to trace later.
    if _C is None:
        return {}
    kernels = {}
    for device_type, key in _DISPATCH_KEYS.items():
        names = torch._C._dispatch_get_registrations_for_dispatch_key(key)
        kernels[device_type] = frozenset(n.split("::", 1)[1] for n in names if n.startswith("peftkern::"))
    return kernels


_KERNELS = _kernels_by_device()


def has_kernel(op: str, device_type: str) -> bool:
    """True when `torch.ops.peftkern.<op>` has a compiled kernel for `device_type` ("cpu"/"cuda")."""
    return op in _KERNELS.get(device_type, ())


def op_exists(op: str) -> bool:
    """True when the loaded library declares `peftkern::<op>` (an older build may not)."""
    if _C is None:
        return False
    try:
        getattr(torch.ops.peftkern, op)
    except (AttributeError, RuntimeError):
        return False
    return True


def _devices(values) -> set[torch.device]:
    devices = set()
    for value in values:
        if isinstance(value, torch.Tensor):
            devices.add(value.device)
        elif isinstance(value, (list, tuple)):
            devices |= _devices(value)
    return devices


def register_fake(op: str):
    """torch.library.register_fake for `peftkern::<op>` when the library declares it; otherwise
    (no library, or one built before the op existed) a no-op, and the op's wrapper runs the
    reference. The fake refuses tensors on several devices: a real call that mixes meta tensors
    with CPU ones is dispatched to the fake, which would otherwise return uninitialised memory."""
    if not op_exists(op):
        return lambda fn: fn

    def register(fn):
        def fake(*args, **kwargs):
            devices = _devices((*args, *kwargs.values()))
            if len(devices) > 1:
                raise ValueError(f"peftkern::{op}: every tensor must be on one device, got "
                                 f"{', '.join(sorted(map(str, devices)))}")  # fmt: skip
            return fn(*args, **kwargs)

        torch.library.register_fake(f"peftkern::{op}")(fake)
        return fn

    return register


def has_cuda_kernels() -> bool:
    """True when this build compiled the CUDA kernels (whether or not a GPU is visible now)."""
    return has_kernel("nf4_dequantize", "cuda")


def build_info() -> dict:
    """What was built: CUDA version and archs (None / "" for a CPU-only build), the torch it was
    compiled against, the compiler; plus what is running now."""
    info = {"extension": available(), "cuda_kernels": has_cuda_kernels(), "torch_runtime": torch.__version__}
    if _C is None:
        info["load_error"] = str(_LOAD_ERROR)
        return info
    info.update(json.loads(torch.ops.peftkern.build_info()))
    if info.get("torch") and info["torch"] != torch.__version__:
        warnings.warn(
            f"peftkern was compiled against torch {info['torch']} but torch {torch.__version__} is "
            "running; rebuild peftkern (pip install --no-build-isolation -e .)",
            stacklevel=2,
        )
    return info


def set_poison_outputs(enabled: bool) -> None:
    """Debug aid: fill every output the compiled ops allocate with NaN / 0xA5 before the kernel
    writes it, so an unwritten element is caught. Off by default (it costs a memset)."""
    if _C is not None:
        torch.ops.peftkern.set_poison_outputs(enabled)


def cpu_isa() -> str:
    """The SIMD path the CPU NF4 decode and QLoRA GEMV kernels take now: "scalar", "avx2" or
    "avx512" (chosen once from cpuid, or forced by PEFTKERN_CPU_ISA; DESIGN.md "CPU ISA dispatch")."""
    return torch.ops.peftkern.cpu_isa() if _C is not None else "scalar"


def set_cpu_isa(isa: str) -> None:
    """Forces a CPU SIMD path for this process; raises RuntimeError (naming what the CPU supports) for
    an unknown ISA or one this CPU lacks."""
    if _C is None:
        raise RuntimeError(f"peftkern's op library is not loaded: {_LOAD_ERROR}")
    torch.ops.peftkern.set_cpu_isa(isa)


def supported_cpu_isas() -> list[str]:
    """Every CPU SIMD path this machine (and build) can run, scalar first."""
    return list(torch.ops.peftkern.cpu_isas_supported()) if _C is not None else ["scalar"]
