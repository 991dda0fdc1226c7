"""The CUDA emulation itself (peftkern/emulation.py, csrc/emu/): CUDA's semantics where a kernel
depends on them, and an error wherever a kernel breaks a rule that a GPU would punish. The real
kernels run under it through the op-test modules listed in conftest.EMULATED_MODULES."""

import math
import os
import subprocess
import sys

import pytest
import torch

from peftkern import emulation

pytestmark = pytest.mark.usefixtures("emulation_library")


def run(case, schedule="forward", seed=0):
    emulation.set_schedule(schedule, seed)
    try:
        return torch.ops.peftkern_emu.emu_selftest(case)
    finally:
        emulation.set_schedule("forward")


def cuda_shuffle(lane, kind, operand, width=32):
    """The source lane of each shuffle, as the CUDA programming guide defines it."""
    base = lane & ~(width - 1)
    if kind == "idx":
        return base + (operand % width)
    if kind == "up":
        return lane if lane - operand < base else lane - operand
    if kind == "down":
        return lane if lane + operand >= base + width else lane + operand
    return lane if (lane ^ operand) >= base + width else lane ^ operand


def test_warp_shuffles_follow_cuda_semantics():
    got = run("shuffles").view(64, 6)
    for t in range(64):
        warp, lane = divmod(t, 32)
        expected = [
            cuda_shuffle(lane, "xor", 5), cuda_shuffle(lane, "up", 3), cuda_shuffle(lane, "down", 3),
            cuda_shuffle(lane, "idx", 7), cuda_shuffle(lane, "down", 2, 8), cuda_shuffle(lane, "idx", 3, 8),
        ]  # fmt: skip
        assert got[t].tolist() == [32.0 * warp + e for e in expected], t


def test_a_divergent_shuffle_is_an_error():
    with pytest.raises(RuntimeError, match="divergent warp collective: lane 16 waits at __shfl_xor_sync .* lane 0 has exited"):
        run("divergent_shuffle")


@pytest.mark.parametrize("schedule", ["forward", "reverse", "shuffle"])
def test_shared_memory_with_a_barrier_is_the_same_under_every_schedule(schedule):
    got = run("with_barrier", schedule, seed=7)[: 3 * 64].view(3, 64)
    assert got.tolist() == [[float((t + 1) % 64) for t in range(64)]] * 3


def test_a_missing_barrier_reads_poison_and_depends_on_the_schedule():
    """Shared memory starts every block as NaN; without the barrier a thread that runs before its
    neighbour reads the poison, and which threads do depends on the order they run in."""
    results = [run("missing_barrier", s, seed=3)[: 3 * 64] for s in ("forward", "reverse", "shuffle")]
    assert all(r.isnan().any() for r in results)
    assert not torch.equal(results[0].isnan(), results[1].isnan())


def test_dynamic_shared_memory():
    assert run("dynamic_shared")[:64].tolist() == [2.0] * 64


@pytest.mark.parametrize(
    "case, message",
    [
        ("zero_grid", r"invalid configuration argument: grid \(0, 1, 1\)"),
        ("block_too_large", r"invalid configuration argument: block \(1025, 1, 1\)"),
        ("grid_y_too_large", r"invalid configuration argument: grid \(1, 65536, 1\)"),
        ("dynamic_shared_too_large", r"too much shared memory .* 49156 dynamic"),
        ("device_assert", r"device-side assert triggered at csrc/emu/selftest.cu:\d+: thread 5 is not allowed .*thread \(5, 0, 0\)"),
    ],
)  # fmt: skip
def test_launches_a_gpu_would_refuse_are_errors(case, message):
    with pytest.raises(RuntimeError, match=message):
        run(case)
    assert run("with_barrier")[0] == 1.0  # the emulation is usable after the error


def test_a_misaligned_vector_load_stops_the_process():
    """UBSan (every emulation build has it) stops at a 16-byte vector load from a 4-byte-aligned
    address, as a GPU faults on it. In a child process, since it aborts."""
    code = "import torch; from peftkern import emulation; emulation.load(); torch.ops.peftkern_emu.emu_selftest('misaligned_vector')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PEFTKERN_EMULATION_VARIANT": os.environ.get("PEFTKERN_EMULATION_VARIANT", "ubsan")})  # fmt: skip
    assert result.returncode != 0
    assert "misaligned address" in result.stderr and "float4" in result.stderr, result.stderr[-2000:]


def test_rewrite_of_shared_declarations():
    source = "  __shared__ float table[16];\n  extern __shared__ unsigned char bytes[];\n  __shared__ Acc t[kA][kB + 1];\n"
    out = emulation.rewrite_shared(source, "x.cu").splitlines()
    assert out[0] == "  static float table[16]; ::peftkern::emu::use_shared(&table, sizeof(table), __FILE__, __LINE__);"
    assert out[1] == "  unsigned char* const bytes = reinterpret_cast<unsigned char*>(::peftkern::emu::dynamic_shared());"
    assert out[2].startswith("  static Acc t[kA][kB + 1]; ")
    with pytest.raises(ValueError, match="extern __shared__ must be"):
        emulation.rewrite_shared("extern __shared__ float x[4];", "x.cu")


def test_every_launch_site_of_the_sources_is_known():
    """The launch sites the coverage report checks are every PK_LAUNCH of the .cu files, and no
    .cu file keeps a raw <<<>>> launch."""
    sites = emulation.launch_sites()
    assert len(sites) >= 16 and all(s.file.endswith(".cu") for s in sites)
    for source in emulation.cuda_sources():
        assert "<<<" not in source.read_text(), source


def test_static_shared_bytes_are_counted():
    run("with_barrier")
    assert torch.ops.peftkern_emu.emu_static_shared_bytes() >= 64 * 4
    assert not math.isnan(float(run("with_barrier")[0]))
