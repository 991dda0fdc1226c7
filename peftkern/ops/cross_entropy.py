"""Fused cross-entropy (csrc/cross_entropy/): the causal-LM loss from logits without the
[tokens, vocab] log-probabilities PyTorch's log_softmax + nll_loss write, nor the zero-filled
[tokens, vocab] gradient nll_loss's backward scatters into. Per row r with label y:

    lse[r]  = logsumexp(logits[r])                   float32, computed from the widened logits
    loss[r] = lse[r] - logits[r, y]                  0 where y == ignore_index
    dlogits[r] = g[r] * (softmax(logits[r]) - onehot(y))   in logits' dtype, 0 rows where ignored

`causal_lm_loss` is transformers' `ForCausalLMLoss` (shift, flatten, mean over the non-ignored
tokens or sum / num_items_in_batch) on these rows; `peftkern.patch` installs it as a causal LM's
`loss_function` (DESIGN.md, "Cross-entropy"). Logits are still returned: only the loss changes how
it is computed.
"""

from __future__ import annotations

import torch

from .. import _ext

IGNORE_INDEX = -100


def check_args(logits, labels, ignore_index: int) -> None:
    """The op's checks, in Python for the reference path (the kernels repeat them in C++)."""
    op = "cross_entropy"
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be [tokens, vocab], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{op}: logits must be a floating tensor, got {logits.dtype}")
    if labels.dtype != torch.int64:
        raise ValueError(f"{op}: labels must be int64, got {labels.dtype}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"{op}: labels must be [{logits.shape[0]}] (one per row of logits), got shape "
                         f"{tuple(labels.shape)}")  # fmt: skip
    if labels.device != logits.device:
        raise ValueError(f"{op}: labels is on {labels.device} but logits is on {logits.device}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= logits.shape[1]))
    if labels.device.type == "cpu" and bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: label {int(labels[row])} of row {row} is outside the vocabulary "
                         f"[0, {logits.shape[1]}) and is not ignore_index ({ignore_index})")  # fmt: skip


def cross_entropy_rows_reference(logits, labels, ignore_index: int = IGNORE_INDEX):
    """The spec: (loss, lse), float32 [rows] each (float64 for float64 logits), by plain PyTorch."""
    check_args(logits, labels, ignore_index)
    z = logits if logits.dtype == torch.float64 else logits.float()
    ignored = labels == ignore_index
    if z.shape[1] == 0:
        lse = torch.full(ignored.shape, float("nan"), dtype=z.dtype, device=z.device)
        picked = torch.zeros_like(lse)
    else:
        lse = torch.logsumexp(z, dim=-1)
        picked = z.gather(1, labels.masked_fill(ignored, 0).unsqueeze(1)).squeeze(1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return torch.where(ignored, zero, lse - picked), torch.where(ignored, zero, lse)


@_ext.register_fake("cross_entropy_fwd")
def _(logits, labels, ignore_index):
    rows = logits.new_empty(logits.shape[:1], dtype=torch.float32)
    return rows, torch.empty_like(rows)


@_ext.register_fake("cross_entropy_bwd")
def _(grad_loss, logits, labels, lse, ignore_index):
    return logits.new_empty(logits.shape)  # contiguous


def _setup(ctx, inputs, output):
    logits, labels, ignore_index = inputs
    ctx.mark_non_differentiable(output[1])  # lse: an auxiliary output for the backward
    ctx.save_for_backward(logits, labels, output[1])
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_loss, _grad_lse):
    logits, labels, lse = ctx.saved_tensors
    grad_logits = torch.ops.peftkern.cross_entropy_bwd(grad_loss.float().contiguous(), logits, labels, lse,
                                                       ctx.ignore_index)  # fmt: skip
    return grad_logits, None, None


if _ext.op_exists("cross_entropy_fwd"):
    torch.library.register_autograd("peftkern::cross_entropy_fwd", _backward, setup_context=_setup)


def uses_kernel(logits) -> bool:
    """The compiled op for these logits? On CUDA when built; on CPU on the AVX-512 path only (its
    vector exp; the scalar path is the spec, slower than ATen's vectorized log_softmax). Float64
    (gradcheck-style tests) takes the reference."""
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if not _ext.has_kernel("cross_entropy_fwd", logits.device.type):
        return False
    return logits.device.type != "cpu" or torch.ops.peftkern.cpu_isa() == "avx512"


def cross_entropy_rows(logits, labels, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-row losses, float32 [rows] (differentiable in logits): the fused op where it runs
    (`uses_kernel`), else the reference composition of ATen ops."""
    if uses_kernel(logits):
        return torch.ops.peftkern.cross_entropy_fwd(logits, labels, ignore_index)[0]
    return cross_entropy_rows_reference(logits, labels, ignore_index)[0]


def causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                   shift_labels=None, **kwargs) -> torch.Tensor:  # fmt: skip
    """transformers' `ForCausalLMLoss`, same arguments and result: labels shifted left by one (or
    `shift_labels` as given), then the mean loss over the tokens whose label is not ignore_index
    (NaN if there are none, as PyTorch's), or the sum / num_items_in_batch when that is given
    (Trainer's gradient-accumulation-exact loss). Logits of any float dtype are read as they are
    (transformers first copies them to float32)."""
    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    rows = logits.reshape(-1, vocab_size)
    targets = shift_labels.reshape(-1).to(device=rows.device, dtype=torch.int64)
    losses = cross_entropy_rows(rows, targets, ignore_index)
    if num_items_in_batch is None:
        return losses.sum() / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(losses.device)
    return losses.sum() / num_items_in_batch
