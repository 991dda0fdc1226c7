"""The demo's training step (SmolLM2-135M, 4 x 64 tokens, LoRA r=16 on every projection, AdamW)
timed for one implementation, or profiled, with the frozen-base floor as a third choice:

    python scripts/demo_step_floor.py floor|peftkern|peft [--profile]

floor: the dense float32 model, every parameter frozen, forward + backward to the input
embeddings (what any adapter's step must at least cost); peftkern: `peftkern.patch(..., quantize=
"nf4")` as the demo does; peft: PEFT's LoRA on bitsandbytes' NF4 layers as the demo does. Prints
the median of 9 steps after 3 warm-up steps (run the three in turns, several times: on a shared
2-core VM one run's drift is as large as the differences), or with --profile torch.profiler's
top operators by self CPU time over 3 steps. Needs the demo's model (scripts/demo.sh fetches it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import peftkern
from peftkern import demo


def build(impl: str):
    torch.manual_seed(0)
    model, tokenizer = demo.load_base_model()
    if impl == "peftkern":
        peftkern.patch(model, demo.LORA, quantize="nf4")
    elif impl == "peft":
        import peft

        model = peft.get_peft_model(demo.to_bnb_4bit(model), peft.LoraConfig(**demo.LORA))
    else:  # the frozen dense base, its gradient taken to the input embeddings
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("impl", choices=["floor", "peftkern", "peft"])
    parser.add_argument("--profile", action="store_true", help="torch.profiler table over 3 steps instead")
    args = parser.parse_args()
    model, tokenizer = build(args.impl)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-3) if trainable else None
    batches = demo.training_batches(tokenizer, batch_size=4, seq_len=64, steps=12, seed=0)
    model.train()

    def step(ids):
        model(input_ids=ids, labels=ids).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for ids in batches[:3]:
        step(ids)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for ids in batches[3:6]:
                step(ids)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return
    times = []
    for ids in batches[3:]:
        start = time.perf_counter()
        step(ids)
        times.append(time.perf_counter() - start)
    print(f"{args.impl}: median step {statistics.median(times):.3f} s over {len(times)} steps "
          f"(min {min(times):.3f}, max {max(times):.3f}), {torch.get_num_threads()} threads")  # fmt: skip


if __name__ == "__main__":
    main()
