"""Several adapters per model (add / set / delete / disable) and mixed-adapter batches
(`adapter_names`), for LoRA on dense and NF4 bases and for IA³: against Hugging Face PEFT's
PeftModel holding the same adapters (loaded from our checkpoints), and each row of a mixed batch
against running that row alone with its adapter active."""

import copy

import pytest
import torch

import peftkern
from peftkern.record import PatchRecord

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)  # fmt: skip
LORA_A = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": ["q_proj", "v_proj", "down_proj"]}
LORA_B = {"r": 6, "lora_alpha": 3, "init_lora_weights": False, "target_modules": ["k_proj", "v_proj", "up_proj"]}
LORA_C = {"r": 2, "lora_alpha": 4, "use_rslora": True, "init_lora_weights": False, "target_modules": ["o_proj"]}


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()


def ids(generator, batch=4, length=7):
    return torch.randint(0, 96, (batch, length), generator=generator)


def randomize(model, generator):
    """Random values in every adapter parameter (IA³ vectors start at ones: make them matter)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name or "ia3_l" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5 + ("ia3_l" in name))


def three_lora(generator, **options):
    model = peftkern.patch(tiny_llama(), LORA_A, adapter_name="a", **options)
    peftkern.add_adapter(model, "b", LORA_B)
    peftkern.add_adapter(model, "c", LORA_C)
    randomize(model, generator)
    return model


def peft_twin(ours, tmp_path, names):
    """PEFT's PeftModel on the same base with our adapters, through our checkpoints."""
    for name in names:
        peftkern.save_adapter(ours, tmp_path / name, adapter_name=name)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / names[0], adapter_name=names[0])
    for name in names[1:]:
        theirs.load_adapter(tmp_path / name, adapter_name=name)
    return theirs.eval()


def logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def run_alone(model, name, run):
    """run() with only adapter `name` active ("__base__": every adapter disabled)."""
    if name == "__base__":
        with peftkern.disable_adapter(model):
            return run()
    peftkern.set_adapter(model, name)
    return run()


def assert_rows_match_alone(model, input_ids, names, mixed):
    """Each row of a mixed-batch output equals that row run alone with its adapter."""
    for row, name in enumerate(names):
        alone = run_alone(model, name, lambda: logits(model, input_ids[row : row + 1]))
        torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-5, atol=1e-5)


def test_add_set_delete_against_peft(generator, tmp_path):
    ours = three_lora(generator)
    assert peftkern.list_adapters(ours) == ["a", "b", "c"] and peftkern.active_adapter(ours) == "a"
    theirs = peft_twin(ours, tmp_path, ["a", "b", "c"])
    x = ids(generator)
    for name in ("a", "b", "c", "a"):
        peftkern.set_adapter(ours, name)
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(ours, x), logits(theirs, x), rtol=1e-5, atol=1e-5)
        # only the active adapter trains, as in PEFT
        ours_trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
        assert ours_trainable and all(f".{name}." in n for n in ours_trainable)
    peftkern.delete_adapter(ours, "b")
    theirs.delete_adapter("b")
    assert peftkern.list_adapters(ours) == ["a", "c"]
    assert not any(".b." in n for n, _ in ours.named_parameters())
    peftkern.set_adapter(ours, "c")
    theirs.set_adapter("c")
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="active"):
        peftkern.delete_adapter(ours, "c")  # the active one: "a" takes over
    assert peftkern.active_adapter(ours) == "a"


def test_disable_adapter(generator):
    base = tiny_llama()
    ours = three_lora(generator)
    x = ids(generator)
    expected = logits(base, x)
    with_adapter = logits(ours, x)
    with peftkern.disable_adapter(ours):
        torch.testing.assert_close(logits(ours, x), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(ours, x), with_adapter, rtol=0, atol=0)
    peftkern.merge(ours)  # disabling a merged model unmerges it first, as PEFT does
    with peftkern.disable_adapter(ours):
        torch.testing.assert_close(logits(ours, x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(ours, x), with_adapter, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_mixed_batch_matches_each_row_alone(generator, quantize):
    ours = three_lora(generator, quantize=quantize)
    names = ["b", "__base__", "a", "c", "a", "b"]
    x = ids(generator, batch=len(names))
    mixed = logits(ours, x, adapter_names=names)
    assert_rows_match_alone(ours, x, names, mixed)
    assert peftkern.active_adapter(ours) == names[-1]


def test_mixed_batch_against_peft(generator, tmp_path):
    ours = three_lora(generator)
    theirs = peft_twin(ours, tmp_path, ["a", "b", "c"])
    names = ["c", "a", "__base__", "b", "b"]
    x = ids(generator, batch=len(names))
    torch.testing.assert_close(logits(ours, x, adapter_names=names), logits(theirs, x, adapter_names=names),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    # bfloat16 model, float32 adapters (as PEFT keeps them): within bf16 tolerance of PEFT
    ours.to(torch.bfloat16)
    theirs.to(torch.bfloat16)
    torch.testing.assert_close(logits(ours, x, adapter_names=names).float(),
                               logits(theirs, x, adapter_names=names).float(), rtol=2e-2, atol=2e-2)  # fmt: skip


def test_generate_with_adapter_names(generator, tmp_path):
    ours = three_lora(generator)
    theirs = peft_twin(ours, tmp_path, ["a", "b", "c"])
    names = ["a", "__base__", "c"]
    prompt = ids(generator, batch=3, length=5)
    # min_new_tokens: no row stops early on EOS, so a row of the batch and the row alone have one length
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mine = ours.generate(input_ids=prompt, adapter_names=names, **settings)
        peft_out = theirs.generate(input_ids=prompt, adapter_names=names, **settings)
        assert torch.equal(mine, peft_out)
        for row, name in enumerate(names):  # each row as if generated alone with its adapter
            alone = run_alone(ours, name, lambda: ours.generate(input_ids=prompt[row : row + 1], **settings))
            assert torch.equal(mine[row : row + 1], alone)
        # beam search expands each sequence num_beams times: each name goes with its copies
        beams = ours.generate(input_ids=prompt, adapter_names=names, num_beams=2, **settings)
        peft_beams = theirs.generate(input_ids=prompt, adapter_names=names, num_beams=2, **settings)
        assert torch.equal(beams, peft_beams)


def test_ia3_several_adapters_and_mixed_batch(generator, tmp_path):
    first = {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    second = {"peft_type": "IA3", "target_modules": ["v_proj", "down_proj", "up_proj"],
              "feedforward_modules": ["down_proj", "up_proj"]}  # fmt: skip
    ours = peftkern.patch(tiny_llama(), first, adapter_name="x")
    peftkern.add_adapter(ours, "y", second)
    randomize(ours, generator)
    theirs = peft_twin(ours, tmp_path, ["x", "y"])
    batch = ids(generator, batch=5)
    for name in ("x", "y"):
        peftkern.set_adapter(ours, name)
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), rtol=1e-5, atol=1e-5)
    names = ["y", "x", "__base__", "x", "y"]  # PEFT has no mixed batches for IA³: each row alone is the oracle
    mixed = logits(ours, batch, adapter_names=names)
    assert_rows_match_alone(ours, batch, names, mixed)
    with pytest.raises(ValueError, match="scales its input"):  # a layer scales one side for all its adapters
        peftkern.add_adapter(ours, "z", {**second, "feedforward_modules": ["down_proj"]})
    assert peftkern.list_adapters(ours) == ["x", "y"]


def test_mixed_batch_bad_input(generator):
    ours = three_lora(generator)
    x = ids(generator, batch=2)
    with pytest.raises(ValueError, match="non-existing adapter"):
        ours(input_ids=x, adapter_names=["a", "nope"])
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        ours(input_ids=x, adapter_names=["a", "b", "c"])
    with pytest.raises(TypeError, match="list of adapter names"):
        ours(input_ids=x, adapter_names="a")
    ours.train()
    with pytest.raises(ValueError, match="training mode"):
        ours(input_ids=x, adapter_names=["a", "b"])
    ours.eval()
    peftkern.merge(ours)
    with pytest.raises(ValueError, match="merged"):
        ours(input_ids=x, adapter_names=["a", "b"])
    peftkern.unmerge(ours)
    logits(ours, x, adapter_names=["a", "b"])  # after the errors, the model still works
    dora = peftkern.patch(tiny_llama(), {**LORA_A, "use_dora": True}, adapter_name="d")
    with pytest.raises(ValueError, match="DoRA"):
        logits(dora, x, adapter_names=["d", "__base__"])


def test_add_adapter_errors_leave_model_unchanged(generator):
    ours = three_lora(generator)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="already has an adapter"):
        peftkern.add_adapter(ours, "b", LORA_B)
    with pytest.raises(ValueError, match="cannot add a IA3"):
        peftkern.add_adapter(ours, "z", {"peft_type": "IA3"})
    with pytest.raises(NotImplementedError, match="modules_to_save"):
        peftkern.add_adapter(ours, "z", {**LORA_B, "modules_to_save": ["lm_head"]})
    with pytest.raises(ValueError, match="no module"):
        peftkern.add_adapter(ours, "z", {**LORA_B, "target_modules": ["nothing_here"]})
    with pytest.raises(RuntimeError, match="add_adapter"):
        peftkern.patch(ours, LORA_B)
    assert ours.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())
    assert peftkern.list_adapters(ours) == ["a", "b", "c"]


def test_unpatch_after_add_and_delete_restores_the_model(generator):
    base = tiny_llama()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    types = {n: type(m) for n, m in base.named_modules()}
    peftkern.patch(base, LORA_A, adapter_name="a")
    peftkern.add_adapter(base, "b", LORA_B)
    peftkern.delete_adapter(base, "a")
    peftkern.add_adapter(base, "c", LORA_C)
    peftkern.unpatch(base)
    assert {n: type(m) for n, m in base.named_modules()} == types
    assert base.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert PatchRecord.of(base) is None
    assert "generate" not in base.__dict__ and not base._forward_pre_hooks and not base._forward_hooks


def test_load_adapter_adds_and_retracts(generator, tmp_path):
    source = three_lora(generator)
    peftkern.save_adapter(source, tmp_path / "b", adapter_name="b")
    peftkern.save_adapter(source, tmp_path / "c", adapter_name="c")
    ours = peftkern.patch(tiny_llama(), LORA_A, adapter_name="a")
    peftkern.load_adapter(ours, tmp_path / "b", adapter_name="b")  # added, not activated (as PEFT)
    assert peftkern.list_adapters(ours) == ["a", "b"] and peftkern.active_adapter(ours) == "a"
    x = ids(generator)
    peftkern.set_adapter(ours, "b")
    peftkern.set_adapter(source, "b")
    torch.testing.assert_close(logits(ours, x), logits(source, x), rtol=1e-5, atol=1e-5)
    # a checkpoint that does not fit: the adapter added for it is taken out again, exactly
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    modules = {n: type(m) for n, m in ours.named_modules()}
    broken = tmp_path / "c"
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "adapter_model.safetensors")
    tensors.pop(next(iter(tensors)))
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(KeyError, match="missing"):
        peftkern.load_adapter(ours, broken, adapter_name="c")
    assert peftkern.list_adapters(ours) == ["a", "b"]
    assert {n: type(m) for n, m in ours.named_modules()} == modules
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())


def test_training_one_adapter_leaves_the_others(generator):
    ours = three_lora(generator)
    x = ids(generator)
    names = ["b", "a"]
    stale = logits(ours, x[:2], adapter_names=names)  # a mixed batch before the update
    peftkern.set_adapter(ours, "b")
    before = {n: p.clone() for n, p in ours.named_parameters() if ".a." in n or ".c." in n}
    trainable = [p for p in ours.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    ours.train()
    ours(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters() if n in before)
    ours.eval()
    # mixed batches read the adapters in place, so they see the update: row 0 is b's new output
    mixed = logits(ours, x[:2], adapter_names=names)
    assert not torch.allclose(mixed[:1], stale[:1])
    torch.testing.assert_close(mixed[:1], logits(ours, x[:1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1:], stale[1:], rtol=1e-6, atol=1e-6)  # a did not change


def test_modules_to_save_of_the_first_adapter(generator):
    """The first adapter's trained lm_head copy serves its rows only; other adapters (and
    "__base__") use the original head, in single-adapter and mixed batches alike."""
    ours = peftkern.patch(tiny_llama(), {**LORA_A, "modules_to_save": ["lm_head"]}, adapter_name="a")
    peftkern.add_adapter(ours, "b", LORA_B)
    randomize(ours, generator)
    with torch.no_grad():
        ours.lm_head.modules_to_save["a"].weight.add_(torch.randn(ours.lm_head.weight.shape, generator=generator))
    names = ["b", "a", "__base__"]
    x = ids(generator, batch=3)
    mixed = logits(ours, x, adapter_names=names)
    assert_rows_match_alone(ours, x, names, mixed)
    peftkern.set_adapter(ours, "b")
    assert not any(p.requires_grad for p in ours.lm_head.parameters())
    peftkern.delete_adapter(ours, "a")
    assert "a" not in ours.lm_head.modules_to_save


def test_ia3_mixed_batch_on_nf4_bases(generator):
    config = {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    ours = peftkern.patch(tiny_llama(), config, adapter_name="x", quantize="nf4")
    peftkern.add_adapter(ours, "y", config)
    randomize(ours, generator)
    names = ["y", "__base__", "x"]
    batch = ids(generator, batch=3)
    mixed = logits(ours, batch, adapter_names=names)
    assert_rows_match_alone(ours, batch, names, mixed)
