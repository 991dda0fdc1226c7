"""What the op tests and `python -m peftkern.check` share: per-dtype tolerances, the shapes each
op family is checked on, random-input builders, the error judges (worst error / allowed error of
an op's outputs and gradients against its float64 reference), and one check per family (every
case on one device, as Result rows), registered in CHECKS. The command line lives in check.py.

Every output is poisoned (NaN / 0xA5) before the kernel writes it, so unwritten elements fail
(check.py turns poisoning on, tests/conftest.py does for the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ext
from .ops import adapter as adapter_ops
from .ops import dora as dora_ops
from .ops import dropout as dropout_ops
from .ops import grouped as grouped_ops
from .ops import ia3 as ia3_ops
from .ops import lora as lora_ops
from .nf4 import NF4Weight
from .ops import nf4 as nf4_ops
from .ops import cross_entropy as ce_ops
from .ops import proxy as proxy_ops
from .ops import qlora as qlora_ops
from .ops import relora as relora_ops
from .ops import scaled_lora as scaled_lora_ops
from .ops.common import acc_dtype

# Odd sizes, a partial last block, sizes below one block, empty, and one 2-D weight shaped like
# a real projection.
SHAPES = [(1,), (63,), (3, 5), (257, 129), (1000, 33), (0, 7), (2048, 64)]
BLOCKSIZES = [32, 64, 256, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@dataclass
class Result:
    op: str
    device: str
    dtype: str
    shape: tuple
    blocksize: int
    max_error: float
    passed: bool


def _max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| (inf on a shape mismatch or a NaN where the reference has none)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return float("inf")
    if got.numel() == 0:
        return 0.0
    diff = (got.double() - want.double()).abs()
    return float("inf") if torch.isnan(diff).any() else diff.max().item()


def _scaled_errors(errors, names, ours_list, exact_list, bound_list, tolerance, floor):
    """errors[name] = the worst |ours - exact| / (tolerance·bound + floor) of each output (inf for a
    wrong shape or a NaN); returns errors."""
    for name, ours, exact_value, bound in zip(names, ours_list, exact_list, bound_list):
        ours = ours.detach().cpu().double()
        if ours.shape != exact_value.shape or torch.isnan(ours).any():
            errors[name] = float("inf")
        elif ours.numel() == 0:
            errors[name] = 0.0
        else:
            errors[name] = ((ours - exact_value.detach()).abs() / (tolerance * bound.detach() + floor)).max().item()
    return errors


def _exact(results: list, op, device, dtype, shape, bs, pairs) -> None:
    """NF4 ops are exact: same float32 arithmetic and rounding as the reference, so error 0."""
    error = max(_max_error(got, want) for got, want in pairs)
    results.append(Result(op, device, str(dtype).removeprefix("torch."), tuple(shape), bs, error, error == 0.0))


def check_nf4(device: str, generator: torch.Generator) -> list[Result]:
    results: list[Result] = []
    code8 = nf4_ops.dynamic_code_8bit(device)
    ops = torch.ops.peftkern
    for dtype in DTYPES:
        for shape in SHAPES:
            for bs in BLOCKSIZES:
                w = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
                packed, absmax = ops.nf4_quantize(w, bs)
                ref_packed, ref_absmax = nf4_ops.nf4_quantize_reference(w, bs)
                _exact(results, "nf4_quantize", device, dtype, shape, bs, [(packed, ref_packed), (absmax, ref_absmax)])

                out = ops.nf4_dequantize(packed, absmax, bs, list(shape), dtype)
                plain_ref = nf4_ops.nf4_dequantize_reference(ref_packed, ref_absmax, bs, shape, dtype)
                _exact(results, "nf4_dequantize", device, dtype, shape, bs, [(out, plain_ref)])

                offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
                codes, nested = ops.quantize_blockwise_8bit(absmax - offset, code8, 256)
                ref_codes, ref_nested = nf4_ops.quantize_blockwise_8bit_reference(absmax - offset, code8, 256)
                _exact(
                    results, "quantize_blockwise_8bit", device, dtype, shape, 256,
                    [(codes, ref_codes), (nested, ref_nested)],
                )  # fmt: skip
                values = ops.dequantize_blockwise_8bit(codes, nested, code8, 256)
                ref_values = nf4_ops.dequantize_blockwise_8bit_reference(codes, nested, code8, 256)
                _exact(results, "dequantize_blockwise_8bit", device, dtype, shape, 256, [(values, ref_values)])

                args = (packed, codes, nested, code8, offset.reshape(()), bs, 256)
                out = ops.nf4_dequantize_nested(*args, list(shape), dtype)
                ref = nf4_ops.nf4_dequantize_nested_reference(*args, shape, dtype)
                _exact(results, "nf4_dequantize_nested", device, dtype, shape, bs, [(out, ref)])

                # the same two into a caller's buffer (starting as NaN: every element must be written)
                plain_into = torch.full(shape, float("nan"), device=device, dtype=dtype)
                ops.nf4_dequantize_into(plain_into, packed, absmax, None, None, None, bs, 0)
                nested_into = torch.full(shape, float("nan"), device=device, dtype=dtype)
                ops.nf4_dequantize_into(nested_into, packed, codes, nested, code8, offset.reshape(1), bs, 256)
                _exact(results, "nf4_dequantize_into", device, dtype, shape, bs,
                       [(plain_into, plain_ref), (nested_into, ref)])  # fmt: skip
    return results


# Rounding tolerance per dtype, relative to the magnitude of the terms summed (see below).
GEMM_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}
LORA_SHAPES = [(1, 7, 5, 2), (13, 33, 17, 4), (64, 96, 80, 16), (3, 5, 4, 8), (9, 1, 3, 1)]  # (tokens, in, out, r)


def dropout_mask_of(x, drop):
    """(mask, keep scale) on the CPU for the float64 references: the decisions the op draws for
    x under drop = (p, seed, offset), materialised by `lora_dropout_mask` (its own tests check it
    against Random123's vectors, the plain-PyTorch Philox and the statistics)."""
    p, seed, offset = drop
    if p == 0.0:
        return None, 1.0
    return dropout_ops.lora_dropout_mask(x.detach(), p, seed, offset).cpu(), 1.0 / (1.0 - p)


def random_dropout(generator, p=0.3):
    """A (p, seed, offset) dropout with seed and offset drawn from the test's generator."""
    seed, offset = (int(v) for v in torch.randint(-(2**62), 2**62, (2,), generator=generator))
    return (p, seed, offset)


def lora_linear_errors(x, w, b, a, bb, drop, scaling, generator) -> dict[str, float]:
    """Worst error / allowed error of lora_linear_fwd's output and of its gradients for x, A, B
    (pass: <= 1), under drop = (p, seed, offset) (lora.NO_DROPOUT: none). Allowed:
    tolerance(dtype) * the same computation on absolute values in float64, i.e. the sum of
    |terms| that bounds a GEMM's rounding error, element by element; so a result that cancels to
    almost nothing is judged on its terms, not on itself. NaN gives inf. The reference gets the
    op's dropout decisions as a mask (`dropout_mask_of`)."""
    x, a, bb = (t.detach().requires_grad_() for t in (x, a, bb))
    out, _ = torch.ops.peftkern.lora_linear_fwd(x, w, b, a, bb, scaling, *drop)
    return _lora_errors(out, x, w, b, a, bb, drop, scaling, generator)


def _lora_errors(out, x, w, b, a, bb, drop, scaling, generator) -> dict[str, float]:
    """lora_linear_errors' judge for an op's `out` computed from the leaves x, a, bb (requiring
    grad) and the dense weight w."""
    cpu_mask, keep_scale = dropout_mask_of(x, drop)

    def reference64(transform):
        leaves = [transform(t.detach().double().cpu()).requires_grad_() if t is not None else None
                  for t in (x, w, b, a, bb)]  # fmt: skip
        return lora_ops.lora_linear_reference(*leaves, scaling, cpu_mask, keep_scale), leaves

    exact, leaves = reference64(lambda t: t)
    magnitude, abs_leaves = reference64(torch.abs)
    g = torch.randn(out.shape, generator=generator).to(out.dtype)  # one rounded g for all three
    got = torch.autograd.grad(out, (x, a, bb), g.to(out.device))
    want = torch.autograd.grad(exact, [leaves[i] for i in (0, 3, 4)], g.double())
    bounds = torch.autograd.grad(magnitude, [abs_leaves[i] for i in (0, 3, 4)], g.double().abs())

    tolerance = GEMM_TOLERANCE[out.dtype]
    names = ("out", "grad_x", "grad_a", "grad_b")
    return _scaled_errors({}, names, (out, *got), (exact, *want), (magnitude, *bounds), tolerance, 1e-300)


def random_lora_inputs(shape, dtype, device, generator, bias=True, dropout=False):
    m, k, n, r = shape

    def rand(*size):
        t = torch.randn(size, generator=generator, dtype=torch.float64) / max(size[-1], 1) ** 0.5
        return t.to(device=device, dtype=dtype)

    drop = random_dropout(generator) if dropout else lora_ops.NO_DROPOUT
    return rand(m, k), rand(n, k), rand(n) if bias else None, rand(r, k), rand(n, r), drop


def check_lora(device: str, generator: torch.Generator) -> list[Result]:
    results = []
    for dtype in DTYPES:
        for shape in LORA_SHAPES:
            for dropout in (False, True):
                x, w, b, a, bb, drop = random_lora_inputs(shape, dtype, device, generator, dropout=dropout)
                errors = lora_linear_errors(x, w, b, a, bb, drop, 0.75, generator)
                worst = max(errors.values())
                results.append(Result("lora_linear_fwd+bwd", device, str(dtype).removeprefix("torch."), shape,
                                      0, worst, worst <= 1.0))  # fmt: skip
    return results


# (tokens, in, out, r, blocksize, double quantization): odd in (rows straddling bytes and blocks)
QLORA_TRAIN_SHAPES = [(13, 45, 37, 4, 64, True), (64, 96, 80, 16, 128, False), (3, 33, 5, 8, 32, True),
                      (1, 256, 130, 2, 64, True), (0, 64, 16, 4, 64, True)]  # fmt: skip


def check_qlora_train(device: str, generator: torch.Generator) -> list[Result]:
    """nf4_lora_linear_train (the CPU QLoRA layer: fused dequant + GEMM, C++ backward) judged as
    lora_linear_fwd+bwd against the float64 reference on the weight dequantized into x's dtype
    (what the op multiplies by), with and without dropout. CPU only (CUDA dequantizes instead)."""
    results = []
    if not _ext.has_kernel("nf4_lora_linear_train", device):
        return results
    for dtype in DTYPES:
        for tokens, k, n, r, blocksize, nested in QLORA_TRAIN_SHAPES:
            for dropout in (False, True):
                x, _, b, a, bb, drop = random_lora_inputs((tokens, k, n, r), dtype, device, generator, dropout=dropout)
                weight = NF4Weight.quantize(torch.randn(n, k, generator=generator).to(device) * 0.05, blocksize,
                                            double_quant=nested)  # fmt: skip
                x, a, bb = (t.detach().requires_grad_() for t in (x, a, bb))
                out, _ = torch.ops.peftkern.nf4_lora_linear_train(x, *qlora_ops._quant_state(weight), n, b, a, bb,
                                                                  0.75, *drop)  # fmt: skip
                errors = _lora_errors(out, x, weight.dequantize(dtype), b, a, bb, drop, 0.75, generator)
                worst = max(errors.values())
                results.append(Result("nf4_lora_linear_train+bwd", device, str(dtype).removeprefix("torch."),
                                      (tokens, k, n, r), blocksize, worst, worst <= 1.0))  # fmt: skip
    return results


def check_dora(device: str, generator: torch.Generator) -> list[Result]:
    """dora_weight_norm against its float32/float64 reference: relative error per row."""
    results = []
    for dtype in DTYPES:
        for n, k, r in [(1, 1, 1), (17, 33, 4), (96, 257, 16), (0, 8, 2)]:
            w, a, b = (torch.randn(s, generator=generator).to(device=device, dtype=dtype) for s in ((n, k), (r, k), (n, r)))
            got = torch.ops.peftkern.dora_weight_norm(w, a, b, 0.7).double().cpu()
            want = dora_ops.dora_weight_norm_reference(w.cpu().double(), a.cpu().double(), b.cpu().double(), 0.7)
            error = ((got - want).abs() / want.clamp_min(1e-30)).max().item() if n else 0.0
            error = float("inf") if torch.isnan(got).any() else error
            # one rounding to the output dtype (float32 accumulation inside)
            allowed = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
            results.append(Result("dora_weight_norm", device, str(dtype).removeprefix("torch."), (n, k, r), 0,
                                  error, error <= allowed))  # fmt: skip
    return results


# Random123's philox4x32-10 known answers: (counter words, key words, output words).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]  # fmt: skip


def check_dropout(device: str, generator: torch.Generator) -> list[Result]:
    """The mask-free dropout must be exact (error 0): Random123's known answers through
    philox_words, and lora_dropout / lora_dropout_mask on `device` bit for bit against the
    plain-PyTorch Philox (the CPU and CUDA kernels then draw the same decisions)."""
    as_i64 = dropout_ops._as_int64
    results = []
    for counter, key, expected in PHILOX_KAT:
        group, seed = as_i64(counter[0] | counter[1] << 32), as_i64(key[0] | key[1] << 32)
        got = torch.ops.peftkern.philox_words(torch.tensor([group], device=device), seed,
                                              as_i64(counter[2] | counter[3] << 32)).cpu()  # fmt: skip
        ok = got.tolist() == [list(expected)]
        results.append(Result("philox_words (Random123 KAT)", device, "uint32", (1, 4), 0, 0.0 if ok else 1.0, ok))
    for dtype in (*DTYPES, torch.float64):
        for shape in [(1, 1), (13, 33), (257, 129), (0, 7)]:
            seed, offset = (int(v) for v in torch.randint(-(2**62), 2**62, (2,), generator=generator))
            x = torch.randn(shape, generator=generator).to(dtype)
            want = dropout_ops.lora_dropout_reference(x, 0.3, seed, offset)
            got = torch.ops.peftkern.lora_dropout(x.to(device), 0.3, seed, offset).cpu()
            mask = torch.ops.peftkern.lora_dropout_mask(x.to(device), 0.3, seed, offset).cpu()
            ok = torch.equal(got, want) and torch.equal(mask, dropout_ops.lora_dropout_mask_reference(shape, 0.3, seed,
                                                                                                      offset))  # fmt: skip
            results.append(Result("lora_dropout", device, str(dtype).removeprefix("torch."), shape, 0,
                                  0.0 if ok else 1.0, ok))  # fmt: skip
            # the A-projection with the decisions drawn inside (one pass on CPU): within the GEMM
            # tolerance of lora_dropout(x)·Aᵀ, relative to the same products on absolute values
            lora_a = torch.randn(5, shape[1], generator=generator).to(dtype)
            xd = want.double()
            got = torch.ops.peftkern.lora_dropout_project(x.to(device), lora_a.to(device), 0.3, seed, offset).cpu()
            errors = _scaled_errors({}, ["xa"], [got], [xd @ lora_a.double().t()],
                                    [xd.abs() @ lora_a.double().abs().t()], GEMM_TOLERANCE[dtype], 1e-30)  # fmt: skip
            results.append(Result("lora_dropout_project", device, str(dtype).removeprefix("torch."), shape, 0,
                                  errors["xa"], got.dtype == dtype and errors["xa"] <= 1.0))  # fmt: skip
    return results


def check_qlora_gemv(device: str, generator: torch.Generator) -> list[Result]:
    """nf4_lora_gemv (the QLoRA decode path) against its float32 reference: max error relative
    to the output's scale. Shapes: rows straddling blocks and bytes (odd in), aligned rows (the
    CUDA vector path), rows ending in a 64-code half chunk (the AVX-512 chunked kernel), 1 to 11
    tokens."""
    results = []
    for dtype in DTYPES:
        for n, k, tokens, blocksize, nested in [(37, 45, 1, 64, True), (64, 96, 3, 128, False), (130, 256, 8, 64, True),
                                                 (96, 2048, 11, 64, True), (0, 64, 2, 64, True),
                                                 (40, 576, 9, 64, True), (7, 320, 2, 32, False)]:  # fmt: skip
            w = torch.randn(n, k, generator=generator).to(device) * 0.05
            weight = NF4Weight.quantize(w, blocksize, double_quant=nested)
            x, bias, xa, lora_b = (torch.randn(s, generator=generator).to(device, dtype)
                                   for s in ((tokens, k), (n,), (tokens, 4), (n, 4)))  # fmt: skip
            got = torch.ops.peftkern.nf4_lora_gemv(
                x, weight.packed, weight.absmax, *(
                    (weight.nested.absmax, weight.nested.code, weight.nested.offset.reshape(1)) if nested
                    else (None, None, None)), blocksize, 256 if nested else 0, n, bias, xa, lora_b, 0.5)  # fmt: skip
            want = qlora_ops.nf4_lora_gemv_reference(x, weight, bias, xa, lora_b, 0.5)
            scale = want.double().abs().max().item() if want.numel() else 1.0
            error = _max_error(got, want) / max(scale, 1e-30)
            allowed = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
            results.append(Result("nf4_lora_gemv", device, str(dtype).removeprefix("torch."), (n, k, tokens),
                                  blocksize, error, error <= allowed))  # fmt: skip
    return results


# --- IA³ -----------------------------------------------------------------------------------------
IA3_SHAPES = [(1, 7, 5), (13, 33, 17), (200, 96, 80), (3, 1, 4), (0, 6, 5), (129, 64, 1)]  # (tokens, in, out)


def random_ia3_inputs(shape, dtype, device, generator, scale_input, bias=True, l_dtype=torch.float32):
    """x [M, K], W [N, K], b [N], and l near 1 (PEFT's init plus a learned deviation), shaped as
    PEFT's ([1, K] input side, [N, 1] output side); l in float32 unless dtype is float64."""
    m, k, n = shape

    def rand(*size):
        t = torch.randn(size, generator=generator, dtype=torch.float64) / max(size[-1], 1) ** 0.5
        return t.to(device=device, dtype=dtype)

    l_shape = (1, k) if scale_input else (n, 1)
    l = 1 + 0.5 * torch.randn(l_shape, generator=generator, dtype=torch.float64)
    l_dtype = torch.float64 if dtype == torch.float64 else l_dtype
    return rand(m, k), rand(n, k), rand(n) if bias else None, l.to(device=device, dtype=l_dtype)


def ia3_linear_errors(x, w, b, l, scale_input, generator) -> dict[str, float]:
    """Worst error / allowed error of the compiled IA³ op's output and of its gradients for x and
    l (pass: <= 1), judged as lora_linear_errors: against the float64 reference, allowed
    GEMM_TOLERANCE[dtype] times the same computation on absolute values (a bound on the rounding
    of every sum), element by element. NaN gives inf."""
    x, l = x.detach().requires_grad_(), l.detach().requires_grad_()
    op = torch.ops.peftkern.ia3_input_linear_fwd if scale_input else torch.ops.peftkern.ia3_output_linear_fwd
    out = op(x, w, b, l)
    out = out if scale_input else out[0]

    def reference64(transform):
        leaves = [transform(t.detach().double().cpu()).requires_grad_() if t is not None else None for t in (x, w, b, l)]
        return ia3_ops.ia3_linear_reference(*leaves, scale_input), leaves

    exact, leaves = reference64(lambda t: t)
    magnitude, abs_leaves = reference64(torch.abs)
    g = torch.randn(out.shape, generator=generator).to(out.dtype)
    got = torch.autograd.grad(out, (x, l), g.to(out.device))
    want = torch.autograd.grad(exact, [leaves[0], leaves[3]], g.double())
    bounds = torch.autograd.grad(magnitude, [abs_leaves[0], abs_leaves[3]], g.double().abs())
    tolerance = GEMM_TOLERANCE[out.dtype]
    # Plus the smallest normal number: a product that lands among float16's subnormals is
    # rounded to an absolute spacing (6e-8), not a relative one.
    floor = torch.finfo(out.dtype).tiny
    names = ("out", "grad_x", "grad_l")
    return _scaled_errors({}, names, (out, *got), (exact, *want), (magnitude, *bounds), tolerance, floor)


def check_ia3(device: str, generator: torch.Generator) -> list[Result]:
    """Both IA³ ops (input and output scaling), forward and backward, against the reference."""
    results = []
    for dtype in DTYPES:
        for shape in IA3_SHAPES:
            for scale_input in (True, False):
                x, w, b, l = random_ia3_inputs(shape, dtype, device, generator, scale_input)
                worst = max(ia3_linear_errors(x, w, b, l, scale_input, generator).values())
                name = "ia3_input_linear_fwd+bwd" if scale_input else "ia3_output_linear_fwd+bwd"
                results.append(Result(name, device, str(dtype).removeprefix("torch."), shape, 0, worst, worst <= 1.0))
    return results


# --- Bottleneck adapter (adapter_bottleneck_fwd + bwd) --------------------------------------------
ADAPTER_SHAPES = [(1, 32, 2), (13, 33, 5), (64, 96, 6), (5, 6, 11), (0, 24, 4)]  # (tokens, hidden, bottleneck)


def adapter_errors(x, residual, params, scale, scaling, code, generator) -> dict[str, float]:
    """Worst error / allowed error of adapter_bottleneck_fwd's output and of every gradient
    (pass: <= 1), against the float64 reference. Allowed: tolerance(dtype) * (the same
    computation on |values| + 1), the magnitude of the terms a GEMM sums, element by element.
    For relu the reference takes the side of the kink the stored pre-activation took (a value
    within rounding of 0 may fall on either side in low precision)."""
    leaves = [t.detach().requires_grad_() for t in (x, residual, *params)] + (
        [scale.detach().requires_grad_()] if scale is not None else [])  # fmt: skip
    out, pre = torch.ops.peftkern.adapter_bottleneck_fwd(*leaves[:6], scaling, leaves[6] if scale is not None else None,
                                                         code)  # fmt: skip
    g = torch.randn(out.shape, generator=generator).to(out.dtype)
    got = torch.autograd.grad(out, leaves, g.to(out.device))  # an empty batch too: zero gradients

    def reference64(transform, activation):
        ls = [transform(t.detach().double().cpu()).requires_grad_() for t in leaves]
        sc = ls[6] if scale is not None else None
        if activation is None:  # magnitudes: |act(z)| <= |z| for all four activations
            z = torch.nn.functional.linear(ls[0], ls[2], ls[3])
            y = torch.nn.functional.linear(z, ls[4], ls[5]) * abs(scaling) * (sc.reshape(()) if sc is not None else 1)
            return ls[1] + y, ls
        if activation == 0:  # relu: the side of the kink the kernel's stored pre-activation took
            z = torch.nn.functional.linear(ls[0], ls[2], ls[3]) * (pre.detach().cpu() > 0)
            y = torch.nn.functional.linear(z, ls[4], ls[5]) * (scaling * (sc.reshape(()) if sc is not None else 1))
            return ls[1] + y, ls
        return adapter_ops.adapter_bottleneck_reference(*ls[:6], scaling, sc, activation), ls

    exact, ls = reference64(lambda t: t, code)
    magnitude, abs_ls = reference64(torch.abs, None)
    want = torch.autograd.grad(exact, ls, g.double())
    bounds = torch.autograd.grad(magnitude, abs_ls, g.double().abs() + 1.0)
    tolerance = GEMM_TOLERANCE[out.dtype] * 2  # two chained GEMMs
    names = ("grad_x", "grad_residual", "grad_w_down", "grad_b_down", "grad_w_up", "grad_b_up", "grad_scale")
    # allowed: tolerance·(bound + 1), an absolute floor of one tolerance for terms near zero
    bounds_plus_one = [b.detach() + 1.0 for b in (magnitude, *bounds)]
    return _scaled_errors({}, ("out", *names), (out, *got), (exact, *want), bounds_plus_one, tolerance, 0.0)


def check_adapter(device: str, generator: torch.Generator) -> list[Result]:
    results = []
    for dtype in DTYPES:
        for m, d, r in ADAPTER_SHAPES:
            for activation in ("relu", "gelu", "gelu_new", "silu"):
                for learned in (False, True):

                    def rand(*size, gain=1.0):
                        t = torch.randn(size, generator=generator, dtype=torch.float64) * gain / max(size[-1], 1) ** 0.5
                        return t.to(device=device, dtype=dtype)

                    x, residual = rand(m, d, gain=d**0.5), rand(m, d, gain=d**0.5)
                    params = [rand(r, d), rand(r, gain=r**0.5), rand(d, r), rand(d, gain=d**0.5)]
                    scale = torch.tensor([0.8], dtype=dtype, device=device) if learned else None
                    errors = adapter_errors(x, residual, params, scale, 1.5, adapter_ops.activation_code(activation),
                                            generator)  # fmt: skip
                    worst = max(errors.values(), default=0.0)
                    results.append(Result(f"adapter_bottleneck {activation}", device, str(dtype).removeprefix("torch."),
                                          (m, d, r), 0, worst, worst <= 1.0))  # fmt: skip
    return results


# --- Grouped (mixed-adapter) inference: lora_grouped_fwd, ia3_grouped_scale ----------------------
# (tokens, in, out, adapters, max rank): one row, odd sizes, G = 0 (every row -1), 1, 3, 8 and 40
# (more than the 32 adapters of one kernel call: two chunks), rank 0, no rows. On CPU, the small
# cases take the row-by-row kernel (< 8 rows per adapter), the 300-row case (and usually the
# 37-row one: the row mix is random) the per-adapter GEMMs.
GROUPED_SHAPES = [(1, 7, 5, 1, 2), (13, 33, 17, 3, 4), (9, 5, 3, 0, 2), (0, 6, 5, 2, 3), (10, 8, 6, 2, 0),
                  (37, 24, 40, 3, 5), (64, 96, 80, 8, 16), (300, 48, 40, 2, 8), (90, 12, 10, 40, 3)]  # fmt: skip


def random_grouped_inputs(shape, dtype, device, generator, strided=False, weight_dtype=None):
    """base_out [T, N], x [T, K]; G adapters as lists: lora_a[g] [r_g, K], lora_b[g] [N, r_g] of
    weight_dtype (default: dtype) with a random rank r_g in [1, R] (the last of three or more: rank
    0), scaling G floats; row_adapter int32 [T] in [-1, G) (mixed and interleaved, -1 rows
    included); IA³ scales [G, N] near 1 (float32, float64 for float64). strided: x and base_out
    are column-strided views."""
    t, k, n, g, r = shape
    weight_dtype = weight_dtype or dtype

    def rand(*size, fan, to=dtype):
        return (torch.randn(size, generator=generator, dtype=torch.float64) / max(fan, 1) ** 0.5).to(to)

    x, base_out = rand(t, 2 * k if strided else k, fan=1), rand(t, 2 * n if strided else n, fan=1)
    if strided:
        x, base_out = x[:, ::2], base_out[:, ::2]
    ranks = torch.randint(1, r + 1, (g,), generator=generator).tolist() if r > 0 else [0] * g
    if g >= 3:
        ranks[-1] = 0
    lora_a = [rand(rank, k, fan=k, to=weight_dtype).to(device) for rank in ranks]
    lora_b = [rand(n, rank, fan=max(rank, 1), to=weight_dtype).to(device) for rank in ranks]
    scaling = (0.5 + 2 * torch.rand(g, generator=generator, dtype=torch.float64)).tolist()
    row_adapter = torch.randint(-1, g, (t,), generator=generator, dtype=torch.int32)
    scales = (1 + 0.5 * torch.randn(g, n, generator=generator, dtype=torch.float64)).to(acc_dtype(dtype))
    to = lambda v: v.to(device)  # noqa: E731
    return to(base_out), to(x), lora_a, lora_b, scaling, to(row_adapter), to(scales)


def grouped_errors(base_out, x, lora_a, lora_b, scaling, row_adapter, scales, generator) -> dict[str, float]:
    """Worst error / allowed error (pass: <= 1) of both compiled grouped ops and of the gradients
    their autograd formulas give (lora: base_out, x, every lora_a[g] and lora_b[g]; ia3: t, scales),
    judged as lora_linear_errors: against the float64 reference, allowed GEMM_TOLERANCE[x's dtype]
    times the same computation on absolute values, element by element (plus the smallest normal
    number)."""
    dtype, adapters = x.dtype, len(lora_a)
    leaves = [t.detach().requires_grad_() for t in (base_out, x, *lora_a, *lora_b)]

    def split(ls):  # base_out, x, lora_a list, lora_b list
        return ls[0], ls[1], ls[2 : 2 + adapters], ls[2 + adapters :]

    out = torch.ops.peftkern.lora_grouped_fwd(*split(leaves), scaling, row_adapter)
    g = torch.randn(out.shape, generator=generator).to(dtype)
    got = torch.autograd.grad(out, leaves, g.to(out.device), materialize_grads=True)

    ra = row_adapter.cpu()

    def lora64(transform):
        ls = [transform(t.detach().double().cpu()).requires_grad_() for t in leaves]
        scales64 = [abs(s) for s in scaling] if transform is torch.abs else scaling
        return grouped_ops.lora_grouped_reference(*split(ls), scales64, ra), ls

    exact, ls = lora64(lambda t: t)
    magnitude, abs_ls = lora64(torch.abs)
    want = torch.autograd.grad(exact, ls, g.double(), materialize_grads=True)  # G = 0: x unused
    bounds = torch.autograd.grad(magnitude, abs_ls, g.double().abs(), materialize_grads=True)
    tolerance, floor = GEMM_TOLERANCE[dtype], torch.finfo(dtype).tiny
    names = ("lora out", "lora grad_base", "lora grad_x", *(f"lora grad_a[{i}]" for i in range(adapters)),
             *(f"lora grad_b[{i}]" for i in range(adapters)))  # fmt: skip
    errors: dict[str, float] = {}
    _scaled_errors(errors, names, (out, *got), (exact, *want), (magnitude, *bounds), tolerance, floor)

    # IA³ over base_out's [T, N]: t ⊙ scales[g].
    t, s = base_out.detach().requires_grad_(), scales.detach().requires_grad_()
    out = torch.ops.peftkern.ia3_grouped_scale(t, s, row_adapter)
    got = torch.autograd.grad(out, (t, s), g.to(out.device))

    def ia3_64(transform):
        ls = [transform(v.detach().double().cpu()).requires_grad_() for v in (t, s)]
        return grouped_ops.ia3_grouped_scale_reference(*ls, ra), ls

    exact, ls = ia3_64(lambda v: v)
    magnitude, abs_ls = ia3_64(torch.abs)
    want = torch.autograd.grad(exact, ls, g.double())
    bounds = torch.autograd.grad(magnitude, abs_ls, g.double().abs())
    names = ("ia3 out", "ia3 grad_t", "ia3 grad_scales")
    return _scaled_errors(errors, names, (out, *got), (exact, *want), (magnitude, *bounds), tolerance, floor)


def check_grouped(device: str, generator: torch.Generator) -> list[Result]:
    """lora_grouped_fwd and ia3_grouped_scale (forward and autograd) against the reference; for
    half activations also with float32 adapters (PEFT's usual mix)."""
    results = []
    for dtype in DTYPES:
        weight_dtypes = [dtype] + ([torch.float32] if dtype in (torch.float16, torch.bfloat16) else [])
        for weight_dtype in weight_dtypes:
            for shape in GROUPED_SHAPES:
                for strided in (False, True):
                    inputs = random_grouped_inputs(shape, dtype, device, generator, strided, weight_dtype)
                    errors = grouped_errors(*inputs, generator)
                    for op in ("lora_grouped_fwd", "ia3_grouped_scale"):
                        if op != "lora_grouped_fwd" and weight_dtype != dtype:
                            continue  # the IA³ op has no adapter dtype of its own: checked once
                        prefix = op.split("_")[0] + " "
                        worst = max(e for name, e in errors.items() if name.startswith(prefix))
                        name = f"{op}+bwd" + (" f32 w" if weight_dtype != dtype else "")
                        results.append(Result(name, device, str(dtype).removeprefix("torch."), shape, 0, worst,
                                              worst <= 1.0))  # fmt: skip
    return results


# --- Scaled LoRA (VeRA, AdaLoRA): scaled_lora_linear_fwd + bwd -------------------------------------
# (tokens, in, out, r): one token, odd sizes, r larger than a dimension, no rows.
SCALED_LORA_SHAPES = [(1, 7, 5, 2), (13, 33, 17, 4), (200, 96, 80, 16), (3, 5, 4, 8), (0, 6, 5, 3)]
# (rank_scale, out_scale, A and B trained): LoRA's case, AdaLoRA's (E, A/B trained), VeRA's
# (λ_d, λ_b, A/B frozen), and the other mixes.
SCALED_LORA_VARIANTS = [(False, False, True), (True, False, True), (True, True, False), (False, True, False),
                        (True, True, True)]  # fmt: skip


def random_scaled_lora_inputs(shape, dtype, device, generator, rank_scale=True, out_scale=True, dropout=False,
                              strided=False):  # fmt: skip
    """x, W, b, A, B as random_lora_inputs, plus rank_scale [r] and out_scale [N] (float32; float64
    for float64), each of either sign; strided: A a column slice of a wider matrix (VeRA's
    vera_A[:, :in]) and B a row slice (vera_B[:out, :])."""
    m, k, n, r = shape
    x, w, b, a, bb, drop = random_lora_inputs(shape, dtype, device, generator, dropout=dropout)
    if strided:
        wide_a = torch.randn(r, k + 5, generator=generator, dtype=torch.float64) / max(k, 1) ** 0.5
        tall_b = torch.randn(n + 3, r, generator=generator, dtype=torch.float64) / max(r, 1) ** 0.5
        a, bb = wide_a.to(device=device, dtype=dtype)[:, :k], tall_b.to(device=device, dtype=dtype)[:n]
    scale_dtype = acc_dtype(dtype)
    rs = torch.randn(r, generator=generator, dtype=torch.float64).to(device=device, dtype=scale_dtype)
    os_ = torch.randn(n, generator=generator, dtype=torch.float64).to(device=device, dtype=scale_dtype)
    return x, w, b, a, bb, rs if rank_scale else None, os_ if out_scale else None, drop


def scaled_lora_errors(x, w, b, a, bb, rs, os_, drop, scaling, train_ab, generator) -> dict[str, float]:
    """Worst error / allowed error of scaled_lora_linear_fwd's output and of its gradients for x,
    the scales present and (train_ab) A and B (pass: <= 1), judged as lora_linear_errors: against
    the float64 reference, allowed GEMM_TOLERANCE[dtype] times the same computation on absolute
    values, element by element (plus the smallest normal number). NaN gives inf."""
    names = ["x"] + (["a", "b"] if train_ab else []) + (["rank_scale"] if rs is not None else []) + (
        ["out_scale"] if os_ is not None else [])  # fmt: skip
    tensors = {"x": x, "w": w, "b": b, "a": a, "b_": bb, "rank_scale": rs, "out_scale": os_}
    trained = {"x": "x", "a": "a", "b": "b_", "rank_scale": "rank_scale", "out_scale": "out_scale"}
    leaves = {k: (t.detach().requires_grad_() if k in [trained[n] for n in names] else t) for k, t in tensors.items()}
    out, _ = torch.ops.peftkern.scaled_lora_linear_fwd(leaves["x"], w, b, leaves["a"], leaves["b_"],
                                                       leaves["rank_scale"], leaves["out_scale"], scaling,
                                                       *drop)  # fmt: skip
    cpu_mask, keep_scale = dropout_mask_of(x, drop)
    g = torch.randn(out.shape, generator=generator).to(out.dtype)
    got = torch.autograd.grad(out, [leaves[trained[n]] for n in names], g.to(out.device))

    def reference64(transform):
        ls = {k: (transform(t.detach().double().cpu()).requires_grad_() if t is not None else None)
              for k, t in tensors.items()}  # fmt: skip
        s = abs(scaling) if transform is torch.abs else scaling
        return scaled_lora_ops.scaled_lora_linear_reference(ls["x"], ls["w"], ls["b"], ls["a"], ls["b_"], s,
                                                            ls["rank_scale"], ls["out_scale"], cpu_mask,
                                                            keep_scale), ls  # fmt: skip

    exact, ls = reference64(lambda t: t)
    magnitude, abs_ls = reference64(torch.abs)
    want = torch.autograd.grad(exact, [ls[trained[n]] for n in names], g.double())
    bounds = torch.autograd.grad(magnitude, [abs_ls[trained[n]] for n in names], g.double().abs())
    tolerance = GEMM_TOLERANCE[out.dtype] * 2  # up to three chained products (xa, u·Bᵀ, ⊙ scale)
    floor = torch.finfo(out.dtype).tiny
    return _scaled_errors({}, ("out", *(f"grad_{n}" for n in names)), (out, *got), (exact, *want),
                          (magnitude, *bounds), tolerance, floor)  # fmt: skip


def check_scaled_lora(device: str, generator: torch.Generator) -> list[Result]:
    """scaled_lora_linear_fwd + bwd against the float64 reference: every mix of scales, A/B
    trained or frozen, with and without dropout, contiguous and strided A/B."""
    results = []
    for dtype in DTYPES:
        for shape in SCALED_LORA_SHAPES:
            for rank_scale, out_scale, train_ab in SCALED_LORA_VARIANTS:
                for dropout, strided in ((False, False), (True, True)):
                    x, w, b, a, bb, rs, os_, drop = random_scaled_lora_inputs(
                        shape, dtype, device, generator, rank_scale, out_scale, dropout, strided)  # fmt: skip
                    errors = scaled_lora_errors(x, w, b, a, bb, rs, os_, drop, 0.8, train_ab, generator)
                    worst = max(errors.values())
                    name = "scaled_lora " + "".join(c for c, on in zip("RO", (rank_scale, out_scale)) if on) + (
                        "" if train_ab else " frozen AB")  # fmt: skip
                    results.append(Result(name, device, str(dtype).removeprefix("torch."), shape, 0, worst,
                                          worst <= 1.0))  # fmt: skip
    return results


# ReLoRA's NF4 merge: (out, in, rank) with odd sizes, a partial last block, rank 0, and a projection.
RELORA_SHAPES = [(7, 9, 3), (1, 5, 1), (33, 70, 4), (64, 64, 0), (257, 129, 8), (512, 256, 16)]


def check_relora(device: str, generator: torch.Generator) -> list[Result]:
    """nf4_merge_lowrank against its reference: exact (same float32 / float64 roundings)."""
    results: list[Result] = []
    for out, inp, rank in RELORA_SHAPES:
        for bs in (32, 64, 4096):
            w = torch.randn(out, inp, generator=generator).to(device) * 0.05
            packed, absmax = nf4_ops.quantize(w, bs)
            a = (torch.randn(rank, inp, generator=generator) / max(inp, 1) ** 0.5).to(device)
            b = (torch.randn(out, rank, generator=generator) * 0.05).to(device)
            got = torch.ops.peftkern.nf4_merge_lowrank(packed, absmax, a, b, 1.5, bs, [out, inp])
            want = relora_ops.nf4_merge_lowrank_reference(packed, absmax, a, b, 1.5, bs, (out, inp))
            _exact(results, "nf4_merge_lowrank", device, torch.float32, (out, inp, rank), bs, list(zip(got, want)))
    return results


# Proxy-tuning's decode-step op: (rows, vocab, expert padding), up to a real vocabulary; and
# (temperature, top_k, top_p): the plain combine (greedy), top-k + top-p, top-p alone.
PROXY_SHAPES = [(1, 7, 0), (3, 300, 5), (8, 32000, 64), (4, 49152, 0)]
PROXY_FILTERS = [(1.0, 0, 1.0), (0.7, 50, 0.9), (1.3, 0, 0.8)]


def check_proxy(device: str, generator: torch.Generator) -> list[Result]:
    """proxy_logits against its reference (run on the CPU, where PyTorch divides by the
    temperature exactly): the same removed tokens, kept values within an ulp (error inf when the
    removed sets differ)."""
    results: list[Result] = []
    for dtype in DTYPES:
        for rows, vocab, pad in PROXY_SHAPES:
            for temperature, top_k, top_p in PROXY_FILTERS:
                b, e, a = ((torch.randn(rows, vocab + (0 if i == 0 else pad), generator=generator) * 3).to(dtype)
                           for i in range(3))  # fmt: skip
                got = torch.ops.peftkern.proxy_logits(b.to(device), e.to(device), a.to(device), 1.0, temperature,
                                                      top_k, top_p, 1).cpu()  # fmt: skip
                want = proxy_ops.proxy_logits_reference(b, e, a, 1.0, temperature, top_k, top_p, 1)
                kept = torch.isfinite(want)
                same = torch.equal(torch.isfinite(got), kept) and torch.equal(got.isnan(), want.isnan())
                error = _max_error(got[kept], want[kept]) if same else float("inf")
                bound = 2e-7 * float(want[kept].abs().max()) if kept.any() else 0.0
                results.append(Result(f"proxy_logits T={temperature} k={top_k} p={top_p}", device,
                                      str(dtype).removeprefix("torch."), (rows, vocab), 0, error, error <= bound))  # fmt: skip
    return results


def check_rank_product(device: str, generator: torch.Generator) -> list[Result]:
    """LoRA's rank-r backward products (csrc/rank_product/; on CPU the AVX-512 kernels where they
    apply): lora_out_grads and lora_input_grads_ (with and without dropout) within the GEMM
    tolerance of float64 products, relative to the same products on absolute values. Shapes: row
    groups with a tail, features short of and past a vector, 1-4 vectors of r, r past 64."""
    results = []
    for dtype in DTYPES:
        for m, d, r in [(1, 1, 1), (9, 17, 16), (37, 200, 33), (5, 31, 64), (4, 48, 65)]:
            g, x, gx0 = (torch.randn(m, d, generator=generator).to(dtype) for _ in range(3))
            xa, lora_b, lora_a = (torch.randn(s, generator=generator).to(dtype) for s in ((m, r), (d, r), (r, d)))
            g64, x64, xa64, b64, a64 = (t.double() for t in (g, x, xa, lora_b, lora_a))
            got = torch.ops.peftkern.lora_out_grads(g.to(device), xa.to(device), lora_b.to(device), 0.5)
            errors = _scaled_errors({}, ["grad_xa", "grad_b"], got, [0.5 * g64 @ b64, 0.5 * g64.t() @ xa64],
                                    [0.5 * g64.abs() @ b64.abs(), 0.5 * g64.abs().t() @ xa64.abs()],
                                    GEMM_TOLERANCE[dtype], 1e-30)  # fmt: skip
            worst = max(errors.values())
            results.append(Result("lora_out_grads", device, str(dtype).removeprefix("torch."), (m, d, r), 0, worst,
                                  worst <= 1.0))  # fmt: skip
            for p in (0.0, 0.3):
                seed, offset = (int(v) for v in torch.randint(0, 2**62, (2,), generator=generator))
                grad_x = gx0.to(device).clone()
                grad_a = torch.ops.peftkern.lora_input_grads_(grad_x, x.to(device), xa.to(device), lora_a.to(device),
                                                              p, seed, offset)  # fmt: skip
                keep = dropout_ops.lora_dropout_mask_reference((m, d), p, seed, offset).double() / (1.0 - p)
                errors = _scaled_errors({}, ["grad_x", "grad_a"], [grad_x, grad_a],
                                        [gx0.double() + (xa64 @ a64) * keep, xa64.t() @ (x64 * keep)],
                                        [gx0.double().abs() + (xa64.abs() @ a64.abs()) * keep,
                                         xa64.abs().t() @ (x64.abs() * keep)], GEMM_TOLERANCE[dtype], 1e-30)  # fmt: skip
                worst = max(errors.values())
                results.append(Result(f"lora_input_grads_ p={p}", device, str(dtype).removeprefix("torch."), (m, d, r),
                                      0, worst, worst <= 1.0))  # fmt: skip
    return results


# The fused cross-entropy: (rows, vocab) from one logit to a real vocabulary, odd sizes around the
# 16-lane vectors; every third row ignored.
CROSS_ENTROPY_SHAPES = [(1, 1), (5, 17), (4, 33), (6, 4099), (3, 49152), (0, 8)]
# dlogits: one rounding to the output dtype (its unit roundoff)
CROSS_ENTROPY_ROUNDING = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def check_cross_entropy(device: str, generator: torch.Generator) -> list[Result]:
    """cross_entropy_fwd (loss, lse) and cross_entropy_bwd (dlogits) against float64: the loss and
    lse within 1e-5·(1 + |lse|); dlogits within one rounding to the output dtype plus 1e-5·|g|·p (the
    float32 exp / lse error, relative to the probability p: at the label p − 1 may cancel), plus
    1e-7 (fp16's subnormals). Scaled errors, pass <= 1."""
    results = []
    for dtype in DTYPES:
        for rows, vocab in CROSS_ENTROPY_SHAPES:
            logits = (torch.randn(rows, vocab, generator=generator) * 4).to(dtype)
            labels = torch.randint(0, vocab, (rows,), generator=generator)
            labels[::3] = ce_ops.IGNORE_INDEX
            grad_loss = torch.randn(rows, generator=generator)
            z = logits.double().requires_grad_()
            want_loss, want_lse = ce_ops.cross_entropy_rows_reference(z, labels)
            (want_loss * grad_loss.double()).sum().backward()
            loss, lse = torch.ops.peftkern.cross_entropy_fwd(logits.to(device), labels.to(device), ce_ops.IGNORE_INDEX)
            grad = torch.ops.peftkern.cross_entropy_bwd(grad_loss.to(device), logits.to(device), labels.to(device), lse,
                                                        ce_ops.IGNORE_INDEX).cpu()  # fmt: skip
            bound = 1e-5 * (1.0 + want_lse.detach().abs())
            errors = _scaled_errors({}, ["loss", "lse"], [loss, lse], [want_loss.detach(), want_lse.detach()],
                                    [bound, bound], 1.0, 1e-30)  # fmt: skip
            p = torch.softmax(z.detach(), dim=-1) if vocab > 0 else z.detach()
            bound = (CROSS_ENTROPY_ROUNDING[dtype] * torch.maximum(z.grad.abs(), grad.double().abs().nan_to_num(0.0))
                     + 1e-5 * grad_loss.double().abs()[:, None] * p)  # fmt: skip
            _scaled_errors(errors, ["dlogits"], [grad], [z.grad], [bound], 1.0, 1e-7)
            worst = max(errors.values())
            results.append(Result("cross_entropy", device, str(dtype).removeprefix("torch."), (rows, vocab), 0, worst,
                                  worst <= 1.0))  # fmt: skip
    return results


# The per-family checks `python -m peftkern.check` runs, in its order: name -> check(device,
# generator) -> list[Result].
CHECKS = {
    "nf4": check_nf4,
    "lora": check_lora,
    "dropout": check_dropout,
    "rank_product": check_rank_product,
    "dora": check_dora,
    "qlora_gemv": check_qlora_gemv,
    "qlora_train": check_qlora_train,
    "ia3": check_ia3,
    "adapter": check_adapter,
    "grouped": check_grouped,
    "scaled_lora": check_scaled_lora,
    "relora": check_relora,
    "proxy": check_proxy,
    "cross_entropy": check_cross_entropy,
}
