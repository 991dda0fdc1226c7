"""The fused cross-entropy ops (peftkern::cross_entropy_fwd / _bwd, csrc/cross_entropy/): per-row
loss and log-sum-exp against the float64 reference, dlogits against float64 autograd of PyTorch's
cross_entropy, on every CPU path and dtype; odd, tiny and real vocabularies, strided rows, ignored
rows (any ignore_index), NaN / inf rows, empty shapes; opcheck; bad input. `causal_lm_loss`
against transformers' ForCausalLMLoss, and `peftkern.patch`'s fused_loss on a real model. The op
tests run a second time against the CUDA kernels under the emulation (tests/conftest.py,
EMULATED_MODULES)."""

import math

import pytest
import torch
import torch.nn.functional as F

import peftkern
from peftkern import _ext
from peftkern.ops import cross_entropy as ce

from .conftest import requires_cuda

ops = torch.ops.peftkern
pytestmark = pytest.mark.skipif(not _ext.has_kernel("cross_entropy_fwd", "cpu"), reason="needs the compiled op")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# rows, vocab: one logit, below / at / past one 16-lane vector and a 32-logit step, odd, a real vocabulary
SHAPES = [(1, 1), (3, 7), (2, 16), (5, 17), (4, 33), (6, 300), (3, 4099), (2, 49152)]
# dlogits stored in each dtype: one rounding (the unit roundoff)
GRAD_RTOL = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def random_case(rows, vocab, generator, dtype=torch.float32, ignore_index=-100, scale=4.0):
    logits = (torch.randn(rows, vocab, generator=generator) * scale).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    if rows > 2:
        labels[1] = ignore_index
    return logits, labels


def exact(logits, labels, grad_loss, ignore_index=-100):
    """float64: (loss, lse, dlogits) of sum_r grad_loss[r] * loss[r]."""
    z = logits.double().requires_grad_()
    loss, lse = ce.cross_entropy_rows_reference(z, labels, ignore_index)
    (loss * grad_loss.double()).sum().backward()
    return loss.detach(), lse.detach(), z.grad


def assert_rows_close(loss, lse, want_loss, want_lse):
    assert loss.dtype == lse.dtype == torch.float32
    # float32 sums of exactly widened logits: a few ulp of the log-sum-exp
    tol = 1e-5 * (1.0 + want_lse.abs())
    assert ((loss.double() - want_loss).abs() <= tol).all(), (loss, want_loss)
    assert ((lse.double() - want_lse).abs() <= tol).all(), (lse, want_lse)


def assert_grad_close(got, want, grad_loss, dtype, logits):
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    assert not got.isnan().any()
    # one rounding to dtype (relative to the value rounded), plus the float32 exp / lse error, which
    # is relative to |g|·p (at the label, p − 1 may cancel: not relative to the gradient itself), and
    # an absolute floor for fp16's subnormals (6e-8 apart)
    p = torch.softmax(logits.double(), dim=-1)
    diff = (got.double() - want).abs()
    tol = GRAD_RTOL[dtype] * torch.maximum(want.abs(), got.double().abs()) + 1e-5 * grad_loss.double().abs()[:, None] * p
    tol = tol + 1e-7
    assert (diff <= tol).all(), f"worst {float(diff.max()):.3g} at {divmod(int(diff.argmax()), want.shape[1])}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_match_reference(kernels, cpu_isa, dtype, shape, generator):
    logits, labels = random_case(*shape, generator, dtype)
    grad_loss = torch.randn(shape[0], generator=generator)
    want_loss, want_lse, want_grad = exact(logits, labels, grad_loss)
    loss, lse = ops.cross_entropy_fwd(logits, labels, -100)
    assert_rows_close(loss, lse, want_loss, want_lse)
    got = ops.cross_entropy_bwd(grad_loss, logits, labels, lse, -100)
    assert_grad_close(got, want_grad, grad_loss, dtype, logits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_rows(kernels, dtype, generator):
    """A row-strided view (padded vocabulary) is read in place; a column-strided one is copied."""
    wide, labels = random_case(5, 45, generator, dtype)
    grad_loss = torch.randn(5, generator=generator)
    for logits in (wide[:, :37], wide.t().contiguous().t()[:, :37]):
        want_loss, want_lse, want_grad = exact(logits, labels.clamp(max=36), grad_loss)
        loss, lse = ops.cross_entropy_fwd(logits, labels.clamp(max=36), -100)
        assert_rows_close(loss, lse, want_loss, want_lse)
        assert_grad_close(ops.cross_entropy_bwd(grad_loss, logits, labels.clamp(max=36), lse, -100), want_grad,
                          grad_loss, dtype, logits)  # fmt: skip


def test_ignored_rows_cost_nothing_and_get_nothing(kernels, generator):
    """Any ignore_index, a vocabulary index included: loss 0, lse 0, dlogits 0 (even for NaN logits)."""
    for ignore_index in (-100, 3):
        logits, labels = random_case(4, 20, generator, ignore_index=ignore_index)
        labels[0] = labels[2] = ignore_index
        logits[2] = math.nan
        loss, lse = ops.cross_entropy_fwd(logits, labels, ignore_index)
        assert loss[0] == loss[2] == lse[0] == lse[2] == 0
        grad = ops.cross_entropy_bwd(torch.ones(4), logits, labels, lse, ignore_index)
        assert (grad[0] == 0).all() and (grad[2] == 0).all()
        want_loss, _, _ = exact(logits, labels, torch.ones(4), ignore_index)
        assert torch.allclose(loss.double(), want_loss, atol=1e-5)


def test_nonfinite_rows_give_nan_as_pytorch(kernels):
    """A NaN or +inf logit, or a row all -inf, makes the row's loss NaN (PyTorch's cross_entropy
    too); a -inf logit elsewhere is an ordinary zero-probability token."""
    logits = torch.zeros(4, 40)
    logits[0, 5] = math.nan
    logits[1, 39] = math.inf
    logits[2] = -math.inf
    logits[3, 7] = -math.inf
    labels = torch.tensor([1, 2, 3, 4])
    loss, lse = ops.cross_entropy_fwd(logits, labels, -100)
    want = F.cross_entropy(logits, labels, reduction="none")
    assert torch.equal(loss.isnan(), want.isnan()) and loss[:3].isnan().all()
    assert torch.allclose(loss[3], want[3])
    grad = ops.cross_entropy_bwd(torch.ones(4), logits, labels, lse, -100)
    assert grad[:3].isnan().all() and not grad[3].isnan().any() and grad[3, 7] == 0


def test_empty(kernels):
    loss, lse = ops.cross_entropy_fwd(torch.randn(0, 9), torch.zeros(0, dtype=torch.int64), -100)
    assert loss.shape == lse.shape == (0,)
    assert ops.cross_entropy_bwd(torch.ones(0), torch.randn(0, 9), torch.zeros(0, dtype=torch.int64), lse,
                                 -100).shape == (0, 9)  # fmt: skip
    ignored = torch.full((2,), -100)
    loss, lse = ops.cross_entropy_fwd(torch.randn(2, 0), ignored, -100)  # no vocabulary, every row ignored
    assert (loss == 0).all()
    assert ops.cross_entropy_bwd(torch.ones(2), torch.randn(2, 0), ignored, lse, -100).shape == (2, 0)


def test_bad_input_is_refused(kernels):
    logits, labels = torch.randn(3, 10), torch.tensor([0, 9, -100])
    with pytest.raises(RuntimeError, match="logits must be"):
        ops.cross_entropy_fwd(logits.double(), labels, -100)
    with pytest.raises(RuntimeError, match=r"logits must be \[tokens, vocab\]"):
        ops.cross_entropy_fwd(logits.reshape(3, 5, 2), labels, -100)
    with pytest.raises(RuntimeError, match="labels must be int64"):
        ops.cross_entropy_fwd(logits, labels.int(), -100)
    with pytest.raises(RuntimeError, match=r"labels must be \[3\]"):
        ops.cross_entropy_fwd(logits, labels[:2], -100)
    for bad in (10, -1):
        with pytest.raises(RuntimeError, match=f"label {bad} of row 1 is outside the vocabulary"):
            ops.cross_entropy_fwd(logits, torch.tensor([0, bad, -100]), -100)
    _, lse = ops.cross_entropy_fwd(logits, labels, -100)
    with pytest.raises(RuntimeError, match="grad_loss must be Float"):
        ops.cross_entropy_bwd(torch.ones(3).double(), logits, labels, lse, -100)
    with pytest.raises(RuntimeError, match=r"lse must be \[3\]"):
        ops.cross_entropy_bwd(torch.ones(3), logits, labels, lse[:2], -100)
    with pytest.raises(ValueError, match="label 10 of row 1 is outside"):
        ce.cross_entropy_rows_reference(logits, torch.tensor([0, 10, -100]))


def test_opcheck(generator):
    logits, labels = random_case(4, 50, generator)
    torch.library.opcheck(ops.cross_entropy_fwd.default, (logits.requires_grad_(), labels, -100))
    _, lse = ops.cross_entropy_fwd(logits.detach(), labels, -100)
    torch.library.opcheck(ops.cross_entropy_bwd.default, (torch.randn(4, generator=generator), logits.detach(), labels,
                                                          lse, -100))  # fmt: skip


# ---- causal_lm_loss: transformers' ForCausalLMLoss ---------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "num_items", "shift_labels"])
def test_causal_lm_loss_matches_transformers(dtype, reduction, generator):
    from transformers.loss.loss_utils import ForCausalLMLoss

    vocab = 301
    logits = (torch.randn(3, 11, vocab, generator=generator) * 3).to(dtype)
    labels = torch.randint(0, vocab, (3, 11), generator=generator)
    labels[0, :4] = -100
    kwargs = {}
    if reduction == "num_items":
        kwargs["num_items_in_batch"] = torch.tensor(40)
    if reduction == "shift_labels":
        kwargs["shift_labels"] = torch.roll(labels, -1, dims=1)
    grads = []
    for fn in (ForCausalLMLoss, ce.causal_lm_loss):
        z = logits.clone().requires_grad_()
        loss = fn(z, labels, vocab, **kwargs)
        loss.backward()
        grads.append((loss.detach(), z.grad))
    (want, want_grad), (got, got_grad) = grads
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=tol, atol=1e-6)


def test_causal_lm_loss_routes_by_isa():
    z = torch.randn(2, 5)
    assert not ce.uses_kernel(z.double())
    assert ce.uses_kernel(z) == (_ext.cpu_isa() == "avx512")


# ---- peftkern.patch(..., fused_loss) on a transformers model -----------------------------------------


def _tiny_llama():
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=257)  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_patch_installs_the_fused_loss_and_unpatch_removes_it(generator):
    from transformers.loss.loss_utils import ForCausalLMLoss

    config = {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    fused, plain = _tiny_llama(), _tiny_llama()
    torch.manual_seed(1)
    peftkern.patch(fused, config)
    torch.manual_seed(1)
    peftkern.patch(plain, config, fused_loss=False)
    assert fused.loss_function is ce.causal_lm_loss and plain.loss_function is ForCausalLMLoss
    ids = torch.randint(0, 257, (2, 13), generator=generator)
    labels = ids.clone()
    labels[1, :5] = -100
    outs = []
    for model in (fused, plain):
        for p in model.parameters():
            if p.requires_grad:  # B starts at 0: give the adapters something to differentiate
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(2))
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        outs.append((out, [p.grad for p in model.parameters() if p.requires_grad]))
    (fo, fg), (po, pg) = outs
    torch.testing.assert_close(fo.logits, po.logits)  # the logits are unchanged
    torch.testing.assert_close(fo.loss, po.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(fg, pg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    peftkern.unpatch(fused)
    assert fused.loss_function is ForCausalLMLoss and "_loss_function" not in vars(fused)


def test_patch_leaves_a_users_loss_alone():
    model = _tiny_llama()

    def my_loss(logits, labels, vocab_size, **kwargs):
        return logits.sum() * 0

    model.loss_function = my_loss
    peftkern.patch(model, {"r": 2, "target_modules": ["q_proj"]})
    assert model.loss_function is my_loss


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(dtype, generator):
    logits, labels = random_case(37, 32003, generator, dtype)
    grad_loss = torch.randn(37, generator=generator)
    want_loss, want_lse, want_grad = exact(logits, labels, grad_loss)
    loss, lse = ops.cross_entropy_fwd(logits.cuda(), labels.cuda(), -100)
    assert_rows_close(loss.cpu(), lse.cpu(), want_loss, want_lse)
    got = ops.cross_entropy_bwd(grad_loss.cuda(), logits.cuda(), labels.cuda(), lse, -100)
    assert_grad_close(got.cpu(), want_grad, grad_loss, dtype, logits)
