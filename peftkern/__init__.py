"""peftkern: fused CPU/CUDA kernels for parameter-efficient fine-tuning of Hugging Face models.

Ops live in `torch.ops.peftkern.*` (compiled, csrc/) with plain-PyTorch references in
`peftkern.ops`; this module is the public API.
"""

from ._ext import build_info, has_cuda_kernels
from .nf4 import NestedAbsmax, NF4Weight, nf4_dequantize, nf4_quantize

__version__ = "0.1.0"

__all__ = [
    "NF4Weight",
    "NestedAbsmax",
    "build_info",
    "has_cuda_kernels",
    "nf4_dequantize",
    "nf4_quantize",
]
