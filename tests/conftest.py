import os
import secrets

import pytest
import torch

from peftkern import _ext

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


@pytest.fixture
def generator(request):
    """Fresh random inputs on every run; the seed is printed (pytest shows it on failure), and
    PEFTKERN_TEST_SEED=<seed> replays a failure with the same inputs."""
    seed = int(os.environ["PEFTKERN_TEST_SEED"]) if os.environ.get("PEFTKERN_TEST_SEED") else secrets.randbelow(2**31)
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.has_cuda_kernels()),
    reason="needs a CUDA GPU and a CUDA build of peftkern",
)
