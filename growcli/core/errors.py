"""The exception tree and the one table that turns errors into exit codes and messages.

Library code raises these; only the CLI boundary (``growcli.cli.render.handle_errors``) formats them. Every
message is written to stand alone on one line: it names the file or option involved and
what was expected.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_MISMATCH = 3


class GrowError(Exception):
    """Root of every error a user can cause or fix. ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_ERROR


class UsageError(GrowError, ValueError):
    """The command line or plan asks for something malformed (bad shape, unknown format...)."""

    exit_code = EXIT_USAGE


class CheckpointNotFoundError(GrowError, FileNotFoundError):
    """The input path does not exist."""


class FormatError(GrowError, ValueError):
    """A file exists but is not a readable checkpoint of the format its name or content claims."""


class UnsafePickleError(GrowError):
    """The checkpoint needs arbitrary-code unpickling and ``--trust-pickle`` was not given."""

    def __init__(self, path: str, globals_: list[str]):
        self.path = path
        self.globals = globals_
        shown = ", ".join(globals_[:6]) + (f" (+{len(globals_) - 6} more)" if len(globals_) > 6 else "")
        super().__init__(
            f"{path}: loading it would unpickle and run code from the file (it imports {shown}); "
            "pass --trust-pickle if you trust it, or save a state_dict and load it with --arch"
        )


class ArchitectureError(GrowError, ValueError):
    """``--arch`` cannot be imported or built, or the weights do not fit the architecture."""


class NoMatchingModuleError(GrowError, ValueError):
    """A module name or pattern matched nothing in the model."""


class NotGrowableError(GrowError, ValueError):
    """The transform cannot be applied exactly here; the message says which operation prevents it."""


class InputsError(GrowError, ValueError):
    """Sample inputs are missing, malformed, or rejected by the model."""


class OutputError(GrowError, OSError):
    """The output cannot be written (unwritable directory, same path as the input...)."""


class MissingDependencyError(GrowError, ImportError):
    """An optional package is needed for this input or output."""


class VerificationFailed(GrowError):
    """The grown model does not compute the same function within tolerance."""

    exit_code = EXIT_MISMATCH

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


# Ordered: the first matching row decides the prefix. Used only at the CLI boundary.
MESSAGE_TABLE: list[tuple[type[BaseException], str]] = [
    (VerificationFailed, "verification failed"),
    (UnsafePickleError, "refused"),
    (NotGrowableError, "not growable"),
    (NoMatchingModuleError, "no match"),
    (CheckpointNotFoundError, "not found"),
    (MissingDependencyError, "missing dependency"),
    (UsageError, "usage"),
    (GrowError, "error"),
]


def format_error(exc: BaseException) -> tuple[int, str]:
    """Map an exception to ``(exit_code, one-line message)`` for stderr."""
    for cls, prefix in MESSAGE_TABLE:
        if isinstance(exc, cls):
            text = " ".join(str(exc).split())
            return exc.exit_code, f"{prefix}: {text}"  # type: ignore[attr-defined]
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return EXIT_ERROR, f"internal error: {text} (set GROWCLI_DEBUG=1 for the traceback)"
