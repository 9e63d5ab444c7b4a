"""Growth inside a Hugging Face ``transformers.Trainer`` run: :class:`GrowthCallback`.

::

    callback = GrowthCallback(schedule, example_inputs={"input_ids": held_out_ids})
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()

After every optimizer step (so gradient accumulation is respected) the callback asks the schedule
whether to grow and grows ``trainer.model`` in place with the Trainer's own optimizer, whose
param groups and state are carried (the learning-rate scheduler keeps going). Plateau triggers
read ``eval_loss`` (or ``metric``) from the Trainer's evaluations. At every checkpoint the growth
history is written beside the weights (``growcli_growth.json``); to resume, build the original
model, call :meth:`GrowthCallback.restore` with the checkpoint directory (the model grows again
to the checkpoint's architecture, the schedule takes its state) and then
``trainer.train(resume_from_checkpoint=...)`` as usual.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback

from growcli.core.errors import FormatError
from growcli.run.steps import VerifySettings
from growcli.train.loop import Grower, replay_growth
from growcli.train.schedule import Schedule

STATE_FILE = "growcli_growth.json"


class GrowthCallback(TrainerCallback):
    """Grows the Trainer's model when ``schedule`` fires; see the module docstring."""

    def __init__(self, schedule: Schedule, example_inputs: Any, *, seed: int = 0,
                 settings: VerifySettings | None = None, metric: str = "eval_loss"):
        self.grower = Grower(None, None, schedule, example_inputs, seed=seed, settings=settings)
        self.metric = metric
        self._val_loss: float | None = None

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.grower.history

    def restore(self, model: nn.Module, checkpoint: str | Path) -> nn.Module:
        """Grow a freshly built original ``model`` to ``checkpoint``'s architecture and take its schedule state."""
        path = Path(checkpoint) / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise FormatError(f"{path}: cannot read the growth history ({exc})") from None
        replay_growth(model, state, str(path))
        self.grower.load_state_dict(state)
        return model

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.grower.total_steps = state.max_steps or None
        self.grower.model = model

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and self.metric in metrics:
            self._val_loss = float(metrics[self.metric])

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        self.grower.step(state.global_step, val_loss=self._val_loss, model=model, optimizer=inner)
        self._val_loss = None

    def on_save(self, args, state, control, **kwargs):
        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if directory.is_dir():
            (directory / STATE_FILE).write_text(json.dumps(self.grower.state_dict(), indent=1))
