"""Child-Tuning (peftkern.child_tuning): the wrapper around any torch optimizer equals that
optimizer stepped on the masked gradients (D exactly, F with the reference's draw from the same
RNG state); entries outside the mask never move; ChildTuningAdamW and fisher_mask equal the
reference (alibaba/AliceMind ChildTuningAdamW and calculate_fisher, written out below) bit for bit;
bad reserve_p / mode and NF4 bases are refused."""

import copy
import math

import numpy as np
import pytest
import torch

import peftkern
from peftkern import child_tuning

from .helpers import batch, tiny_model

transformers = pytest.importorskip("transformers")


# --------------------------------------------------------------------------------------------
# The reference (AliceMind ChildTuningAdamW.step and calculate_fisher), written out.
# --------------------------------------------------------------------------------------------


class ReferenceChildTuningAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True,
                 reserve_p=1.0, mode=None):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias))
        self.gradient_mask, self.reserve_p, self.mode = None, reserve_p, mode

    def set_gradient_mask(self, gradient_mask):
        self.gradient_mask = gradient_mask

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.data
                if self.mode == "ChildTuning-D":
                    if p in self.gradient_mask:
                        grad *= self.gradient_mask[p]
                else:
                    grad_mask = torch.distributions.Bernoulli(grad.new_full(size=grad.size(), fill_value=self.reserve_p))
                    grad *= grad_mask.sample() / self.reserve_p
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1, beta2 = group["betas"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    bias_correction1 = 1.0 - beta1 ** state["step"]
                    bias_correction2 = 1.0 - beta2 ** state["step"]
                    step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
                p.data.addcdiv_(exp_avg, denom, value=-step_size)
                p.data.add_(p.data, alpha=-group["lr"] * group["weight_decay"])


def reference_calculate_fisher(model, batches, reserve_p, grad_clip=None):
    gradient_mask = {}
    model.train()
    for name, params in model.named_parameters():
        if "layer" in name:
            gradient_mask[params] = params.new_zeros(params.size())
    iters = len(batches)
    for inputs in batches:
        loss = model(**inputs).loss
        loss.backward()
        for name, params in model.named_parameters():
            if "layer" in name:
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, **grad_clip)
                gradient_mask[params] += (params.grad**2) / iters
        model.zero_grad()
    r = None
    for k, v in gradient_mask.items():
        v = v.view(-1).cpu().numpy()
        r = v if r is None else np.append(r, v)
    polar = np.percentile(r, (1 - reserve_p) * 100)
    for k in gradient_mask:
        gradient_mask[k] = gradient_mask[k] >= polar
    return gradient_mask


def batches(count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [batch(generator) for _ in range(count)]


def step_all(model, opt, data, steps):
    losses = []
    for i in range(steps):
        loss = model(**data[i % len(data)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_clip", [None, {"max_norm": 0.5}])
def test_fisher_mask_equals_reference(grad_clip):
    data = batches()
    model = tiny_model("llama")
    theirs = reference_calculate_fisher(copy.deepcopy(model), data, 0.3, grad_clip)
    ours = child_tuning.fisher_mask(model, data, 0.3, grad_clip=grad_clip)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("layer" in names[id(p)] for p in ours)  # embeddings and the head are not masked
    assert len(ours) == len(theirs)
    for (p, mask), their_mask in zip(ours.items(), theirs.values()):
        assert torch.equal(mask, their_mask), names[id(p)]
    kept = sum(int(m.sum()) for m in ours.values()) / sum(m.numel() for m in ours.values())
    assert 0.29 <= kept <= 0.32
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("mode", ["D", "F"])
def test_child_tuning_adamw_equals_reference(mode):
    """Four steps with weight decay on a tiny Llama: parameters and Adam states bit-identical."""
    data = batches()
    model = tiny_model("llama")
    twin = copy.deepcopy(model)
    mask = child_tuning.fisher_mask(model, data, 0.25) if mode == "D" else None
    twin_mask = {q: mask[p] for p, q in zip(model.parameters(), twin.parameters()) if mask and p in mask}
    ours = child_tuning.ChildTuningAdamW(model.parameters(), lr=1e-3, weight_decay=0.01, reserve_p=0.25, mode=mode,
                                         gradient_mask=mask)  # fmt: skip
    theirs = ReferenceChildTuningAdamW(twin.parameters(), lr=1e-3, weight_decay=0.01, reserve_p=0.25,
                                       mode="ChildTuning-D" if mode == "D" else "ChildTuning-F")  # fmt: skip
    theirs.set_gradient_mask(twin_mask)
    for i in range(4):
        torch.manual_seed(100 + i)  # F: the same RNG state for both draws
        model(**data[i % 3]).loss.backward()
        ours.step()
        ours.zero_grad()
        torch.manual_seed(100 + i)
        twin(**data[i % 3]).loss.backward()
        theirs.step()
        theirs.zero_grad()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"]), name


@pytest.mark.parametrize("make", [lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0),
                                  lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)])  # fmt: skip
def test_wrapper_d_equals_optimizer_on_masked_gradients(make):
    """ChildTuning(opt, mode="D") == opt stepped on g ⊙ M; entries outside M never move."""
    data = batches()
    model = tiny_model("llama")
    mask = child_tuning.fisher_mask(model, data, 0.2)
    twin = copy.deepcopy(model)
    twin_mask = {q: mask[p] for p, q in zip(model.parameters(), twin.parameters()) if p in mask}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ours = child_tuning.ChildTuning(make(list(model.parameters())), 0.2, "D", gradient_mask=mask, model=model)
    plain = make(list(twin.parameters()))
    for i in range(3):
        model(**data[i]).loss.backward()
        ours.step()
        ours.zero_grad()
        twin(**data[i]).loss.backward()
        with torch.no_grad():
            for q, m in twin_mask.items():
                q.grad.mul_(m)
        plain.step()
        plain.zero_grad()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
        if p in mask:
            assert torch.equal(p[~mask[p]], start[name][~mask[p]]), name  # outside the child: untouched
            if mask[p].any():
                assert not torch.equal(p[mask[p]], start[name][mask[p]]), name


def test_wrapper_f_draws_as_the_reference_and_rescales():
    """Mode F with SGD (no momentum): each step moves exactly the entries of a fresh
    Bernoulli(p) mask, by lr·g/p, the mask drawn as the reference draws it."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64))
    opt = child_tuning.ChildTuning(torch.optim.SGD([weight], lr=0.1), reserve_p=0.3, mode="F")
    masks = []
    for step in range(3):
        before = weight.detach().clone()
        grad = torch.randn(64, 64)
        weight.grad = grad.clone()
        torch.manual_seed(7 + step)
        opt.step()
        torch.manual_seed(7 + step)
        expected_mask = torch.distributions.Bernoulli(torch.full_like(grad, 0.3)).sample()
        assert torch.equal(weight.detach(), before.add(grad * (expected_mask / 0.3), alpha=-0.1))  # SGD on g·M/p
        moved = weight.detach() != before
        assert torch.equal(moved, expected_mask.bool())
        masks.append(expected_mask)
        opt.zero_grad()
    assert not torch.equal(masks[0], masks[1])  # redrawn every step
    assert 0.25 < float(torch.stack(masks).mean()) < 0.35


def test_child_tuning_trains():
    data = batches()
    model = tiny_model("llama")
    mask = child_tuning.fisher_mask(model, data, 0.3)
    opt = child_tuning.ChildTuning(torch.optim.AdamW(model.parameters(), lr=3e-3), 0.3, "D", gradient_mask=mask)
    losses = step_all(model, opt, data[:1], 8)
    assert losses[-1] < losses[0] - 0.1, losses
    model = tiny_model("llama")
    opt = child_tuning.ChildTuning(torch.optim.AdamW(model.parameters(), lr=3e-3), 0.3, "F")
    losses = step_all(model, opt, data[:1], 8)
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("reserve_p", [0, 0.0, -0.1, 1.5, True, "0.3", float("nan")])
def test_bad_reserve_p_refused(reserve_p):
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"reserve_p must be a number in \(0, 1\]"):
        child_tuning.ChildTuning(torch.optim.SGD(model.parameters(), lr=0.1), reserve_p)
    with pytest.raises(ValueError, match="reserve_p"):
        child_tuning.ChildTuningAdamW(model.parameters(), reserve_p=reserve_p)
    with pytest.raises(ValueError, match="reserve_p"):
        child_tuning.fisher_mask(model, batches(1), reserve_p)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bad_mode_and_missing_mask_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="mode must be"):
        child_tuning.ChildTuning(torch.optim.SGD(model.parameters(), lr=0.1), 0.3, "E")
    with pytest.raises(ValueError, match="needs gradient_mask"):
        child_tuning.ChildTuning(torch.optim.SGD(model.parameters(), lr=0.1), 0.3, "D")
    weight = next(model.parameters())
    with pytest.raises(ValueError, match="a mask of shape"):
        child_tuning.ChildTuning(torch.optim.SGD([weight], lr=0.1), 0.3, "D",
                                 gradient_mask={weight: torch.ones(3, dtype=torch.bool)})  # fmt: skip


def test_nf4_bases_refused():
    model = peftkern.patch(tiny_model("llama"), peftkern.LoraConfig(target_modules=["q_proj"]), quantize="nf4")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match="NF4"):
        child_tuning.fisher_mask(model, batches(1), 0.3)
    with pytest.raises(ValueError, match="NF4"):
        child_tuning.ChildTuning(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), 0.3,
                                 model=model)  # fmt: skip
    with pytest.raises(ValueError, match="quantized"):
        child_tuning.ChildTuning(torch.optim.SGD([torch.nn.Parameter(torch.zeros(4, dtype=torch.uint8),
                                                                     requires_grad=False)], lr=0.1), 0.3)  # fmt: skip
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_wrapper_is_an_optimizer_for_schedulers_and_the_trainer(tmp_path):
    """A LambdaLR drives the wrapped optimizer's learning rate; transformers' Trainer trains with it
    and only the child network moves."""
    data = batches()
    model = tiny_model("llama")
    mask = child_tuning.fisher_mask(model, data, 0.3)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    opt = child_tuning.ChildTuning(inner, 0.3, "D", gradient_mask=mask)
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups is inner.param_groups
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    weight = model.model.layers[0].mlp.up_proj.weight
    frozen = weight[~mask[weight]].clone()
    rows = [{"input_ids": r, "labels": r} for r in torch.cat([d["input_ids"] for d in data])]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=3,
                                          logging_steps=1, report_to=[], save_strategy="no", use_cpu=True)  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, optimizers=(opt, schedule))
    trainer.train()
    assert inner.param_groups[0]["lr"] == pytest.approx(1e-2 / 5)
    assert torch.equal(weight[~mask[weight]], frozen)
    assert inner.state[weight]["step"] == 4
