"""What the commands write: results on stdout, progress on stderr, and errors as one stderr line.

Results go to stdout (``--json``: exactly one object); progress and hints go to stderr.
:func:`handle_errors` is the boundary where library errors become one line on stderr and the
documented exit code (0 ok, 1 error, 2 usage, 3 verification failed); ``GROWCLI_DEBUG=1``
shows the traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import traceback
from typing import Any, Iterator

import typer

from growcli.core.errors import format_error

try:  # typer >= 0.2x ships its own copy of click (and no longer depends on click itself)
    from typer._click import exceptions as _click_exceptions
except ImportError:  # older typer re-exports the real click
    from click import exceptions as _click_exceptions

# The exceptions click/typer use for control flow and usage errors; never turned into "internal error".
ClickException = _click_exceptions.ClickException
NoArgsIsHelp = getattr(_click_exceptions, "NoArgsIsHelpError", ())


def handle_errors(fn):
    """Turn library errors into one stderr line and an exit code (traceback with GROWCLI_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, ClickException):
            raise
        except Exception as exc:  # the boundary: everything becomes a message and an exit code
            if os.environ.get("GROWCLI_DEBUG") == "1":
                traceback.print_exc()
            code, message = format_error(exc)
            typer.echo(f"growcli: {message}", err=True)
            if getattr(exc, "report", None) is not None and kwargs.get("json_out"):
                typer.echo(json.dumps({"passed": False, **exc.report.to_dict()}))
            raise typer.Exit(code) from None

    return wrapper


def console(quiet: bool = False, json_out: bool = False):
    """A rich console on stderr; silent when asked, with --json, or when stdout is not a terminal."""
    from rich.console import Console

    return Console(stderr=True, quiet=quiet or json_out or not sys.stdout.isatty())


@contextlib.contextmanager
def status(message: str, quiet: bool = False, json_out: bool = False) -> Iterator[None]:
    """A spinner on stderr while a slow call runs; nothing when quiet, with --json or off a terminal."""
    con = console(quiet, json_out)
    if con.quiet:
        yield
        return
    with con.status(message):
        yield


def emit_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, default=str))


def render_grow_report(report: dict[str, Any], json_out: bool) -> None:
    """Print a growth report: the JSON object, or a short human summary on stdout."""
    if json_out:
        emit_json(report)
        return
    for i, step in enumerate(report["steps"], 1):
        v = step.get("verification")
        status = "exact" if step["exact"] else "not function-preserving by design"
        measured = "not run against the input" if v is None else f"max abs diff {v.get('max_abs_diff', 0):.3g}"
        typer.echo(f"step {i}: {step['transform']} {', '.join(step['matched'])} — {status}; "
                   f"{measured}; params {step['params_before']:,} → {step['params_after']:,}")
        for note in step.get("notes", []):
            typer.echo(f"  note: {note}")
    v = report["verification"]
    if v is None:  # a streamed output too large to run here: only its structure was checked
        typer.echo("verification: not run (see 'checked'); the output is not reported function-preserving")
    elif report.get("function_preserving", True):
        result = "PASSED" if v["passed"] else "FAILED"  # FAILED: a promise broken, written under --allow-mismatch
        typer.echo(f"verification ({v['dtype']}, {v['batches']} batches): {result}, max abs diff {v['max_abs_diff']:.3g}")
        if v.get("basis"):
            typer.echo(f"  tolerance: atol {v['atol']:.2g}, rtol {v['rtol']:.2g} — {v['basis']}")
    else:  # nothing was promised: the difference is a measurement, not a failure
        typer.echo(f"verification ({v['dtype']}, {v['batches']} batches): measured divergence, max abs diff "
                   f"{v['max_abs_diff']:.3g} (not function-preserving by design)")
    for out in report["outputs"]:
        extra = f" (onnxruntime check: max abs diff {out['check']['max_abs_diff']:.3g})" if out.get("check") else ""
        typer.echo(f"wrote {out['path']} [{out['format']}]{extra}")


def render_streamed(report: dict[str, Any], json_out: bool) -> None:
    """:func:`render_grow_report`, then, for a streamed run, what was checked and how the shards were written."""
    render_grow_report(report, json_out)
    if json_out or report.get("execution") != "streaming":
        return
    for line in report["checked"]:
        typer.echo(f"checked: {line}")
    for out in report["outputs"]:
        typer.echo(f"execution (streaming): {out['path']} written tensor by tensor, {out['shards']} shard(s), "
                   f"{out['bytes']:,} bytes in {report['seconds']:.1f} s")


@contextlib.contextmanager
def byte_progress_bar(con, label: str):
    """A rich progress bar in bytes on stderr while a step streams, as a ``progress(done, total)`` callback
    (a no-op when the console is quiet)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                  console=con, disable=con.quiet, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
