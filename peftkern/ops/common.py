"""What every op family's Python face shares: autocast casting and the accumulation dtype."""

from __future__ import annotations

import torch


def autocast_inputs(*tensors):
    """Under torch.autocast, the floating tensors cast to the autocast dtype, as autocast does for
    F.linear (our ops are not on autocast's list, and would otherwise see mixed dtypes); None
    entries and non-floating tensors pass through. Without autocast: the tensors as they are."""
    device_type = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype references accumulate in for inputs of `dtype` (csrc/common/accumulate.h):
    float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
