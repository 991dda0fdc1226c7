"""Prefix tuning and prompt tuning against Hugging Face PEFT itself, on tiny randomly initialised
Llama (GQA), Qwen2, Mistral and GPT-2 models built from configs: with PEFT's weights copied into
ours, the same logits, loss and gradients on padded batches, the same generate() tokens (greedy
and sampling, batch > 1 with left padding), checkpoints both ways, exact unpatch, clear errors."""

import copy
import warnings

import pytest
import torch

import peftkern
from peftkern.methods import prefix as prefix_method
from peftkern.record import PatchRecord

from .helpers import assert_matches_peft, tiny_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]
PEFT_CONFIGS = {"prefix": peft.PrefixTuningConfig, "prompt": peft.PromptTuningConfig}
KINDS = {  # (method, extra config)
    "prefix": ("prefix", {}),
    "prefix-projection": ("prefix", {"prefix_projection": True, "encoder_hidden_size": 24}),
    "prompt": ("prompt", {}),
}
PAD = 0


def pair(arch, method, dtype=torch.float32, **config):
    """(PEFT model, peftkern-patched model) from one base, PEFT's prompt encoder copied into ours."""
    base = tiny_model(arch).to(dtype)
    config = {"num_virtual_tokens": 5, "task_type": "CAUSAL_LM", **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), PEFT_CONFIGS[method](**config))
    ours = peftkern.patch(copy.deepcopy(base), {"peft_type": theirs.active_peft_config.peft_type.value, **config})
    their_params = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    our_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert their_params.keys() == our_params.keys()  # exactly the prompt encoder, PEFT's names
    with torch.no_grad():
        for name, value in their_params.items():
            our_params[name].copy_(value)
    return theirs, ours


def padded_batch(generator, left=True, rows=3, length=9):
    """Token ids with a different amount of padding per row (left or right), mask and labels
    (-100 on the padding, as a data collator writes them)."""
    ids = torch.randint(3, 96, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(1, rows):
        pads = min(2 * row, length - 1)
        if left:
            ids[row, :pads], mask[row, :pads] = PAD, 0
        else:
            ids[row, -pads:], mask[row, -pads:] = PAD, 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "position ids are not supported" for prompt tuning
        return fn(*args, **kwargs)


def quiet_forward(model, inputs):
    return quiet(model, **inputs)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
def test_logits_loss_and_gradients_match_peft(arch, kind, left, generator):
    method, extra = KINDS[kind]
    theirs, ours = pair(arch, method, **extra)
    _, our_grads = assert_matches_peft(theirs, ours, padded_batch(generator, left=left), logits=(1e-5, 1e-5),
                                       loss=(1e-5, 1e-6), grads=(1e-4, 1e-6), forward=quiet_forward)  # fmt: skip
    for name, grad in our_grads.items():
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_generate_matches_peft_left_padded(arch, kind, generator):
    method, extra = KINDS[kind]
    theirs, ours = pair(arch, method, **extra)
    theirs.eval()
    ours.eval()
    inputs = padded_batch(generator, left=True, length=7)
    inputs.pop("labels")
    settings = dict(max_new_tokens=8, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        want = quiet(theirs.generate, **inputs, do_sample=False, **settings)
        got = quiet(ours.generate, **inputs, do_sample=False, **settings)
        assert torch.equal(got, want), (got, want)
        seed = int(torch.randint(0, 2**31, (1,), generator=generator))
        sampled = []
        for model in (theirs, ours):
            torch.manual_seed(seed)
            sampled.append(quiet(model.generate, **inputs, do_sample=True, top_k=0, temperature=1.5, **settings))
        assert torch.equal(sampled[1], sampled[0])
    # generate() depends on the prefix/prompt: a changed prompt changes the step scores (tokens of
    # a tiny random model may not move: its greedy continuations are often one repeated token)
    def scores():
        out = quiet(ours.generate, **inputs, do_sample=False, output_scores=True, return_dict_in_generate=True, **settings)
        return torch.stack(out.scores)

    with torch.no_grad():
        before = scores()
        getattr(ours, "prompt_encoder")["default"].embedding.weight.mul_(-3.0).add_(1.0)
        assert not torch.allclose(scores(), before)


@pytest.mark.parametrize("kind", list(KINDS))
def test_bf16_matches_peft(kind, generator):
    method, extra = KINDS[kind]
    theirs, ours = pair("llama", method, dtype=torch.bfloat16, **extra)
    inputs = padded_batch(generator)
    out_theirs, out_ours = quiet(theirs, **inputs), quiet(ours, **inputs)
    assert out_ours.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-2, atol=1e-2)
    out_ours.loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in ours.parameters() if p.requires_grad)
    inputs.pop("labels")
    with torch.no_grad():
        got = quiet(ours.generate, **inputs, max_new_tokens=4, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    assert got.shape == (3, 13)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_training_steps_follow_peft(method, generator):
    theirs, ours = pair("llama", method)
    assert_matches_peft(theirs, ours, padded_batch(generator), steps=4, step_losses=(1e-4, 1e-5), forward=quiet_forward)


def test_prefix_shapes_gqa_and_trainable_parameters(capsys):
    theirs, ours = pair("llama", "prefix")  # 4 query heads, 2 KV heads of 8
    config = PatchRecord.of(ours).config
    assert (config.num_layers, config.num_attention_heads, config.token_dim) == (2, 2, 16)
    assert config.encoder_hidden_size == 16 and config.task_type == "CAUSAL_LM"
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["prompt_encoder.default.embedding.weight"]
    assert ours.prompt_encoder["default"].embedding.weight.shape == (5, 2 * 2 * 16)
    cache = prefix_method.prefix_cache(ours, config, ours.prompt_encoder["default"], batch=3)
    assert len(cache.layers) == 2 and cache.layers[1].keys.shape == (3, 2, 5, 8)
    assert cache.layers[1].keys.stride(0) == 0  # a broadcast view until the first update
    peftkern.print_trainable_parameters(ours)
    ours_line = capsys.readouterr().out.strip()
    theirs.print_trainable_parameters()
    assert ours_line == capsys.readouterr().out.strip()


@pytest.mark.parametrize("method, init", [("prefix", {}), ("prefix", {"prefix_projection": True}),
                                          ("prefix", {"init_weights": "zero"}), ("prompt", {}),
                                          ("prompt", {"prompt_tuning_init": "SAMPLE_VOCAB"})])  # fmt: skip
def test_same_seed_same_initial_weights_as_peft(method, init):
    base = tiny_model("llama")
    config = {"num_virtual_tokens": 4, "task_type": "CAUSAL_LM", **init}
    torch.manual_seed(7)
    theirs = peft.get_peft_model(copy.deepcopy(base), PEFT_CONFIGS[method](**config))
    torch.manual_seed(7)
    ours = peftkern.patch(copy.deepcopy(base), {"peft_type": theirs.active_peft_config.peft_type.value, **config})
    theirs_sd = {k: v for k, v in theirs.state_dict().items() if k.startswith("prompt_encoder")}
    ours_sd = {k: v for k, v in ours.state_dict().items() if k.startswith("prompt_encoder")}
    assert theirs_sd.keys() == ours_sd.keys()
    for key in theirs_sd:
        assert ours_sd[key].dtype == theirs_sd[key].dtype == torch.float32
        torch.testing.assert_close(ours_sd[key], theirs_sd[key], rtol=0, atol=0, msg=key)


def _tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["classify", "the", "sentiment", "of", "this", "review", "[UNK]"]
    tok = Tokenizer(models.WordLevel({w: i + 10 for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(str(tmp_path))
    return transformers.AutoTokenizer.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("n", [3, 11])  # text cut to n / repeated to n
def test_text_init_as_peft_with_a_tokenizer_object(n, tmp_path):
    tokenizer = _tokenizer(tmp_path)
    base = tiny_model("qwen2")
    text = "classify the sentiment of this review"
    config = dict(num_virtual_tokens=n, task_type="CAUSAL_LM", prompt_tuning_init="TEXT", prompt_tuning_init_text=text)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(tokenizer_name_or_path=str(tmp_path), **config))
    ours = peftkern.patch(copy.deepcopy(base), peftkern.PromptTuningConfig(tokenizer_name_or_path=tokenizer, **config))
    want = theirs.prompt_encoder["default"].embedding.weight
    ids = torch.tensor(([10, 11, 12, 13, 14, 15] * 2)[:n])
    torch.testing.assert_close(want, base.get_input_embeddings().weight[ids], rtol=0, atol=0)
    torch.testing.assert_close(ours.prompt_encoder["default"].embedding.weight, want, rtol=0, atol=0)
    assert PatchRecord.of(ours).config.tokenizer_name_or_path == str(tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_peftkern_checkpoint_loads_in_peft(arch, kind, tmp_path, generator):
    method, extra = KINDS[kind]
    _, ours = pair(arch, method, **extra)
    peftkern.save_adapter(ours, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert list(saved) == ["prompt_embeddings"]
    theirs = quiet(peft.PeftModel.from_pretrained, tiny_model(arch), str(tmp_path))
    want = peft.get_peft_model_state_dict(theirs)["prompt_embeddings"]
    torch.testing.assert_close(saved["prompt_embeddings"], want, rtol=1e-6, atol=1e-6)
    inputs = padded_batch(generator)
    ours.eval()
    assert_matches_peft(theirs, ours, inputs, logits=(1e-5, 1e-5), forward=quiet_forward)


@pytest.mark.parametrize("kind", list(KINDS))
def test_peft_checkpoint_loads_in_peftkern(kind, tmp_path, generator):
    method, extra = KINDS[kind]
    theirs, _ = pair("mistral", method, **extra)
    theirs.save_pretrained(str(tmp_path))
    ours = peftkern.load_adapter(tiny_model("mistral"), tmp_path)
    inputs = padded_batch(generator)
    theirs.eval()
    ours.eval()
    assert_matches_peft(theirs, ours, inputs, logits=(1e-5, 1e-5), forward=quiet_forward)
    # and it round-trips through peftkern unchanged
    peftkern.save_adapter(ours, tmp_path / "again")
    from safetensors.torch import load_file

    first, again = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(str(tmp_path / "again/adapter_model.safetensors"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_folded_prefixes_do_not_load_into_a_projection(tmp_path):
    _, ours = pair("llama", "prefix", prefix_projection=True)
    peftkern.save_adapter(ours, tmp_path)
    before = ours.prompt_encoder["default"].embedding.weight.clone()
    with pytest.raises(ValueError, match="projection"):
        peftkern.load_adapter(ours, tmp_path)
    assert torch.equal(ours.prompt_encoder["default"].embedding.weight, before)


@pytest.mark.parametrize("kind", list(KINDS))
def test_unpatch_restores_the_model_exactly(kind, generator):
    method, extra = KINDS[kind]
    model = tiny_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)  # a user's own freezing survives
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    attributes = set(vars(model))
    inputs = padded_batch(generator)
    with torch.no_grad():
        want = model(**inputs).logits
        want_tokens = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                     max_new_tokens=4, do_sample=False, pad_token_id=PAD)  # fmt: skip
    peftkern.patch(model, {"peft_type": {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}[method],
                           "num_virtual_tokens": 4, **extra})  # fmt: skip
    with torch.no_grad():
        assert not torch.equal(quiet(model, **inputs).logits[:, -9:], want)
    peftkern.unpatch(model)
    assert set(vars(model)) == attributes
    assert not model._forward_pre_hooks and not model._forward_pre_hooks_with_kwargs
    assert dict(model.named_modules()) == modules
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, want)
        assert torch.equal(model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                          max_new_tokens=4, do_sample=False, pad_token_id=PAD), want_tokens)  # fmt: skip


class NoCacheLM(torch.nn.Module):
    """A causal LM whose forward takes neither a cache nor embeddings."""

    def __init__(self):
        super().__init__()
        self.config = transformers.LlamaConfig(**{"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2,
                                                  "num_attention_heads": 4, "intermediate_size": 64})  # fmt: skip
        self.embed = torch.nn.Embedding(96, 32)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None):
        return self.embed(input_ids)


@pytest.mark.parametrize(
    "model_fn, config, error, message",
    [
        (NoCacheLM, {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}, TypeError, "past_key_values"),
        (NoCacheLM, {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}, TypeError, "inputs_embeds"),
        (lambda: tiny_model("gpt2"), {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 64}, ValueError, "position budget"),
        (lambda: tiny_model("llama"), {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 5000}, ValueError, "position budget"),
        (lambda: tiny_model("llama"), {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 0}, ValueError, "positive integer"),
        (lambda: tiny_model("llama"), {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": -2}, ValueError, "positive integer"),
        (lambda: tiny_model("llama"), {"peft_type": "PREFIX_TUNING"}, ValueError, "positive integer"),
        (lambda: tiny_model("llama"), {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "num_layers": 3}, ValueError, "layers"),
        (lambda: tiny_model("gpt2"), {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "token_dim": 48,
                                      "num_attention_heads": 4}, ValueError, "KV cache"),  # fmt: skip
        (lambda: tiny_model("llama"), {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "task_type": "SEQ_CLS"},
         NotImplementedError, "CAUSAL_LM"),  # fmt: skip
        (lambda: tiny_model("llama"), {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "prompt_tuning_init": "TEXT"},
         ValueError, "tokenizer_name_or_path"),  # fmt: skip
        (lambda: tiny_model("llama"), {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "prompt_tuning_init": "TEXT",
                                       "prompt_tuning_init_text": "hi", "tokenizer_name_or_path": "/no/such/tokenizer"},
         OSError, "no/such"),  # fmt: skip
    ],
)
def test_bad_input_leaves_the_model_untouched(model_fn, config, error, message):
    model = model_fn()
    before = {n: (type(m), m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    attributes = set(vars(model))
    with pytest.raises(error, match=message):
        peftkern.patch(model, config)
    assert {n: (type(m), m) for n, m in model.named_modules()} == before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert set(vars(model)) == attributes and not model._forward_pre_hooks
    assert not model._forward_pre_hooks_with_kwargs


def test_a_deep_copy_of_a_patched_model_is_patched_on_its_own(generator):
    _, ours = pair("gpt2", "prefix")
    twin = copy.deepcopy(ours)
    with torch.no_grad():
        twin.prompt_encoder["default"].embedding.weight.zero_()
    inputs = padded_batch(generator)
    with torch.no_grad():
        assert not torch.equal(twin(**inputs).logits, ours(**inputs).logits)
    peftkern.unpatch(twin)
    assert hasattr(ours, "prompt_encoder") and ours._forward_pre_hooks and not twin._forward_pre_hooks
    assert "prepare_inputs_for_generation" in vars(ours) and "prepare_inputs_for_generation" not in vars(twin)


def test_prefix_refuses_gradient_checkpointing_as_peft(generator):
    model = tiny_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="gradient checkpointing"):
        peft.get_peft_model(copy.deepcopy(model), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="gradient checkpointing"):
        peftkern.patch(model, {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4})
    assert not hasattr(model, "prompt_encoder")
    # enabled after patching: refused at the training forward (PEFT would silently drop the prefix)
    model.gradient_checkpointing_disable()
    peftkern.patch(model, {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4})
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(**padded_batch(generator))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_prompt_tuning_with_gradient_checkpointing(use_reentrant, generator):
    _, plain = pair("llama", "prompt")
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    inputs = padded_batch(generator)
    grads = []
    for model in (plain, checkpointed):
        model.train()
        model(**inputs).loss.backward()
        grads.append(model.prompt_encoder["default"].embedding.weight.grad)
    assert grads[1] is not None
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_positional_input_ids_and_inputs_embeds(generator):
    for method in ("prefix", "prompt"):
        theirs, ours = pair("qwen2", method)
        inputs = padded_batch(generator)
        with torch.no_grad():
            want = quiet(theirs, **inputs).logits
            torch.testing.assert_close(quiet(ours, inputs["input_ids"], inputs["attention_mask"]).logits, want)
            embeds = ours.get_input_embeddings()(inputs["input_ids"])
            got = quiet(ours, inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_inner_model_sees_the_same_positions_masks_and_caches_as_under_peft(method, generator):
    """What reaches the decoder (position ids, attention mask, cache length, input shape) in a
    training forward and at every generate() step, recorded under PEFT and under peftkern. This
    pins down PEFT's conventions that peftkern copies: with left padding, generate() numbers a
    prefix-tuned row's tokens from its mask (+ num_virtual_tokens), a training forward from the
    cache length; prompt tuning drops position ids (the decoder counts from 0)."""
    theirs, ours = pair("llama", method)
    inputs = padded_batch(generator, length=6)
    seen = {}
    for label, model in (("theirs", theirs), ("ours", ours)):
        decoder = model.get_base_model().model if label == "theirs" else model.model
        calls = seen[label] = []

        def spy(module, args, kwargs, calls=calls):
            cache = kwargs.get("past_key_values")
            embeds = kwargs.get("inputs_embeds")
            calls.append((kwargs.get("position_ids"), kwargs["attention_mask"].long(),
                          cache.get_seq_length() if cache is not None else None,
                          tuple((embeds if embeds is not None else kwargs["input_ids"]).shape[:2])))  # fmt: skip

        handle = decoder.register_forward_pre_hook(spy, with_kwargs=True)
        with torch.no_grad():
            quiet(model, **inputs)
            quiet(model.generate, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                  max_new_tokens=3, do_sample=False, pad_token_id=PAD, eos_token_id=None)  # fmt: skip
        handle.remove()
    assert len(seen["ours"]) == len(seen["theirs"]) == 4
    for step, (mine, want) in enumerate(zip(seen["ours"], seen["theirs"])):
        for got, expected in zip(mine, want):
            if isinstance(expected, torch.Tensor):
                assert isinstance(got, torch.Tensor) and torch.equal(got, expected), (step, got, expected)
            else:
                assert got == expected, (step, got, expected)
    if method == "prefix":
        positions = seen["ours"][1][0]  # generate()'s prefill
        assert positions[0].tolist() == list(range(5, 11)) and positions[2].tolist() == [5] * 5 + [6]  # 4 pads (position 0), then 0, 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", list(KINDS))
def test_cuda_bf16_matches_peft(kind, generator):
    method, extra = KINDS[kind]
    theirs, ours = pair("llama", method, dtype=torch.bfloat16, **extra)
    theirs, ours = theirs.cuda(), ours.cuda()
    inputs = {k: v.cuda() for k, v in padded_batch(generator).items()}
    out_theirs, out_ours = quiet(theirs, **inputs), quiet(ours, **inputs)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-2, atol=1e-2)
    out_ours.loss.backward()
    assert ours.prompt_encoder["default"].embedding.weight.grad.isfinite().all()
    inputs.pop("labels")
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(quiet(ours.generate, **inputs, **settings), quiet(theirs.generate, **inputs, **settings))


@pytest.mark.parametrize("multi_query, new_arch, cached_heads", [(True, False, 1), (False, False, 4), (True, True, 4)])
def test_prefix_tuning_on_falcon_sizes_the_prefix_for_the_heads_it_caches(multi_query, new_arch, cached_heads,
                                                                          generator, tmp_path):  # fmt: skip
    """Falcon caches 1 KV head with multi-query attention, every query head with the new decoder
    architecture, else num_kv_heads: patching sizes the prefix for that, and a PEFT checkpoint
    made for it loads with load_adapter and gives PEFT's logits (it failed in the forward)."""
    config = transformers.FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_kv_heads=2 if new_arch else None, multi_query=multi_query,
                                       new_decoder_architecture=new_arch)  # fmt: skip
    torch.manual_seed(0)
    base = transformers.FalconForCausalLM(config).eval()
    ids = torch.randint(0, 96, (2, 5), generator=generator)
    ours = peftkern.patch(copy.deepcopy(base), {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3})
    assert (PatchRecord.of(ours).config.num_attention_heads, PatchRecord.of(ours).config.token_dim) == (cached_heads, 8 * cached_heads)
    with torch.no_grad():
        assert ours(input_ids=ids).logits.shape == (2, 5, 96)
        assert ours.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False).shape == (2, 7)
    peft_config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, num_layers=2,
                                          num_attention_heads=cached_heads, token_dim=8 * cached_heads)  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config).eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.normal_(generator=generator)
    theirs.save_pretrained(tmp_path)
    loaded = peftkern.load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
