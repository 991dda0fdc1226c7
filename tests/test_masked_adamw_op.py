"""Child-Tuning's fused masked AdamW (peftkern::masked_adamw_, csrc/masked_adamw/): equal to its
reference (ChildTuningAdamW's torch ops) bit for bit over several steps, D (packed bits) and F
(in-kernel Philox, its mask checked against a NumPy Philox with Random123's known answers), on
odd, empty and 2-D sizes, fp32 / bf16 / fp16 parameters; F's keep rate; ChildTuningAdamW(fused=True)
equal to the unfused optimizer (D, and F with the kernel's mask injected); what happens outside
the mask; opcheck; bad input. Runs a second time against the CUDA kernels under the emulation
(tests/conftest.py, EMULATED_MODULES)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from peftkern import _ext, child_tuning
from peftkern.ops import masked_adamw as ma

from .conftest import emulation_enabled

ops = torch.ops.peftkern

pytestmark = pytest.mark.skipif(not _ext.has_kernel("masked_adamw_", "cpu"), reason="needs the compiled op")

SHAPES = [(0,), (1,), (7,), (8,), (9,), (33,), (4099,), (17, 31), (3, 0)]
HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01)


def step_size(t, lr=HYPER["lr"], beta1=HYPER["beta1"], beta2=HYPER["beta2"]):
    return lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)


def random_state(shape, generator, dtype=torch.float32):
    param = torch.randn(shape, generator=generator).to(dtype)
    exp_avg = torch.randn(shape, generator=generator) * 1e-2
    exp_avg_sq = torch.rand(shape, generator=generator) * 1e-4
    return param, exp_avg, exp_avg_sq


def run_steps(fn, state, grads, bits, reserve_p, seed, hyper=HYPER):
    param, exp_avg, exp_avg_sq = (t.clone() for t in state)
    for t, grad in enumerate(grads, start=1):
        fn(param, grad, exp_avg, exp_avg_sq, bits, reserve_p, seed, 7 + t, hyper["lr"], hyper["beta1"], hyper["beta2"],
           hyper["eps"], hyper["weight_decay"], step_size(t))  # fmt: skip
    return param, exp_avg, exp_avg_sq


def assert_bitwise(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32}[g.element_size()]
        differ = (g.reshape(-1).view(bits) != w.reshape(-1).view(bits)).nonzero().reshape(-1)
        assert not len(differ), f"{len(differ)} of {g.numel()} differ, first at {differ[:4].tolist()}"


# ---- the mask ------------------------------------------------------------------------------------


def test_numpy_philox_known_answers():
    """The NumPy Philox4x32-10 of the reference against Random123's known-answer vectors."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]  # fmt: skip
    for counter, key, want in cases:
        group, offset = counter[0] | counter[1] << 32, counter[2] | counter[3] << 32
        words = ma._philox_words(key[0] | key[1] << 32, offset, np.array([group], dtype=np.uint64))
        assert tuple(int(w) for w in words[0]) == want


@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 5)])
def test_keep_mask_equals_numpy_philox(shape, generator):
    seed = int(torch.randint(0, 2**62, (), generator=generator)) * 3  # past 2^63 too
    reserve_p = float(torch.rand((), generator=generator)) * 0.9 + 0.05
    got = ops.masked_adamw_keep_mask(torch.empty(shape), reserve_p, ma._int64(seed), 5)
    assert got.dtype == torch.bool and got.shape == shape
    assert torch.equal(got, ma.keep_mask_reference(shape, reserve_p, seed, 5))


@pytest.mark.parametrize("reserve_p", [0.05, 0.3, 0.9, 1.0])
def test_keep_rate_and_independent_streams(reserve_p, generator):
    n = 1 << 18
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    a = ma.keep_mask(torch.empty(n), reserve_p, seed, 0)
    rate = a.float().mean().item()
    sigma = math.sqrt(reserve_p * (1 - reserve_p) / n)
    assert abs(rate - reserve_p) <= 6 * sigma + 1e-12, (rate, reserve_p)
    if reserve_p == 1.0:
        assert a.all()
        return
    # another offset (the next tensor or step) and another seed: independent draws (overlap ~ p²)
    for b in (ma.keep_mask(torch.empty(n), reserve_p, seed, 1), ma.keep_mask(torch.empty(n), reserve_p, seed + 1, 0)):
        both = (a & b).float().mean().item()
        assert abs(both - reserve_p**2) <= 6 * math.sqrt(reserve_p**2 * (1 - reserve_p**2) / n)
    # neighbouring elements (one Philox block shares a counter) are independent too
    assert abs((a[0::4] & a[1::4]).float().mean().item() - reserve_p**2) <= 6 * math.sqrt(reserve_p**2 / (n / 4))


def test_pack_mask_round_trip(generator):
    for n in (0, 1, 7, 8, 9, 1001):
        mask = torch.rand(n, generator=generator) < 0.5
        bits = ma.pack_mask(mask)
        assert bits.dtype == torch.uint8 and bits.numel() == (n + 7) // 8
        assert torch.equal(ma.unpack_mask(bits, (n,)), mask)
        if n % 8:  # unused bits of the last byte are 0
            assert int(bits[-1]) >> (n % 8) == 0
    assert torch.equal(ma.pack_mask(torch.tensor([True, False, False, True, True, False, False, False, True])),
                       torch.tensor([0b00011001, 1], dtype=torch.uint8))  # fmt: skip


# ---- the update ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["D", "F", "AdamW"])
@pytest.mark.parametrize("shape", SHAPES)
def test_op_equals_reference_bitwise(mode, shape, generator, cpu_isa):
    """fp32, 3 steps with weight decay: every bit of param and both moments equals the reference."""
    state = random_state(shape, generator)
    grads = [torch.randn(shape, generator=generator) for _ in range(3)]
    bits = ma.pack_mask(torch.rand(shape, generator=generator) < 0.3) if mode == "D" else None
    reserve_p = 0.3 if mode == "F" else 1.0
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    got = run_steps(ops.masked_adamw_, state, grads, bits, reserve_p, seed)
    want = run_steps(ma.masked_adamw_reference_, state, grads, bits, reserve_p, seed)
    assert_bitwise(got, want)
    if state[0].numel():  # the step changed something
        assert not torch.equal(got[0], state[0]) and not torch.equal(got[1], state[1])
    # against torch's own (not correctly rounded) CPU sqrt: the moments still bitwise, the parameter
    # within a rounding of each step's update
    torch_sqrt = run_steps(lambda *a: ma.masked_adamw_reference_(*a, exact_sqrt=False), state, grads, bits, reserve_p, seed)
    assert_bitwise(got[1:], torch_sqrt[1:])
    torch.testing.assert_close(got[0], torch_sqrt[0], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["D", "F"])
def test_half_parameters_equal_reference(dtype, mode, generator):
    """bf16 / fp16 parameters and gradients, float32 moments: the update in float32, the parameter
    rounded once per step, bit for bit as the reference does it."""
    shape = (37, 29)
    state = random_state(shape, generator, dtype)
    grads = [torch.randn(shape, generator=generator).to(dtype) for _ in range(3)]
    bits = ma.pack_mask(torch.rand(shape, generator=generator) < 0.5) if mode == "D" else None
    reserve_p = 0.5 if mode == "F" else 1.0
    hyper = HYPER | dict(lr=0.05, weight_decay=0.1)  # steps large enough to move a bf16 value
    got = run_steps(ops.masked_adamw_, state, grads, bits, reserve_p, 11, hyper)
    want = run_steps(ma.masked_adamw_reference_, state, grads, bits, reserve_p, 11, hyper)
    assert_bitwise(got, want)
    assert not torch.equal(got[0], state[0])


def test_nan_gradient_propagates_as_reference(generator):
    state = random_state((40,), generator)
    grad = torch.randn(40, generator=generator)
    grad[3], grad[17] = float("nan"), float("inf")
    bits = ma.pack_mask(torch.arange(40) % 2 == 1)
    got = run_steps(ops.masked_adamw_, state, [grad], bits, 1.0, 0)
    want = run_steps(ma.masked_adamw_reference_, state, [grad], bits, 1.0, 0)
    assert got[0][3].isnan() and got[0][17].isnan()  # NaN·0 and inf·1 are NaN; nothing hides them
    assert_bitwise(got, want)


@pytest.mark.skipif(not emulation_enabled(), reason="PEFTKERN_SKIP_EMULATION is set")
def test_cpu_equals_cuda_emulated(emulation_library, generator):
    """The CPU and the CUDA kernel (run under the emulation), called directly, agree bit for bit."""
    emu = torch.ops.peftkern_emu
    cpu = torch.ops.peftkern.masked_adamw_.default
    for mode in ("D", "F"):
        state = random_state((1000, 3), generator)
        grads = [torch.randn(1000, 3, generator=generator) for _ in range(2)]
        bits = ma.pack_mask(torch.rand(1000, 3, generator=generator) < 0.2) if mode == "D" else None
        p = 0.2 if mode == "F" else 1.0
        assert_bitwise(run_steps(cpu, state, grads, bits, p, 99), run_steps(emu.masked_adamw_, state, grads, bits, p, 99))
    like = torch.empty(4097)
    assert torch.equal(emu.masked_adamw_keep_mask(like, 0.4, 12345, 6), torch.ops.peftkern.masked_adamw_keep_mask.default(like, 0.4, 12345, 6))


def test_opcheck(generator):
    param, exp_avg, exp_avg_sq = random_state((13, 7), generator)
    grad = torch.randn(13, 7, generator=generator)
    bits = ma.pack_mask(torch.rand(13, 7, generator=generator) < 0.5)
    for b, p in ((bits, 1.0), (None, 0.5)):
        torch.library.opcheck(ops.masked_adamw_.default,
                              (param, grad, exp_avg, exp_avg_sq, b, p, 3, 4, 1e-3, 0.9, 0.999, 1e-6, 0.01, 1e-3))  # fmt: skip
    torch.library.opcheck(ops.masked_adamw_keep_mask.default, (param, 0.5, 3, 4))


def _bad_args(change):
    shape = (5, 6)
    args = dict(param=torch.zeros(shape), grad=torch.zeros(shape), exp_avg=torch.zeros(shape),
                exp_avg_sq=torch.zeros(shape), mask_bits=torch.zeros(4, dtype=torch.uint8), reserve_p=1.0, seed=0,
                offset=0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0, step_size=1e-3)  # fmt: skip
    return args | change


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(param=torch.zeros(5, 6, dtype=torch.float64), grad=torch.zeros(5, 6, dtype=torch.float64)), "param must be"),
        (dict(param=torch.zeros(5, 6, dtype=torch.uint8)), "NF4"),
        (dict(grad=torch.zeros(5, 6, dtype=torch.bfloat16)), "grad is BFloat16 but param is Float"),
        (dict(exp_avg=torch.zeros(5, 6, dtype=torch.bfloat16)), "exp_avg must be Float"),
        (dict(exp_avg_sq=torch.zeros(6, 5)), "exp_avg_sq must have param's shape"),
        (dict(grad=torch.zeros(30)), "grad must have param's shape"),
        (dict(mask_bits=torch.zeros(5, dtype=torch.uint8)), "mask_bits .* must have 4 elements"),
        (dict(mask_bits=torch.zeros(4, dtype=torch.int32)), "mask_bits must be Byte"),
        (dict(mask_bits=torch.zeros(4, dtype=torch.uint8), reserve_p=0.5), "reserve_p must be 1"),
        (dict(mask_bits=None, reserve_p=0.0), r"reserve_p must be in \(0, 1\]"),
        (dict(mask_bits=None, reserve_p=1.5), r"reserve_p must be in \(0, 1\]"),
        (dict(param=torch.zeros(6, 5).t()), "contiguous"),
        (dict(beta1=1.0), "invalid"),
    ],
)
def test_bad_input_refused_nothing_changed(change, match):
    args = _bad_args(change)
    before = [t.clone() for t in (args["param"], args["exp_avg"], args["exp_avg_sq"])]
    with pytest.raises(RuntimeError, match=match):
        ops.masked_adamw_(*args.values())
    for b, t in zip(before, (args["param"], args["exp_avg"], args["exp_avg_sq"])):
        assert torch.equal(b, t)


@pytest.mark.parametrize("reserve_p", [0.0, -0.1, 1.01])
def test_keep_mask_bad_reserve_p(reserve_p):
    with pytest.raises(RuntimeError, match=r"reserve_p must be in \(0, 1\]"):
        ops.masked_adamw_keep_mask(torch.empty(8), reserve_p, 0, 0)
    with pytest.raises(ValueError, match=r"reserve_p must be in \(0, 1\]"):
        ma.keep_mask_reference((8,), reserve_p, 0, 0)


# ---- ChildTuningAdamW(fused=True) ---------------------------------------------------------------------


def make_params(generator):
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=generator)))
    layers = nn.Sequential(nn.Linear(13, 33), nn.Tanh(), nn.Linear(33, 5))
    return layers, torch.randn(17, 13, generator=generator)


def train(model, x, opt, steps=4):
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.fixture(params=["exact-sqrt", "torch-sqrt"])
def compare(request, monkeypatch):
    """How the fused optimizer is compared with the unfused one. "exact-sqrt": torch's sqrt made
    correctly rounded (through float64) for the unfused run, so every bit must agree; "torch-sqrt":
    torch's CPU sqrt as it is (1 ulp off for ~1 value in 6), so within a rounding per step, which
    then flows through the gradients of later steps."""
    if request.param == "torch-sqrt":
        # (the absolute floor scales with the tensor: a moment near 0 is a difference of larger terms)
        return lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    sqrt = torch.Tensor.sqrt
    monkeypatch.setattr(torch.Tensor, "sqrt", lambda self: sqrt(self.double()).to(self.dtype))
    return lambda a, b: assert_bitwise([a], [b])


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_fused_d_equals_unfused(weight_decay, generator, compare):
    model, x = make_params(generator)
    model_twin = nn.Sequential(nn.Linear(13, 33), nn.Tanh(), nn.Linear(33, 5))
    model_twin.load_state_dict(model.state_dict())
    params, twin = list(model.parameters()), list(model_twin.parameters())
    masks = {p: torch.rand(p.shape, generator=generator) < 0.3 for p in params[:3]}  # the last bias: unmasked
    kw = dict(lr=1e-2, weight_decay=weight_decay, reserve_p=0.3, mode="D")
    fused = child_tuning.ChildTuningAdamW(params, gradient_mask=masks, fused=True, **kw)
    start = [p.detach().clone() for p in params]
    train(model, x, fused)
    unfused = child_tuning.ChildTuningAdamW(twin, gradient_mask={q: masks[p] for p, q in zip(params, twin) if p in masks},
                                            **kw)  # fmt: skip
    train(model_twin, x, unfused)
    for p, q, s in zip(model.parameters(), model_twin.parameters(), start):
        compare(p.detach(), q.detach())
        compare(fused.state[p]["exp_avg"], unfused.state[q]["exp_avg"])
        compare(fused.state[p]["exp_avg_sq"], unfused.state[q]["exp_avg_sq"])
        if p in masks:
            outside = ~masks[p]
            if weight_decay == 0:  # outside the child network nothing moves, nor do the moments
                assert torch.equal(p[outside], s[outside]) and not fused.state[p]["exp_avg"][outside].any()
            else:  # the reference's decoupled decay moves every entry: p·(1 - lr·wd) per step
                assert not torch.equal(p[outside], s[outside])
            assert not torch.equal(p[~outside], s[~outside])
    assert fused.gradient_mask is None and all(b.dtype == torch.uint8 for b in fused.mask_bits.values())


def test_fused_f_equals_unfused_with_the_kernels_mask(generator, monkeypatch, compare):
    """F: the fused optimizer's masks (keep_mask for the seed / offsets it takes from its
    generator) injected into the unfused reference give the same bits; the keep rate is reserve_p."""
    model, x = make_params(generator)
    model_twin = nn.Sequential(nn.Linear(13, 33), nn.Tanh(), nn.Linear(33, 5))
    model_twin.load_state_dict(model.state_dict())
    reserve_p, seed = 0.4, int(torch.randint(0, 2**31, (), generator=generator))
    fused = child_tuning.ChildTuningAdamW(model.parameters(), lr=1e-2, weight_decay=0.01, reserve_p=reserve_p,
                                          generator=torch.Generator().manual_seed(seed), fused=True)  # fmt: skip
    replay = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    injected = []
    for _ in range(4):  # the masks the fused steps will draw, from a replay of its generator
        s, o = ma.philox_seed_offset(replay, torch.device("cpu"), len(params))
        injected += [ma.keep_mask(p, reserve_p, s, o + i).float() for i, p in enumerate(params)]
    rate = torch.cat([m.reshape(-1) for m in injected]).mean().item()
    assert abs(rate - reserve_p) < 0.05
    queue = list(injected)
    monkeypatch.setattr(torch, "bernoulli", lambda probs, generator=None: queue.pop(0))
    unfused = child_tuning.ChildTuningAdamW(model_twin.parameters(), lr=1e-2, weight_decay=0.01, reserve_p=reserve_p)
    train(model, x, fused)
    train(model_twin, x, unfused)
    assert not queue
    for p, q in zip(model.parameters(), model_twin.parameters()):
        compare(p.detach(), q.detach())
        compare(fused.state[p]["exp_avg"], unfused.state[q]["exp_avg"])
        compare(fused.state[p]["exp_avg_sq"], unfused.state[q]["exp_avg_sq"])


def test_fused_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        child_tuning.ChildTuningAdamW([nn.Parameter(torch.zeros(3, dtype=torch.float64))], fused=True)
    p = nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="bool of its parameter's shape"):
        child_tuning.ChildTuningAdamW([p], mode="D", gradient_mask={p: torch.ones(4, 3, dtype=torch.bool)}, fused=True)
    with pytest.raises(ValueError, match="bool of its parameter's shape"):
        child_tuning.ChildTuningAdamW([p], mode="D", gradient_mask={p: torch.ones(3, 4)}, fused=True)
    with pytest.raises(ValueError, match="reserve_p"):
        child_tuning.ChildTuningAdamW([p], reserve_p=0.0, fused=True)
    with pytest.raises(ValueError, match="NF4"):  # a packed 4-bit weight is not a float parameter
        child_tuning.ChildTuningAdamW([nn.Parameter(torch.zeros(8, dtype=torch.uint8), requires_grad=False)], fused=True)
