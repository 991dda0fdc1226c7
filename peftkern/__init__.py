"""peftkern: fused CPU/CUDA kernels for parameter-efficient fine-tuning of Hugging Face models.

Ops live in `torch.ops.peftkern.*` (compiled, csrc/) with plain-PyTorch references in
`peftkern.ops`; this module is the public API.
"""

from ._ext import build_info, cpu_isa, has_cuda_kernels, set_cpu_isa, supported_cpu_isas
from .multi_adapter import active_adapter, add_adapter, delete_adapter, disable_adapter, list_adapters, set_adapter
from .io import save_adapter
from .load import load_adapter
from .methods.adalora import AdaLoraConfig, update_and_allocate
from .methods.bitfit import BitFitConfig
from .methods.bottleneck import BnConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from .methods.ia3 import IA3Config
from .methods.lora import LoraConfig
from .methods.prefix import PrefixTuningConfig
from .methods.prompt import PromptTuningConfig
from .methods.union import ConfigUnion, MAMConfig, UniPELTConfig
from .methods.vera import VeraConfig
from .nf4 import NestedAbsmax, NF4Linear, NF4Weight, nf4_dequantize, nf4_quantize
from .patch import merge, merge_and_unload, patch, print_trainable_parameters, unmerge, unpatch
from .proxy import proxy_generate
from . import child_tuning, relora

__version__ = "0.1.0"



def __getattr__(name):
    if name == "AdaLoraCallback":  # a transformers TrainerCallback: transformers is imported only when asked for
        from .methods.adalora import make_trainer_callback

        return make_trainer_callback()
    if name == "ReLoRACallback":
        return relora.make_trainer_callback()
    raise AttributeError(f"module 'peftkern' has no attribute {name!r}")


__all__ = [
    "AdaLoraCallback",
    "AdaLoraConfig",
    "IA3Config",
    "active_adapter",
    "add_adapter",
    "delete_adapter",
    "disable_adapter",
    "list_adapters",
    "set_adapter",
    "BitFitConfig",
    "child_tuning",
    "ReLoRACallback",
    "relora",
    "BnConfig",
    "ConfigUnion",
    "DoubleSeqBnConfig",
    "ParBnConfig",
    "SeqBnConfig",
    "LoraConfig",
    "MAMConfig",
    "UniPELTConfig",
    "NF4Linear",
    "NF4Weight",
    "NestedAbsmax",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "build_info",
    "cpu_isa",
    "has_cuda_kernels",
    "load_adapter",
    "nf4_dequantize",
    "merge",
    "merge_and_unload",
    "nf4_quantize",
    "patch",
    "print_trainable_parameters",
    "proxy_generate",
    "save_adapter",
    "set_cpu_isa",
    "supported_cpu_isas",
    "unmerge",
    "unpatch",
    "update_and_allocate",
    "VeraConfig",
]
