"""UniPELT's gates (Mao et al., ACL 2022), as AdapterHub computes them (adapters/methods:
`LoRA.forward`, `Adapter.forward`, `PrefixTuningLayer.compose_single`).

A gate is an `nn.Linear(features, outputs)` per component and layer; for an input x [batch, seq,
features] (the input of the gated layer: a LoRA layer's x, a bottleneck adapter's own input z, the
attention's hidden states for a prefix) its value is one number per sequence and output:

    G = mean over seq of σ(x·W_gᵀ + b)        [batch, outputs]

and it scales that component's contribution: LoRA's B·A·x (AdapterHub drops α/r then), the
adapter's s·up(act(down(z))), the prefix's keys (output 0) and values (output -1; one shared
output by default). The mean runs over every position the layer sees, so G is not causal: a
token's output depends on later tokens and on padding, as in AdapterHub (docs/hybrids.md).

Initialisation as AdapterHub's: W_g ~ normal(0, 0.02); the bias keeps nn.Linear's default
(LoRA, prefix) or is zero (bottleneck adapters with "bert" / "mam_adapter" init).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def new_gate(features: int, outputs: int = 1, zero_bias: bool = False, device=None, dtype=None) -> nn.Linear:
    gate = nn.Linear(features, outputs, device=device, dtype=dtype)
    with torch.no_grad():
        nn.init.normal_(gate.weight, std=0.02)
        if zero_bias:
            nn.init.zeros_(gate.bias)
    return gate


def gate_value(gate: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """mean over the sequence of σ(x·W_gᵀ + b): x [batch, seq, features] -> [batch, outputs], in
    x's dtype (the gate's parameters are cast to it, as the adapters' are)."""
    if x.dim() != 3:
        raise ValueError(f"a UniPELT gate takes hidden states [batch, seq, features], got shape {tuple(x.shape)}")
    weight, bias = gate.weight, gate.bias
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        weight, bias = weight.to(x.dtype), bias.to(x.dtype)
    return torch.sigmoid(F.linear(x, weight, bias)).mean(dim=1)
