"""Size routing (peftkern/ops/routing.py): on CPU, fewer tokens than a family's measured threshold
take the plain-PyTorch reference path, as many or more take the compiled kernel; CUDA always takes
the kernel; `kernels_always()` overrides. Which path ran is read from the profiler (the kernel's
op name appears only when it ran). Results agree either way (the reference is the spec)."""

import os

import pytest
import torch

from peftkern import _ext
from peftkern.ops import adapter as adapter_ops
from peftkern.ops import ia3 as ia3_ops
from peftkern.ops import lora as lora_ops
from peftkern.ops import routing

pytestmark = pytest.mark.skipif(not _ext.has_kernel("ia3_output_linear_fwd", "cpu"), reason="no compiled CPU kernels")


@pytest.fixture
def routed():
    """Undo the session-wide kernels_always() of conftest for this test."""
    previous, routing._force_kernels = routing._force_kernels, False
    yield
    routing._force_kernels = previous


def ran(fn, op_name: str) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.name == f"peftkern::{op_name}" for e in prof.events())


def ia3_call(tokens, generator):
    x = torch.randn(tokens, 16, generator=generator, requires_grad=True)
    w = torch.randn(8, 16, generator=generator)
    l = torch.rand(8, 1, generator=generator).requires_grad_()
    return lambda: ia3_ops.ia3_linear(x, w, None, l, False).sum().backward(), (x, w, l)


def adapter_call(tokens, generator):
    x = torch.randn(tokens, 16, generator=generator, requires_grad=True)
    residual = torch.randn(tokens, 16, generator=generator)
    params = [torch.randn(4, 16, generator=generator), torch.randn(4, generator=generator),
              torch.randn(16, 4, generator=generator), torch.randn(16, generator=generator)]  # fmt: skip
    return lambda: adapter_ops.adapter_bottleneck(x, residual, *params).sum().backward(), (x, residual, *params)


def lora_call(tokens, generator):
    """LoRA with dropout 0.1; torch's generator is re-seeded per call so that both routes draw the
    same (seed, offset), hence the same decisions (the reference takes them as a mask)."""
    x = torch.randn(tokens, 16, generator=generator, requires_grad=True)
    w = torch.randn(8, 16, generator=generator)
    b = torch.randn(8, generator=generator)
    a = torch.randn(4, 16, generator=generator).requires_grad_()
    bb = torch.randn(8, 4, generator=generator).requires_grad_()

    def step():
        torch.manual_seed(1234)
        lora_ops.lora_linear(x, w, b, a, bb, 0.5, dropout=0.1, training=True).sum().backward()

    return step, (x, w, b, a, bb)


@pytest.mark.parametrize("family, op_name, make", [("ia3", "ia3_output_linear_fwd", ia3_call),
                                                   ("adapter", "adapter_bottleneck_fwd", adapter_call),
                                                   ("lora", "lora_linear_fwd", lora_call)])  # fmt: skip
def test_cpu_routes_by_size(routed, generator, family, op_name, make):
    threshold = routing.CPU_MIN_TOKENS[family]
    assert threshold >= 1
    small, _ = make(threshold - 1, generator)
    large, _ = make(threshold, generator)
    assert not ran(small, op_name), f"{family}: {threshold - 1} tokens should take the reference path"
    assert ran(large, op_name), f"{family}: {threshold} tokens should take the kernel"
    with routing.kernels_always():
        assert ran(small, op_name)


def test_lora_routes_by_its_no_grad_threshold_when_nothing_needs_grad(routed, generator):
    """Inference (no_grad, or no input requiring grad) routes LoRA by CPU_MIN_TOKENS_NO_GRAD;
    training by CPU_MIN_TOKENS, even when only A and B require grad (a frozen base's first layer)."""
    train_min, infer_min = routing.CPU_MIN_TOKENS["lora"], routing.CPU_MIN_TOKENS_NO_GRAD["lora"]
    w = torch.randn(8, 16, generator=generator)
    a = torch.randn(4, 16, generator=generator).requires_grad_()
    b = torch.randn(8, 4, generator=generator).requires_grad_()

    for tokens in sorted({train_min - 1, train_min, infer_min - 1, infer_min}):
        with torch.no_grad():
            assert ran(lambda: lora_ops.lora_linear(torch.randn(tokens, 16, generator=generator), w, None, a, b, 0.5),
                       "lora_linear_fwd") == (tokens >= infer_min), tokens  # fmt: skip
        x = torch.randn(tokens, 16, generator=generator)  # needs no grad; A and B do
        assert ran(lambda: lora_ops.lora_linear(x, w, None, a, b, 0.5).sum().backward(),
                   "lora_linear_fwd") == (tokens >= train_min), tokens  # fmt: skip
    frozen = torch.randn(infer_min - 1, 16, generator=generator)
    assert not ran(lambda: lora_ops.lora_linear(frozen, w, None, a.detach(), b.detach(), 0.5), "lora_linear_fwd")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 8])
def test_lora_half_precision_decode_adds_a_float32_branch(routed, generator, dtype, tokens):
    """CPU decode in bf16/fp16 (no grad, few tokens): the rank-r branch runs in float32 and the
    sum is rounded once; within two roundings of the magnitudes of the summed terms, and no
    compiled op runs."""
    assert lora_ops.uses_float32_decode_branch(torch.empty(tokens, 64, dtype=dtype))
    x, w, b = (torch.randn(s, generator=generator) for s in ((tokens, 64), (96, 64), (96,)))
    a, bb = torch.randn(16, 64, generator=generator) / 8, torch.randn(96, 16, generator=generator) / 4
    half = [t.to(dtype) for t in (x, w, b, a, bb)]
    with torch.no_grad():
        assert not ran(lambda: lora_ops.lora_linear(*half, 2.0), "lora_linear_fwd")
        out = lora_ops.lora_linear(*half, 2.0)
    x64, w64, b64, a64, bb64 = (t.double() for t in half)
    exact = x64 @ w64.t() + b64 + 2.0 * (x64 @ a64.t()) @ bb64.t()
    terms = x64.abs() @ w64.abs().t() + b64.abs() + 2.0 * (x64.abs() @ a64.abs().t()) @ bb64.abs().t()
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert out.dtype == dtype and out.shape == (tokens, 96)
    assert ((out.double() - exact).abs() <= 2 * unit * terms).all()


@pytest.mark.parametrize("make", [ia3_call, adapter_call, lora_call])
def test_routes_agree(routed, generator, make):
    """Both routes give the same outputs and gradients (fp32, 1e-5 relative)."""
    step, leaves = make(5, generator)
    results = []
    for force in (False, True):
        for t in leaves:
            t.grad = None
        if force:
            with routing.kernels_always():
                step()
        else:
            step()
        results.append([t.grad.clone() for t in leaves if t.grad is not None])
    assert len(results[0]) == len(results[1]) > 0
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cuda_always_takes_the_kernel():
    assert all(routing.use_kernel(family, 1, "cuda") for family in routing.CPU_MIN_TOKENS)


def _cpu_vendor() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@pytest.mark.skipif(not _ext.op_exists("cpu_gemm"), reason="op library not built")
def test_cpu_gemm_library_choice():
    """The base GEMMs' library (csrc/common/cpu_gemm.h): oneDNN on AMD CPUs (where MKL takes its
    generic path), ATen elsewhere, PEFTKERN_CPU_GEMM forcing either; an unknown name is an error."""
    import subprocess
    import sys

    ops = torch.ops.peftkern
    has_onednn = hasattr(torch.ops.mkldnn, "_linear_pointwise")
    probe = "import torch, peftkern; print(torch.ops.peftkern.cpu_gemm())"
    default = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "PEFTKERN_CPU_GEMM"})  # fmt: skip
    assert default.stdout.strip() == ("onednn" if _cpu_vendor() == "AuthenticAMD" and has_onednn else "aten")
    forced = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={**os.environ, "PEFTKERN_CPU_GEMM": "aten"})  # fmt: skip
    assert forced.stdout.strip() == "aten"
    bad = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "PEFTKERN_CPU_GEMM": "blas"})  # fmt: skip
    assert bad.returncode != 0 and "PEFTKERN_CPU_GEMM: unknown CPU GEMM library 'blas'" in bad.stderr
    with pytest.raises(RuntimeError, match="set_cpu_gemm: unknown CPU GEMM library 'blas'"):
        ops.set_cpu_gemm("blas")
