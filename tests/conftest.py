import os
import secrets

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from peftkern import _ext
from peftkern.ops import routing

from . import bnb_oracle


def pytest_configure(config):
    """bitsandbytes, where installed, computes by its format's definition on every machine
    (tests/bnb_oracle.py): a test's verdict must not depend on the CPU that runs it."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return
    bnb_oracle.pin_to_reference()


def pytest_report_header(config):
    changed = [p for p in bnb_oracle.PINNED if p != "done"]
    if changed:
        return "bitsandbytes oracle pinned to its reference path: " + "; ".join(changed)


@pytest.fixture(autouse=True, scope="session")
def poison_outputs():
    """Every output a compiled op allocates starts as NaN / 0xA5: unwritten elements fail."""
    _ext.set_poison_outputs(True)
    yield
    _ext.set_poison_outputs(False)


@pytest.fixture(autouse=True, scope="session")
def kernels_at_every_size():
    """The wrappers take their compiled kernels even for the small shapes tests use (on CPU they
    would otherwise route small sizes to the reference they are compared with: ops/routing.py).
    tests/test_routing.py checks the routing itself, inside its own override."""
    with routing.kernels_always():
        yield


def _seed() -> int:
    """PEFTKERN_TEST_SEED when set (to replay a failure), else a fresh one."""
    return int(os.environ["PEFTKERN_TEST_SEED"]) if os.environ.get("PEFTKERN_TEST_SEED") else secrets.randbelow(2**31)


@pytest.fixture
def generator(request):
    """Fresh random inputs on every run; the seed is printed (pytest shows it on failure), and
    PEFTKERN_TEST_SEED=<seed> replays a failure with the same inputs."""
    seed = _seed()
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


# The op-test modules that also run against the CUDA kernels compiled for the CPU emulation
# (peftkern/emulation.py): each of their tests runs once with the CPU kernels and once with the
# emulated CUDA kernels in their place ("cuda-emulated"). PEFTKERN_SKIP_EMULATION=1 leaves them out.
EMULATED_MODULES = {
    "test_nf4", "test_nf4_bitsandbytes", "test_nf4_golden", "test_nf4_nonfinite", "test_qlora_gemv", "test_dora",
    "test_ia3_op", "test_adapter_op", "test_grouped_op", "test_op_inputs", "test_scaled_lora_op", "test_relora_op",
    "test_proxy_op",
    "test_dropout_op",
    "test_masked_adamw_op",
    "test_cross_entropy_op",
}  # fmt: skip


def emulation_enabled() -> bool:
    return os.environ.get("PEFTKERN_SKIP_EMULATION", "").strip().lower() not in ("1", "true", "yes", "on")


# The CPU SIMD paths (csrc/common/cpu_isa.h). A test that takes the `cpu_isa` fixture runs its CPU
# kernels once per path ("cpu-scalar", "cpu-avx2", "cpu-avx512"; those this CPU lacks skip with the
# reason) and, in an emulated module, once more with the emulated CUDA kernels (no ISA there).
CPU_ISAS = ["scalar", "avx2", "avx512"]


def pytest_generate_tests(metafunc):
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    needs_gpu = any(m.kwargs.get("reason") == requires_cuda.kwargs["reason"] for m in metafunc.definition.iter_markers("skipif"))
    emulate = "kernels" in metafunc.fixturenames and module in EMULATED_MODULES and emulation_enabled() and not needs_gpu
    if "cpu_isa" in metafunc.fixturenames:
        cases = [("cpu", isa) for isa in CPU_ISAS] + ([("cuda-emulated", None)] if emulate else [])
        metafunc.parametrize("kernels, cpu_isa", cases, ids=[k if i is None else f"{k}-{i}" for k, i in cases],
                             indirect=True)  # fmt: skip
    elif emulate:
        metafunc.parametrize("kernels", ["cpu", "cuda-emulated"], indirect=True)


@pytest.fixture(params=["aten", "onednn"])
def cpu_gemm(request):
    """The library of our layers' float32 CPU base GEMMs (csrc/common/cpu_gemm.h), forced for the
    test, so both paths are tested on every machine (the load-time choice is restored after)."""
    ops = torch.ops.peftkern
    before = ops.cpu_gemm()
    try:
        ops.set_cpu_gemm(request.param)
    except RuntimeError as error:
        pytest.skip(str(error))
    try:
        yield request.param
    finally:
        ops.set_cpu_gemm(before)


@pytest.fixture
def cpu_isa(request):
    """The CPU SIMD path this test runs on (forced with set_cpu_isa, the load-time choice restored
    after); None under the emulated CUDA kernels."""
    isa = getattr(request, "param", None)
    if isa is None:
        yield None
        return
    supported = _ext.supported_cpu_isas()
    if isa not in supported:
        pytest.skip(f"this CPU cannot run the {isa} path (it supports {', '.join(supported)})")
    before = _ext.cpu_isa()
    _ext.set_cpu_isa(isa)
    try:
        yield isa
    finally:
        _ext.set_cpu_isa(before)


@pytest.fixture(scope="session")
def emulation_library():
    """Builds (ccache-friendly, incremental) and loads the emulated CUDA kernels once per session.
    A build failure fails the tests that need it: it is never a silent skip."""
    from peftkern import emulation

    try:
        return emulation.load()
    except Exception as error:  # noqa: BLE001  (the compiler's output is in the message)
        pytest.fail(f"the CUDA emulation did not build or load: {error}", pytrace=False)


@pytest.fixture(autouse=True)
def kernels(request):
    """"cpu": the compiled CPU kernels. "cuda-emulated": the CUDA kernels run on the CPU, each call
    under several thread / block schedules whose results must agree bit for bit (a seeded shuffle
    among them: its seed is printed, PEFTKERN_TEST_SEED replays it)."""
    backend = getattr(request, "param", "cpu")
    if backend == "cpu":
        yield backend
        return
    from peftkern import emulation

    request.getfixturevalue("emulation_library")
    seed = _seed()
    print(f"emulation schedule seed={seed}")
    with emulation.cuda_kernels_on_cpu(seed=seed):
        yield backend


class OpsCalled(TorchDispatchMode):
    """Records every op dispatched while active, by name without overload ("aten.mm"), C++
    callers included."""

    def __enter__(self):
        self.names = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.has_cuda_kernels()),
    reason="needs a CUDA GPU and a CUDA build of peftkern",
)


_emulated_modules_run: set[str] = set()


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        if "[cuda-emulated" in item.nodeid:
            _emulated_modules_run.add(item.module.__name__.rsplit(".", 1)[-1])


def _all_emulated_modules_ran() -> bool:
    return EMULATED_MODULES <= _emulated_modules_run


def pytest_sessionfinish(session, exitstatus):
    """When every emulated module ran, every launch site of the .cu files must have run too, with
    every kernel instantiation (dtype, template arguments) it compiles."""
    from peftkern import emulation

    if emulation.is_loaded() and _all_emulated_modules_ran() and exitstatus == 0:
        _, missing = emulation.coverage()
        if missing:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
            print("\nCUDA emulation: kernels that never ran: " + "; ".join(missing))


def pytest_terminal_summary(terminalreporter):
    from peftkern import emulation

    if emulation.is_loaded() and _all_emulated_modules_ran():
        terminalreporter.section("CUDA kernels run under the emulation")
        terminalreporter.write_line(emulation.coverage_table())
