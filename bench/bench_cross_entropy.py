"""The causal-LM loss, forward + backward to the logits, side by side in one run: peftkern's fused
cross-entropy (`peftkern.ops.cross_entropy.causal_lm_loss`, what `peftkern.patch` installs) against
transformers' `ForCausalLMLoss` (logits.float(), log_softmax + nll_loss), the loss every HF
model computes otherwise. Shapes: the demo's batch (4 x 64 tokens, SmolLM2's vocabulary 49152),
a longer one with Llama-2's 32000, float32 and bfloat16 logits (bf16 models / autocast).

    python -m pytest -q bench/bench_cross_entropy.py

GB/s counts the floor of the two passes: the logits read in the forward, read again and dlogits
written in the backward (3 x the logits' bytes). memory_mb: the bytes the loss keeps for the
backward beyond the logits themselves (log-probabilities for transformers' path, two float32
per row for ours), from torch.autograd.graph.saved_tensors_hooks.
"""

import pytest
import torch

from peftkern.ops import cross_entropy as ce

transformers = pytest.importorskip("transformers")
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

CASES = [(4, 64, 49152, torch.float32), (4, 64, 49152, torch.bfloat16), (2, 512, 32000, torch.float32)]


def saved_mb(fn, logits) -> float:
    """MB saved for the backward by fn(logits), not counting logits' own storage."""
    sizes = {}

    def pack(t):
        if t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(logits)
    return sum(sizes.values()) / 2**20


@pytest.mark.parametrize("impl", ["peftkern", "transformers"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-V{c[2]}-{str(c[3]).removeprefix('torch.')}")
def test_causal_lm_loss(benchmark, record, impl, case):
    batch, seq, vocab, dtype = case
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(batch, seq, vocab, generator=g) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    loss_fn = ce.causal_lm_loss if impl == "peftkern" else ForCausalLMLoss

    def loss_of(z):
        return loss_fn(z, labels, vocab)

    def step():
        loss_of(logits).backward()
        logits.grad = None

    if impl == "peftkern" and not ce.uses_kernel(logits):
        pytest.skip("this CPU path routes to the reference (transformers' ops): nothing to compare")
    benchmark.group = f"causal LM loss {batch}x{seq} V={vocab} {dtype}"
    benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1)
    memory = saved_mb(loss_of, logits)
    record(f"loss fwd+bwd {batch}x{seq} V={vocab} {str(dtype).removeprefix('torch.')}", impl,
           3 * logits.numel() * logits.element_size(), "cpu", memory_mb=memory)  # fmt: skip
