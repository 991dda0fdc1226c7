"""Builds peftkern and its op library `peftkern._C`.

A CUDA build when torch has CUDA and nvcc is found, else a CPU-only build (with a message that
says why). Every knob is an environment variable, documented in README.md ("Environment variables"):

  PEFTKERN_FORCE_CPU=1        build the CPU kernels only
  PEFTKERN_CUDA_ARCHS="8.0;9.0"  GPU architectures (else TORCH_CUDA_ARCH_LIST, else the visible
                              GPUs, else DEFAULT_CUDA_ARCHS)
  CUDA_HOME                   the CUDA toolkit (else CUDA_PATH, else /usr/local/cuda)
  MAX_JOBS                    parallel compile jobs (torch's BuildExtension reads it)
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
# Compute capabilities built when nothing else says: Ampere (A100, A10/3090), Ada (L4/4090),
# Hopper (H100/H200), plus PTX of the newest so later GPUs can JIT it.
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def log(message):
    print(f"peftkern setup: {message}", file=sys.stderr)


def read_sources():
    """Sections of csrc/sources.txt: {"ops": [...], "cuda": [...], "python": [...]}."""
    sections, current = {}, None
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            current.append(line)
    return sections


def find_cuda_home():
    """CUDA_HOME must be known before torch.utils.cpp_extension is imported (it reads it once).

    A wrapper script on PATH (e.g. /usr/local/bin/nvcc) makes torch guess /usr/local, so look
    for a real toolkit first.
    """
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    return None


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


cuda_home = find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils import cpp_extension  # noqa: E402


def resolve_cuda_archs():
    """The arch list, as torch's TORCH_CUDA_ARCH_LIST syntax ("8.0;9.0+PTX"), and its origin."""
    for variable in ("PEFTKERN_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        value = os.environ.get(variable, "").strip()
        if value:
            return value.replace(" ", ";").replace(",", ";"), variable
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps), "visible GPUs"
    return DEFAULT_CUDA_ARCHS, "default list"


def want_cuda():
    if env_flag("PEFTKERN_FORCE_CPU"):
        return False, "PEFTKERN_FORCE_CPU is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if cpp_extension.CUDA_HOME is None or not Path(cpp_extension.CUDA_HOME, "bin", "nvcc").exists():
        return False, "no CUDA toolkit (nvcc) found; set CUDA_HOME to build the CUDA kernels"
    return True, f"CUDA {torch.version.cuda}, toolkit at {cpp_extension.CUDA_HOME}"


def extra_include_dirs():
    """cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h includes: a toolkit without them is
    completed by the ones torch's nvidia-* wheels ship."""
    dirs = []
    for site in map(Path, sys.path):
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            if (site / sub / "cusparse.h").exists():
                dirs.append(str(site / sub))
    return dirs[:1]


def write_build_config(cuda_archs):
    """Fills csrc/build_config.h.in (the template CMake's configure_file uses too) into
    csrc/generated/, which git ignores. A header, not -D"..." flags: string defines do not
    survive the shell that ninja runs compilers in."""
    template = (ROOT / "csrc" / "build_config.h.in").read_text()
    text = template.replace("@PEFTKERN_CUDA_ARCHS@", cuda_archs).replace(
        "@PEFTKERN_TORCH_VERSION@", torch.__version__
    )
    out_dir = ROOT / "csrc" / "generated"
    out_dir.mkdir(exist_ok=True)
    target = out_dir / "build_config.h"
    if not target.exists() or target.read_text() != text:  # keep ninja's incremental builds
        target.write_text(text)
    return str(out_dir)


def make_extension():
    sources = read_sources()
    use_cuda, reason = want_cuda()
    # -fopenmp: the CPU kernels split their work with at::parallel_for, whose OpenMP backend (torch's
    # pip builds) is a `#pragma omp parallel` in a header: compiled without -fopenmp it runs every
    # task on the calling thread. Linked the same way, libgomp.so.1 is the one torch loaded (its
    # wheels ship libgomp.so.1 under that soname), so torch.set_num_threads governs ours too.
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp"]
    link_flags = ["-fopenmp"]
    files = sources["ops"] + sources["python"]
    if not use_cuda:
        log(f"building the CPU-only op library ({reason})")
        return cpp_extension.CppExtension(
            "peftkern._C", files, include_dirs=[write_build_config("")], extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )

    archs, origin = resolve_cuda_archs()
    # torch turns TORCH_CUDA_ARCH_LIST into -gencode flags; we pass no -gencode of our own, so this
    # is the only arch knob (torch would ignore the list if it saw raw -gencode flags).
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    log(f"building CPU + CUDA kernels for archs {archs} ({origin}); {reason}")
    return cpp_extension.CUDAExtension(
        "peftkern._C",
        files + sources["cuda"],
        include_dirs=[write_build_config(archs), *extra_include_dirs()],
        extra_compile_args={
            "cxx": cxx_flags + ["-DPEFTKERN_WITH_CUDA"],
            "nvcc": ["-O3", "-lineinfo", "-DPEFTKERN_WITH_CUDA"],
        },
        extra_link_args=link_flags,
    )


setup(
    name="peftkern",
    version="0.1.0",
    description="Fused CPU/CUDA kernels for parameter-efficient fine-tuning of Hugging Face models",
    packages=find_packages(include=["peftkern", "peftkern.*"]),
    package_data={"peftkern": ["data/*.txt"]},  # the demo's corpus
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "safetensors"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "numpy", "bitsandbytes>=0.45", "transformers", "peft"],
    },
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
    zip_safe=False,
)
