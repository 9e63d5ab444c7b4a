"""The package's shape, computed from the source: no import cycles, layers in order, short modules, a light CLI.

The import graph is read with ``ast`` from every module under ``growcli/``, counting imports
inside functions too (a function-level import hides a circle; it does not remove it). An
edge ``from growcli.x import y`` goes to the module ``growcli.x.y`` when that is a module,
else to ``growcli.x``. Layers, each importing only from its own or earlier ones::

    core → io → verification → analysis → transforms → run → advise → train → (growcli, api) → cli

``growcli.nn`` and ``growcli.zoo`` are leaf public modules: anything may import them, and they
import only ``core`` (and each other). A module longer than 400 lines must say why in its
docstring, with the phrase :data:`LONG_MODULE_MARKER` followed by the reason.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "growcli"
# ``train`` (growth during training) runs ``run``'s steps and may use ``advise``'s scores as growth triggers.
# ``search`` (architecture search by growth) trains children with ``train``; ``cl`` (continual learning) likewise.
LAYERS = ["core", "io", "verification", "analysis", "transforms", "run", "advise", "train", "search", "cl", "api", "cli"]
TOP = {"growcli": "api", "growcli.api": "api", "growcli.__main__": "cli"}  # top-level modules' layers
LEAVE_PACKAGES = ("growcli.nn", "growcli.zoo")  # and their submodules (growcli.nn.branch, …)


class _Leaves:
    def __contains__(self, module: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in LEAVE_PACKAGES)


LEAVES = _Leaves()
MAX_LINES = 400
# A module over MAX_LINES lines carries this phrase in its docstring, then says why one idea needs the length.
LONG_MODULE_MARKER = "Longer than 400 lines because"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports(module: str) -> set[str]:
    """Every growcli module ``module`` imports, at module level or inside functions."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {t for t in found if t in MODULES and t != module}


GRAPH = {m: imports(m) for m in MODULES}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the strongly connected components (iterative, so depth is no limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                components.append(sorted(component))
    return components


def cycles() -> list[str]:
    out = []
    for component in strongly_connected(GRAPH):
        if len(component) > 1:
            edges = [f"{a} -> {b}" for a in component for b in sorted(GRAPH[a]) if b in component]
            out.append("cycle: " + "; ".join(edges))
    return out


def layer(module: str) -> str | None:
    if module in TOP:
        return TOP[module]
    if module in LEAVES:
        return None
    return module.split(".")[1] if module.count(".") else module


def layer_violations(graph: dict[str, set[str]] = GRAPH) -> list[str]:
    out = [f"{m} is in no layer (add its package to LAYERS)" for m in graph if m not in LEAVES and layer(m) not in LAYERS]
    for module, targets in graph.items():
        if any(x not in LEAVES and layer(x) not in LAYERS for x in (module, *targets)):
            continue
        for target in sorted(targets):
            if module in LEAVES:
                ok = target in LEAVES or layer(target) == "core"
            elif target in LEAVES:
                ok = True
            else:
                ok = LAYERS.index(layer(target)) <= LAYERS.index(layer(module))
            if not ok:
                out.append(f"{module} imports {target}")
    return out


def long_modules() -> list[str]:
    out = []
    for module, path in MODULES.items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if n > MAX_LINES and LONG_MODULE_MARKER not in doc:
            out.append(f"{module} has {n} lines")
    return out


def test_the_graph_is_read_from_real_imports():
    """The checks below see function-level and relative imports; if they saw nothing they would pass vacuously."""
    assert "growcli.cli.commands" in GRAPH["growcli.cli.app"]  # a function-level import in get_app
    assert "growcli.core.errors" in GRAPH["growcli.transforms.catalog"]
    assert "growcli.transforms.widen" in GRAPH["growcli.transforms.catalog"]  # from growcli.transforms import widen
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"], ["d"]]
    assert layer_violations({"growcli.core.x": {"growcli.cli.app", "growcli.nn"}, "growcli.nn": {"growcli.io.load"},
                             "growcli.cli.app": {"growcli.core.x", "growcli.zoo"}, "growcli.new.y": set()}) == [
        "growcli.new.y is in no layer (add its package to LAYERS)", "growcli.core.x imports growcli.cli.app",
        "growcli.nn imports growcli.io.load"]


def test_no_import_cycles():
    assert cycles() == []


def test_layers_import_only_from_earlier_layers():
    assert layer_violations() == []


def test_long_modules_say_why():
    assert long_modules() == []


# --------------------------------------------------------------------------- a light command line
PROBE = """
import json, sys
import growcli
after_import = 'torch' in sys.modules
import typer
from growcli.cli.app import get_app
command = typer.main.get_command(get_app())
print(json.dumps({"after_import": after_import, "after_app": 'torch' in sys.modules,
                  "commands": sorted(command.commands)}))
"""


def test_import_and_the_full_cli_leave_torch_unloaded():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen == {"after_import": False, "after_app": False, "commands": sorted(seen["commands"])}
    assert {"widen", "deepen", "stack", "grow", "convert", "verify"} <= set(seen["commands"])


@pytest.mark.parametrize("args", [["--help"], ["widen", "--help"], ["stack", "--help"], ["--version"]])
def test_help_and_version_do_not_import_torch(args):
    code = ("import sys; from growcli.cli.app import main; sys.argv = ['growcli', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "print('torch' in sys.modules, code, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.stderr.splitlines()[-1] == "False 0", proc.stderr


def test_version_comes_from_core_version():
    from growcli.core.version import __version__

    proc = subprocess.run([sys.executable, "-m", "growcli", "--version"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"growcli {__version__}\n", "")
