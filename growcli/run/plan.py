"""Reading growth plans: from a file or a text, to a :class:`growcli.run.planschema.Plan` or every problem.

The schema (version 1) is described in :mod:`growcli.run.planschema`; the checks are in
:mod:`growcli.run.plancheck`. :func:`load_plan` raises :class:`growcli.run.planschema.PlanError`
listing every problem; :func:`read_plan` and :func:`parse_plan` return them instead (what
``growcli validate`` shows). :mod:`growcli.run.planrun` checks a plan against a model and runs it.
"""

from __future__ import annotations

from pathlib import Path

from growcli.core.safeyaml import YamlError, load_located, read_text
from growcli.run.plancheck import PlanChecker
from growcli.run.planschema import Plan, PlanError, Problem


def load_plan(path: str | Path) -> Plan:
    """Read and check the plan at ``path``; raises :class:`PlanError` listing every problem.

    Relative paths inside the plan (``verify.inputs``, ``output.path``) mean what they would
    on the command line: relative to the current directory, as in mergekit and torchtune
    configs and CI steps run from a repository's root.
    """
    path = Path(path)
    plan, problems = read_plan(path)
    if problems or plan is None:
        raise PlanError(str(path), problems)
    return plan


def read_plan(path: Path) -> tuple[Plan | None, list[Problem]]:
    """Like :func:`load_plan`, but returns the problems (and the plan, when there is one) instead of raising."""
    if not path.is_file():
        return None, [Problem(str(path), None, "plan", "no such file" if not path.exists() else "not a file")]
    try:
        text = read_text(path)
    except YamlError as exc:
        return None, [Problem(str(path), exc.loc, "plan", exc.message)]
    except OSError as exc:
        return None, [Problem(str(path), None, "plan", f"cannot read it ({exc.strerror or exc})")]
    return parse_plan(text, str(path))


def parse_plan(text: str, file: str = "<plan>") -> tuple[Plan | None, list[Problem]]:
    """Check ``text`` against schema version 1 and the transform registry, collecting every problem.

    Returns the plan (``None`` when the text is not a YAML mapping) and the problems sorted
    by position. Steps with problems stay in the plan with ``valid=False``.
    """
    try:
        doc = load_located(text)
    except YamlError as exc:
        return None, [Problem(file, exc.loc, "plan", exc.message)]
    return PlanChecker(doc, file).check(text)
