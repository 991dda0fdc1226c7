"""Proof that the CUDA emulation can fail: plant realistic bugs in copies of the .cu sources, build
each into its own emulation library, and run the emulated op tests of its family against it. Every
mutant must make them fail; the table says which test or check caught it.

    python scripts/emu_mutants.py [--only NAME ...] [--markdown FILE]

Exit status 1 when a mutant survives (or the unmutated sources do not pass). CI runs it after the
test suite; DESIGN.md ("CUDA kernels on the CPU") records the result.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peftkern import emulation  # noqa: E402


@dataclass
class Mutant:
    name: str
    file: str  # relative to the checkout
    find: str  # must occur exactly `count` times
    replace: str
    tests: str  # the emulated op tests of the family
    bug: str  # what a real engineer would have done wrong
    variant: str = "ubsan"
    count: int = 1
    survives: str = ""  # why the emulation cannot catch it (an output-equivalent mutant), if so


NF4 = "tests/test_nf4.py tests/test_nf4_bitsandbytes.py"
MUTANTS = [
    Mutant("nf4-dropped-barrier", "csrc/nf4/nf4_cuda.cu",
           "  if (threadIdx.x < quant::kNf4Codes) table[threadIdx.x] = quant::nf4_value(threadIdx.x);\n  __syncthreads();\n",
           "  if (threadIdx.x < quant::kNf4Codes) table[threadIdx.x] = quant::nf4_value(threadIdx.x);\n",
           NF4, "dequantize: the barrier after the shared code table is filled is dropped"),
    Mutant("nf4-short-warp-reduction", "csrc/nf4/nf4_cuda.cu",
           "for (int offset = kWarp / 2; offset > 0; offset >>= 1) {",
           "for (int offset = kWarp / 4; offset > 0; offset >>= 1) {",
           NF4, "quantize: the warp max skips the first shuffle (offset 16), so half the lanes are never compared"),
    Mutant("nf4-vector-store-off-by-one-element", "csrc/nf4/nf4_cuda.cu",
           "*reinterpret_cast<OutChunk<T>*>(out + first) = chunk;",
           "*reinterpret_cast<OutChunk<T>*>(out + first + 1) = chunk;",
           NF4, "dequantize: the 8-element vector store lands one element late (misaligned, and past the end)"),
    Mutant("nf4-tail-bound-off-by-one", "csrc/nf4/nf4_cuda.cu",
           "if (first + kElemsPerThread <= n) {",
           "if (first + kElemsPerThread <= n + 1) {",
           NF4, "dequantize: the full-chunk bound lets a chunk one short of 8 take the vector path (writes 1 past the end)",
           variant="asan"),
    Mutant("qlora-gemv-half-warp-mask", "csrc/qlora/qlora_cuda.cu",
           "acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], offset);",
           "acc[t] += __shfl_xor_sync(0x0000ffffu, acc[t], offset);",
           "tests/test_qlora_gemv.py", "decode GEMV: the reduction's shuffle mask names only half the warp"),
    Mutant("qlora-gemv-shuffle-offset", "csrc/qlora/qlora_cuda.cu",
           "for (int offset = kWarp / 2; offset > 0; offset >>= 1) {\n      acc[t]",
           "for (int offset = kWarp / 2; offset > 1; offset >>= 1) {\n      acc[t]",
           "tests/test_qlora_gemv.py", "decode GEMV: the warp reduction stops before the last shuffle (offset 1)"),
    Mutant("ia3-dropped-second-barrier", "csrc/ia3/ia3_cuda.cu",
           "    __syncthreads();  // lane_sums is reused by the next row block\n", "\n",
           "tests/test_ia3_op.py", "IA³ reduction: the barrier before lane_sums is reused by the next row block is dropped"),
    Mutant("ia3-grid-stride-stops-early", "csrc/ia3/ia3_cuda.cu",
           "for (int64_t i = blockIdx.y; i < m; i += gridDim.y) {\n    out[i * w + j]",
           "for (int64_t i = blockIdx.y; i < gridDim.y && i < m; i += gridDim.y) {\n    out[i * w + j]",
           "tests/test_ia3_op.py", "IA³ scale: the grid-stride loop over rows stops after the first stride"),
    Mutant("grouped-expand-bound-off-by-one", "csrc/grouped/grouped_cuda.cu",
           "  if (o >= n) return;\n  for (int64_t t = blockIdx.y;",
           "  if (o > n) return;\n  for (int64_t t = blockIdx.y;",
           "tests/test_grouped_op.py", "grouped LoRA expand: the column bound guard lets thread o == N write"),
    Mutant("grouped-ia3-stride-by-block", "csrc/grouped/grouped_cuda.cu",
           "const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;",
           "const int64_t step = static_cast<int64_t>(blockDim.x);",
           "tests/test_grouped_op.py", "grouped IA³: the grid-stride step forgets gridDim.x (blocks redo each other's work)",
           survives="every element is still written, with the same value, only several times: a performance bug, "
                    "and the emulation cannot see performance (nor a benign write-write race on global memory)"),
    Mutant("dora-dropped-barrier", "csrc/dora/dora_cuda.cu",
           "    coef[q] = scaling * static_cast<Acc>(b[i * r + q]);\n  }\n  __syncthreads();\n",
           "    coef[q] = scaling * static_cast<Acc>(b[i * r + q]);\n  }\n",
           "tests/test_dora.py", "DoRA norm: the barrier after B's row is staged in shared memory is dropped"),
    Mutant("adapter-grid-stride-without-grid", "csrc/adapter/adapter_cuda.cu",
           "e += static_cast<int64_t>(gridDim.x) * blockDim.x) {\n    const T v",
           "e += static_cast<int64_t>(blockDim.x)) {\n    const T v",
           "tests/test_adapter_op.py", "adapter down epilogue: the grid-stride step forgets gridDim.x (bias added twice)"),
    Mutant("relora-merge-short-warp-max", "csrc/relora/relora_cuda.cu",
           "for (int offset = kWarp / 2; offset > 0; offset >>= 1) {",
           "for (int offset = kWarp / 4; offset > 0; offset >>= 1) {",
           "tests/test_relora_op.py", "ReLoRA NF4 merge: the block's new absmax skips the first shuffle (half the lanes)"),
    Mutant("block-reduce-no-trailing-barrier", "csrc/common/cuda_block_reduce.h",
           "  const V result = scratch[0];\n  __syncthreads();  // scratch is reused by the next reduction\n",
           "  const V result = scratch[0];\n",
           "tests/test_proxy_op.py tests/test_cross_entropy_op.py",
           "block reduction (Proxy-tuning logits, cross-entropy): it returns without the barrier that keeps the next one from overwriting its result"),
    Mutant("cross-entropy-grid-stride-stops-early", "csrc/cross_entropy/cross_entropy_cuda.cu",
           "r < rows; r += gridDim.x) {\n    const int64_t y = labels[r];\n    if (is_ignored(y, ignore_index)) {  // the same",
           "r < rows && r < gridDim.x; r += gridDim.x) {\n    const int64_t y = labels[r];\n    if (is_ignored(y, ignore_index)) {  // the same",
           "tests/test_cross_entropy_op.py", "cross-entropy forward: the grid-stride loop over rows stops after the first stride"),
    Mutant("cross-entropy-label-lane-off-by-one", "csrc/cross_entropy/cross_entropy_cuda.cu",
           "v == y, g));", "v == y + 1, g));",
           "tests/test_cross_entropy_op.py", "cross-entropy backward: the -1 of the label's logit lands on its neighbour"),
    Mutant("dropout-strided-x-read-as-contiguous", "csrc/dropout/dropout_cuda.cu",
           "if (xd != nullptr) xd[e] = dropped<T, Acc>(x[i * s0 + j * s1], w.w[l], threshold, scale);",
           "if (xd != nullptr) xd[e] = dropped<T, Acc>(x[e * s1], w.w[l], threshold, scale);",
           "tests/test_dropout_op.py", "LoRA dropout: x indexed by the flat element index, as if its rows were packed"),
    Mutant("masked-adamw-philox-counter-per-thread", "csrc/masked_adamw/masked_adamw_cuda.cu",
           "philox::block_words(mask.seed, mask.offset, static_cast<uint64_t>(q))",
           "philox::block_words(mask.seed, mask.offset, static_cast<uint64_t>(threadIdx.x))",
           "tests/test_masked_adamw_op.py", "masked AdamW F: the Philox counter is the thread's index, not the group's"),
    Mutant("masked-adamw-grid-stride-stops-early", "csrc/masked_adamw/masked_adamw_cuda.cu",
           "q < groups; q += stride) {\n    float factor[4];\n    group_factors(mask, q, factor);\n    const int64_t first",
           "q < groups && q < stride; q += stride) {\n    float factor[4];\n    group_factors(mask, q, factor);\n    const int64_t first",
           "tests/test_masked_adamw_op.py", "masked AdamW: the grid-stride loop stops after the first stride"),
]  # fmt: skip


def run_mutant(m: Mutant) -> dict:
    source = (ROOT / m.file).read_text()
    found = source.count(m.find)
    if found != m.count:
        return {"caught": False, "by": f"the pattern occurs {found} times in {m.file}, expected {m.count}"}
    start = time.time()
    out_dir = ROOT / "build" / "emu" / f"mutant-{m.name}"
    try:
        library = emulation.build(m.variant, ROOT, out_dir=out_dir, replace={m.file: source.replace(m.find, m.replace)})
    except RuntimeError as error:
        return {"caught": True, "by": "the build (it does not compile)", "detail": str(error)[-400:]}
    env = {**os.environ, "PEFTKERN_EMULATION_LIBRARY": str(library), "PEFTKERN_EMULATION_VARIANT": m.variant}
    if m.variant == "asan":
        env.update(emulation.asan_environment())
    # -s: a sanitizer aborts the process, and pytest's captured output would go with it.
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-s", "-p", "no:cacheprovider", "-k", "cuda-emulated",
               *m.tests.split()]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    caught = result.returncode != 0
    return {"caught": caught, "by": _first_failure(output) if caught else "nothing: every emulated test passed",
            "seconds": round(time.time() - start), "output": output[-3000:]}  # fmt: skip


def _first_failure(output: str) -> str:
    """The line that says what caught the bug: a sanitizer report, or pytest's first `E` line."""
    lines = output.splitlines()
    for marker in ("ERROR: AddressSanitizer", "runtime error:"):
        for line in lines:
            if marker in line:
                return line.strip()[:240]
    for line in lines:
        if line.startswith("E ") and line[1:].strip():
            return line[1:].strip()[:240]
    for line in output.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            return line.strip()[:200]
    return output.strip().splitlines()[-1][:200] if output.strip() else "(no output)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="mutant names to run (default: all)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    rows, unexpected = [], 0
    for m in mutants:
        result = run_mutant(m)
        if m.survives:
            status = "CAUGHT (expected to survive: update the suite)" if result["caught"] else "survived, as expected"
            unexpected += result["caught"]
            if not result["caught"]:
                result["by"] = m.survives
        else:
            status = "caught" if result["caught"] else "SURVIVED"
            unexpected += not result["caught"]
        print(f"{m.name:<38} {status:<22} {result.get('seconds', 0):>4}s  {result['by']}", flush=True)
        if status.isupper() and "output" in result:
            print(result["output"], flush=True)
        rows.append(f"| {m.name} | {m.bug} | {m.variant} | {status} | {result['by'].replace('|', '/')} |")
    table = "| mutant | planted bug | build | result | first failure |\n|---|---|---|---|---|\n" + "\n".join(rows)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    print(f"{sum(1 for r in rows if '| caught |' in r)} of {sum(not m.survives for m in mutants)} planted bugs caught; "
          f"{sum(bool(m.survives) for m in mutants)} output-equivalent mutant(s) survive as expected")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
