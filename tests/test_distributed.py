"""A patched model under torch.distributed, 2 CPU processes over gloo: DDP and FSDP2
(`fully_shard`) train LoRA to the same adapter weights as one process on the whole batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import peftkern

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)  # fmt: skip
LORA = {"r": 4, "lora_alpha": 8, "init_lora_weights": "gaussian", "target_modules": ["q_proj", "v_proj", "down_proj"]}
STEPS = 3


def patched_model():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    return peftkern.patch(model, LORA)


def batch():
    ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(1))
    return ids


def train(model, ids, steps=STEPS):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _worker(rank, world, port, mode, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = patched_model()
        ids = batch().chunk(world)[rank]
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
            train(wrapped, ids)
            state = adapter_state(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            train(model, ids)
            state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                     for n, p in model.named_parameters() if "lora_" in n}  # fmt: skip
        if rank == 0:
            torch.save(state, os.path.join(out_dir, f"{mode}.pt"))
        # both ranks done with every collective before either tears gloo down: without it one CI run
        # had rank 1 abort in teardown ("terminate called without an active exception", SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_train_the_adapters_as_one_process_does(mode, tmp_path):
    if mode == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 (fully_shard) needs torch >= 2.6")
    mp.start_processes(_worker, args=(2, free_port(), mode, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    distributed = torch.load(tmp_path / f"{mode}.pt")
    single = patched_model()
    train(single, batch())  # the mean loss over the whole batch = the mean of the two halves' means
    want = adapter_state(single)
    assert distributed.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(distributed[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
