"""Scores for :class:`growcli.train.schedule.ScoreAbove` from the model in training.

:func:`gradmax_scores` returns a function the schedule calls every ``every`` steps: for each layer
GradMax applies to, the top singular value of ``M = Σ δ hᵀ`` on the given batch (``h`` the layer's
input to its consumer, ``δ`` the gradient at the consumer's output), the quantity GradMax (Evci
et al. 2022) grows by: a new unit with zero incoming weights and outgoing weights along the top
singular vector receives the largest possible gradient, so a large value means the layer asks
for more units. Same scoring as ``growcli suggest``; the model is not changed.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from growcli.advise.suggest import score_layers
from growcli.analysis.calibration import Calibration, check_loss
from growcli.train.live import as_batch, live_model


def gradmax_scores(model: nn.Module, inputs: Any, target: torch.Tensor | None, *,
                   loss: str = "cross_entropy") -> Callable[[], dict[str, float]]:
    """A scores function over ``model`` (held by reference, so it follows growth) on one batch."""
    batch = as_batch(inputs)
    check_loss(loss)

    def scores() -> dict[str, float]:
        gm = live_model(model, batch)
        was_training = model.training
        try:
            found, _, _ = score_layers(gm, Calibration("training batch", loss, [(batch, target)]))
        finally:
            model.train(was_training)
        return {s.layer: (s.singular_values[0] if s.singular_values else 0.0) for s in found}

    return scores
