"""The two layers (docs/architecture.md): the library (`dstp`, every module outside `dstp.lab`) imports nothing of the
lab (`dstp.lab`: ShiftBench, the benchmarks, the CLI), and no module of the package takes part in an import circle.
Both are read from the sources with `ast` (imports inside functions included); the last test checks what a user's
process really imports."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import dstp

SRC = Path(dstp.__file__).resolve().parent  # the package: src/dstp in the repository, site-packages/dstp installed
LAB = "dstp.lab"


def module_files() -> dict[str, Path]:
    """Module name -> file of every module of the package (a package by its __init__.py)."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = ("dstp", *path.relative_to(SRC).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, modules) -> set[str]:
    """The package's modules that `name` imports anywhere in its file: `import a.b`, `from a import b` (the module
    a.b if there is one, else a), relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    found.add(f"{base}.{a.name}")
                elif base in modules:
                    found.add(base)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def is_lab(name: str) -> bool:
    return name == LAB or name.startswith(LAB + ".")


def test_the_graph_sees_the_packages_imports():
    graph = import_graph()
    assert {"dstp.api", "dstp.engine.engine", "dstp.lab.shiftbench", "dstp.lab.cli.main"} <= set(graph)
    assert "dstp.engine.engine" in graph["dstp.api"]
    assert "dstp.lab.bench.sweep" in graph["dstp.lab.cli.bench"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_library_imports_nothing_of_the_lab():
    wrong = {name: sorted(filter(is_lab, deps)) for name, deps in import_graph().items() if not is_lab(name)}
    wrong = {name: deps for name, deps in wrong.items() if deps}
    assert not wrong, f"library modules importing the lab: {wrong}"


LOAD = """
import json, sys
import dstp
after_import = sorted(m for m in sys.modules if m == "dstp.lab" or m.startswith("dstp.lab."))
pipe = dstp.load({model_id!r})
from dstp.models.registry import ADAPTERS
print(json.dumps({{"after_import": after_import, "family": pipe.adapter.family, "adapters": sorted(ADAPTERS),
                  "after_load": sorted(m for m in sys.modules if m == "dstp.lab" or m.startswith("dstp.lab."))}}))
"""


def run_load(model_id: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", LOAD.format(model_id=model_id)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_dstp_and_load_a_model_import_no_lab_module(hub_models):
    """A user's process: `import dstp` and `dstp.load` of a (non-ShiftBench) checkpoint by hub id import no
    ShiftBench, benchmark or CLI module, and the ShiftBench adapter is not registered."""
    out = run_load(hub_models["qwen2_5_vl"])
    assert out["family"] == "qwen2_5_vl"
    assert out["after_import"] == [] and out["after_load"] == []
    assert "ShiftBenchForConditionalGeneration" not in out["adapters"]


def test_loading_the_shipped_shiftbench_checkpoint_imports_its_adapter():
    """`dstp.load` of a ShiftBench checkpoint, with nothing of the lab imported before: the `dstp.adapters` entry
    point names the module that registers the model (pyproject.toml), so it loads."""
    out = run_load(str(SRC / "lab" / "shiftbench" / "checkpoint"))
    assert out["after_import"] == [] and out["family"] == "shiftbench"
    assert "ShiftBenchForConditionalGeneration" in out["adapters"]
    assert "dstp.lab.shiftbench.adapter" in out["after_load"]
