"""Growth inside a PyTorch Lightning run: :class:`LightningGrowth`, a ``lightning.pytorch.Callback``.

::

    trainer = lightning.Trainer(max_steps=10_000, callbacks=[LightningGrowth(schedule, example_inputs=x)])
    trainer.fit(module, data)

After every optimizer step (``trainer.global_step`` advancing, so gradient accumulation is
respected) the schedule is asked whether to grow; the LightningModule (or its attribute
``module``, e.g. ``"model"``) grows in place with the Trainer's optimizer carried. Plateau
triggers read ``monitor`` (default ``val_loss``) from the logged metrics. The growth history is
saved in every checkpoint (as JSON under the key ``growcli``); when ``fit(ckpt_path=...)``
resumes, the callback grows the freshly built module to the checkpoint's architecture before
Lightning loads the weights and the optimizer state (it chains into the module's
``on_load_checkpoint`` hook, the last one Lightning calls before loading the weights).
"""

from __future__ import annotations

import json
from typing import Any

from lightning.pytorch import Callback

from growcli.core.errors import FormatError
from growcli.run.steps import VerifySettings
from growcli.train.loop import Grower, replay_growth
from growcli.train.schedule import Schedule

KEY = "growcli"


class LightningGrowth(Callback):
    """Grows the LightningModule when ``schedule`` fires; see the module docstring."""

    def __init__(self, schedule: Schedule, example_inputs: Any, *, module: str | None = None, seed: int = 0,
                 settings: VerifySettings | None = None, monitor: str = "val_loss"):
        self.grower = Grower(None, None, schedule, example_inputs, seed=seed, settings=settings)
        self.module = module
        self.monitor = monitor
        self._last_step = 0
        self._val_loss: float | None = None

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.grower.history

    def _target(self, pl_module):
        return getattr(pl_module, self.module) if self.module else pl_module

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Lightning loads a checkpoint's weights right after the LightningModule's on_load_checkpoint
        # hook (callbacks hear of the checkpoint only later): chain into that hook so the module grows
        # to the checkpoint's architecture before its weights and optimizer state are loaded.
        if getattr(pl_module, "_growcli_hooked", False):
            return
        user_hook = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            self.restore(pl_module, checkpoint)
            user_hook(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint
        pl_module._growcli_hooked = True

    def restore(self, pl_module, checkpoint: dict[str, Any]) -> None:
        """Grow a freshly built ``pl_module`` to ``checkpoint``'s architecture and take its schedule state."""
        text = checkpoint.get(KEY)
        if not text:
            return
        try:
            state = json.loads(text)
        except ValueError as exc:
            raise FormatError(f"checkpoint entry {KEY!r}: cannot read the growth history ({exc})") from None
        replay_growth(self._target(pl_module), state, f"checkpoint entry {KEY!r}")
        self.grower.load_state_dict(state)

    def on_train_start(self, trainer, pl_module) -> None:
        self.grower.total_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self._last_step = trainer.global_step

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            self._val_loss = float(value)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:  # still accumulating gradients
            return
        self._last_step = trainer.global_step
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.grower.step(trainer.global_step, val_loss=self._val_loss, model=self._target(pl_module),
                         optimizer=optimizer)
        self._val_loss = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[KEY] = json.dumps(self.grower.state_dict())
