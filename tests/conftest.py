import secrets

import pytest
import torch

from peftkern import _ext


@pytest.fixture(autouse=True, scope="session")
def poison_outputs():
    """Every output a compiled op allocates starts as NaN / 0xA5: unwritten elements fail."""
    _ext.set_poison_outputs(True)
    yield
    _ext.set_poison_outputs(False)


@pytest.fixture
def generator(request):
    """Fresh random inputs on every run; the seed is printed (pytest shows it on failure) so a
    failure can be replayed."""
    seed = secrets.randbelow(2**31)
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.has_cuda_kernels()),
    reason="needs a CUDA GPU and a CUDA build of peftkern",
)
