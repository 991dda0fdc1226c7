"""A union's training step against the sum of its parts: one small Llama-shaped model (GQA),
float32 on CPU (bfloat16 on a GPU where one runs it), left-padded batch 4 x 32.

    python -m pytest -q bench/bench_hybrid.py

Cases: the base model alone (every parameter frozen but the input embeddings, so that there is a
backward: it computes one [1024, 256] weight gradient the other cases do not), each part alone (LoRA on
q/v/down, SeqBn reduction 16, prefix tuning 16 virtual tokens), and their ConfigUnion. The sum of
the parts is lora + seqbn + prefix - 2 x base (each part's own cost added once to one base
step); a union that costs more than that would be doing extra work. On a shared 2-core machine
the timings are noisy: read them as "same order".

UniPELT (`UniPELTConfig()`: gated LoRA r=8 on q/v, gated SeqBn reduction 16, gated prefix of 10
tokens through a 512-unit MLP): the same comparison with its gated parts alone (`unipelt_lora`,
`unipelt_seqbn`, `unipelt_prefix`, each a one-component gated union) and with the same three
parts ungated (`unipelt_ungated`): the difference is what the gates cost.
"""

import warnings

import pytest
import torch

import peftkern

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
BATCH, SEQ = 4, 32
CASES = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])


def parts():
    return {
        "lora": peftkern.LoraConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        "seqbn": peftkern.SeqBnConfig(reduction_factor=16),
        "prefix": peftkern.PrefixTuningConfig(num_virtual_tokens=16),
    }


def unipelt_parts():
    return dict(zip(["prefix", "seqbn", "lora"], peftkern.UniPELTConfig().configs))


def config_for(case):
    if case == "union":
        return peftkern.ConfigUnion(*parts().values())
    if case == "unipelt":
        return peftkern.UniPELTConfig()
    if case == "unipelt_ungated":
        return peftkern.ConfigUnion(*unipelt_parts().values())
    if case.startswith("unipelt_"):
        return peftkern.ConfigUnion(unipelt_parts()[case.removeprefix("unipelt_")], use_gating=True)
    return parts()[case]


def make(case, device, dtype):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).to(device=device, dtype=dtype)
    if case == "base":
        for p in model.parameters():
            p.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)  # something to backward into
        return model
    return peftkern.patch(model, config_for(case))


@pytest.mark.parametrize("device, dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("case", ["base", "lora", "seqbn", "prefix", "union", "unipelt_lora", "unipelt_seqbn",
                                  "unipelt_prefix", "unipelt", "unipelt_ungated"])  # fmt: skip
def test_training_step(benchmark, record, case, device, dtype):
    model = make(case, device, dtype).train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SHAPE["vocab_size"], (BATCH, SEQ), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(BATCH):
        mask[row, : row * 3] = 0
    ids, mask = ids.masked_fill(mask == 0, 0).to(device), mask.to(device)
    labels = ids.masked_fill(mask == 0, -100)

    def step():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1)
    params = sum(p.numel() for p in model.parameters())
    record(f"union train step {BATCH}x{SEQ} {str(dtype)[6:]} {device}", case, params * torch.finfo(dtype).bits // 8,
           device)  # fmt: skip
