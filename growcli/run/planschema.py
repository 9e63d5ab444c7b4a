"""Growth plans, schema version 1: the keys a plan may have and the objects a parsed plan becomes.

A plan, schema version 1::

    version: 1
    description: wider and deeper  # optional, free text
    seed: 0                        # optional; --seed overrides it
    steps:                         # applied in order; each is one registered transform
      - widen: {layer: fc1, to: 64}
      - deepen:
          after: fc1
      - stack                      # a transform with no options
    verify:                        # optional; command-line options override each key
      batches: 3
      dtype: float64               # or float32
      atol: 1e-10
      rtol: 1e-10
      inputs: batch.safetensors    # paths are relative to the current directory, as on the command line
    output:                        # optional; -o replaces path and format
      path: grown.safetensors
      format: safetensors
      shard_size: 2GB              # Hugging Face directory outputs only

A step is a one-key mapping from a transform name to its options. Names and options come
from the transform registry, the same table the commands are built from: a step's options
are its spec's fields, spelled as in Python (``shard_size``, not ``--shard-size``). Nothing
here knows a particular transform.

:func:`growcli.run.plan.parse_plan` checks a text against this schema without a model and returns
every :class:`Problem`, each with file, line and column (:mod:`growcli.run.plancheck` does the
checking); :mod:`growcli.run.planrun` checks a plan against a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from growcli.core.errors import UsageError
from growcli.core.safeyaml import Loc

VERSION = 1
TOP_KEYS = ("version", "seed", "steps", "verify", "output", "description")
VERIFY_KEYS = ("batches", "dtype", "atol", "rtol", "inputs")
OUTPUT_KEYS = ("path", "format", "shard_size")
DTYPES = ("float64", "float32")
STEP_EXAMPLE = "'- widen: {layer: fc1, to: 64}'"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a plan: where (file, line, column), which part, and what was expected."""

    file: str
    loc: Loc | None
    where: str  # "step 2 (widen)", "verify", "plan"
    message: str
    option: str | None = None

    def __str__(self) -> str:
        pos = f"{self.file}:{self.loc.line}:{self.loc.column}" if self.loc else self.file
        return f"{pos}: {self.where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.loc.line if self.loc else None,
                "column": self.loc.column if self.loc else None, "where": self.where,
                "option": self.option, "message": self.message}


class PlanError(UsageError):
    """The plan is invalid; ``problems`` holds every problem found (exit code 2)."""

    def __init__(self, file: str, problems: list[Problem]):
        self.file = file
        self.problems = problems
        n = len(problems)
        super().__init__(f"{file}: invalid plan ({n} problem{'s' if n != 1 else ''}): "
                         + "; ".join(str(p) for p in problems))


@dataclass(frozen=True)
class PlanStep:
    """One step: ``index`` is 1-based; ``valid`` is false when the schema check found a problem in it."""

    index: int
    transform: str
    options: dict[str, Any]
    loc: Loc
    option_locs: dict[str, Loc] = field(default_factory=dict)
    valid: bool = True

    @property
    def label(self) -> str:
        return f"step {self.index} ({self.transform})" if self.transform else f"step {self.index}"


@dataclass(frozen=True)
class VerifyConfig:
    batches: int | None = None
    dtype: str | None = None
    atol: float | None = None
    rtol: float | None = None
    inputs: Path | None = None


@dataclass(frozen=True)
class OutputConfig:
    path: Path | None = None
    format: str | None = None
    shard_size: int | None = None
    loc: Loc | None = None  # where ``path`` was written


@dataclass
class Plan:
    """A parsed plan. ``file`` is the name used in messages; ``text`` is kept verbatim for provenance."""

    file: str
    text: str
    version: int | None
    steps: list[PlanStep]
    seed: int | None = None
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def position(self, step: PlanStep) -> str:
        return f"{self.file}:{step.loc.line}:{step.loc.column}"
