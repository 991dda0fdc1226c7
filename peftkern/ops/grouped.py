"""Grouped (mixed-adapter) inference ops, punica / S-LoRA style: one call per layer serves a batch
whose rows belong to different adapters, with no Python loop over the adapters. The plain-PyTorch
references (the spec), fakes, the autograd formulas of the compiled ops and the wrappers
`lora_grouped` and `ia3_grouped_scale` that layers call.

Every row t has an adapter index row_adapter[t] in [-1, G): -1 means none (the base output
alone, PEFT's "__base__"), g selects the g-th of G stacked adapters.

    lora_grouped:      out[t] = base_out[t] + scaling[g]·(x[t]·A[g]ᵀ)·B[g]ᵀ
    ia3_grouped_scale: out[t] = t[t] ⊙ l[g]

Stacked layouts: lora_a [G, R, K] holds each adapter's lora_A weight [r_g, K] in its first r_g
rows; lora_b_t [G, R, N] holds each lora_B weight [N, r_g] TRANSPOSED in its first r_g rows (so
the kernels read it along N, coalesced); the unused rank rows are zero, so adapters of different
ranks share one R = max r_g. scaling is float32 [G] (alpha / r_g, or alpha / sqrt(r_g) for
rsLoRA). IA³ vectors stack as scales [G, F] in float32 (float64 for float64 activations).

Precision: sums accumulate in float32 (float64 for float64) and each output is rounded once to the
activation dtype.

These are inference paths; their gradients (for base_out, x, lora_a and lora_b_t; for t and
scales) are correct but computed in plain PyTorch, not tuned: the LoRA backward runs every
adapter's GEMMs over every row (see lora_grouped_grads), which keeps it free of host syncs and
traceable by torch.compile.
"""

from __future__ import annotations

import torch

from .. import _ext

# --------------------------------------------------------------------------------------------
# References: the spec (autograd through plain PyTorch ops gives their gradients).
# --------------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_weights(row_adapter, scaling, adapters: int, acc: torch.dtype) -> torch.Tensor:
    """[T, G]: scaling[g] where g is the row's adapter, 0 elsewhere (a row of -1 is all 0)."""
    one_hot = row_adapter.long()[:, None] == torch.arange(adapters, device=row_adapter.device)
    return one_hot.to(acc) * scaling.to(acc)


def lora_grouped_reference(base_out, x, lora_a, lora_b_t, scaling, row_adapter) -> torch.Tensor:
    """base_out [T, N], x [T, K], lora_a [G, R, K], lora_b_t [G, R, N], scaling [G], row_adapter
    [T] in [-1, G). Written without grouping the rows: every row is multiplied by every adapter's
    A (x·[A_0; ...; A_{G-1}]ᵀ, [T, G·R]), the blocks of the other adapters are zeroed by a one-hot
    row mask that also carries the scaling, and one GEMM with the stacked B_t adds the row's own
    adapter. G times the FLOPs of the shrink step (a rank-G·R LoRA), fine for a spec and a
    fallback. A value outside [-1, G) selects no adapter here; the compiled ops refuse it (CPU)."""
    acc = _acc(x.dtype)
    rows, k = x.shape
    adapters, rank, n = lora_b_t.shape
    weights = _row_weights(row_adapter, scaling, adapters, acc)
    xa = (x.to(acc) @ lora_a.to(acc).reshape(adapters * rank, k).t()).view(rows, adapters, rank)
    xa = (xa * weights[:, :, None]).reshape(rows, adapters * rank)
    return (base_out.to(acc) + xa @ lora_b_t.to(acc).reshape(adapters * rank, n)).to(base_out.dtype)


def ia3_grouped_scale_reference(t, scales, row_adapter) -> torch.Tensor:
    """t [T, F], scales [G, F], row_adapter [T] in [-1, G): each row times its adapter's vector,
    in float32 (float64 for float64 t), rounded once; a row without an adapter is multiplied by 1
    (exact: it comes back unchanged). Values outside [-1, G) are not checked here (-2 would wrap
    to the last adapter); the compiled CPU op refuses them."""
    acc = _acc(t.dtype)
    table = torch.cat([torch.ones(1, t.shape[1], dtype=acc, device=t.device), scales.to(acc)])  # row 0: none
    return (t.to(acc) * table[row_adapter.long() + 1]).to(t.dtype)


# --------------------------------------------------------------------------------------------
# Fakes and autograd for the compiled ops.
# --------------------------------------------------------------------------------------------


@_ext.register_fake("lora_grouped_fwd")
def _(base_out, x, lora_a, lora_b_t, scaling, row_adapter):
    return base_out.new_empty((x.shape[0], base_out.shape[1]))


@_ext.register_fake("ia3_grouped_scale")
def _(t, scales, row_adapter):
    return t.new_empty(t.shape)


def lora_grouped_grads(grad_out, x, lora_a, lora_b_t, scaling, row_adapter, needs=(True, True, True)):
    """Gradients of lora_grouped_fwd for x, lora_a, lora_b_t (None where `needs` is False), in
    float32 (float64), as the reference's formula differentiates: with w[t, g] = scaling[g] on row
    t's own adapter and 0 elsewhere, dxa[t, g] = w[t, g]·dy[t]·B_t[g]ᵀ, then dx = Σ_g dxa[:, g]·A[g],
    dA[g] = dxa[:, g]ᵀ·x, dB_t[g] = (w[:, g]·x·A[g]ᵀ)ᵀ·dy. Every adapter's GEMMs run over every row
    (G times the FLOPs of grouping the rows first) but nothing depends on the VALUES of row_adapter:
    no host sync, and torch.compile / opcheck can trace it. Rows without an adapter get dx = 0."""
    acc = _acc(x.dtype)
    rows, k = x.shape
    adapters, rank, n = lora_b_t.shape
    weights = _row_weights(row_adapter, scaling, adapters, acc)[:, :, None]  # [T, G, 1]
    dy, xs = grad_out.to(acc), x.to(acc)
    a_flat, bt_flat = lora_a.to(acc).reshape(adapters * rank, k), lora_b_t.to(acc).reshape(adapters * rank, n)
    dxa = ((dy @ bt_flat.t()).view(rows, adapters, rank) * weights).reshape(rows, adapters * rank)
    grad_x = (dxa @ a_flat).to(x.dtype) if needs[0] else None
    grad_a = (dxa.t() @ xs).view(adapters, rank, k).to(lora_a.dtype) if needs[1] else None
    grad_bt = None
    if needs[2]:
        xa = ((xs @ a_flat.t()).view(rows, adapters, rank) * weights).reshape(rows, adapters * rank)
        grad_bt = (xa.t() @ dy).view(adapters, rank, n).to(lora_b_t.dtype)
    return grad_x, grad_a, grad_bt


def _lora_setup(ctx, inputs, output):
    base_out, x, lora_a, lora_b_t, scaling, row_adapter = inputs
    ctx.save_for_backward(x, lora_a, lora_b_t, scaling, row_adapter)


def _lora_backward(ctx, grad_out):
    x, lora_a, lora_b_t, scaling, row_adapter = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = lora_grouped_grads(grad_out, x, lora_a, lora_b_t, scaling, row_adapter, needs[1:4])
    return grad_out if needs[0] else None, *grads, None, None


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


def _autocast(*tensors):
    """Under torch.autocast, cast the floating activations and weights to the autocast dtype, as
    autocast does for F.linear (our ops are not on autocast's list)."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def _row_adapter(op: str, row_adapter, rows: int, device) -> torch.Tensor:
    """row_adapter as the ops take it: int32, 1-D, one entry per row (any integer dtype or shape
    with `rows` elements is accepted and converted)."""
    if not isinstance(row_adapter, torch.Tensor):
        row_adapter = torch.as_tensor(row_adapter, dtype=torch.int32, device=device)
    if row_adapter.is_floating_point() or row_adapter.is_complex() or row_adapter.dtype == torch.bool:
        raise TypeError(f"{op}: row_adapter must be an integer tensor, got {row_adapter.dtype}")
    if row_adapter.numel() != rows:
        raise ValueError(f"{op}: row_adapter has {row_adapter.numel()} entries, expected one per row ({rows})")
    if row_adapter.device != device:
        raise ValueError(f"{op}: row_adapter is on {row_adapter.device} but the activations are on {device}")
    return row_adapter.reshape(-1).to(torch.int32)


def lora_grouped(base_out, x, lora_a, lora_b_t, scaling, row_adapter) -> torch.Tensor:
    """`base_out + scaling[g]·(x·A[g]ᵀ)·B_t[g]` row by row, g = row_adapter of the row (-1: none),
    over any leading dims: base_out [..., N], x [..., K] with the same leading dims, lora_a
    [G, R, K], lora_b_t [G, R, N] (see the module docstring), scaling [G] (a tensor or a sequence
    of floats; read as float32), row_adapter with one entry per row (integers). Returns a new
    tensor shaped like base_out; base_out is not modified."""
    op = "lora_grouped"
    if x.dim() == 0 or base_out.dim() == 0 or x.shape[:-1] != base_out.shape[:-1]:
        raise ValueError(f"{op}: base_out {tuple(base_out.shape)} and x {tuple(x.shape)} must share their leading dims")
    k, n = x.shape[-1], base_out.shape[-1]
    if lora_a.dim() != 3 or lora_a.shape[2] != k:
        raise ValueError(f"{op}: lora_a has shape {tuple(lora_a.shape)}, expected [adapters, rank, {k}]")
    if tuple(lora_b_t.shape) != (lora_a.shape[0], lora_a.shape[1], n):
        expected = f"[{lora_a.shape[0]}, {lora_a.shape[1]}, {n}]"
        shape = tuple(lora_b_t.shape)
        raise ValueError(f"{op}: lora_b_t has shape {shape}, expected {expected} (lora_B stacked, transposed)")
    if not isinstance(scaling, torch.Tensor):
        scaling = torch.tensor(scaling, dtype=torch.float32, device=x.device)
    scaling = scaling.reshape(-1).to(torch.float32)
    if scaling.numel() != lora_a.shape[0]:
        raise ValueError(f"{op}: scaling has {scaling.numel()} entries, expected one per adapter ({lora_a.shape[0]})")
    base_out, x, lora_a, lora_b_t = _autocast(base_out, x, lora_a, lora_b_t)
    base2, x2 = base_out.reshape(-1, n), x.reshape(-1, k)
    row_adapter = _row_adapter(op, row_adapter, x2.shape[0], x.device)
    if _ext.has_kernel("lora_grouped_fwd", x.device.type):
        out = torch.ops.peftkern.lora_grouped_fwd(base2, x2, lora_a, lora_b_t, scaling, row_adapter)
    else:
        out = lora_grouped_reference(base2, x2, lora_a, lora_b_t, scaling, row_adapter)
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
    (t,) = _autocast(t)
    t2 = t.reshape(-1, t.shape[-1])
    row_adapter = _row_adapter(op, row_adapter, t2.shape[0], t.device)
    if _ext.has_kernel("ia3_grouped_scale", t.device.type):
        out = torch.ops.peftkern.ia3_grouped_scale(t2, scales.to(_acc(t.dtype)), row_adapter)
    else:
        out = ia3_grouped_scale_reference(t2, scales, row_adapter)
    return out.view(t.shape)
