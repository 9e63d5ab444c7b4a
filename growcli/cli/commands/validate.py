"""growcli validate plan.yaml [--model MODEL]: report every problem in a plan at once (exit 2 if any)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from growcli.cli.options import Arch, ArchKwargs, InputShape, Json, Quiet, TrustPickle
from growcli.cli.render import emit_json, handle_errors
from growcli.core.errors import EXIT_USAGE


def register(app: typer.Typer) -> None:
    @app.command("validate")
    @handle_errors
    def validate_cmd(plan: Annotated[Path, typer.Argument(help="The growth plan (YAML, version 1).", show_default=False)],
                     model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Also check the steps against "
                                      "this checkpoint: layers exist, sizes grow, every step applies.")] = None,
                     arch: Arch = None, arch_kwargs: ArchKwargs = None, trust_pickle: TrustPickle = False,
                     input_shape: InputShape = None, json_out: Json = False, quiet: Quiet = False) -> None:
        """Check a growth plan: schema, step types and options, and (with --model) the model's layers.

        Example: growcli validate examples/cnn.yaml --model fixtures/cnn.pt --arch growcli.zoo:cnn
        """
        from growcli.run.plan import read_plan
        from growcli.run.planrun import check_against_model

        p, problems = read_plan(plan)
        if p is not None and model is not None:
            from growcli.io.load import load_model

            gm = load_model(model, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle, input_shape=input_shape)
            problems = sorted(problems + check_against_model(p, gm, p.seed or 0),
                              key=lambda q: (q.loc.line, q.loc.column) if q.loc else (0, 0))
        if json_out:
            emit_json({"plan": str(plan), "valid": not problems, "model": str(model) if model else None,
                       "steps": [s.transform for s in p.steps] if p else [], "problems": [q.to_dict() for q in problems]})
        elif problems:
            for q in problems:
                typer.echo(str(q), err=True)
            typer.echo(f"growcli: usage: {plan}: invalid plan ({len(problems)} problem{'s' if len(problems) != 1 else ''})", err=True)
        else:
            checked = f"; every step applies to {model}" if model else ""
            typer.echo(f"{plan}: valid plan (version {p.version}, {len(p.steps)} step{'s' if len(p.steps) != 1 else ''}: "
                       f"{', '.join(s.transform for s in p.steps)}){checked}")
        if problems:
            raise typer.Exit(EXIT_USAGE)
