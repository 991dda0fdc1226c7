"""The cache layer of UniPELT's gated prefix (methods/prefix.py), apart so that peftkern imports
without transformers."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class GatedPrefixLayer(DynamicLayer):
    """A cache layer holding the prefix keys/values [1, kv_heads, P, head_dim] apart from the real
    ones: `update` stores the real keys as DynamicLayer does and returns (G_k·prefix ‖ keys,
    G_v·prefix ‖ values), G [batch, outputs] set by the attention's pre-hook for this call. Its
    length counts the prefix, as a pre-filled layer's does, so masks and positions are PEFT's."""

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor):
        super().__init__()
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.gate = None

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        gate, self.gate = self.gate, None
        if gate is None:
            raise RuntimeError("gated prefix: the attention ran without its gate (was the module's forward pre-hook removed?)")
        batch, gate = keys.shape[0], gate.to(keys.dtype)
        prefix_keys = self.prefix_keys.expand(batch, -1, -1, -1) * gate[:, 0].view(-1, 1, 1, 1)
        prefix_values = self.prefix_values.expand(batch, -1, -1, -1) * gate[:, -1].view(-1, 1, 1, 1)
        return torch.cat((prefix_keys, keys), dim=-2), torch.cat((prefix_values, values), dim=-2)

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.prefix_keys.shape[-2]
