"""Mixed-adapter batches as callers hit them: the length of `adapter_names` checked on every
call (PEFT's error), and calls from several threads on one model, mixed and plain interleaved,
each seeing only its own batch."""

import threading

import pytest
import torch

import peftkern

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)  # fmt: skip
LORA_A = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": ["q_proj", "v_proj"]}
LORA_B = {"r": 2, "lora_alpha": 4, "init_lora_weights": False, "target_modules": ["k_proj", "up_proj"]}


def two_adapters(generator):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    peftkern.patch(model, LORA_A, adapter_name="a")
    peftkern.add_adapter(model, "b", LORA_B)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model


@pytest.mark.parametrize("names", [[], ["a"], ["a", "b", "a", "b", "a"]])
def test_adapter_names_of_the_wrong_length_raise_in_forward_and_generate(generator, names):
    model = two_adapters(generator)
    x = torch.randint(0, 96, (2, 5), generator=generator)
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model(input_ids=x, adapter_names=names)
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model.generate(x, adapter_names=names, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model.generate(input_ids=x, adapter_names=names, max_new_tokens=2, do_sample=False)
    with torch.no_grad():  # the model still works, plain and mixed
        model(input_ids=x)
        model(input_ids=x, adapter_names=["a", "b"])


def test_threads_mixing_adapter_names_and_plain_calls_each_see_their_own_batch(generator):
    """One thread runs mixed batches, others plain forwards and generate on the same model, many
    times, interleaved: every result equals the one computed alone, no thread raises, and a plain
    call after the mixed ones runs the active adapter (no batch left behind)."""
    model = two_adapters(generator)
    x = torch.randint(0, 96, (2, 6), generator=generator)
    with torch.no_grad():
        want_mixed = model(input_ids=x, adapter_names=["b", "__base__"]).logits
        want_plain = model(input_ids=x).logits
        want_tokens = model.generate(x, max_new_tokens=3, do_sample=False)
    errors, barrier = [], threading.Barrier(3)

    def worker(kind):
        try:
            barrier.wait()
            for _ in range(15):
                with torch.no_grad():
                    if kind == "mixed":
                        torch.testing.assert_close(model(input_ids=x, adapter_names=["b", "__base__"]).logits,
                                                   want_mixed, rtol=1e-5, atol=1e-5)  # fmt: skip
                    elif kind == "plain":
                        torch.testing.assert_close(model(input_ids=x).logits, want_plain, rtol=1e-5, atol=1e-5)
                    else:
                        assert torch.equal(model.generate(x, max_new_tokens=3, do_sample=False), want_tokens)
        except BaseException as error:  # noqa: BLE001  (reported below, with the thread's kind)
            errors.append((kind, repr(error)))

    threads = [threading.Thread(target=worker, args=(kind,)) for kind in ("mixed", "plain", "generate")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, want_plain, rtol=1e-5, atol=1e-5)
