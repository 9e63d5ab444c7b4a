"""The growcli command line: the typer app, its entry point, and the app with every command registered.

Commands are thin: they parse, call the library once, and render (:mod:`growcli.cli.render`);
options they share are in :mod:`growcli.cli.options`. Errors become one line on stderr and the
documented exit code (0 ok, 1 error, 2 usage, 3 verification failed); ``GROWCLI_DEBUG=1`` shows
the traceback. Importing this module, building the app and ``--help`` never import torch.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from growcli.core.errors import EXIT_USAGE
from growcli.cli.render import ClickException, NoArgsIsHelp

app = typer.Typer(
    name="growcli",
    help="Grow saved neural networks and prove the grown model computes the same function.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_help_option=False,  # --help is _root's own option: see _print_help
)


def _print_version(value: bool) -> None:
    if value:
        from growcli.core.version import __version__

        typer.echo(f"growcli {__version__}")
        raise typer.Exit()


def _print_help(ctx: typer.Context, value: bool) -> None:
    """The group's ``--help``. Typer's own one is unset (None, not False) when a command follows, and typer
    imports pydantic (~0.1 s) to read that None; this one is a plain bool, like every command's --help."""
    if value:
        typer.echo(ctx.get_help())
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print growcli's version and exit.")] = False,
          show_help: Annotated[bool, typer.Option("--help", callback=_print_help, is_eager=True,
                                             help="Show this message and exit.")] = False) -> None:
    pass


HEAP_MMAP_BYTES = 32 << 20  # glibc: allocations from this size up are memory maps, returned when freed (its dynamic maximum)


def _bound_heap() -> None:
    """Large blocks (tensors read, converted, written) come from their own memory maps and go back to the
    system when freed. glibc's default raises its map threshold after each large free (up to 32 MB), so the
    tensors of a streamed or block-wise run pile up in a fragmented heap that never shrinks: block-wise
    verification of a 1.1B checkpoint peaked at 1.1–1.2 GB that way, 0.55–0.6 GB with a fixed threshold.
    The CLI process only (the Python API leaves its host's allocator alone); nothing elsewhere than glibc."""
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # the user's own setting wins
        from growcli.core.memory import fix_map_threshold

        fix_map_threshold(HEAP_MMAP_BYTES)


def main() -> None:
    """Console entry point; click usage errors become one line and exit 2."""
    _bound_heap()
    if os.environ.get("GROWCLI_DEBUG") != "1":
        import warnings

        warnings.filterwarnings("ignore")
        import logging

        logging.getLogger("torch").setLevel(logging.ERROR)
    get_app()
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
