"""VeRA and AdaLoRA layers (the scaled-LoRA op: fused scale epilogue, scale gradients reduced from
the backward's own intermediates, frozen A/B without their GEMMs) side by side with Hugging Face
PEFT's VeRA / AdaLoRA layers on a 1B-class projection (2048 -> 2048), at decode (8 tokens) and
training (512 tokens) sizes, forward + backward; plus one training step of a small Llama patched
by each. float32 on CPU (bfloat16 too where a GPU runs it). MB: bytes saved for backward (CPU).

    python -m pytest bench/bench_scaled_lora.py
"""

import copy

import pytest
import torch

import peftkern

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IN, OUT = 2048, 2048
CASES = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])
METHODS = {
    "vera": (lambda: peft.VeraConfig(r=256, target_modules=["proj"], init_weights=False), {"peft_type": "VERA", "r": 256,
             "target_modules": ["proj"], "init_weights": False}),
    "adalora": (lambda: peft.AdaLoraConfig(init_r=12, target_r=4, total_step=100, target_modules=["proj"],
                                           init_lora_weights=False),
                {"peft_type": "ADALORA", "init_r": 12, "target_r": 4, "total_step": 100, "target_modules": ["proj"],
                 "init_lora_weights": False}),
}  # fmt: skip


class One(torch.nn.Module):
    def __init__(self, device, dtype):
        super().__init__()
        self.proj = torch.nn.Linear(IN, OUT, device=device, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


def make(method, impl, device, dtype):
    torch.manual_seed(0)
    base = One(device, dtype)
    theirs, ours = METHODS[method]
    if impl == "peft":
        return peft.get_peft_model(base, theirs())
    return peftkern.patch(base, dict(ours))


def saved_bytes(fn):
    total = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t, lambda t: t):
        out = fn()
    return out, sum(total) / 2**20


@pytest.mark.parametrize("device, dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("impl", ["peftkern", "peft"])
@pytest.mark.parametrize("tokens", [8, 512])
@pytest.mark.parametrize("method", list(METHODS))
def test_layer_forward_backward(benchmark, record, method, tokens, impl, device, dtype):
    model = make(method, impl, device, dtype)
    x = torch.randn(tokens, IN, device=device, dtype=dtype, requires_grad=True)

    def step():
        model(x).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{method} fwd+bwd {tokens} tok {device}"
    benchmark.pedantic(step, rounds=5 if tokens >= 512 else 20, warmup_rounds=2, iterations=1)
    _, memory = saved_bytes(lambda: model(x))
    record(f"{method} fwd+bwd {tokens}tok {str(dtype)[6:]} {device}", impl, IN * OUT * x.element_size(), device,
           flops=6 * tokens * IN * OUT, memory_mb=memory)  # fmt: skip


@pytest.mark.parametrize("impl", ["peftkern", "peft"])
@pytest.mark.parametrize("method", list(METHODS))
def test_train_step_small_llama(benchmark, record, method, impl):
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        vocab_size=2000))  # fmt: skip
    theirs, ours = METHODS[method]
    targets = ["q_proj", "v_proj", "down_proj"]
    if impl == "peft":
        config = theirs()
        config.target_modules = set(targets)
        if method == "adalora":
            config.task_type = "CAUSAL_LM"
        model = peft.get_peft_model(copy.deepcopy(base), config)
    else:
        model = peftkern.patch(copy.deepcopy(base), {**ours, "target_modules": targets})
    ids = torch.randint(0, 2000, (4, 128))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    benchmark.group = f"{method} train step llama-4L"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    _, memory = saved_bytes(lambda: model(input_ids=ids, labels=ids).loss)
    record(f"{method} train step llama-4L cpu", impl, 0, "cpu", memory_mb=memory)
