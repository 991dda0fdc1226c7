"""Grouped (mixed-adapter) inference ops, punica / S-LoRA style: one call per layer serves a batch
whose rows belong to different adapters, with no Python loop over the adapters. The plain-PyTorch
references (the spec), fakes, the autograd formulas of the compiled ops and the wrappers
`lora_grouped` and `ia3_grouped_scale` that layers call.

Every row t has an adapter index row_adapter[t] in [-1, G): -1 means none (the base output
alone, PEFT's "__base__"), g selects the g-th of G adapters.

    lora_grouped:      out[t] = base_out[t] + scaling[g]·(x[t]·A[g]ᵀ)·B[g]ᵀ
    ia3_grouped_scale: out[t] = t[t] ⊙ l[g]

LoRA adapters are passed as lists, each adapter's weights as nn.Linear holds them: lora_a[g] =
lora_A [r_g, K], lora_b[g] = lora_B [N, r_g] (ranks may differ, 0 allowed), scaling[g] a float
(alpha / r_g, or alpha / sqrt(r_g) for rsLoRA). Nothing is stacked, padded or transposed per call,
and no cache is needed (so none can go stale). All adapter tensors share one dtype: the
activations' or float32 (PEFT keeps adapters in float32 on a half model). IA³ vectors stack as
scales [G, F] in float32 (float64 for float64 activations).

Precision: sums accumulate in float32 (float64 for float64) and each output is rounded once to the
activation dtype.

These are inference paths; their gradients (for base_out, x and every lora_a[g], lora_b[g]; for t
and scales) are correct but computed in plain PyTorch, not tuned: the LoRA backward runs every
adapter's GEMMs over every row (see lora_grouped_grads), which keeps it free of host syncs and
traceable by torch.compile.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ext
from .common import acc_dtype, autocast_inputs

# --------------------------------------------------------------------------------------------
# References: the spec (autograd through plain PyTorch ops gives their gradients).
# --------------------------------------------------------------------------------------------


def _row_weight(row_adapter, g: int, scale: float, acc: torch.dtype) -> torch.Tensor:
    """[T, 1]: scale on the rows of adapter g, 0 elsewhere (rows of -1 included)."""
    return (row_adapter == g).to(acc)[:, None] * scale


def lora_grouped_reference(base_out, x, lora_a, lora_b, scaling, row_adapter) -> torch.Tensor:
    """base_out [T, N], x [T, K], lora_a G x [r_g, K], lora_b G x [N, r_g], scaling G floats,
    row_adapter [T] in [-1, G). Written without grouping the rows: each adapter's LoRA runs over
    every row, masked to its own rows (with the scaling) between the two GEMMs; a row gets its
    adapter's term plus exact zeros from the others. G times the FLOPs of grouping, no host sync,
    fine for a spec and a fallback. A value outside [-1, G) selects no adapter here; the compiled
    ops refuse it (CPU)."""
    acc = acc_dtype(x.dtype)
    xs, ra = x.to(acc), row_adapter.long()
    out = base_out.to(acc)
    for g, (a, b, scale) in enumerate(zip(lora_a, lora_b, scaling)):
        xa = (xs @ a.to(acc).t()) * _row_weight(ra, g, scale, acc)
        out = out + xa @ b.to(acc).t()
    return out.to(base_out.dtype)


def ia3_grouped_scale_reference(t, scales, row_adapter) -> torch.Tensor:
    """t [T, F], scales [G, F], row_adapter [T] in [-1, G): each row times its adapter's vector,
    in float32 (float64 for float64 t), rounded once; a row without an adapter is multiplied by 1
    (exact: it comes back unchanged). Values outside [-1, G) are not checked here (-2 would wrap
    to the last adapter); the compiled CPU op refuses them."""
    acc = acc_dtype(t.dtype)
    table = torch.cat([torch.ones(1, t.shape[1], dtype=acc, device=t.device), scales.to(acc)])  # row 0: none
    return (t.to(acc) * table[row_adapter.long() + 1]).to(t.dtype)


# --------------------------------------------------------------------------------------------
# Fakes and autograd for the compiled ops.
# --------------------------------------------------------------------------------------------


@_ext.register_fake("lora_grouped_fwd")
def _(base_out, x, lora_a, lora_b, scaling, row_adapter):
    return base_out.new_empty((x.shape[0], base_out.shape[1]))


@_ext.register_fake("ia3_grouped_scale")
def _(t, scales, row_adapter):
    return t.new_empty(t.shape)


def lora_grouped_grads(grad_out, x, lora_a, lora_b, scaling, row_adapter, needs_x=True, needs_a=None, needs_b=None):
    """Gradients of lora_grouped_fwd for x (None unless needs_x) and each lora_a[g], lora_b[g]
    (lists; None where needs_a[g] / needs_b[g] is False, all needed when those are None),
    computed in float32 (float64) as the reference's formula differentiates: with w_g[t] =
    scaling[g] on adapter g's rows and 0 elsewhere, dxa_g = w_g·dy·B[g], dx = Σ_g dxa_g·A[g],
    dA[g] = dxa_gᵀ·x, dB[g] = dyᵀ·(w_g·x·A[g]ᵀ). Every adapter's GEMMs run over every row (G
    times the FLOPs of grouping the rows first) but nothing depends on the VALUES of row_adapter:
    no host sync, and torch.compile / opcheck can trace it. Rows without an adapter get dx = 0.
    Each gradient comes back in its input's dtype."""
    acc = acc_dtype(x.dtype)
    adapters = len(lora_a)
    needs_a = [True] * adapters if needs_a is None else needs_a
    needs_b = [True] * adapters if needs_b is None else needs_b
    dy, xs, ra = grad_out.to(acc), x.to(acc), row_adapter.long()
    grad_x = torch.zeros_like(xs) if needs_x else None
    grads_a, grads_b = [], []
    for g, (a, b, scale) in enumerate(zip(lora_a, lora_b, scaling)):
        weight = _row_weight(ra, g, scale, acc)
        a_acc, b_acc = a.to(acc), b.to(acc)
        dxa = (dy @ b_acc) * weight if needs_x or needs_a[g] else None  # [T, r_g]
        if needs_x:
            grad_x = grad_x + dxa @ a_acc
        grads_a.append((dxa.t() @ xs).to(a.dtype) if needs_a[g] else None)
        grads_b.append((dy.t() @ ((xs @ a_acc.t()) * weight)).to(b.dtype) if needs_b[g] else None)
    return (grad_x.to(x.dtype) if needs_x else None), grads_a, grads_b


def _lora_setup(ctx, inputs, output):
    base_out, x, lora_a, lora_b, scaling, row_adapter = inputs
    ctx.adapters, ctx.scaling = len(lora_a), list(scaling)
    ctx.save_for_backward(x, row_adapter, *lora_a, *lora_b)


def _lora_backward(ctx, grad_out):
    """One gradient per input, lists for the Tensor[] inputs (register_autograd checks the
    structure): needs_input_grad holds a list of bools for each of them; scaling (floats) gets
    None, or [] when empty (an empty list is a list node, not a leaf, to torch's pytree)."""
    x, row_adapter, *adapter_tensors = ctx.saved_tensors
    lora_a, lora_b = adapter_tensors[: ctx.adapters], adapter_tensors[ctx.adapters :]
    needs_base, needs_x, needs_a, needs_b = ctx.needs_input_grad[:4]
    grad_x, grads_a, grads_b = lora_grouped_grads(
        grad_out, x, lora_a, lora_b, ctx.scaling, row_adapter, needs_x, needs_a, needs_b
    )
    grad_scaling = [] if ctx.adapters == 0 else None
    return grad_out if needs_base else None, grad_x, grads_a, grads_b, grad_scaling, None


def _ia3_setup(ctx, inputs, output):
    t, scales, row_adapter = inputs
    ctx.save_for_backward(t if scales.requires_grad else None, scales, row_adapter)


def _ia3_backward(ctx, grad_out):
    t, scales, row_adapter = ctx.saved_tensors
    needs = ctx.needs_input_grad
    # d t = dy ⊙ l[g]: the forward op itself, applied to dy (same rounding, rows -1 pass through).
    grad_t = torch.ops.peftkern.ia3_grouped_scale(grad_out, scales, row_adapter) if needs[0] else None
    grad_scales = None
    if needs[1]:  # d l[g] = Σ_{rows of g} dy ⊙ t; row 0 of the sum collects the rows without an adapter
        acc = scales.dtype
        products = grad_out.to(acc) * t.to(acc)
        sums = torch.zeros((scales.shape[0] + 1, scales.shape[1]), dtype=acc, device=scales.device)
        grad_scales = sums.index_add_(0, row_adapter.long() + 1, products)[1:]
    return grad_t, grad_scales, None


if _ext.op_exists("lora_grouped_fwd"):
    torch.library.register_autograd("peftkern::lora_grouped_fwd", _lora_backward, setup_context=_lora_setup)
    torch.library.register_autograd("peftkern::ia3_grouped_scale", _ia3_backward, setup_context=_ia3_setup)


# --------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------


def _row_adapter(op: str, row_adapter, rows: int, device) -> torch.Tensor:
    """row_adapter as the ops take it: int32, 1-D, one entry per row (any integer dtype or shape
    with `rows` elements is accepted and converted)."""
    if not isinstance(row_adapter, torch.Tensor):
        row_adapter = torch.as_tensor(row_adapter, dtype=torch.int64, device=device)
    if row_adapter.is_floating_point() or row_adapter.is_complex() or row_adapter.dtype == torch.bool:
        raise TypeError(f"{op}: row_adapter must be an integer tensor, got {row_adapter.dtype}")
    if row_adapter.numel() != rows:
        raise ValueError(f"{op}: row_adapter has {row_adapter.numel()} entries, expected one per row ({rows})")
    if row_adapter.device != device:
        raise ValueError(f"{op}: row_adapter is on {row_adapter.device} but the activations are on {device}")
    narrowed = row_adapter.reshape(-1).to(torch.int32)
    if row_adapter.dtype != torch.int32 and not torch.equal(narrowed.to(row_adapter.dtype), row_adapter.reshape(-1)):
        # int64 2**32 would wrap to 0 and select adapter 0: refuse instead (costs a sync; the layers pass int32)
        raise ValueError(f"{op}: row_adapter holds values outside int32 (adapter indices are -1 .. adapters - 1)")
    return narrowed


def lora_grouped(
    base_out: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scaling: Sequence[float],
    row_adapter,
) -> torch.Tensor:
    """`base_out + scaling[g]·(x·A[g]ᵀ)·B[g]ᵀ` row by row, g = row_adapter of the row (-1: none),
    over any leading dims: base_out [..., N], x [..., K] with the same leading dims, lora_a[g]
    [r_g, K] and lora_b[g] [N, r_g] (the adapters' nn.Linear weights, one dtype for all: x's or
    float32), scaling[g] floats, row_adapter with one entry per row (integers). Under autocast the
    activations are cast to the autocast dtype; float32 adapters stay float32 (others are cast
    too). Returns a new tensor shaped like base_out; base_out is not modified."""
    op = "lora_grouped"
    if x.dim() == 0 or base_out.dim() == 0 or x.shape[:-1] != base_out.shape[:-1]:
        raise ValueError(f"{op}: base_out {tuple(base_out.shape)} and x {tuple(x.shape)} must share their leading dims")
    lora_a, lora_b, scaling = list(lora_a), list(lora_b), [float(s) for s in scaling]
    if not len(lora_a) == len(lora_b) == len(scaling):
        raise ValueError(
            f"{op}: lora_a has {len(lora_a)} tensors, lora_b {len(lora_b)} and scaling {len(scaling)} "
            "values (one each per adapter)"
        )
    k, n = x.shape[-1], base_out.shape[-1]
    for g, (a, b) in enumerate(zip(lora_a, lora_b)):
        if a.dim() != 2 or a.shape[1] != k:
            raise ValueError(f"{op}: lora_a[{g}] has shape {tuple(a.shape)}, expected [rank, {k}]")
        if tuple(b.shape) != (n, a.shape[0]):
            raise ValueError(f"{op}: lora_b[{g}] has shape {tuple(b.shape)}, expected [{n}, {a.shape[0]}] (lora_B)")
    base_out, x = autocast_inputs(base_out, x)
    if torch.is_autocast_enabled(x.device.type):  # the op takes one adapter dtype: x's (autocast's) or float32
        dtypes = {t.dtype for t in (*lora_a, *lora_b)}
        if len(dtypes) > 1 or not dtypes <= {x.dtype, torch.float32}:
            lora_a, lora_b = [t.to(x.dtype) for t in lora_a], [t.to(x.dtype) for t in lora_b]
    base2, x2 = base_out.reshape(-1, n), x.reshape(-1, k)
    row_adapter = _row_adapter(op, row_adapter, x2.shape[0], x.device)
    if _ext.has_kernel("lora_grouped_fwd", x.device.type):
        out = torch.ops.peftkern.lora_grouped_fwd(base2, x2, lora_a, lora_b, scaling, row_adapter)
    else:
        out = lora_grouped_reference(base2, x2, lora_a, lora_b, scaling, row_adapter)
    return out.view(base_out.shape)


def ia3_grouped_scale(t, scales, row_adapter) -> torch.Tensor:
    """`t ⊙ scales[g]` row by row, g = row_adapter of the row (-1: the row unchanged), over any
    leading dims of t [..., F]; scales [G, F] (read in float32, float64 for float64 t; the
    gradient comes back in scales' dtype), row_adapter with one entry per row. A new tensor."""
    op = "ia3_grouped_scale"
    if t.dim() == 0:
        raise ValueError(f"{op}: t must have a feature dim, got a 0-d tensor")
    if scales.dim() != 2 or scales.shape[1] != t.shape[-1]:
        raise ValueError(f"{op}: scales has shape {tuple(scales.shape)}, expected [adapters, {t.shape[-1]}]")
    (t,) = autocast_inputs(t)
    t2 = t.reshape(-1, t.shape[-1])
    row_adapter = _row_adapter(op, row_adapter, t2.shape[0], t.device)
    if _ext.has_kernel("ia3_grouped_scale", t.device.type):
        out = torch.ops.peftkern.ia3_grouped_scale(t2, scales.to(acc_dtype(t.dtype)), row_adapter)
    else:
        out = ia3_grouped_scale_reference(t2, scales, row_adapter)
    return out.view(t.shape)
