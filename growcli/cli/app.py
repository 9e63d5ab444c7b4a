"""The growcli command line: thin commands that parse, call the library once, and render.

Results go to stdout (``--json``: exactly one object); progress and hints go to stderr.
Errors become one line on stderr and the documented exit code (0 ok, 1 error, 2 usage,
3 verification failed); ``GROWCLI_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

from growcli.core.errors import EXIT_USAGE, format_error

try:  # typer >= 0.2x ships its own copy of click (and no longer depends on click itself)
    from typer._click import exceptions as _click_exceptions
except ImportError:  # older typer re-exports the real click
    from click import exceptions as _click_exceptions

# The exceptions click/typer use for control flow and usage errors; never turned into "internal error".
ClickException = _click_exceptions.ClickException
NoArgsIsHelp = getattr(_click_exceptions, "NoArgsIsHelpError", ())

app = typer.Typer(
    name="growcli",
    help="Grow saved neural networks and prove the grown model computes the same function.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from growcli.core.version import __version__

        typer.echo(f"growcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print growcli's version and exit.")] = False) -> None:
    pass

# Options shared by every command that loads a model.
Model = Annotated[Path, typer.Argument(help="Checkpoint: .pt2, .safetensors, .pt/.pth, or a Hugging Face directory.", show_default=False)]
Arch = Annotated[Optional[str], typer.Option("--arch", help="package.module:factory that builds the model for a state_dict.")]
ArchKwargs = Annotated[Optional[str], typer.Option("--arch-kwargs", help="JSON keyword arguments for --arch.")]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="Allow unpickling a whole module (runs code from the file).")]
InputShape = Annotated[Optional[str], typer.Option("--input-shape", help="Input shape(s), e.g. 1,3,32,32 or '2,8:int64'.")]
InputsFile = Annotated[Optional[Path], typer.Option("--inputs", help="Tensors to run: .safetensors/.pt, keys 0,1,… or argument names.")]
# Strings, not Paths: a trailing / (a directory output) must reach growcli.io.save.output_format.
Outputs = Annotated[Optional[list[str]], typer.Option("-o", "--output", metavar="PATH", help="Output path; repeat for "
                    "several formats. A directory (Hugging Face format) if it ends with /, exists as one or has no "
                    ".safetensors/.pt2/.onnx/.pt/.pth suffix.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs: files, and directories "
                      "growcli wrote (they hold its growth_report.json). Without it an existing file or non-empty "
                      "directory is refused; an input is never replaced.")]
Format = Annotated[Optional[str], typer.Option("--format", help="safetensors, pt2, onnx, hf or pt (default: from the suffix).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for every random choice.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or hints on stderr.")]
Atol = Annotated[Optional[float], typer.Option("--atol", help="Absolute tolerance (default 1e-10 in float64, 1e-6 in float32).")]
Rtol = Annotated[Optional[float], typer.Option("--rtol", help="Tolerance relative to the output's max |value| (default 1e-10 / 1e-5).")]
Batches = Annotated[int, typer.Option("--batches", min=1, help="Number of input batches to compare.")]
SeqLen = Annotated[Optional[int], typer.Option("--seq-len", min=1, help="Base length of generated token sequences (batches vary around it).")]
Dtype = Annotated[str, typer.Option("--dtype", help="float64 (falls back to float32 if unsupported) or float32.")]
AllowMismatch = Annotated[bool, typer.Option("--allow-mismatch", help="Write the output even if verification fails.")]


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


def verify_settings(batches: int, dtype: str, atol: float | None, rtol: float | None, allow_mismatch: bool = False,
                    seq_len: int | None = None):
    import torch

    from growcli.core.errors import UsageError
    from growcli.run.steps import VerifySettings

    if dtype not in ("float64", "float32"):
        raise UsageError(f"--dtype {dtype!r}: expected float64 or float32")
    return VerifySettings(batches=batches, dtype=getattr(torch, dtype), atol=atol, rtol=rtol, allow_mismatch=allow_mismatch,
                          seq_len=seq_len)


def render_grow_report(report: dict[str, Any], json_out: bool) -> None:
    """Print a growth report: the JSON object, or a short human summary on stdout."""
    if json_out:
        emit_json(report)
        return
    for i, step in enumerate(report["steps"], 1):
        v = step.get("verification") or {}
        status = "exact" if step["exact"] else "not function-preserving by design"
        typer.echo(f"step {i}: {step['transform']} {', '.join(step['matched'])} — {status}; "
                   f"max abs diff {v.get('max_abs_diff', 0):.3g}; params {step['params_before']:,} → {step['params_after']:,}")
        for note in step.get("notes", []):
            typer.echo(f"  note: {note}")
    v = report["verification"]
    if report.get("function_preserving", True):
        result = "PASSED" if v["passed"] else "FAILED"  # FAILED: a promise broken, written under --allow-mismatch
        typer.echo(f"verification ({v['dtype']}, {v['batches']} batches): {result}, max abs diff {v['max_abs_diff']:.3g}")
    else:  # nothing was promised: the difference is a measurement, not a failure
        typer.echo(f"verification ({v['dtype']}, {v['batches']} batches): measured divergence, max abs diff "
                   f"{v['max_abs_diff']:.3g} (not function-preserving by design)")
    for out in report["outputs"]:
        extra = f" (onnxruntime check: max abs diff {out['check']['max_abs_diff']:.3g})" if out.get("check") else ""
        typer.echo(f"wrote {out['path']} [{out['format']}]{extra}")


def main() -> None:
    """Console entry point; click usage errors become one line and exit 2."""
    from growcli.cli import commands

    if os.environ.get("GROWCLI_DEBUG") != "1":
        import warnings

        warnings.filterwarnings("ignore")
        import logging

        logging.getLogger("torch").setLevel(logging.ERROR)
    commands.register_all(app)
    try:
        code = app(standalone_mode=False, prog_name="growcli")
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        typer.echo("growcli: aborted", err=True)
        code = 1
    except NoArgsIsHelp as exc:  # bare ``growcli``: the help text, as click itself shows it
        typer.echo(exc.format_message(), err=True)
        code = EXIT_USAGE
    except ClickException as exc:
        typer.echo(f"growcli: usage: {' '.join(exc.format_message().split())}", err=True)
        code = exc.exit_code if exc.exit_code else EXIT_USAGE
    sys.exit(code if isinstance(code, int) else 0)


def get_app() -> typer.Typer:
    """The app with every command registered (what tests drive with ``CliRunner``)."""
    from growcli.cli import commands

    commands.register_all(app)
    return app
