"""growcli verify ORIGINAL GROWN: the check CI scripts call (exit 0 equal, 3 not equal)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from growcli.cli.options import (Arch, ArchKwargs, Atol, Batches, Device, Dtype, InputsFile, InputShape, Json, Quiet, Rtol, SeqLen,
                                 TrustPickle, verify_settings)
from growcli.cli.render import emit_json, handle_errors, status
from growcli.core.errors import EXIT_MISMATCH

Blockwise = Annotated[bool, typer.Option("--blockwise", help="Run both Hugging Face directories one block at a time "
                      "from disk and compare at every block boundary (for models too large to hold twice).")]


def register(app: typer.Typer) -> None:
    @app.command("verify")
    @handle_errors
    def verify_cmd(original: Annotated[Path, typer.Argument(help="The checkpoint before growth.")],
                   grown: Annotated[Path, typer.Argument(help="The grown checkpoint (any format growcli writes).")],
                   arch: Arch = None, arch_kwargs: ArchKwargs = None, trust_pickle: TrustPickle = False,
                   input_shape: InputShape = None, inputs: InputsFile = None, batches: Batches = 3, seq_len: SeqLen = None,
                   dtype: Dtype = "float64", device: Device = "cpu", atol: Atol = None, rtol: Rtol = None, blockwise: Blockwise = False,
                   json_out: Json = False, quiet: Quiet = False) -> None:
        """Run both models on the same inputs and compare every output.

        Example: growcli verify model.pt2 grown.pt2 --json
        """
        settings = verify_settings(batches, dtype, atol, rtol, seq_len=seq_len, device=device)
        from growcli.io.hub import resolve_path
        original, grown = resolve_path(original), resolve_path(grown)  # either may be a Hugging Face id
        if blockwise:
            _blockwise(original, grown, settings, inputs, json_out, quiet, arch or input_shape or trust_pickle)
            return
        from growcli.run.compare import compare_checkpoints
        from growcli.run.runner import Source

        src = Source(original, arch, arch_kwargs, trust_pickle, input_shape, inputs)
        with status(f"comparing {original} and {grown}", quiet, json_out):
            report = compare_checkpoints(src, grown, settings)
        if json_out:
            emit_json(report.to_dict())
        else:
            for o in report.outputs:
                typer.echo(f"{o.name} {o.shape}: max abs diff {o.max_abs_diff:.3g}, max rel diff {o.max_rel_diff:.3g}, "
                           f"tolerance {o.tolerance:.3g} — {'pass' if o.passed else 'FAIL'}{' (' + o.note + ')' if o.note else ''}")
            typer.echo(report.summary() + (f" ({report.note})" if report.note else ""))
        if not report.passed:
            raise typer.Exit(EXIT_MISMATCH)


def _blockwise(original: Path, grown: Path, settings, inputs: Path | None, json_out: bool, quiet: bool,
               model_options: object) -> None:
    """``verify --blockwise``: per-block lines (or ``--json``), exit 3 naming the first block that broke."""
    from growcli.core.errors import UsageError
    from growcli.run.streaming import blockwise_check

    if model_options:
        raise UsageError("--blockwise compares Hugging Face directories; --arch, --input-shape and --trust-pickle "
                         "do not apply")
    with status(f"comparing {original} and {grown} block by block", quiet, json_out):
        report = blockwise_check(original, grown, settings, inputs_file=inputs)
    if json_out:
        emit_json(report.to_dict())
    else:
        for b in report.blocks:
            typer.echo(f"{b.name} (original boundary {b.original}): max abs diff {b.max_abs_diff:.3g}, max rel diff "
                       f"{b.max_rel_diff:.3g}, tolerance {b.tolerance:.3g} — {'pass' if b.passed else 'FAIL'}")
        for o in report.outputs:
            typer.echo(f"{o.name} {o.shape}: max abs diff {o.max_abs_diff:.3g}, max rel diff {o.max_rel_diff:.3g}, "
                       f"tolerance {o.tolerance:.3g} — {'pass' if o.passed else 'FAIL'}{' (' + o.note + ')' if o.note else ''}")
        notes = "; ".join(n for n in (report.note, report.map_note) if n)
        typer.echo(report.summary() + (f" ({notes})" if notes else ""))
    if not report.passed:
        if report.first_failing and not json_out:
            typer.echo(f"error: the grown model first differs at {report.first_failing}", err=True)
        raise typer.Exit(EXIT_MISMATCH)
