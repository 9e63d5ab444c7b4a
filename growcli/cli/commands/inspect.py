"""growcli inspect MODEL: modules, parameters, inputs, block stacks and growable layers."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from growcli.cli.options import Arch, ArchKwargs, InputShape, Json, Model, Quiet, TrustPickle
from growcli.cli.render import emit_json, handle_errors, status


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    @handle_errors
    def inspect_cmd(model: Model, arch: Arch = None, arch_kwargs: ArchKwargs = None, trust_pickle: TrustPickle = False,
                    input_shape: InputShape = None,
                    all_modules: Annotated[bool, typer.Option("--all", help="List every module: do not show identical "
                                                              "repeated blocks once (as print(model) does).")] = False,
                    json_out: Json = False, quiet: Quiet = False) -> None:
        """Show what is in a checkpoint and which layers each transform can grow.

        Identical repeated blocks are listed once, e.g. encoder.layer.0-1 × 2 BertLayer (--all
        lists every module); module names are never shortened.

        Example: growcli inspect fixtures/mlp.pt2 --json
        """
        from growcli.advise.inspect import inspect_model
        from growcli.io.load import load_model

        with status(f"inspecting {model}", quiet, json_out):
            gm = load_model(model, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle, input_shape=input_shape)
            report = inspect_model(gm)
        if json_out:
            emit_json(report)
        else:
            _render(report, expand=all_modules)


def _render(report: dict, expand: bool = False) -> None:
    from rich.console import Console

    out = Console(highlight=False, soft_wrap=True, markup=False)  # paths and [kind] are text, not markup
    out.print(f"{report['path']}  [{report['kind']}]  {report['class']}")
    out.print(f"parameters: {report['total_parameters']:,}    inputs: {report['inputs']}")
    rows, collapsed = module_rows(report["modules"], [] if expand else report["block_stacks"])
    # Plain columns, as wide as their longest cell: a module name is never cut, on a terminal or in a pipe.
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        out.print(" " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if collapsed:
        out.print(f"identical blocks listed once: {', '.join(collapsed)} (--all lists every module)")
    for s in report["block_stacks"]:
        out.print(f"block stack: {s['name']} × {s['length']} ({s['type']}, {s['params_per_block']:,} params each)")
    for transform, layers in report["growable"].items():
        for layer, reason in layers.items():
            out.print(f"{transform}: {layer}: {'growable' if reason is None else 'not growable: ' + reason}")


def module_rows(modules: list[dict[str, Any]], stacks: list[dict[str, Any]]) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """Table rows (header first) for ``modules``; each stack of identical blocks becomes one ``name.0-N × n`` row
    followed by its first block's modules named ``name.0-N.…``. Also returns the collapsed ranges."""
    def prefix(stack: str) -> str:
        return f"{stack}." if stack else ""

    def block(stack: str, i: int) -> list[tuple]:
        head = f"{prefix(stack)}{i}"
        return [(m["name"][len(head):], m["type"], m["params"]) for m in modules
                if m["name"] == head or m["name"].startswith(head + ".")]

    ranges: dict[str, tuple[dict[str, Any], str]] = {}  # block 0's name → (stack, "name.0-N")
    hidden: list[str] = []  # name prefixes of blocks 1…N, not listed
    for s in stacks:
        name, n = s["name"], s["length"]
        if any(name == h or name.startswith(h + ".") for h in hidden) or \
                any(name.startswith(first + ".") for first in ranges):  # inside a collapsed block: listed once already
            continue
        blocks = [block(name, i) for i in range(n)]
        if not blocks[0] or any(b != blocks[0] for b in blocks[1:]):  # grown or otherwise different: list each
            continue
        ranges[f"{prefix(name)}0"] = (s, f"{prefix(name)}0-{n - 1}")
        hidden += [f"{prefix(name)}{i}" for i in range(1, n)]
    rows = [("module", "type", "parameters", "count")]
    shown: set[str] = set()
    for m in modules:
        name = m["name"]
        if any(name == h or name.startswith(h + ".") for h in hidden):
            continue
        first = next((f for f in ranges if name == f or name.startswith(f + ".")), None)
        if first is not None:
            stack, label = ranges[first]
            if first not in shown:
                shown.add(first)
                per, n = stack["params_per_block"], stack["length"]
                rows.append((f"{label} × {n}", stack["type"], "", f"{per * n:,} ({per:,} each)"))
            name = label + name[len(first):]
            if name == label:  # the block itself has parameters: its row is the header's
                name = f"{label} (each)"
        rows.append((name, m["type"], ", ".join(f"{k} {v}" for k, v in m["params"].items()), f"{m['count']:,}"))
    return rows, [label for _, label in ranges.values()]
