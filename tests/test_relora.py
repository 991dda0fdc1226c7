"""ReLoRA (peftkern.relora): a restart leaves the model's function unchanged (fp32 dense bases:
to fp32 rounding; NF4 bases: to NF4 rounding, bytes as quantizing the dense sum), re-initialises
A and B and prunes the optimizer state exactly as the reference (Guitaricet/relora) does; the
jagged cosine schedule equals the reference's value by value; a run with restarts trains; bad
input is refused with the model and optimizer untouched."""

import copy
import math

import pytest
import torch

import peftkern
from peftkern import relora
from peftkern.methods.bases import nf4_base_weight
from peftkern.methods.lora import LoraLinear

from . import bnb_oracle
from .helpers import batch, tiny_model, train_steps

transformers = pytest.importorskip("transformers")

TARGETS = {"llama": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}


def lora_model(arch="llama", **config):
    model = tiny_model(arch)
    return peftkern.patch(model, peftkern.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], **config))


def trained(arch="llama", steps=3, quantize=None, **config):
    """A patched tiny model after a few AdamW steps (B non-zero, Adam states filled), its optimizer
    and batch."""
    model = tiny_model(arch)
    options = {"quantize": quantize} if quantize else {}
    peftkern.patch(model, peftkern.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], **config), **options)
    inputs = batch(torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, inputs, steps, opt)
    return model, opt, inputs


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def snapshot(model, opt):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()},
    )


def assert_snapshot_equal(model, opt, snap):
    tensors, states = snap
    for key, value in model.state_dict().items():
        assert torch.equal(value, tensors[key]), key
    for p, state in opt.state.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(states[id(p)][key])), key


# --------------------------------------------------------------------------------------------
# The reference's restart (Guitaricet/relora: ReLoRaLinear.merge_and_reinit, optimizer_reset),
# written out on peftkern's layers.
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_restart(model, opt, prune):
    for _, layer in lora_layers(model):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        delta = b @ a * layer.scaling["default"]
        layer.base_layer.weight.data += delta.t() if layer.fan_in_fan_out else delta
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        torch.nn.init.zeros_(b)
    for state in opt.state.values():  # the reference's loop: every state of the optimizer
        for key in ("exp_avg", "exp_avg_sq"):
            prune(state[key])


def reference_random_prune(tensor, ratio=0.999):
    tensor.mul_(torch.rand_like(tensor) > ratio)


def reference_magnitude_prune(tensor, ratio):
    magnitude = tensor.abs()
    threshold = torch.quantile(magnitude.flatten().to(torch.float32), ratio).to(tensor.dtype)
    tensor.mul_((magnitude > threshold).to(tensor.dtype))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("reset", ["random", "magnitude"])
def test_restart_equals_reference(arch, reset):
    """Weights, re-initialised A/B and pruned Adam states bit-identical to the reference's
    procedure, from the same RNG state (the optimizer holds only the adapter's tensors)."""
    model, opt, inputs = trained(arch)
    theirs, their_opt = copy.deepcopy((model, opt))
    torch.manual_seed(1234)
    prune = reference_random_prune if reset == "random" else (lambda t: reference_magnitude_prune(t, 0.9))
    reference_restart(theirs, their_opt, prune)
    torch.manual_seed(1234)
    stats = relora.restart(model, opt, reset=reset)
    assert stats["layers"] == len(lora_layers(model)) >= 2 * len(TARGETS[arch])
    assert 0.85 < stats["states_zeroed"] <= 1.0
    ours, theirs_sd = model.state_dict(), theirs.state_dict()
    for key in ours:
        assert torch.equal(ours[key], theirs_sd[key]), key
    for p, q in zip(opt.param_groups[0]["params"], their_opt.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], their_opt.state[q][key]), key
    for _, layer in lora_layers(model):
        assert not layer.lora_B["default"].weight.any()
        assert layer.lora_A["default"].weight.abs().max() <= 1 / math.sqrt(layer.in_features) + 1e-7


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logits_unchanged_after_restart_fp32(arch):
    model, opt, inputs = trained(arch)
    model.eval()
    with torch.no_grad():
        before = model(**inputs).logits
        weights = {n: m.base_layer.weight.clone() for n, m in lora_layers(model)}
        deltas = {n: m.delta_weight("default").clone() for n, m in lora_layers(model)}
        assert all(d.abs().max() > 0 for d in deltas.values())  # trained: the merge is not a no-op
        relora.restart(model, opt)
        after = model(**inputs).logits
    for name, layer in lora_layers(model):  # exactly W + s·B·A, rounded once
        assert torch.equal(layer.base_layer.weight, weights[name] + deltas[name]), name
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_zero_reset_and_generic_optimizers():
    """reset="zero" clears every state tensor shaped like the parameter (SGD's momentum too) and
    keeps Adam's step count, as the reference does."""
    model, opt, _ = trained()
    relora.restart(model, opt, reset="zero")
    for state in opt.state.values():
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
        assert state["step"] == 3
    model = lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    train_steps(model, batch(torch.Generator().manual_seed(0)), 2, sgd)
    stats = relora.restart(model, sgd, reset="zero")
    assert stats["states_zeroed"] == 1.0
    assert all(not s["momentum_buffer"].any() for s in sgd.state.values())


def test_restart_with_generator_is_reproducible(generator):
    model, opt, _ = trained()
    twin, twin_opt = copy.deepcopy((model, opt))
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    relora.restart(model, opt, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(0)  # the global RNG must not matter
    relora.restart(twin, twin_opt, generator=torch.Generator().manual_seed(seed))
    for (k, v), (_, w) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(v, w), k


# --------------------------------------------------------------------------------------------
# The schedule.
# --------------------------------------------------------------------------------------------


def reference_schedule(step, *, num_training_steps, first_warmup_steps, restart_warmup_steps, restart_every,
                       min_lr_ratio):  # fmt: skip
    """Guitaricet/relora training_utils._get_cosine_schedule_with_multiple_warmups_lambda."""
    if step < first_warmup_steps:
        return float(step) / float(max(1, first_warmup_steps))
    restart_step = step % restart_every
    restart_number = step // restart_every
    if restart_step < restart_warmup_steps:
        end_of_warmup_progress = float(restart_number * restart_every) / float(max(1, num_training_steps - first_warmup_steps))
        _cosine_decay = 0.5 * (1.0 + math.cos(math.pi * end_of_warmup_progress))
        warmup_lr_multiplier = min_lr_ratio + (1.0 - min_lr_ratio) * _cosine_decay
        return float(restart_step) / float(max(1, restart_warmup_steps)) * warmup_lr_multiplier
    progress = float(step - first_warmup_steps) / float(max(1, num_training_steps - first_warmup_steps))
    cosine_decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine_decay


@pytest.mark.parametrize(
    "total,first,restart_warmup,every,min_ratio",
    [(1000, 100, 50, 200, 0.1), (120, 10, 5, 30, 0.1), (60, 0, 0, 20, 0.5), (90, 40, 7, 30, 1.0), (8, 3, 2, 4, 0.2)],
)
def test_schedule_matches_reference_step_by_step(total, first, restart_warmup, every, min_ratio):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.3)
    schedule = relora.get_jagged_cosine_schedule(opt, num_training_steps=total, first_warmup_steps=first,
                                                 restart_warmup_steps=restart_warmup, restart_every=every,
                                                 min_lr_ratio=min_ratio)  # fmt: skip
    kwargs = dict(num_training_steps=total, first_warmup_steps=first, restart_warmup_steps=restart_warmup,
                  restart_every=every, min_lr_ratio=min_ratio)  # fmt: skip
    for step in range(total + 1):
        assert opt.param_groups[0]["lr"] == 0.3 * reference_schedule(step, **kwargs), step
        opt.step()
        schedule.step()
    if restart_warmup:  # the learning rate is 0 at every restart after the first warmup
        for cycle in range(1, total // every):
            if cycle * every >= first:
                assert reference_schedule(cycle * every, **kwargs) == 0.0


def test_schedule_state_dict_round_trip():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = relora.get_jagged_cosine_schedule(opt, num_training_steps=40, first_warmup_steps=4,
                                                 restart_warmup_steps=2, restart_every=10)  # fmt: skip
    for _ in range(13):
        opt.step()
        schedule.step()
    state = schedule.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule2 = relora.get_jagged_cosine_schedule(opt2, num_training_steps=40, first_warmup_steps=4,
                                                  restart_warmup_steps=2, restart_every=10)  # fmt: skip
    schedule2.load_state_dict(state)
    assert schedule2.get_last_lr() == schedule.get_last_lr()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_training_steps=100, restart_every=30), "divisible"),
        (dict(num_training_steps=100, restart_every=0), "restart_every"),
        (dict(num_training_steps=100, restart_every=20, min_lr_ratio=0.0), "min_lr_ratio"),
        (dict(num_training_steps=100, restart_every=20, first_warmup_steps=-1), "first_warmup_steps"),
    ],
)
def test_schedule_bad_input(kwargs, match):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    full = dict(first_warmup_steps=10, restart_warmup_steps=5) | kwargs
    with pytest.raises(ValueError, match=match):
        relora.get_jagged_cosine_schedule(opt, **full)


# --------------------------------------------------------------------------------------------
# Training with restarts.
# --------------------------------------------------------------------------------------------


def test_loss_falls_across_restarts():
    """Three ReLoRA cycles on a tiny Llama: the loss falls within and across cycles, and each
    restart leaves the loss where it was (the merge keeps the function)."""
    model = lora_model()
    inputs = batch(torch.Generator().manual_seed(3))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    cycle, cycles = 10, 3
    # the restart warmup matters: the reference's random pruning draws exp_avg's and exp_avg_sq's
    # masks independently, so ~0.1% of entries keep their momentum with a pruned second moment
    # and take a large first step (with 2 warmup steps at lr 2e-2 the loss jumps back up).
    schedule = relora.get_jagged_cosine_schedule(opt, num_training_steps=cycle * cycles, first_warmup_steps=2,
                                                 restart_warmup_steps=4, restart_every=cycle)  # fmt: skip
    ends = []
    first = None
    for c in range(cycles):
        for _ in range(cycle):
            loss = model(**inputs).loss
            first = loss.item() if first is None else first
            loss.backward()
            opt.step()
            schedule.step()
            opt.zero_grad()
        with torch.no_grad():
            before = model(**inputs).loss.item()
            relora.restart(model, opt)
            after = model(**inputs).loss.item()
        assert after == pytest.approx(before, rel=1e-5, abs=1e-5)
        ends.append(after)
    assert ends[0] < first and ends[1] < ends[0] and ends[2] < ends[1], (first, ends)


def test_trainer_callback_restarts(tmp_path):
    """peftkern.ReLoRACallback under transformers' Trainer: a restart every relora_steps, the
    jagged schedule passed as the trainer's scheduler, the loss falling."""
    model = lora_model()
    ids = torch.randint(0, 96, (8, 11), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2)
    schedule = relora.get_jagged_cosine_schedule(opt, num_training_steps=12, first_warmup_steps=1,
                                                 restart_warmup_steps=1, restart_every=4)  # fmt: skip
    callback = peftkern.ReLoRACallback(relora_steps=4)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
                                          logging_steps=1, report_to=[], save_strategy="no", use_cpu=True)  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, schedule),
                                   callbacks=[callback])  # fmt: skip
    a_before = lora_layers(model)[0][1].lora_A["default"].weight.clone()
    trainer.train()
    assert callback.restarts == 3
    assert not lora_layers(model)[0][1].lora_B["default"].weight.any()  # just restarted at step 12
    assert not torch.equal(lora_layers(model)[0][1].lora_A["default"].weight, a_before)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing changed.
# --------------------------------------------------------------------------------------------


def test_restart_without_lora_refused():
    model = tiny_model("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match="no LoRA layers"):
        relora.restart(model, opt)
    assert_snapshot_equal(model, opt, snap)
    ia3 = peftkern.patch(tiny_model("llama"), peftkern.IA3Config(target_modules=["k_proj", "down_proj"],
                                                                 feedforward_modules=["down_proj"]))  # fmt: skip
    with pytest.raises(ValueError, match="no LoRA layers"):
        relora.restart(ia3, None)


def test_restart_dora_refused():
    model, opt, _ = trained(use_dora=True)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match="DoRA"):
        relora.restart(model, opt)
    assert_snapshot_equal(model, opt, snap)


@pytest.mark.parametrize("options,match", [(dict(reset="svd"), "reset must be"), (dict(ratio=1.5), "ratio"),
                                           (dict(adapter_name="other"), "no LoRA layers")])  # fmt: skip
def test_restart_bad_options_refused(options, match):
    model, opt, _ = trained()
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        relora.restart(model, opt, **options)
    assert_snapshot_equal(model, opt, snap)


def test_restart_merged_refused():
    model, opt, _ = trained()
    peftkern.merge(model)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match="merged"):
        relora.restart(model, opt)
    assert_snapshot_equal(model, opt, snap)


def test_callback_bad_input():
    with pytest.raises(ValueError, match="relora_steps"):
        peftkern.ReLoRACallback(relora_steps=0)
    with pytest.raises(ValueError, match="reset must be"):
        peftkern.ReLoRACallback(relora_steps=5, reset="nope")


# --------------------------------------------------------------------------------------------
# NF4 bases: the fused block merge.
# --------------------------------------------------------------------------------------------


def merged_dense(layer):
    """deq(W) in float32 plus s·B·A formed in float64 and rounded once (the merge's definition,
    peftkern.ops.relora)."""
    nf4 = nf4_base_weight(layer.base_layer)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return nf4.dequantize(torch.float32) + (layer.scaling["default"] * (b.double() @ a.double())).float()


def assert_nf4_equal(ours, packed, absmax, nested_absmax, offset):
    assert torch.equal(ours.packed.reshape(-1), packed.reshape(-1).view(torch.uint8))
    assert torch.equal(ours.absmax, absmax)
    assert torch.equal(ours.nested.absmax, nested_absmax)
    assert torch.equal(ours.nested.offset.reshape(()), offset.reshape(()))


@pytest.mark.parametrize("source", ["peftkern", "bitsandbytes"])
def test_restart_on_nf4_bases(source):
    """Every NF4 base after a restart holds the bytes of quantizing deq(W) + s·B·A: peftkern's
    nf4_quantize of it, and bitsandbytes' quantize_4bit of it (its tensors updated in place under
    a bitsandbytes Linear4bit); the logits move only by NF4 rounding."""
    if source == "bitsandbytes":
        pytest.importorskip("bitsandbytes")
        from peftkern.demo import to_bnb_4bit

        model = to_bnb_4bit(tiny_model("llama"), TARGETS["llama"])
        peftkern.patch(model, peftkern.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"]))
        inputs = batch(torch.Generator().manual_seed(1))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        train_steps(model, inputs, 3, opt)
    else:
        model, opt, inputs = trained(quantize="nf4")
    model.eval()
    layers = lora_layers(model)
    expected = {name: merged_dense(layer) for name, layer in layers}
    shared = {name: nf4_base_weight(layer.base_layer).packed.data_ptr() for name, layer in layers}
    with torch.no_grad():
        before = model(**inputs).logits
        relora.restart(model, opt)
        after = model(**inputs).logits
    for name, layer in layers:
        ours = nf4_base_weight(layer.base_layer)
        assert ours.packed.data_ptr() == shared[name]  # in place
        want = peftkern.nf4_quantize(expected[name], 64, double_quant=True)
        assert_nf4_equal(ours, want.packed, want.absmax, want.nested.absmax, want.nested.offset)
        if source == "bitsandbytes":
            assert_nf4_equal(ours, *bnb_oracle.quantize_4bit_reference(expected[name], 64))
    # NF4 rounding's scale: what quantizing the untrained model's targets once does to its logits
    with torch.no_grad():
        dense = tiny_model("llama")(**inputs).logits
        quantized = peftkern.patch(tiny_model("llama"), peftkern.LoraConfig(target_modules=TARGETS["llama"]),
                                   quantize="nf4")(**inputs).logits  # fmt: skip
    rounding = (quantized - dense).norm() / dense.norm()
    assert (after - before).norm() / before.norm() < 2 * rounding, rounding
