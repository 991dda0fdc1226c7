"""One training step (forward, backward, AdamW step) of a small Llama built from a config, LoRA on
every linear layer (r = 16), side by side in one run: peftkern vs Hugging Face PEFT on the dense
model, and peftkern QLoRA (quantize="nf4") vs PEFT + bitsandbytes Linear4bit; float32, and on CPU
also float32 weights under bf16 autocast (`torch.autocast("cpu", torch.bfloat16)`, how a CPU user
trains in bf16 on AVX-512-BF16 / AMX machines).

    python -m pytest bench/bench_e2e.py

The roofline of a training step is the frozen-base floor ("frozen-base" rows): the same dense model
with no adapter at all, every parameter frozen, backward run to the input embeddings (the dx GEMMs
every implementation must do). The summary prints each implementation's adapter overhead over that
floor. QLoRA rows are compared with the same dense floor, so their overhead includes the cost of
dequantizing the 4-bit weights: what a user pays for the memory saving.

Memory column: on a GPU the peak allocated memory of a step (torch.cuda.max_memory_allocated,
minus what was allocated before it); on a CPU, where no allocator statistic exists, the bytes the
step saves for backward (every tensor autograd keeps, each storage counted once): the activation
memory that LoRA/QLoRA implementations differ in. FLOP: 6 × tokens × base parameters (forward,
dx and the frozen base's share) is the floor the GEMMs must do.
"""

import copy

import pytest
import torch
import transformers

import peftkern

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
BATCH, SEQ = 2, 128
AUTOCAST_BF16 = "autocast-bf16"  # float32 weights, the step under torch.autocast(device, torch.bfloat16)
CASES = [("cpu", torch.float32), ("cpu", AUTOCAST_BF16)] + (
    [("cuda", torch.bfloat16)] if torch.cuda.is_available() else []
)


def small_llama(device, dtype):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=4096,
                                      max_position_embeddings=512, attn_implementation="sdpa")  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)


def build(impl, device, dtype):
    model = small_llama(device, dtype)
    if impl == "frozen-base":  # the floor: no adapter, nothing trainable, backward to the inputs
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    if impl == "peftkern":
        return peftkern.patch(model, LORA)
    if impl == "peftkern-nf4":
        return peftkern.patch(model, LORA, quantize="nf4")
    import peft

    if impl == "peft+bnb":
        if device != "cuda" and dtype != torch.float32:
            pytest.skip("bitsandbytes CPU baseline runs in float32 here")
        from peftkern.demo import to_bnb_4bit

        targets = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
        model = to_bnb_4bit(model, targets) if device == "cpu" else _bnb_cuda(model, targets, dtype)
    return peft.get_peft_model(model, peft.LoraConfig(**copy.deepcopy(LORA)))


def _bnb_cuda(model, targets, dtype):
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=dtype, compress_statistics=True, quant_type="nf4")  # fmt: skip
            layer.weight = bnb.nn.Params4bit(module.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)  # fmt: skip
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer.to("cuda"))
    return model


def saved_for_backward_mb(model, inputs) -> float:
    """MB of the distinct storages autograd saves during one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values()) / 2**20


@pytest.mark.parametrize("device, dtype", CASES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("impl", ["frozen-base", "peftkern", "peft", "peftkern-nf4", "peft+bnb"])
def test_training_step(benchmark, record, impl, device, dtype):
    autocast = dtype == AUTOCAST_BF16
    model_dtype = torch.float32 if autocast else dtype
    model = build(impl, device, model_dtype)
    model.train()
    ids = torch.randint(0, 4096, (BATCH, SEQ), generator=torch.Generator().manual_seed(1)).to(device)
    inputs = {"input_ids": ids, "labels": ids}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**inputs).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        memory_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            memory_mb = saved_for_backward_mb(model, inputs)
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    base_params = sum(m.in_features * m.out_features for m in small_llama("meta", model_dtype).modules()
                      if isinstance(m, torch.nn.Linear))  # fmt: skip
    flops = 6 * BATCH * SEQ * base_params
    dtype_name = dtype if autocast else str(dtype)[6:]
    kinds = ["lora", "qlora"] if impl == "frozen-base" else ["qlora" if "nf4" in impl or "bnb" in impl else "lora"]
    for kind in kinds:  # the floor row serves both groups
        record(f"train step {kind} {dtype_name} {device}", impl.replace("-nf4", ""), 0, device, flops=flops,
               memory_mb=memory_mb)  # fmt: skip
