"""Write a search's files: the best model (every format asked for), its plan, the log, the plot, the policy state.

Paths are checked before the search starts (:func:`check_search_outputs`: never an input, an
existing file only with ``overwrite``), and everything is written in one transaction at the end
(:func:`write_search_outputs`): each model file is read back from disk and run against the model
in memory before it is kept, and the model files, plan, log and plot are renamed into place
together or not at all. The same happens with the best model so far when a search is interrupted.

The log (``<first output>.search.json``, beside it) holds the settings, every child of every
round, the path to the best model and where the outputs went. The controller's state is written
on its own after every round (:func:`save_policy_state`), so an interrupted search resumes from
the last finished round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from growcli.core.errors import FormatError, UsageError
from growcli.core.inputs import make_batches
from growcli.core.model import GrowModel
from growcli.io.atomic import atomic_output, check_distinct, check_output_path, transaction
from growcli.io.save import check_output
from growcli.run.outputs import save_models
from growcli.run.steps import VerifySettings
from growcli.search.loop import SearchResult
from growcli.search.report import plan_text, plot_png


@dataclass
class SearchOutputs:
    """Where a search writes: model files (path, format), and optionally a plan, a plot and the log."""

    models: list[tuple[Path, str | None]]
    plan: Path | None = None
    plot: Path | None = None
    log: Path | None = None
    formats: list[str] = field(default_factory=list)  # resolved by check_search_outputs

    def files(self) -> list[Path]:
        return [p for p, _ in self.models] + [p for p in (self.plan, self.plot, self.log) if p is not None]


def log_path(first: Path) -> Path:
    """``<stem>.search.json`` beside a file output, ``<name>.search.json`` beside a directory output."""
    first = Path(first)
    return first.with_name((first.stem if first.suffix else first.name) + ".search.json")


def check_search_outputs(gm: GrowModel, outs: SearchOutputs, inputs: tuple[Path, ...], overwrite: bool) -> None:
    """Every output is valid and free (see the module docstring) before any work; resolves the model formats."""
    if not outs.models:
        raise UsageError("search needs at least one -o OUTPUT for the best model")
    if outs.log is None:
        outs.log = log_path(outs.models[0][0])
    check_distinct(outs.files())
    outs.formats = [check_output(gm, p, fmt, overwrite=overwrite, inputs=inputs) for p, fmt in outs.models]
    for p in (outs.plan, outs.plot, outs.log):
        if p is not None:
            check_output_path(p, (gm.source, *inputs), overwrite=overwrite)


def write_search_outputs(result: SearchResult, outs: SearchOutputs, *, plan: str, log: dict[str, Any],
                         settings: VerifySettings | None = None) -> list[dict[str, Any]]:
    """Write everything in one transaction; returns the model outputs' read-back results."""
    gm = result.best
    batches = make_batches(gm.inputs, 2, seed=1) if not gm.inputs.empty else []
    with transaction():
        written = save_models(gm, [(p, fmt, None) for (p, _), fmt in zip(outs.models, outs.formats)], plan=plan,
                              batches=batches, settings=settings)
        if outs.plan is not None:
            with atomic_output(outs.plan) as tmp:
                tmp.write_text(plan)
        if outs.plot is not None:
            with atomic_output(outs.plot) as tmp:
                plot_png(result, tmp)
        with atomic_output(outs.log) as tmp:
            tmp.write_text(json.dumps({**log, "outputs": written, "plan_text": plan}, indent=2, default=str) + "\n")
    return written


def search_plan(result: SearchResult, train, *, model: str, data: str, seed: int, arch: str | None,
                plan_path: Path | None) -> str:
    hint = ""
    if plan_path is not None:
        hint = f"growcli grow {model}{f' --arch {arch}' if arch else ''} --plan {plan_path} -o grown.safetensors"
    return plan_text(result, train, model=model, data=data, seed=seed, run_hint=hint)


# --------------------------------------------------------------------------- the controller's state
def load_policy_state(path: Path | None) -> dict[str, Any] | None:
    """The saved controller state at ``path``, or ``None`` when there is none yet (a new search)."""
    if path is None or not Path(path).exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a file that is not a weights-only torch file
        raise FormatError(f"{path}: not a growcli search policy state ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("policy") != "controller":
        raise FormatError(f"{path}: not a growcli search controller state")
    return state


def save_policy_state(state: dict[str, Any] | None, path: Path | None) -> None:
    """Replace ``path`` with ``state`` atomically (a crash leaves the previous round's state)."""
    if path is None or state is None or state.get("policy") != "controller":
        return
    with atomic_output(Path(path)) as tmp:
        torch.save(state, tmp)


def run_log(result: SearchResult, settings, train, *, model: str, data: str, val: str) -> dict[str, Any]:
    """The search log's content (JSON-able): inputs, settings, every round, the path and where it stopped."""
    import dataclasses

    return {"model": model, "data": data, "val": val, "settings": dataclasses.asdict(settings),
            "training": train.to_dict(), **result.to_dict()}
