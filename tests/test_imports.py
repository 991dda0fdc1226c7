"""The package's import structure: no import cycle among peftkern's modules, and every module
imports on its own (a module that only works when something else was imported first is a
hidden cycle or a missing import)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import peftkern

PACKAGE = Path(peftkern.__file__).parent
# Deprecated aliases that warn on import by design; they must still import alone.
DEPRECATED = {"peftkern.adapters"}


def _module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names[name] = path
    return names


def _top_level_names(path: Path) -> set[str]:
    """The names a module binds at its top level (imports, defs, classes, assignments)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the peftkern modules it imports, from every import statement in its source,
    function-local ones included. `from P import x` counts as importing P when P's __init__
    binds x, else the submodule P.x (a compiled one, such as `_C`, is no source module and
    drops out). A package's own __init__ is not counted as imported by its submodules (Python
    runs it first, but that is the package's façade, not a dependency the submodule states)."""
    modules = _module_names()
    bound = {name: _top_level_names(path) for name, path in modules.items() if path.name == "__init__.py"}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                if base in bound:  # a package: its own name, or a submodule
                    targets = [base if a.name in bound[base] else f"{base}.{a.name}" for a in node.names]
                else:
                    targets = [base]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_relative_and_function_local_imports():
    graph = import_graph()
    assert "peftkern.record" in graph["peftkern.patch"]  # from .record import PatchRecord
    assert "peftkern.mixed" in graph["peftkern.methods.layer"]  # from .. import mixed
    assert "peftkern.methods" in graph["peftkern.methods.lora"]  # from . import config_fields
    assert "peftkern._C" not in graph["peftkern._ext"]  # the compiled library is not a source module


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Each module imported in a child forked from an interpreter that has imported torch but nothing
# of peftkern (fresh for peftkern, without paying torch's import once per module).
_IMPORT_EACH = r"""
import importlib, os, sys, traceback, warnings
import torch  # noqa: F401
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed.append(name)
print("FAILED:", " ".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone():
    names = sorted(n for n in _module_names() if n != "peftkern.__main__")
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], cwd=PACKAGE.parent,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]


def test_deprecated_aliases_warn_and_still_work():
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "try:\n    import peftkern.adapters\nexcept DeprecationWarning as w:\n    print('warned:', w)\n"
            "import peftkern\nwarnings.simplefilter('ignore')\nimport peftkern.adapters as a\n"
            "assert a.add_adapter is peftkern.add_adapter")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "warned: peftkern.adapters is renamed peftkern.multi_adapter" in result.stdout
