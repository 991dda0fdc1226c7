"""`python -m peftkern.check`: every compiled op on every available device against its
plain-PyTorch reference, on fresh random inputs. Prints one row per case and exits non-zero on
any failure, or when the compiled library is missing. Run it first on a new machine or GPU.

Every output is poisoned (NaN / 0xA5) before the kernel writes it, so unwritten elements fail.
Where the CUDA emulation has been built (build/emu/, see peftkern/emulation.py), the CUDA kernels
also run on the CPU under it, as the device "cuda-emu" (`--no-emulation` leaves them out).
The checks themselves (shapes, tolerances, judges) are in peftkern.testing, shared with the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import sys

import torch

from . import _ext
from .ops import routing
from .testing import CHECKS, Result

# Names the tests imported from here before peftkern.testing held them: `from peftkern.check
# import X` keeps working.
from .testing import (  # noqa: F401
    GROUPED_SHAPES,
    IA3_SHAPES,
    LORA_SHAPES,
    grouped_errors,
    ia3_linear_errors,
    lora_linear_errors,
    random_grouped_inputs,
    random_ia3_inputs,
    random_lora_inputs,
)


def devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available() and _ext.has_cuda_kernels():
        found.append("cuda")
    return found


def emulated_results(generator: torch.Generator) -> list[Result]:
    """The checks of every op with a CUDA kernel, run by the CUDA emulation on CPU tensors."""
    from . import emulation

    emulation.load(build_if_needed=False)
    ops = set(emulation.emulated_ops())
    results = []
    with emulation.cuda_kernels_on_cpu():
        for check in CHECKS.values():
            for r in check("cpu", generator):
                root = r.op.split("+")[0].split(" ")[0]
                if {root, f"{root}_fwd", f"{root}_linear_fwd"} & ops:  # the check's name -> the op's
                    results.append(dataclasses.replace(r, device="cuda-emu"))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m peftkern.check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--all", action="store_true", help="print passing rows too (default: a summary per op)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    parser.add_argument("--no-emulation", action="store_true", help="leave out the emulated CUDA kernels")
    args = parser.parse_args(argv)

    info = _ext.build_info()
    print(f"peftkern build: {info}")
    if "cpu_isa" in info:
        print(f"CPU SIMD path: {info['cpu_isa']} (this CPU supports {', '.join(info['cpu_isas_supported'])}; "
              "PEFTKERN_CPU_ISA forces one)")
    if "cpu_gemm" in info:
        print(f"CPU GEMM library of the layers' float32 base GEMMs: {info['cpu_gemm']} (PEFTKERN_CPU_GEMM=aten|onednn "
              "forces one)")
    if not _ext.available():
        print("FAIL: the compiled op library is missing; build it with `pip install --no-build-isolation -e .`")
        return 1
    if torch.cuda.is_available() and not _ext.has_cuda_kernels():
        print("note: a GPU is visible but this build has no CUDA kernels (CPU-only build): checking CPU only")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    from . import emulation

    emulate = not args.no_emulation and emulation.library_path().exists()
    print(f"seed {seed}; devices {devices() + (['cuda-emu'] if emulate else [])}")
    generator = torch.Generator().manual_seed(seed)

    _ext.set_poison_outputs(True)
    try:
        with routing.kernels_always():  # the kernels at every size, not the small-size reference route
            results = [r for device in devices() for check in CHECKS.values() for r in check(device, generator)]
            if emulate:
                results += emulated_results(generator)
    finally:
        _ext.set_poison_outputs(False)

    print("max error: NF4 ops and the dropout (philox_words, lora_dropout) must be exact (0); "
          "lora_dropout_project worst error / allowed error (<= 1); "
          "lora_linear_fwd+bwd reports worst error / allowed error (<= 1); "
          "dora_weight_norm the relative error (fp32 1e-5, fp16 1e-3, bf16 8e-3); ia3_*_linear_fwd+bwd as lora; "
          "nf4_lora_gemv the max error relative to the output's scale; nf4_lora_linear_train+bwd as lora (CPU); "
          "adapter_bottleneck (fwd+bwd) worst error / allowed error (<= 1); "
          "lora_grouped_fwd / ia3_grouped_scale (+bwd) as lora; "
          "scaled_lora (R: rank_scale, O: out_scale; fwd+bwd) as lora")
    header = f"{'op':<28}{'device':<9}{'dtype':<10}{'shape':<14}{'block':>6}{'max error':>12}  result"
    print(header)
    print("-" * len(header))
    shown = results if args.all else [r for r in results if not r.passed]
    for r in shown:
        print(f"{r.op:<28}{r.device:<9}{r.dtype:<10}{str(r.shape):<14}{r.blocksize:>6}{r.max_error:>12.3g}  "
              f"{'pass' if r.passed else 'FAIL'}")  # fmt: skip
    if not args.all:  # one summary row per (op, device, dtype)
        groups: dict[tuple, list[Result]] = {}
        for r in results:
            groups.setdefault((r.op, r.device, r.dtype), []).append(r)
        for (op, device, dtype), rows in groups.items():
            worst = max(r.max_error for r in rows)
            ok = all(r.passed for r in rows)
            print(f"{op:<28}{device:<9}{dtype:<10}{f'{len(rows)} cases':<14}{'all':>6}{worst:>12.3g}  "
                  f"{'pass' if ok else 'FAIL'}")  # fmt: skip
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
