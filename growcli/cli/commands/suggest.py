"""growcli suggest MODEL --data FILE: rank the layers where new units promise the most, optionally as a plan."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from growcli.cli.options import Arch, ArchKwargs, InputShape, Json, Model, Overwrite, Quiet, Seed, TrustPickle
from growcli.cli.render import emit_json, handle_errors

Data = Annotated[Path, typer.Option("--data", help="Calibration data: .safetensors/.pt with 'input' (or 0,1,… or "
                                    "argument names) and 'target' (or 'labels' for the model's own loss).",
                                    show_default=False)]
Loss = Annotated[str, typer.Option("--loss", help="auto, cross_entropy, mse, or model (the model's own loss output).")]
DataBatches = Annotated[Optional[int], typer.Option("--batches", min=1, help="Use only the first N calibration batches.")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Samples per calibration batch "
                                                  "(default 32; a .pt2 program's own batch size).")]


def register(app: typer.Typer) -> None:
    @app.command("suggest")
    @handle_errors
    def suggest_cmd(
        model: Model, data: Data, loss: Loss = "auto", batches: DataBatches = None, batch_size: BatchSize = None,
        budget: Annotated[Optional[int], typer.Option("--budget", min=1, help="Units to share out among the layers "
                                                      "(default: 10% of the growable layers' units).")] = None,
        lr: Annotated[float, typer.Option("--lr", help="SGD learning rate the expected decrease assumes.")] = 0.01,
        scale: Annotated[float, typer.Option("--scale", help="New outgoing weights' norm, relative to the mean of "
                                             "the existing ones.")] = 0.5,
        candidates: Annotated[int, typer.Option("--candidates", min=1, help="Firefly candidate units per layer.")] = 32,
        plan_out: Annotated[Optional[Path], typer.Option("--plan-out", help="Write the suggestion as a growth plan "
                                                         "(YAML) for growcli grow.")] = None,
        arch: Arch = None, arch_kwargs: ArchKwargs = None, trust_pickle: TrustPickle = False,
        input_shape: InputShape = None, seed: Seed = 0, overwrite: Overwrite = False, json_out: Json = False,
        quiet: Quiet = False,
    ) -> None:
        """Rank the layers where added units promise the largest loss decrease on your data (GradMax, Firefly, NeST).

        Example: growcli suggest mlp.pt --arch growcli.zoo:mlp --data calib.safetensors --budget 8 --plan-out plan.yaml
        """
        from growcli.analysis.calibration import DataRequest, check_loss, load_calibration
        from growcli.core.errors import NotGrowableError, UsageError
        from growcli.io.atomic import atomic_output, check_output_path
        from growcli.io.hub import resolve_path
        from growcli.io.load import load_model
        from growcli.advise.suggest import plan_text, suggest

        if lr <= 0 or scale <= 0:
            raise UsageError(f"--lr and --scale must be positive, got {lr} and {scale}")
        if plan_out is not None:  # before any work: never the model or the data, an existing file only with --overwrite
            check_output_path(plan_out, (resolve_path(model), data), overwrite=overwrite)
        gm = load_model(model, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle, input_shape=input_shape)
        request = DataRequest(str(data), check_loss(loss), batches, batch_size)
        cal = load_calibration(request, gm.inputs, gm.kind)
        result = suggest(gm, cal, budget=budget, lr=lr, scale=scale, candidates=candidates, seed=seed)
        if plan_out is not None:
            if not result.allocation:
                raise NotGrowableError(f"{model}: no layer can be grown with gradmax, so there is no plan to write "
                                       f"({'; '.join(f'{k}: {v}' for k, v in list(result.not_scored.items())[:3])})")
            hint = f"growcli grow {model}{f' --arch {arch}' if arch else ''} --plan {plan_out} -o grown.safetensors"
            with atomic_output(plan_out) as tmp:
                tmp.write_text(plan_text(result.allocation, request, cal.loss, scale, run_hint=hint))
        report = {"model": str(model), "data": str(data), "loss": cal.loss, "samples": cal.samples,
                  "batches": len(cal.batches), "lr": lr, "scale": scale, **result.to_dict(),
                  "plan": str(plan_out) if plan_out is not None else None}
        if json_out:
            emit_json(report)
        else:
            _render(report, cal.describe())


def _render(report: dict[str, Any], data: str) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False, soft_wrap=True, markup=False)
    out.print(f"calibration: {data}; mean loss {report['mean_loss']:.4g}" if report["mean_loss"] is not None
              else f"calibration: {data}")
    out.print(f"expected loss decrease from one SGD step (lr {report['lr']}) per added unit:")
    table = Table("rank", "layer", "units", "consumer", "σ1", "gradmax", "firefly", "NeST max|G|", "+units", box=None)
    for col in (table.columns[1], table.columns[3]):  # module names are never cut short
        col.overflow = "fold"
    for i, s in enumerate(report["layers"], 1):
        sigma = f"{s['singular_values'][0]:.3g}" if s["singular_values"] else "0"
        grow = str(s["suggested"]) if s["gradmax_ok"] else "-"
        table.add_row(str(i), s["layer"], str(s["units"]), s["consumer"], sigma, f"{s['gradmax_gain']:.3g}",
                      f"{s['firefly_gain']:.3g}", f"{s['nest_max_gradient']:.3g}", grow)
    out.print(table)
    for s in report["layers"]:
        if not s["gradmax_ok"]:
            out.print(f"not growable with gradmax: {s['layer']}: {s['gradmax_reason']}")
    for layer, reason in report["not_scored"].items():
        out.print(f"not scored: {layer}: {reason}")
    shares = ", ".join(f"{k} +{v}" for k, v in report["allocation"].items()) or "nothing"
    out.print(f"budget {report['budget']} units: {shares}")
    if report["plan"]:
        out.print(f"wrote {report['plan']}")
