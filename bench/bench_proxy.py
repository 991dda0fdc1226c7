"""Proxy-tuning decode throughput (peftkern.proxy_generate), side by side in one run, greedy, 4
sequences x 16 new tokens after a 32-token prompt, on CPU here:

- base-generate: the large model M alone, transformers' `generate` (the floor: proxy-tuning adds
  the small pair on top of it);
- proxy-3-models: M, M+ and M− as three separate models (M+ with its LoRA merged);
- proxy-adapter-split: M+ = M− + a peftkern LoRA adapter, expert and anti-expert as two forwards
  of the one small model (`mixed_batch=False`);
- proxy-adapter-mixed: the same as ONE mixed batch of 8 sequences (`adapter_names`), the small
  model's weights read once per step.

M: a Llama of hidden 768, 4 layers, vocab 8192; M+/M−: hidden 256, 2 layers, the same vocabulary;
LoRA r=16 on every projection. Also the decode-step op alone (`proxy_logits`: combine +
temperature + top-k + top-p on [8, 49152] rows) against the same steps in PyTorch with
transformers' warpers.

    python -m pytest -q bench/bench_proxy.py

GB/s counts the weights each step must read (every model once; the small one twice for the
three-model and split paths) for the generate cases, the three logit rows read and one written
for the op.
"""

import copy

import pytest
import torch

import peftkern
from peftkern.ops import proxy as proxy_ops

transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB, BATCH, PROMPT, NEW = 8192, 4, 32, 16


def llama(seed, hidden, layers):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                      eos_token_id=None, pad_token_id=0)  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models():
    base = llama(0, 768, 4)
    anti = llama(1, 256, 2)
    patched = peftkern.patch(copy.deepcopy(anti), {"r": 16, "lora_alpha": 32, "target_modules": TARGETS,
                                                   "init_lora_weights": False}, adapter_name="tuned").eval()  # fmt: skip
    expert = peftkern.merge_and_unload(copy.deepcopy(patched)).eval()
    return base, expert, anti, patched


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("impl", ["base-generate", "proxy-3-models", "proxy-adapter-split", "proxy-adapter-mixed"])
def test_proxy_decode(benchmark, record, models, impl):
    base, expert, anti, patched = models
    ids = torch.randint(1, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    if impl == "base-generate":
        def run():
            return base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                 min_new_tokens=NEW, do_sample=False, pad_token_id=0)  # fmt: skip
        small_reads = 0
    elif impl == "proxy-3-models":
        def run():
            return peftkern.proxy_generate(base, expert, anti, ids, max_new_tokens=NEW)
        small_reads = 2
    else:
        mixed = impl.endswith("mixed")

        def run():
            return peftkern.proxy_generate(base, patched, None, ids, expert_adapter="tuned", mixed_batch=mixed,
                                           max_new_tokens=NEW)  # fmt: skip
        small_reads = 1 if mixed else 2
    with torch.inference_mode():
        out = run()
        assert out.shape == (BATCH, PROMPT + NEW)
        benchmark.group = "proxy decode"
        benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    benchmark.extra_info["tokens_per_s"] = BATCH * NEW / benchmark.stats.stats.median
    per_step = weight_bytes(base) + small_reads * weight_bytes(anti)
    record(f"proxy decode {BATCH}x{NEW} tok (tok/s = {BATCH * NEW}/median)", impl, per_step * NEW, "cpu")


@pytest.mark.parametrize("impl", ["fused", "torch+warpers"])
def test_proxy_logits_op(benchmark, record, impl):
    rows, vocab = 8, 49152
    g = torch.Generator().manual_seed(0)
    b, e, a = (torch.randn(rows, vocab, generator=g) * 3 for _ in range(3))
    warpers = [transformers.TemperatureLogitsWarper(0.7), transformers.TopKLogitsWarper(50),
               transformers.TopPLogitsWarper(0.9)]  # fmt: skip

    def fused():
        return proxy_ops.proxy_logits(b, e, a, 1.0, 0.7, 50, 0.9)

    def unfused():
        z = b + 1.0 * (e - a)
        for warp in warpers:
            z = warp(None, z)
        return z

    fn = fused if impl == "fused" else unfused
    benchmark.group = "proxy_logits op"
    benchmark.pedantic(fn, rounds=10, warmup_rounds=2, iterations=1)
    record(f"proxy_logits [{rows}, {vocab}] T+top-k+top-p", impl, 4 * rows * vocab * 4, "cpu")
