"""Prefix tuning and prompt tuning: peftkern's hooks side by side with Hugging Face PEFT's
PeftModelForCausalLM on one small Llama-shaped model (GQA: 8 query heads, 2 KV heads), float32
on CPU (bfloat16 too where a GPU runs it).

    python -m pytest -q bench/bench_prefix.py

Cases: a training step (forward + backward, left-padded batch of 4 x 32, 32 virtual tokens),
greedy generate() (batch 4, 16-token left-padded prompts, 16 new tokens: tokens/s = 64 / median
seconds), and building the injected prefix cache, where the bytes column is what that
implementation materialises for it (peftkern: the prefix once, broadcast over the batch; PEFT:
batch copies); the memory line printed per case says the same in KiB. On a shared 2-core machine
the model-level timings are noisy (min and max differ by several x): read them as "same
order", not as a speedup.
"""

import copy
import warnings

import pytest
import torch

import peftkern
from peftkern.methods import prefix as prefix_method
from peftkern.record import PatchRecord

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
VIRTUAL, BATCH, SEQ = 32, 4, 32
GEN_BATCH, GEN_PROMPT, GEN_NEW = 4, 16, 16
CASES = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])
PEFT_TYPES = {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def make(impl, method, device, dtype):
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).to(device=device, dtype=dtype)
    config = {"num_virtual_tokens": VIRTUAL, "task_type": "CAUSAL_LM"}
    if impl == "peft":
        cls = peft.PrefixTuningConfig if method == "prefix" else peft.PromptTuningConfig
        return peft.get_peft_model(base, cls(**config))
    return peftkern.patch(base, {"peft_type": PEFT_TYPES[method], **config})


def padded(rows, length, device, generator):
    ids = torch.randint(3, SHAPE["vocab_size"], (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(rows):
        mask[row, : row % 4 * 3] = 0  # left padding, 0 to 9 tokens
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


@pytest.mark.parametrize("device, dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("impl", ["peftkern", "peft"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_training_step(benchmark, record, method, impl, device, dtype):
    model = make(impl, method, device, dtype).train()
    ids, mask = padded(BATCH, SEQ, device, torch.Generator().manual_seed(0))
    labels = ids.masked_fill(mask == 0, -100)

    def step():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        sync(device)

    benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1)
    params = sum(p.numel() for n, p in model.named_parameters() if "prompt_encoder" not in n)
    tokens = BATCH * (SEQ + (VIRTUAL if method == "prompt" else 0))
    record(f"{method} train step {BATCH}x{SEQ} {str(dtype)[6:]} {device}", impl,
           params * torch.finfo(dtype).bits // 8, device, flops=6 * params * tokens)  # fmt: skip


@pytest.mark.parametrize("device, dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("impl", ["peftkern", "peft"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generate(benchmark, record, method, impl, device, dtype):
    model = make(impl, method, device, dtype).eval()
    ids, mask = padded(GEN_BATCH, GEN_PROMPT, device, torch.Generator().manual_seed(1))

    def run():
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GEN_NEW, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)  # fmt: skip
        sync(device)
        return out

    out = benchmark.pedantic(run, rounds=4, warmup_rounds=1, iterations=1)
    assert out.shape == (GEN_BATCH, GEN_PROMPT + GEN_NEW)
    new_tokens = GEN_BATCH * GEN_NEW
    benchmark.extra_info["tokens_per_s"] = new_tokens / benchmark.stats.stats.median
    params = sum(p.numel() for p in model.parameters())
    record(f"{method} generate {new_tokens} tok {str(dtype)[6:]} {device}", impl,
           params * torch.finfo(dtype).bits // 8 * GEN_NEW, device)  # fmt: skip


def cache_bytes(cache) -> int:
    """Bytes of the distinct storages the cache's tensors live in."""
    storages = {}
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("device, dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("impl", ["peftkern", "peft"])
def test_prefix_cache_build(benchmark, record, capsys, impl, device, dtype):
    model = make(impl, "prefix", device, dtype)
    if impl == "peft":
        build = lambda: model.get_prompt(BATCH)  # noqa: E731
    else:
        config = PatchRecord.of(model).config
        build = lambda: prefix_method.prefix_cache(model, config, model.prompt_encoder["default"], BATCH)  # noqa: E731
    cache = build()
    nbytes = cache_bytes(cache)
    per_batch = BATCH * VIRTUAL * SHAPE["num_hidden_layers"] * 2 * 64 * torch.finfo(dtype).bits // 8
    benchmark.extra_info.update(cache_bytes=nbytes, batch_expanded_bytes=per_batch)
    benchmark.pedantic(build, rounds=30, warmup_rounds=3, iterations=1)
    record(f"prefix cache build B{BATCH} {str(dtype)[6:]} {device}", impl, nbytes, device)
    with capsys.disabled():
        print(f"\ninjected prefix cache, {impl}, {device} {str(dtype)[6:]}: {nbytes / 1024:.0f} KiB "
              f"(the batch-expanded prefix: {per_batch / 1024:.0f} KiB)")  # fmt: skip
