"""DoRA: the fused weight-norm kernel against its reference, and DoRA layers against Hugging Face
PEFT (dense bases on Llama and GPT-2's Conv1D, with and without dropout: under dropout PEFT's
nn.Dropout is replaced by peftkern's draws, since the two generators differ; NF4 bases against
PEFT + bitsandbytes)."""

import copy

import pytest
import torch

import peftkern
from peftkern.ops import dora as dora_ops
from peftkern.ops import dropout as dropout_ops

from .conftest import requires_cuda
from .helpers import QLORA_TARGETS, TARGETS, assert_matches_peft, batch, lora_pair, tiny_model

ops = torch.ops.peftkern
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_weight_norm_matches_reference(dtype, generator):
    for n, k, r in [(1, 1, 1), (17, 33, 4), (64, 130, 16), (5, 7, 9), (0, 8, 2)]:
        w = torch.randn(n, k, generator=generator).to(dtype)
        a = torch.randn(r, k, generator=generator).to(dtype)
        b = torch.randn(n, r, generator=generator).to(dtype)
        got = ops.dora_weight_norm(w, a, b, 0.7)
        want = dora_ops.dora_weight_norm_reference(w, a, b, 0.7)
        assert got.dtype == dtype and got.shape == (n,)
        torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=0)
    # a transposed (fan-in-fan-out) weight view gives the same as its contiguous copy
    wt = torch.randn(40, 24, generator=generator).t()
    a, b = torch.randn(3, 40, generator=generator), torch.randn(24, 3, generator=generator)
    torch.testing.assert_close(ops.dora_weight_norm(wt, a, b, 2.0), ops.dora_weight_norm(wt.contiguous(), a, b, 2.0))


def test_weight_norm_opcheck_and_errors(generator):
    w, a, b = torch.randn(6, 5), torch.randn(2, 5), torch.randn(6, 2)
    torch.library.opcheck(ops.dora_weight_norm.default, (w, a, b, 1.5))
    with pytest.raises(RuntimeError, match="lora_a is"):
        ops.dora_weight_norm(w, torch.randn(2, 4), b, 1.0)
    with pytest.raises(RuntimeError, match="must be Float like weight"):
        ops.dora_weight_norm(w, a.double(), b, 1.0)


@pytest.mark.parametrize("dtype, limit", [(torch.float64, 6136), (torch.float32, 8192)])
def test_weight_norm_largest_rank_the_cuda_kernel_takes(dtype, limit, kernels, generator):
    """The CUDA kernel stages B's row in 48 KiB of shared memory: at its largest rank it runs (the
    emulation enforces CUDA's limit), one more is refused clearly there, and the wrapper routes such
    ranks to the reference on CUDA. The CPU kernel has no limit."""
    w, b = torch.randn(3, 4, generator=generator).to(dtype), torch.randn(3, limit + 1, generator=generator).to(dtype)
    a = torch.randn(limit + 1, 4, generator=generator).to(dtype)
    got = ops.dora_weight_norm(w, a[:limit], b[:, :limit], 0.5)
    torch.testing.assert_close(got, dora_ops.dora_weight_norm_reference(w, a[:limit], b[:, :limit], 0.5))
    if kernels == "cuda-emulated":
        with pytest.raises(RuntimeError, match=f"rank {limit + 1} is larger than this kernel supports"):
            ops.dora_weight_norm(w, a, b, 0.5)
    else:
        torch.testing.assert_close(ops.dora_weight_norm(w, a, b, 0.5), dora_ops.dora_weight_norm_reference(w, a, b, 0.5))
    assert dora_ops._CUDA_MAX_RANK.get(dtype, dora_ops._CUDA_MAX_RANK_DEFAULT) == limit


def compare_with_peft(theirs, ours, inputs):
    _, our_grads = assert_matches_peft(theirs, ours, inputs, logits=(1e-4, 1e-5), grads=(1e-4, 1e-6))
    assert any("lora_magnitude_vector" in n for n in our_grads)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_matches_peft(arch, generator):
    theirs, ours = lora_pair(arch, target_modules=TARGETS[arch], use_dora=True)
    compare_with_peft(theirs, ours, batch(generator))


class _PeftkernDropout(torch.nn.Module):
    """Stands in for PEFT's nn.Dropout: peftkern's decisions (same distribution as torch's
    bernoulli, different draws), by the plain-PyTorch Philox reference, (seed, offset) drawn from
    torch's generator as peftkern's layers draw it: an injected mask, identical on both sides."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        return dropout_ops.lora_dropout_reference(x2, self.p, *dropout_ops.draw_seed(x.device)).view(x.shape)


def test_dora_with_dropout_matches_peft_in_training(generator):
    """PEFT's dropout modules replaced by peftkern's draws; both models draw once per layer in the
    same order, so the same seed gives the same decisions."""
    theirs, ours = lora_pair("llama", target_modules=TARGETS["llama"], use_dora=True, lora_dropout=0.2)
    replaced = 0
    for module in theirs.modules():
        if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
            module.lora_dropout["default"] = _PeftkernDropout(module.lora_dropout["default"].p)
            replaced += 1
    assert replaced > 0
    theirs.train()
    ours.train()
    inputs = batch(generator)
    torch.manual_seed(7)
    out_theirs = theirs(**inputs)
    torch.manual_seed(7)
    out_ours = ours(**inputs)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-4, atol=1e-5)


def test_dora_on_nf4_bases_matches_peft_with_bitsandbytes(generator):
    pytest.importorskip("bitsandbytes")
    from peftkern.demo import to_bnb_4bit as with_bnb_linear4bit

    peft = pytest.importorskip("peft")
    base = with_bnb_linear4bit(tiny_model("llama"), QLORA_TARGETS)
    config = {"r": 4, "lora_alpha": 8, "target_modules": QLORA_TARGETS, "init_lora_weights": False, "use_dora": True}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = peftkern.patch(copy.deepcopy(base), config)
    their_state = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items() if "lora_" in k}
    with torch.no_grad():
        for key, value in ours.state_dict().items():
            if "lora_" in key:
                value.copy_(their_state[key])
    compare_with_peft(theirs, ours, batch(generator))


@requires_cuda
def test_weight_norm_cuda_matches_cpu(generator):
    for dtype in (torch.float32, torch.bfloat16):
        for n, k, r in [(1, 1, 1), (300, 1000, 16), (7, 4097, 64)]:
            w, a, b = (torch.randn(s, generator=generator).to(dtype) for s in ((n, k), (r, k), (n, r)))
            torch.testing.assert_close(ops.dora_weight_norm(w.cuda(), a.cuda(), b.cuda(), 0.5).cpu(),
                                       dora_ops.dora_weight_norm_reference(w, a, b, 0.5), rtol=TOL[dtype], atol=0)  # fmt: skip
