"""Growth in a training loop: a :class:`Grower` runs a :class:`~growcli.train.schedule.Schedule`.

::

    grower = Grower(model, optimizer, schedule, example_inputs=held_out_batch, total_steps=10_000)
    for step in range(1, 10_001):
        ...                                   # forward, backward, optimizer.step(), scheduler.step()
        grower.step(step, val_loss=val_loss)  # grows when the schedule says so (optimizer carried)

The Grower keeps the growth history: for each growth, the step, the reason and the structural
edits it recorded. :meth:`Grower.state_dict` goes into training checkpoints; to resume, build
the original model, call :func:`replay_growth` with the saved state (the architecture grows
again, to the recorded shapes) and then load the checkpoint's weights and optimizer state as
usual. The Hugging Face and Lightning callbacks are thin wrappers around this class.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from growcli.core.replay import check_records, replay
from growcli.run.steps import VerifySettings
from growcli.train.live import LiveReport, grow_
from growcli.train.schedule import Schedule, TrainingState


class Grower:
    """Checks the schedule after each optimizer step and grows ``model`` in place when it fires."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, schedule: Schedule,
                 example_inputs: Any, *, total_steps: int | None = None, seed: int = 0,
                 settings: VerifySettings | None = None, on_grow: Callable[[LiveReport], None] | None = None):
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.example_inputs = example_inputs
        self.total_steps = total_steps
        self.seed = seed
        self.settings = settings
        self.on_grow = on_grow
        self.history: list[dict[str, Any]] = []

    def step(self, step: int, val_loss: float | None = None, model: nn.Module | None = None,
             optimizer: torch.optim.Optimizer | None = None) -> list[LiveReport]:
        """Grow if due after optimizer step ``step`` (1-based); returns the growths run (usually none)."""
        self.model = model if model is not None else self.model
        self.optimizer = optimizer if optimizer is not None else self.optimizer
        params = sum(p.numel() for p in self.model.parameters())
        reports = []
        for event in self.schedule.due(TrainingState(step, self.total_steps, val_loss, params)):
            report = grow_(self.model, event.steps, self.optimizer, self.example_inputs,
                           seed=self.seed + len(self.history), settings=self.settings)
            self.history.append({"step": step, "reason": event.reason, "steps": event.steps, "edits": report.edits,
                                 "params_before": report.params_before, "params_after": report.params_after,
                                 "over_budget": self.schedule.over_budget(report.params_after)})
            reports.append(report)
            if self.on_grow is not None:
                self.on_grow(report)
        return reports

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state and the growth history (JSON-able), for training checkpoints."""
        return {"schedule": self.schedule.state_dict(), "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the schedule state and history of a checkpoint (the model must already be grown, see replay_growth)."""
        self.schedule.load_state_dict(state["schedule"])
        self.history = [dict(h) for h in state.get("history", [])]


def replay_growth(model: nn.Module, state: dict[str, Any], source: str | None = None) -> nn.Module:
    """Grow a freshly built original ``model`` to the architecture recorded in a Grower's ``state``.

    Parameters get placeholder values of the recorded shapes; load the checkpoint's weights next.
    The recorded edits are checked like those of a file (only allowlisted module types).
    """
    for entry in state.get("history", []):
        model = replay(model, check_records(entry.get("edits", []), source), source)
    return model
