"""growcli grow MODEL --plan plan.yaml -o OUT: run a YAML growth plan (or preview it with --dry-run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from growcli.cli.options import (AllowMismatch, Arch, ArchKwargs, Atol, Device, Format, InputsFile, InputShape, Json, Model,
                                 Outputs, Overwrite, Quiet, Rtol, TrustPickle)
from growcli.cli.render import byte_progress_bar, console, emit_json, handle_errors, render_streamed

PlanFile = Annotated[Path, typer.Option("--plan", "-p", help="The growth plan (YAML, version 1).", show_default=False)]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Apply the steps in memory and show what they do; write nothing.")]
# Unset by default so that the plan's own values apply unless the command line gives one.
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed for every random choice (default: the plan's, else 0).")]
BatchesOpt = Annotated[Optional[int], typer.Option("--batches", min=1, help="Input batches to compare (default: the plan's, else 3).")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="float64 or float32 (default: the plan's, else float64).")]
StreamingOpt = Annotated[Optional[bool], typer.Option("--streaming/--no-streaming", help="Run every step of the plan "
                         "on a Hugging Face directory tensor by tensor without loading it, composing the steps into "
                         "one output (default: above 1 GiB, when every step can stream).")]
ShardSizeOpt = Annotated[Optional[str], typer.Option("--shard-size", help="Largest weights file of the output directory "
                         "(default: the plan's output.shard_size, else 5GB when streaming).")]


def register(app: typer.Typer) -> None:
    @app.command("grow")
    @handle_errors
    def grow_cmd(model: Model, plan: PlanFile, output: Outputs = None, format: Format = None, arch: Arch = None,
                 arch_kwargs: ArchKwargs = None, trust_pickle: TrustPickle = False, input_shape: InputShape = None,
                 inputs: InputsFile = None, seed: SeedOpt = None, batches: BatchesOpt = None, dtype: DtypeOpt = None,
                 device: Device = "cpu",
                 atol: Atol = None, rtol: Rtol = None, allow_mismatch: AllowMismatch = False, dry_run: DryRun = False,
                 streaming: StreamingOpt = None, shard_size: ShardSizeOpt = None,
                 overwrite: Overwrite = False, json_out: Json = False, quiet: Quiet = False) -> None:
        """Apply a growth plan's steps in order, verifying each, and write the result with the plan as provenance.

        Example: growcli grow fixtures/mlp.pt --arch growcli.zoo:mlp --plan examples/mlp.yaml -o grown/mlp.safetensors
        (streaming: growcli grow llama/ --plan plan.yaml --streaming -o grown/ ; above 1 GiB by default)
        """
        from growcli.run.plan import load_plan
        from growcli.run.planrun import configure, dry_run as preview, run_plan
        from growcli.run.runner import Source
        from growcli.run.streaming import parse_shard_size

        from growcli.cli.options import check_device

        check_device(device)
        p = load_plan(plan)
        cfg = configure(p, Source(model, arch, arch_kwargs, trust_pickle, input_shape, inputs), outputs=output,
                        format=format, seed=seed, batches=batches, dtype=dtype, atol=atol, rtol=rtol,
                        allow_mismatch=allow_mismatch, require_output=not dry_run, overwrite=overwrite,
                        device=device, streaming=streaming,
                        shard_size=parse_shard_size(shard_size) if shard_size is not None else None)
        if not dry_run:
            with byte_progress_bar(console(quiet, json_out), "growing") as advance:
                report = run_plan(p, cfg, progress=advance)
            render_streamed(report, json_out)
            return
        report, error = preview(p, cfg)
        if json_out:
            emit_json(report)
        else:
            _render_dry_run(report)
        if error is not None:
            raise error


def _render_dry_run(report: dict[str, Any], max_changes: int = 12) -> None:
    echo = typer.echo
    echo(f"dry run of {report['plan']} on {report['input']} (seed {report['seed']}); nothing is written")
    for s in report["steps"]:
        echo(f"step {s['index']}: {s['transform']} {_options(s['options'])}  [{s['position']}]")
        if s["skipped"]:
            echo("  skipped: the plan is invalid here (run growcli validate)")
            continue
        if s["matched"]:
            echo(f"  matched: {', '.join(s['matched'])}")
        for c in s["changes"][:max_changes]:
            echo(f"  {c['name']}: {_change(c['before'], c['after'])}")
        if len(s["changes"]) > max_changes:
            echo(f"  … and {len(s['changes']) - max_changes} more tensors (--json lists all)")
        echo(f"  params: {s['params_before']:,} → {s['params_after']:,}")
        v = s["verification"]
        if s["exact"] is not None:
            measured = f"; measured max abs diff {v['max_abs_diff']:.3g} in {v['dtype']}" if v else ""
            verdict = "yes" if s["exact"] else "no, by design"
            if s["exact"] and v and not v["passed"]:
                verdict = "promised, but NOT equal"
            echo(f"  function-preserving: {verdict}{measured}")
        for note in s["notes"]:
            echo(f"  note: {note}")
        if s["error"]:
            echo(f"  FAILS: {s['error']}")
    echo(f"params: {report['params_before']:,} → {report['params_after']:,}; "
         f"function-preserving overall: {'yes' if report['function_preserving'] else 'no'}")
    for o in report["outputs"]:
        echo(f"would write: {o['path']} [{o['format']}]")


def _options(options: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in options.items()) + "}"


def _change(before: list[int] | None, after: list[int] | None) -> str:
    if before is None:
        return f"new {after}"
    if after is None:
        return f"removed (was {before})"
    return f"{before} → {after}"
