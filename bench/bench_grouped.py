"""Mixed-adapter batches (punica / S-LoRA style serving): one layer, 8 LoRA adapters (r=16) over a
1024->1024 base, a batch of 8 sequences x {1, 64} tokens where each sequence uses its own
adapter, forward only (inference). Side by side in one run:

  peftkern         base F.linear, then ONE lora_grouped call for every adapter (the adapters'
                   lora_A / lora_B weights passed as lists, as the layer does: no stacking)
  peft-loop        PEFT's mixed-batch forward (LoraLayer._mixed_batch_forward): base, then a
                   Python loop over the adapters: sub-batch x[idx] -> lora_B(lora_A(.)) * s ->
                   result[idx] += ...
  one-adapter      every row through the same adapter (base + lora_B(lora_A(x)) * s): the
                   "one adapter per batch" lower bound that grouping tries to approach

    python -m pytest bench/bench_grouped.py

The 'vs peftkern' column is that implementation's time / peftkern's. Bytes: the base weight, the
8 adapters, x and the output (read once, written once); FLOP: base GEMM + LoRA on every row.
"""

import pytest
import torch
import torch.nn.functional as F

from peftkern.ops import grouped as grouped_ops

ADAPTERS, RANK, IN, OUT, SEQUENCES = 8, 16, 1024, 1024, 8
TOKENS = [1, 64]
CASES = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def make_layer(impl, device, dtype):
    torch.manual_seed(0)
    weight = torch.randn(OUT, IN, device=device, dtype=dtype) / IN**0.5
    lora_a = [torch.randn(RANK, IN, device=device, dtype=dtype) / IN**0.5 for _ in range(ADAPTERS)]
    lora_b = [torch.randn(OUT, RANK, device=device, dtype=dtype) / RANK**0.5 for _ in range(ADAPTERS)]
    scaling = [2.0 * (1 + g % 3) for g in range(ADAPTERS)]  # lora_alpha / r, different per adapter
    # Each sequence its own adapter, in a shuffled order: sequence i uses adapter (3 i) mod 8.
    seq_adapter = [(3 * i) % ADAPTERS for i in range(SEQUENCES)]

    if impl == "peftkern":

        def forward(x):  # x [B, S, K]; the adapters' weights passed as they are (lists, no stacking)
            rows = torch.tensor(seq_adapter, dtype=torch.int32, device=device).repeat_interleave(x.shape[1])
            return grouped_ops.lora_grouped(F.linear(x, weight), x, lora_a, lora_b, scaling, rows)

        return forward
    if impl == "peft-loop":

        def forward(x):  # PEFT 0.x _mixed_batch_forward, dropout = identity (inference)
            result = F.linear(x, weight)
            unique = set(seq_adapter)
            sub_batches = [[i for i, name in enumerate(seq_adapter) if name == g] for g in unique]
            for g, idx in zip(unique, sub_batches):
                sub = x[idx]
                result[idx] += F.linear(F.linear(sub, lora_a[g]), lora_b[g]) * scaling[g]
            return result

        return forward

    def forward(x):  # one adapter for the whole batch
        return F.linear(x, weight) + F.linear(F.linear(x, lora_a[0]), lora_b[0]) * scaling[0]

    return forward


@pytest.mark.parametrize("device, dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("impl", ["peftkern", "peft-loop", "one-adapter"])
@pytest.mark.parametrize("tokens", TOKENS)
def test_lora_mixed_batch(benchmark, record, tokens, impl, device, dtype):
    forward = make_layer(impl, device, dtype)
    x = torch.randn(SEQUENCES, tokens, IN, device=device, dtype=dtype)

    def step():
        with torch.no_grad():
            forward(x)
        sync(device)

    benchmark.group = f"grouped lora fwd {SEQUENCES}x{tokens} tok {device}"
    benchmark.pedantic(step, rounds=30 if tokens == 1 else 15, warmup_rounds=3, iterations=1)
    rows, size = SEQUENCES * tokens, x.element_size()
    weight_bytes = (IN * OUT + ADAPTERS * RANK * (IN + OUT)) * size + rows * (IN + OUT) * size
    flops = 2 * rows * (IN * OUT + RANK * (IN + OUT))
    name = f"lora 8 adapters fwd {SEQUENCES}x{tokens}tok {str(dtype)[6:]} {device}"
    record(name, impl, weight_bytes, device, flops=flops)
