"""growcli inspect MODEL: modules, parameters, inputs, block stacks and growable layers."""

from __future__ import annotations

import typer

from growcli.cli import Arch, ArchKwargs, InputShape, Json, Model, Quiet, TrustPickle, emit_json, handle_errors, status


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    @handle_errors
    def inspect_cmd(model: Model, arch: Arch = None, arch_kwargs: ArchKwargs = None, trust_pickle: TrustPickle = False,
                    input_shape: InputShape = None, json_out: Json = False, quiet: Quiet = False) -> None:
        """Show what is in a checkpoint and which layers each transform can grow.

        Example: growcli inspect fixtures/mlp.pt2 --json
        """
        from growcli.inspect import inspect_model
        from growcli.io.load import load_model

        with status(f"inspecting {model}", quiet, json_out):
            gm = load_model(model, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle, input_shape=input_shape)
            report = inspect_model(gm)
        if json_out:
            emit_json(report)
        else:
            _render(report)


def _render(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False, soft_wrap=True, markup=False)  # paths and [kind] are text, not markup
    out.print(f"{report['path']}  [{report['kind']}]  {report['class']}")
    out.print(f"parameters: {report['total_parameters']:,}    inputs: {report['inputs']}")
    table = Table("module", "type", "parameters", "count", box=None)
    for m in report["modules"]:
        table.add_row(m["name"], m["type"], ", ".join(f"{k} {v}" for k, v in m["params"].items()), f"{m['count']:,}")
    out.print(table)
    for s in report["block_stacks"]:
        out.print(f"block stack: {s['name']} × {s['length']} ({s['type']}, {s['params_per_block']:,} params each)")
    for transform, layers in report["growable"].items():
        for layer, reason in layers.items():
            out.print(f"{transform}: {layer}: {'growable' if reason is None else 'not growable: ' + reason}")
