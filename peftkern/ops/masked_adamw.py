"""Child-Tuning's fused masked AdamW (csrc/masked_adamw/): one in-place pass per parameter
tensor doing exactly ChildTuningAdamW's arithmetic (the reference's sequence of torch ops, each
rounded as torch's CPU kernels round it; see masked_adamw_math.h), with the mask either

- mode D: a fixed mask as packed bits, 1 bit per weight (`pack_mask`), 1/32 of the float32
  weights' bytes (1/8 of a bool mask), or
- mode F: drawn inside the kernel, keep = Philox4x32-10(seed, offset, e) < reserve_p with the
  1/reserve_p rescale (csrc/common/philox.h's stream convention), so no mask tensor is stored.
  `philox_seed_offset` takes (seed, offset) from a torch generator, advancing it per step and per
  tensor; `keep_mask` materialises the decisions for tests.

The reference (`masked_adamw_reference_`) is the spec and the fallback where no kernel exists:
the reference optimizer's torch ops on float32 moments, F's mask from a NumPy Philox."""

from __future__ import annotations

import numpy as np
import torch

from .. import _ext

_MASK32 = np.uint64(0xFFFFFFFF)
_ROUND_MULTIPLIERS = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_WEYL_KEYS = (np.uint64(0x9E3779B9), np.uint64(0xBB67AE85))


# ---- the mask as bits (mode D) ------------------------------------------------------------------


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask (any shape, flattened row-major) as uint8 [ceil(n / 8)]: element e is bit e % 8
    (least significant first) of byte e // 8; the last byte's unused bits are 0."""
    if mask.dtype != torch.bool:
        raise ValueError(f"pack_mask: mask must be bool, got {mask.dtype}")
    flat = mask.detach().reshape(-1)
    n = flat.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=flat.device)
    padded[:n] = flat
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8) if n else padded


def unpack_mask(bits: torch.Tensor, shape) -> torch.Tensor:
    """pack_mask's inverse: the bool mask of `shape`."""
    n = int(np.prod(shape)) if len(shape) else 1
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    flat = ((bits.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:n].bool()
    return flat.reshape(shape)


# ---- mode F's draw -------------------------------------------------------------------------------


def _philox_words(seed: int, offset: int, groups: np.ndarray) -> np.ndarray:
    """Philox4x32-10 of counters (group, offset) under key `seed`: uint64 [len(groups), 4] holding
    32-bit words (common/philox.h, in NumPy; the 32x32-bit products are exact in uint64)."""
    c0, c1 = groups & _MASK32, groups >> np.uint64(32)
    c2 = np.full_like(groups, np.uint64(offset) & _MASK32)
    c3 = np.full_like(groups, np.uint64(offset) >> np.uint64(32))
    k0, k1 = np.uint64(seed) & _MASK32, np.uint64(seed) >> np.uint64(32)
    for _ in range(10):
        p0, p1 = _ROUND_MULTIPLIERS[0] * c0, _ROUND_MULTIPLIERS[1] * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK32
        k0, k1 = (k0 + _WEYL_KEYS[0]) & _MASK32, (k1 + _WEYL_KEYS[1]) & _MASK32
    return np.stack([c0, c1, c2, c3], axis=1)


def keep_mask_reference(shape, reserve_p: float, seed: int, offset: int) -> torch.Tensor:
    """Mode F's decisions (bool, CPU): uniform(seed, offset, e) = (word >> 8)·2^-24 < reserve_p in float32."""
    _check_reserve_p(reserve_p)
    n = int(np.prod(shape)) if len(shape) else 1
    words = _philox_words(seed % 2**64, offset % 2**64, np.arange((n + 3) // 4, dtype=np.uint64)).reshape(-1)[:n]
    uniform = (words >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24)
    return torch.from_numpy(uniform < np.float32(reserve_p)).reshape(shape)


def _check_reserve_p(reserve_p) -> None:
    if not 0.0 < reserve_p <= 1.0:
        raise ValueError(f"masked_adamw: reserve_p must be in (0, 1], got {reserve_p}")


def philox_seed_offset(generator: torch.Generator | None, device: torch.device, count: int) -> tuple[int, int]:
    """(seed, first offset) for `count` tensors' draws in one optimizer step; tensor i uses
    offset first + i. From `generator`, else torch's default generator of `device`:
    - a CUDA generator (torch's own Philox): seed = its seed, offsets reserved by advancing its
      offset past them (as torch's dropout does), so later draws never reuse them;
    - a CPU generator (Mersenne Twister, no offset): a fresh 63-bit seed drawn from it each step,
      offsets 0 .. count - 1.
    Either way the generator advances every step, and manual_seed replays the masks."""
    if generator is None:
        generator = torch.cuda.default_generators[device.index or 0] if device.type == "cuda" else torch.default_generator
    if generator.device.type == "cuda":
        seed, offset = generator.initial_seed(), generator.get_offset()
        generator.set_offset(offset + (count + 3) // 4 * 4)  # CUDA generators advance in multiples of 4
        return seed, offset
    return int(torch.randint(0, 2**63 - 1, (), generator=generator)), 0


def _int64(value: int) -> int:
    """A 64-bit seed / offset as the op's int64 (two's complement; the kernels read it as uint64)."""
    value = int(value) % 2**64
    return value - 2**64 if value >= 2**63 else value


# ---- the op --------------------------------------------------------------------------------------


@_ext.register_fake("masked_adamw_")
def _(param, grad, exp_avg, exp_avg_sq, mask_bits, reserve_p, seed, offset, lr, beta1, beta2, eps, weight_decay,
      step_size):  # fmt: skip
    return None


@_ext.register_fake("masked_adamw_keep_mask")
def _(like, reserve_p, seed, offset):
    return torch.empty_like(like, dtype=torch.bool)


@torch.no_grad()
def masked_adamw_reference_(param, grad, exp_avg, exp_avg_sq, mask_bits, reserve_p, seed, offset, lr, beta1, beta2,
                            eps, weight_decay, step_size, *, exact_sqrt: bool = True) -> None:  # fmt: skip
    """The spec: ChildTuningAdamW's step for one tensor (its torch ops, in its order), float32
    moments, a bf16/fp16 parameter widened to float32 and rounded once at the end. The one
    deliberate difference, `exact_sqrt`: sqrt(v) correctly rounded (through float64, exact for a
    float32 square root), as the kernels and CUDA compute it; torch's CPU sqrt (vectorised) is not
    (about 1 in 6 values 1 ulp off, torch 2.14 on AVX-512). exact_sqrt=False: torch's sqrt."""
    if mask_bits is not None:
        factor = unpack_mask(mask_bits, param.shape)
    else:
        keep = keep_mask_reference(param.shape, reserve_p, seed, offset).to(param.device)
        factor = keep.float() / reserve_p
    g = grad.float() * factor  # (the kernels leave grad as it is)
    p = param.float() if param.dtype != torch.float32 else param
    exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = (exp_avg_sq.double().sqrt().float() if exact_sqrt else exp_avg_sq.sqrt()).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)
    p.add_(p, alpha=-lr * weight_decay)
    if p is not param:
        param.copy_(p)


def masked_adamw_(param, grad, exp_avg, exp_avg_sq, mask_bits=None, reserve_p=1.0, seed=0, offset=0, *, lr,
                  beta1, beta2, eps, weight_decay, step_size) -> None:  # fmt: skip
    """One fused step on one tensor (see the module doc): the compiled kernel for the tensors'
    device, else the reference. `step_size` is the bias-corrected lr (or lr)."""
    args = (param, grad, exp_avg, exp_avg_sq, mask_bits, float(reserve_p), _int64(seed), _int64(offset), float(lr),
            float(beta1), float(beta2), float(eps), float(weight_decay), float(step_size))  # fmt: skip
    if _ext.has_kernel("masked_adamw_", param.device.type):
        torch.ops.peftkern.masked_adamw_(*args)
    else:
        masked_adamw_reference_(*args)


def keep_mask(like: torch.Tensor, reserve_p: float, seed: int, offset: int) -> torch.Tensor:
    """Mode F's keep decisions for a tensor shaped like `like`, as masked_adamw_ draws them."""
    if _ext.has_kernel("masked_adamw_keep_mask", like.device.type):
        return torch.ops.peftkern.masked_adamw_keep_mask(like, float(reserve_p), _int64(seed), _int64(offset))
    return keep_mask_reference(like.shape, reserve_p, seed, offset).to(like.device)
