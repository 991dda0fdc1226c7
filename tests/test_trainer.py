"""transformers' Trainer on a patched model, the QLoRA workflow: a model loaded in 4-bit by
bitsandbytes, patched, trained by Trainer; its checkpoints are adapter directories in PEFT's
format (load_adapter and PeftModel.from_pretrained read them), training resumes from them, and
gradient checkpointing still trains the adapters."""

import os

import pytest
import torch

import peftkern

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)  # fmt: skip
LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(directory)
    return directory


def load_4bit(base_dir):
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization,
                                                             device_map="cpu")  # fmt: skip


def dataset(seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 96, (16,), generator=generator) for _ in range(8)]
    return [{"input_ids": row, "labels": row} for row in rows]


def trainer(model, output_dir, **overrides):
    args = dict(output_dir=str(output_dir), max_steps=4, save_steps=2, per_device_train_batch_size=2,
                learning_rate=5e-3, report_to=[], use_cpu=True, seed=7)  # fmt: skip
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**{**args, **overrides}),
                                train_dataset=dataset())  # fmt: skip


def adapter_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_trainer_fine_tunes_a_4bit_model_and_writes_adapter_directories(base_dir, tmp_path, generator):
    model = peftkern.patch(load_4bit(base_dir), LORA)
    before = adapter_tensors(model)
    trainer(model, tmp_path / "run").train()  # used to raise: "cannot perform fine-tuning on purely quantized models"
    after = adapter_tensors(model)
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed no adapter weight"
    checkpoint = tmp_path / "run" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "config.json" not in files, files

    final = tmp_path / "final"
    trainer(model, tmp_path / "run").save_model(str(final))
    ids = torch.randint(0, 96, (2, 9), generator=generator)
    want = logits(model, ids)
    ours = peftkern.load_adapter(load_4bit(base_dir), final)
    torch.testing.assert_close(logits(ours, ids), want, rtol=1e-5, atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(load_4bit(base_dir), final)
    torch.testing.assert_close(logits(theirs, ids), want, rtol=1e-4, atol=1e-4)


def test_trainer_resumes_from_its_checkpoint(base_dir, tmp_path):
    """Four steps in one go, or two, a checkpoint, and a fresh model resumed from it: the same
    adapter weights at the end."""
    straight = peftkern.patch(load_4bit(base_dir), LORA)
    trainer(straight, tmp_path / "straight").train()
    resumed = peftkern.patch(load_4bit(base_dir), LORA)
    trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    want, got = adapter_tensors(straight), adapter_tensors(resumed)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_still_trains_the_adapters(base_dir):
    model = peftkern.patch(load_4bit(base_dir), LORA)
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 96, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # (lora_A: zero while B is 0)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_unpatch_takes_the_transformers_integration_back(base_dir):
    model = load_4bit(base_dir)
    peftkern.patch(model, LORA)
    assert model._hf_peft_config_loaded and "save_pretrained" in vars(model)
    peftkern.unpatch(model)
    assert not model._hf_peft_config_loaded and "save_pretrained" not in vars(model)


def tiny_tokenizer():
    """A word-level tokenizer for the tiny model's 96 ids ("t0" ... "t93"), so that TRL's
    SFTTrainer can tokenize text without a hub."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(94)}
    vocab.update({"[UNK]": 94, "[PAD]": 95})
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                                eos_token="t0")  # fmt: skip


def sft(model, output_dir, **kwargs):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    generator = torch.Generator().manual_seed(0)
    rows = [" ".join(f"t{i}" for i in torch.randint(1, 94, (16,), generator=generator).tolist()) for _ in range(8)]
    args = trl.SFTConfig(output_dir=str(output_dir), max_steps=2, save_steps=2, per_device_train_batch_size=2,
                         report_to=[], use_cpu=True, learning_rate=5e-3)  # fmt: skip
    return trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list([{"text": r} for r in rows]),
                          processing_class=tiny_tokenizer(), **kwargs)  # fmt: skip


def test_trl_sfttrainer_on_a_patched_4bit_model(base_dir, tmp_path):
    model = peftkern.patch(load_4bit(base_dir), LORA)
    before = adapter_tensors(model)
    sft(model, tmp_path / "run").train()
    after = adapter_tensors(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(checkpoint))
    # (the trained model's forward may still be accelerate's autocast wrapper: compare the weights)
    reloaded = adapter_tensors(peftkern.load_adapter(load_4bit(base_dir), checkpoint))
    assert reloaded.keys() == after.keys() and all(torch.equal(reloaded[k], after[k]) for k in after)


def test_trl_sfttrainer_with_a_peft_config_then_patched(base_dir, tmp_path):
    """The other way in: SFTTrainer makes PEFT's model from an unpatched one and a peft_config,
    then peftkern.patch(trainer.model) swaps the fused layers in, sharing PEFT's parameters."""
    trainer = sft(load_4bit(base_dir), tmp_path / "run", peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peftkern.patch(trainer.model)
    before = adapter_tensors(trainer.model)
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in adapter_tensors(trainer.model).items())
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "run" / "checkpoint-2"))


def test_peft_wrapping_the_modules_of_a_patched_layer_is_refused(base_dir):
    """PEFT's get_peft_model on a patched model that targets our layers' inner modules would
    train adapters our forward never runs: the forward refuses, naming the way out."""
    model = peftkern.patch(load_4bit(base_dir), LORA)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lora_A.default"]))
    with pytest.raises(RuntimeError, match="wrapped by another library"):
        wrapped(input_ids=torch.randint(0, 96, (1, 4)))
