"""Deprecated alias of `peftkern.multi_adapter` (renamed: "adapters" read as the bottleneck
adapters of `peftkern.ops.adapter`). The functions are `peftkern.add_adapter`, ... as before."""

import warnings

from .multi_adapter import active_adapter, add_adapter, delete_adapter, disable_adapter, list_adapters, set_adapter

warnings.warn("peftkern.adapters is renamed peftkern.multi_adapter (the functions are also peftkern.add_adapter, ...)",
              DeprecationWarning, stacklevel=2)  # fmt: skip

__all__ = ["active_adapter", "add_adapter", "delete_adapter", "disable_adapter", "list_adapters", "set_adapter"]
