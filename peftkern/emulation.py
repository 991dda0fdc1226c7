"""The CUDA kernels, run on the CPU: a test-only build of the .cu files as C++ (csrc/emu/).

The same kernel source that nvcc compiles is compiled by the host compiler with
`-DPEFTKERN_CUDA_EMULATION`: csrc/common/cuda_launch.h then maps the CUDA spellings onto an
execution model in which GPU threads are fibers, blocks run one after another, barriers and warp
shuffles are scheduling points, and launch limits are enforced (DESIGN.md, "CUDA kernels on the
CPU"). The result is a plain shared library registering the kernels as CPU kernels of the op
namespace `peftkern_emu`, with the same schemas as `peftkern`.

    build(variant)            compile it (ninja, ccache when found) under build/emu/<variant>/
    load(variant)             build if needed and load it into this process
    cuda_kernels_on_cpu()     a context in which `torch.ops.peftkern.*` on CPU tensors runs the
                              emulated CUDA kernels (every call under several schedules, compared
                              bit for bit), so the op tests run unchanged against them
    launch_stats()            which launch sites and instantiations ran

Variants: "ubsan" (the default: UndefinedBehaviorSanitizer, which stops at a misaligned vector
load) and "asan" (AddressSanitizer + UBSan, which needs `LD_PRELOAD` of libasan in the process
that loads it: see scripts/emu_asan.sh). Source trees other than this checkout (the planted-bug
suite builds mutated copies) are passed as `root`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "peftkern_emu"
CONTROL_OPS = (
    "emu_set_schedule", "emu_launch_stats", "emu_reset_launch_stats", "emu_static_shared_bytes", "emu_selftest",
    "emu_instantiations",
)  # fmt: skip
# Every emulated call runs under each of these (thread and block orders); results must be equal.
DEFAULT_SCHEDULES = ("forward", "reverse", "shuffle")

_VARIANT_FLAGS = {
    "ubsan": ["-fsanitize=undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all"],
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all"],
}
_loaded: dict[str, Path] = {}


def cuda_sources(root: Path = ROOT) -> list[Path]:
    """The [cuda] section of csrc/sources.txt: the .cu files the emulation compiles."""
    sources, section = [], None
    for line in (root / "csrc" / "sources.txt").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#") and section == "cuda":
            sources.append(root / line)
    return sources


_SHARED = re.compile(r"(?P<extern>\bextern\s+)?\b__shared__\s+(?P<decl>[^;{}()]+?)\s*;")
_DECLARATOR = re.compile(r"^(?P<type>.+?)\s*\b(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]*\]\s*)*)$")


def rewrite_shared(source: str, path: str) -> str:
    """The one source transformation of the emulation build: each `__shared__ T name[n];` becomes
    `static T name[n];` plus a call that tells the runtime where the array is (on the same line, so
    line numbers stay), and `extern __shared__ T name[];` a pointer to the dynamic shared memory.
    A form this does not recognise is an error (never silently per-thread storage)."""

    def replace(match):
        declarator = _DECLARATOR.match(match["decl"].strip())
        if declarator is None:
            raise ValueError(f"{path}: cannot rewrite the __shared__ declaration {match[0]!r} for the emulation")
        type_, name, dims = declarator["type"], declarator["name"], declarator["dims"].strip()
        if match["extern"]:
            if dims != "[]":
                raise ValueError(f"{path}: extern __shared__ must be `T name[]`, got {match[0]!r}")
            return f"{type_}* const {name} = reinterpret_cast<{type_}*>(::peftkern::emu::dynamic_shared());"
        return (
            f"static {type_} {name}{dims}; "
            f"::peftkern::emu::use_shared(&{name}, sizeof({name}), __FILE__, __LINE__);"
        )

    return _SHARED.sub(replace, source)


def library_path(variant: str = "ubsan", root: Path = ROOT) -> Path:
    return root / "build" / "emu" / variant / "libpeftkern_emu.so"


def _compiler() -> list[str]:
    cxx = os.environ.get("CXX", "c++")
    launcher = ["ccache"] if shutil.which("ccache") and "ccache" not in cxx else []
    return launcher + cxx.split()


def _ninja_file(variant: str, root: Path, out_dir: Path, replace: dict[str, str]) -> str:
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [root / "csrc", *map(Path, cpp_extension.include_paths())]
    cflags = [
        "-std=c++20", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer", "-ffp-contract=off", "-fvisibility=hidden",
        "-DPEFTKERN_CUDA_EMULATION", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-Wno-attributes",
        *_VARIANT_FLAGS[variant], *(f"-isystem {p}" if p != root / "csrc" else f"-I{p}" for p in includes),
    ]  # fmt: skip
    torch_lib = Path(torch.__file__).parent / "lib"
    ldflags = [
        "-shared", *_VARIANT_FLAGS[variant], f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu",
        "-ltorch",
    ]  # fmt: skip
    cxx = " ".join(_compiler())
    lines = [
        "ninja_required_version = 1.3",
        f"cxx = {cxx}",
        f"cflags = {' '.join(cflags)}",
        f"ldflags = {' '.join(ldflags)}",
        "rule compile",
        "  command = $cxx -MMD -MF $out.d -x c++ $cflags $includes -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = emu: compile $in",
        "rule link",
        "  command = $cxx $in $ldflags -o $out",
        "  description = emu: link $out",
    ]
    objects = []
    # compiled from their rewritten copies (rewrite_shared); selftest.cu: the emulation's own tests
    for source in [*cuda_sources(root), root / "csrc/emu/selftest.cu"]:
        relative = source.relative_to(root)
        copy = out_dir / "src" / relative
        copy.parent.mkdir(parents=True, exist_ok=True)
        original = replace.get(str(relative), None) or source.read_text()
        text = f'#line 1 "{relative}"\n' + rewrite_shared(original, str(relative))
        if not copy.exists() or copy.read_text() != text:  # keep ninja's timestamps when unchanged
            copy.write_text(text)
        obj = f"obj/{source.parent.name}_{source.stem}.o"
        objects.append(obj)
        lines += [f"build {obj}: compile {copy}", f"  includes = -iquote {source.parent}"]
    # A replaced header (the planted-bug suite): its copy under src/, where the .cu copies' quoted
    # includes ("../common/x.h", relative to the including file) find it before the original.
    compiled = {str(s.relative_to(root)) for s in cuda_sources(root)}
    for relative, text in replace.items():
        if relative not in compiled:
            copy = out_dir / "src" / relative
            copy.parent.mkdir(parents=True, exist_ok=True)
            if not copy.exists() or copy.read_text() != text:
                copy.write_text(text)
    for source in [root / "csrc/emu/runtime.cpp", root / "csrc/emu/library.cpp"]:
        obj = f"obj/{source.parent.name}_{source.stem}.o"
        objects.append(obj)
        lines.append(f"build {obj}: compile {source}")
    lines.append(f"build libpeftkern_emu.so: link {' '.join(objects)}")
    return "\n".join(lines) + "\n"


def build(
    variant: str = "ubsan", root: Path = ROOT, quiet: bool = True, out_dir: Path | None = None,
    replace: dict[str, str] | None = None,
) -> Path:
    """Compiles the emulation library (incrementally) and returns its path. Raises RuntimeError with
    the compiler's output when the build fails. `replace` maps a .cu file or a header they include
    (relative to `root`) to the text to compile instead (the planted-bug suite), built in `out_dir`."""
    if variant not in _VARIANT_FLAGS:
        raise ValueError(f"variant must be one of {sorted(_VARIANT_FLAGS)}, got {variant!r}")
    root = Path(root)
    out_dir = Path(out_dir) if out_dir else library_path(variant, root).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    ninja_file = out_dir / "build.ninja"
    text = _ninja_file(variant, root, out_dir, replace or {})
    if not ninja_file.exists() or ninja_file.read_text() != text:
        ninja_file.write_text(text)
    ninja = shutil.which("ninja") or str(Path(sysconfig.get_path("scripts")) / "ninja")
    jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
    result = subprocess.run([ninja, "-C", str(out_dir), "-j", jobs], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the CUDA emulation failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}")
    if not quiet:
        print(result.stdout, file=sys.stderr)
    return out_dir / "libpeftkern_emu.so"


def load(variant: str | None = None, root: Path = ROOT, build_if_needed: bool = True) -> Path:
    """Loads the emulation library into this process (once). `variant` defaults to
    $PEFTKERN_EMULATION_VARIANT, else "ubsan"; $PEFTKERN_EMULATION_LIBRARY names a library built
    elsewhere (a planted-bug build) to load instead."""
    variant = variant or os.environ.get("PEFTKERN_EMULATION_VARIANT", "ubsan")
    if os.environ.get("PEFTKERN_EMULATION_LIBRARY") and not _loaded:
        path = Path(os.environ["PEFTKERN_EMULATION_LIBRARY"])
        torch.ops.load_library(str(path))
        _loaded[variant] = path
        return path
    if _loaded:
        (loaded_variant, path), *_ = _loaded.items()
        if loaded_variant != variant:
            raise RuntimeError(f"the {loaded_variant!r} emulation is already loaded ({path}); one per process")
        return path
    path = build(variant, root) if build_if_needed else library_path(variant, root)
    if not path.exists():
        raise FileNotFoundError(f"no emulation build at {path}: run peftkern.emulation.build()")
    torch.ops.load_library(str(path))
    _loaded[variant] = path
    return path


def is_loaded() -> bool:
    return bool(_loaded)


def emulated_ops() -> list[str]:
    """The kernel ops the loaded emulation implements (CPU kernels of `peftkern_emu`)."""
    names = torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
    prefix = NAMESPACE + "::"
    ops = [n[len(prefix) :] for n in names if n.startswith(prefix)]
    return sorted(op for op in ops if op not in CONTROL_OPS)


def set_schedule(mode: str, seed: int = 0) -> None:
    torch.ops.peftkern_emu.emu_set_schedule(mode, seed)


def launch_stats() -> list[dict]:
    """Per launch site: file, line, kernel, blocks, threads and launches by instantiation."""
    return json.loads(torch.ops.peftkern_emu.emu_launch_stats())


def reset_launch_stats() -> None:
    torch.ops.peftkern_emu.emu_reset_launch_stats()


def _bits(value):
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(-1).contiguous().view(torch.uint8) if value.numel() else value
    if isinstance(value, (tuple, list)):
        return [_bits(v) for v in value]
    return value


def _first_difference(a, b, path="output"):
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{path}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        if a.numel() and not torch.equal(_bits(a), _bits(b)):
            flat_a, flat_b = a.reshape(-1), b.reshape(-1)
            diff = (_bits(a).view(-1, a.element_size()) != _bits(b).view(-1, b.element_size())).any(1)
            i = int(diff.nonzero()[0])
            return f"{path}[flat {i}]: {flat_a[i].item()} vs {flat_b[i].item()}"
        return None
    if isinstance(a, (tuple, list)):
        for n, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{path}[{n}]")
            if found:
                return found
    return None


class ScheduleRace(AssertionError):
    """An emulated kernel gave different bits under two thread / block schedules: a race."""


def _emulated_kernel(name: str, schedules, seed: int):
    op = getattr(getattr(torch.ops, NAMESPACE), name).default
    calls = [0]
    # Arguments the op writes (`Tensor(a!)`): each schedule starts from their original values, and
    # what it leaves in them is compared like an output; the first schedule's values are kept.
    mutable = [i for i, arg in enumerate(op._schema.arguments) if arg.alias_info is not None and arg.alias_info.is_write]

    def kernel(*args, **kwargs):
        calls[0] += 1
        originals = [args[i].clone() for i in mutable]
        results = []
        for mode in schedules:
            for i, original in zip(mutable, originals):
                args[i].copy_(original)
            set_schedule(mode, seed + calls[0])
            out = op(*args, **kwargs)
            results.append((out, *(args[i].clone() for i in mutable)) if mutable else out)
        if mutable:
            for i, written in zip(mutable, results[0][1:]):
                args[i].copy_(written)
        for mode, other in zip(schedules[1:], results[1:]):
            found = _first_difference(results[0], other)
            if found:
                raise ScheduleRace(
                    f"emulated CUDA kernel of {name}: schedule {schedules[0]!r} and {mode!r} (seed {seed + calls[0]}) "
                    f"differ at {found}: a race between GPU threads or blocks"
                )
        set_schedule("forward")
        return results[0][0] if mutable else results[0]

    return kernel


@contextlib.contextmanager
def cuda_kernels_on_cpu(schedules=DEFAULT_SCHEDULES, seed: int = 0):
    """Within the context, `torch.ops.peftkern.<op>` on CPU tensors runs the emulated CUDA kernel of
    every op that has one (the CPU kernels come back on exit). Each call runs once per schedule and
    raises ScheduleRace unless all results are bit-identical."""
    load()
    lib = torch.library.Library("peftkern", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
            for name in emulated_ops():
                lib.impl(name, _emulated_kernel(name, tuple(schedules), seed), "CPU")
        yield
    finally:
        lib._destroy()


class LaunchSite(tuple):
    """(file, line, kernel) of one PK_LAUNCH in a .cu file; file relative to the checkout."""

    __slots__ = ()

    def __new__(cls, file, line, kernel):
        return super().__new__(cls, (file, line, kernel))

    file = property(lambda self: self[0])
    line = property(lambda self: self[1])
    kernel = property(lambda self: self[2])


def _split_arguments(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "(<[{":
            depth += 1
        elif ch in ")>]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return parts + [current.strip()]


def launch_sites(root: Path = ROOT) -> list[LaunchSite]:
    """Every PK_LAUNCH of the shipped .cu files (the sites the coverage report expects to run)."""
    sites = []
    for source in cuda_sources(root):
        for number, line in enumerate(source.read_text().splitlines(), 1):
            start = line.find("PK_LAUNCH(")
            if start < 0 or line.lstrip().startswith("//"):
                continue
            depth, end = 0, None
            for i in range(start + len("PK_LAUNCH"), len(line)):
                depth += {"(": 1, ")": -1}.get(line[i], 0)
                if depth == 0:
                    end = i
                    break
            if end is None:
                raise ValueError(f"{source}:{number}: keep each PK_LAUNCH(...) on one line")
            kernel = _split_arguments(line[start + len("PK_LAUNCH(") : end])[-1]
            sites.append(LaunchSite(str(source.relative_to(root)), number, kernel))
    return sites


def compiled_instantiations() -> list[str]:
    """Every kernel instantiation compiled into the loaded library, e.g. "... [with auto Kernel =
    peftkern::qlora::{anonymous}::nf4_lora_gemv_kernel<float, 8>]"."""
    return json.loads(torch.ops.peftkern_emu.emu_instantiations())


def _parts(instantiation: str) -> tuple[str, int]:
    """"... [with auto Kernel = peftkern::ns::f<c10::Half, 8>; int Line = 154]" ->
    ("peftkern::ns::f<c10::Half, 8>", 154)."""
    body = instantiation.split("Kernel = ", 1)[-1].removesuffix("]")
    kernel, _, line = body.rpartition("; int Line = ")
    return kernel, int(line)


def _short(instantiation: str) -> str:
    """The kernel's name without its namespaces, with its template arguments."""
    kernel, _ = _parts(instantiation)
    head = kernel.split("<", 1)[0]
    return head.split("::")[-1] + kernel[len(head) :]


def _belongs(instantiation: str, site: LaunchSite) -> bool:
    kernel, line = _parts(instantiation)
    return line == site.line and kernel.split("<", 1)[0].split("::")[-1] == site.kernel.split("<", 1)[0]


def coverage(root: Path = ROOT) -> tuple[list[dict], list[str]]:
    """Per launch site of the sources: launches, instantiations (run / compiled) and GPU threads run
    since the library loaded (or the last reset); and what never ran (sites and instantiations)."""
    ran = {(s["file"], s["line"]): s for s in launch_stats()}
    compiled = [n for n in compiled_instantiations() if "emu_selftest" not in n]
    rows, missing = [], []
    for site in launch_sites(root):
        stats = ran.get((site.file, site.line))
        done = set(stats["instantiations"]) if stats else set()
        mine = [n for n in compiled if _belongs(n, site)]
        if stats is None:
            missing.append(f"{site.file}:{site.line} ({site.kernel})")
        missing += [f"{site.file}:{site.line} {_short(n)}" for n in mine if n not in done]
        rows.append({
            "site": f"{site.file}:{site.line}", "kernel": site.kernel,
            "launches": sum(stats["instantiations"].values()) if stats else 0,
            "instantiations": f"{len(done & set(mine))}/{len(mine)}",
            "threads": stats["threads"] if stats else 0,
        })  # fmt: skip
    return rows, missing


def coverage_table(root: Path = ROOT) -> str:
    rows, missing = coverage(root)
    lines = [f"{'launch site':<40} {'kernel':<58} {'launches':>8} {'instantiations':>14} {'GPU threads':>12}"]
    for r in rows:
        lines.append(
            f"{r['site']:<40} {r['kernel'][:58]:<58} {r['launches']:>8} {r['instantiations']:>14} {r['threads']:>12}"
        )
    sites_ran = sum(r["launches"] > 0 for r in rows)
    lines.append(f"{sites_ran} of {len(rows)} launch sites ran under the emulation")
    lines += [f"never ran: {m}" for m in missing]
    return "\n".join(lines)


def asan_environment() -> dict[str, str]:
    """What a process that loads the "asan" variant needs: libasan loaded first (Python is not built
    with it), no leak report at exit (the interpreter's own allocations are not ours)."""
    compiler = os.environ.get("CXX", "c++").split()[0]

    def library(name):
        path = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not path or not Path(path).exists():
            raise RuntimeError(f"no {name} found by {compiler} -print-file-name")
        return str(Path(path).resolve())

    # libstdc++ too: ASan's __cxa_throw interceptor needs it loaded before torch's libraries throw.
    preload = [library("libasan.so"), library("libstdc++.so"), os.environ.get("LD_PRELOAD", "")]
    return {
        "LD_PRELOAD": " ".join(filter(None, preload)),
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=1:verify_asan_link_order=0",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    }
