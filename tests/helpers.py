"""What the test files share (fixtures and markers stay in conftest.py): tiny randomly initialised
Hugging Face models built from configs, a token batch, a LoRA (PEFT model, peftkern model) pair,
a few AdamW steps, the PEFT-parity check (assert_matches_peft) and the torch.compile one."""

import copy
from contextlib import nullcontext

import pytest
import torch

import peftkern

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
PEFT_PREFIX = "base_model.model."  # what PEFT's parameter names have in front of the base model's


def tiny_model(arch: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                         eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(config)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    return model_cls(config_cls(**TINY, num_key_value_heads=2))


# LoRA targets per architecture; QLoRA's (the Llama layers replaced by bitsandbytes' Linear4bit).
TARGETS = {
    "llama": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "gate_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
QLORA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def lora_pair(arch, **config):
    """(PEFT model, peftkern-patched model) from one base, with PEFT's adapter weights copied
    into ours (random A and B: init_lora_weights=False)."""
    base = tiny_model(arch)
    config = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **config}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = peftkern.patch(copy.deepcopy(base), config)
    their_lora = {k[len(PEFT_PREFIX):]: v for k, v in theirs.state_dict().items() if "lora_" in k}
    our_lora = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    assert their_lora.keys() == our_lora.keys()  # same modules, same names
    with torch.no_grad():
        for key, value in their_lora.items():
            our_lora[key].copy_(value)
    return theirs, ours


def batch(generator):
    ids = torch.randint(0, 96, (3, 11), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}


def call(model, inputs):
    return model(**inputs)


def train_steps(model, inputs, steps, opt=None, forward=call):
    """`steps` optimizer steps of `model` on the one batch (AdamW over its trainable parameters,
    lr 1e-2, unless `opt` is given); returns the loss of each step, before its update."""
    opt = opt if opt is not None else torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = forward(model, inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def trainable_grads(model):
    """{name: gradient} of the trainable parameters, named as the base model names them (PEFT's
    prefix removed; peftkern's and PEFT's prompt-encoder names have none)."""
    return {n.removeprefix(PEFT_PREFIX): p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_matches_peft(theirs, ours, inputs, *, logits=None, loss=None, grads=None, grads_of_max=None, steps=0,
                        step_losses=None, forward=call):  # fmt: skip
    """PEFT's model and ours side by side on one batch; ours is the actual value, PEFT's the
    expected one, and each check runs when its tolerance is given:

    logits, loss: (rtol, atol) of one forward's outputs (under no_grad when no backward follows);
    grads: (rtol, atol) of every trainable parameter's gradient after a backward of each loss,
        both models having the same trainable names (see trainable_grads);
    grads_of_max: instead of grads, an atol of this times the largest |PEFT gradient| of the
        parameter, rtol 0 (low precision);
    steps, step_losses: then `steps` AdamW steps of each (train_steps, gradients zeroed first):
        ours must lower its loss, and the losses agree within step_losses' (rtol, atol).
    forward(model, inputs) gives the output (.logits, .loss): model(**inputs) by default.
    Returns (their gradients, our gradients) ({} and {} without a gradient check)."""
    backward = grads is not None or grads_of_max is not None
    their_grads, our_grads = {}, {}
    if logits is not None or loss is not None or backward:
        with nullcontext() if backward else torch.no_grad():
            out_theirs, out_ours = forward(theirs, inputs), forward(ours, inputs)
        if logits is not None:
            assert out_ours.logits.shape == out_theirs.logits.shape
            torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=logits[0], atol=logits[1])
        if loss is not None:
            torch.testing.assert_close(out_ours.loss, out_theirs.loss, rtol=loss[0], atol=loss[1])
    if backward:
        out_theirs.loss.backward()
        out_ours.loss.backward()
        their_grads, our_grads = trainable_grads(theirs), trainable_grads(ours)
        assert their_grads.keys() == our_grads.keys()
        for name in our_grads:
            if grads is not None:
                rtol, atol = grads
            else:
                rtol, atol = 0, grads_of_max * their_grads[name].abs().max().item()
            torch.testing.assert_close(our_grads[name], their_grads[name], rtol=rtol, atol=atol, msg=name)

    if steps:
        losses = {}
        for label, model in (("theirs", theirs), ("ours", ours)):
            model.zero_grad()
            losses[label] = train_steps(model, inputs, steps, forward=forward)
        assert losses["ours"][-1] < losses["ours"][0]
        torch.testing.assert_close(torch.tensor(losses["ours"]), torch.tensor(losses["theirs"]),
                                   rtol=step_losses[0], atol=step_losses[1])  # fmt: skip
    return their_grads, our_grads


def assert_compiled_matches_eager(model, inputs):
    """torch.compile (aot_eager) of a patched model gives the eager loss and gradients."""
    torch._dynamo.reset()
    want = model(**inputs).loss
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    got = torch.compile(model, backend="aot_eager")(**inputs).loss
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)


def snapshot(model):
    """What `assert_unchanged` compares: tensors, requires_grad flags, modules, attributes."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, {n: p.requires_grad for n, p in model.named_parameters()},
            {n: (type(m), m) for n, m in model.named_modules()}, set(vars(model)))  # fmt: skip


def assert_unchanged(model, snap):
    """The model is as `snapshot` saw it, and no forward pre-hook is left on any module."""
    state, flags, modules, attributes = snap
    assert {n: (type(m), m) for n, m in model.named_modules()} == modules
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert set(vars(model)) == attributes
    assert not model._forward_pre_hooks and not model._forward_pre_hooks_with_kwargs
    assert not any(m._forward_pre_hooks for m in model.modules())
