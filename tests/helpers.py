"""What the test files share (fixtures and markers stay in conftest.py): tiny randomly initialised
Hugging Face models built from configs, a token batch, a LoRA (PEFT model, peftkern model) pair."""

import copy

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
