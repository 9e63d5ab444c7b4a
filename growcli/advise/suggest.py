"""Where to grow: score every widenable layer by what one added unit promises on calibration data.

One forward/backward pass per calibration batch observes, for every layer GradMax applies to,
its input ``h`` and the gradient ``δ`` at its consumer's output, and from them three scores
(docs/recipes.md#suggest):

- **GradMax**: the singular values ``σ_i`` of ``M = Σ δ hᵀ``. A new unit with zero incoming
  weights and outgoing weights ``r·u_i`` (``r`` = ``scale`` × the mean norm of the existing
  outgoing weights) gets incoming gradient ``φ'·r·σ_i``; one SGD step of learning rate ``lr``
  on it lowers the loss by ``lr·(φ'·r·σ_i)²`` to first order. That is the expected first-step
  loss decrease of the ``i``-th unit added to the layer.
- **Firefly**: temporary candidate units with random incoming weights (the spread of the
  existing ones) and zero outgoing weights; the gradient ``g`` of the loss w.r.t. their
  outgoing weights is the first-order gain, and one SGD step lowers the loss by ``lr·‖g‖²``.
  The best of ``candidates`` is reported.
- **NeST**: the largest connection gradient ``|G_mn| = |Σ δ_m h_n|`` (an entry of ``M``):
  how strongly a missing connection from an input of the layer to an output of its consumer
  is asked for.

Layers are ranked by the GradMax decrease of their first unit; a budget of units is shared
out greedily by the per-unit GradMax decreases across layers, and written as a growth plan
of ``widen`` steps with ``init: gradmax``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from growcli.analysis.calibration import Calibration, DataRequest
from growcli.analysis.coupling import analyze, producer_layers
from growcli.analysis.trace import trace_model
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import make_batches
from growcli.core.model import GrowModel
from growcli.transforms.gradmax import EPS_REL, new_unit_value, outgoing_norm, plan_activation, value_and_slope
from growcli.transforms.gradmax_measure import Probe, consumer_taps, measure, padded_as_op
from growcli.transforms.gradmax_site import Site, find_site


@dataclass
class LayerScore:
    """Scores of one layer. ``gradmax_gains[i]`` is the expected decrease from its ``i``-th new unit."""

    layer: str
    units: int
    consumer: str
    singular_values: list[float]
    gradmax_gains: list[float]
    firefly_gain: float
    firefly_mean_gain: float
    nest_max_gradient: float
    slope: float
    radius: float
    gradmax_ok: bool = True
    gradmax_reason: str | None = None
    suggested: int = 0

    @property
    def gain(self) -> float:
        return self.gradmax_gains[0] if self.gradmax_gains else 0.0

    def to_dict(self, top: int = 8) -> dict[str, Any]:
        d = asdict(self)
        d["singular_values"] = self.singular_values[:top]
        d["gradmax_gains"] = self.gradmax_gains[:top]
        d["gradmax_gain"] = self.gain
        return d


class _FireflyProbe(Probe):
    """A :class:`Probe` that also scores temporary candidate units (random incoming, zero outgoing)."""

    def __init__(self, site: Site, module: torch.nn.Module, candidates: int, gen: torch.Generator):
        super().__init__(site, module)
        w = self.pw.detach().double()
        std = float(w.std()) if w.numel() > 1 else 1.0
        self.cand = torch.randn((candidates, *w.shape[1:]), generator=gen, dtype=torch.float64) * std
        self.g: torch.Tensor | None = None

    def extra(self, h: torch.Tensor, delta: torch.Tensor) -> None:
        if self.site.is_conv:
            p, q = self.site.producer_conv, self.site.consumer_conv
            pre = F.conv2d(padded_as_op(h, p), self.cand, stride=p.stride, dilation=p.dilation)  # the op's own padding
            a = new_unit_value(self.site, pre)
            taps = consumer_taps(a, q)  # [N, C·k2, L2]
            g = torch.einsum("nol,ncl->oc", delta.reshape(delta.shape[0], delta.shape[1], -1), taps)
            g = g.reshape(delta.shape[1], len(self.cand), -1).permute(1, 0, 2).reshape(len(self.cand), -1)
        else:
            a = new_unit_value(self.site, h.reshape(-1, h.shape[-1]) @ self.cand.T)
            g = (delta.reshape(-1, delta.shape[-1]).T @ a).T  # [C, R]
        self.g = g if self.g is None else self.g + g


def score_layers(gm: GrowModel, cal: Calibration, *, lr: float = 0.01, scale: float = 0.5, candidates: int = 32,
                 seed: int = 0) -> tuple[list[LayerScore], dict[str, str], float]:
    """Score every layer; returns the scores (best first), the unscored layers with reasons, and the mean loss.

    The model is not changed. Raises :class:`InputsError` when the model rejects the data.
    """
    trace = trace_model(gm.module, make_batches(gm.inputs, 1)[0])
    gen = torch.Generator().manual_seed(seed)
    probes: list[_FireflyProbe] = []
    skipped: dict[str, str] = {}
    for layer in producer_layers(trace):
        try:
            site = find_site(trace, analyze(trace, layer))
        except NotGrowableError as exc:
            skipped[layer] = str(exc).split(": ", 1)[-1].removeprefix("gradmax: ")
            continue
        probes.append(_FireflyProbe(site, gm.module, candidates, gen))
    loss = measure(gm.module, probes, cal) if probes else float("nan")
    scores = [_score(pr, gm.module, lr, scale) for pr in probes]
    scores.sort(key=lambda s: (-s.gain, s.layer))
    return scores, skipped, loss


def _score(pr: _FireflyProbe, module: torch.nn.Module, lr: float, scale: float) -> LayerScore:
    site = pr.site
    sv = torch.linalg.svdvals(pr.m)
    ok, reason = True, None
    try:
        slope = plan_activation(site, pr.consumer_rms).slope
    except NotGrowableError as exc:
        ok, reason = False, str(exc).split("gradmax: ", 1)[-1]
        value0, slope = value_and_slope(site, 0.0, "bias")
        if slope == 0.0:  # flat at 0 (ReLU): score it on its linear side, as the reference does
            _, slope = value_and_slope(site, EPS_REL * max(pr.consumer_rms, 1e-12), "bias")
    radius = scale * (outgoing_norm(site, module) or 1.0)
    gains = [lr * (slope * radius * float(s)) ** 2 for s in sv if s > sv[0] * 1e-12]
    ff = lr * pr.g.pow(2).sum(dim=1) if pr.g is not None else torch.zeros(1)
    return LayerScore(site.layer, site.size, site.consumer, [float(s) for s in sv], gains, float(ff.max()),
                      float(ff.mean()), float(pr.m.abs().max()), slope, radius, ok, reason)


def allocate(scores: list[LayerScore], budget: int) -> dict[str, int]:
    """Share ``budget`` new units among layers GradMax can grow, greedily by per-unit expected decrease.

    A layer gets at most as many units as ``M`` has non-zero singular values.
    """
    pool = [(g, s.layer) for s in scores if s.gradmax_ok for g in s.gradmax_gains]
    pool.sort(key=lambda t: (-t[0], t[1]))
    counts: dict[str, int] = {}
    for _, layer in pool[:budget]:
        counts[layer] = counts.get(layer, 0) + 1
    for s in scores:
        s.suggested = counts.get(s.layer, 0)
    return {s.layer: counts[s.layer] for s in scores if s.layer in counts}  # in rank order


def default_budget(scores: list[LayerScore]) -> int:
    """10% of the units of the layers GradMax can grow, at least 1."""
    return max(1, round(0.1 * sum(s.units for s in scores if s.gradmax_ok)))


def plan_text(allocation: dict[str, int], request: DataRequest, loss: str, scale: float, *, run_hint: str = "") -> str:
    """A version-1 growth plan: one ``widen`` step with ``init: gradmax`` per allocated layer."""
    import yaml

    steps = []
    for layer, n in allocation.items():
        options: dict[str, Any] = {"layer": layer, "by": n, "init": "gradmax", "data": request.path, "loss": loss,
                                   "scale": scale}
        if request.batches is not None:
            options["data_batches"] = request.batches
        if request.batch_size is not None:
            options["batch_size"] = request.batch_size
        steps.append({"widen": options})
    doc = {"version": 1, "description": "GradMax units where the calibration gradient promises the largest "
                                        "first-step loss decrease (growcli suggest)", "steps": steps}
    header = "# Written by growcli suggest; each step recomputes M on the model grown so far.\n"
    if run_hint:
        header += f"# run: {run_hint}\n"
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)


@dataclass
class Suggestion:
    scores: list[LayerScore]
    not_scored: dict[str, str]
    loss: float
    budget: int
    allocation: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"mean_loss": self.loss if math.isfinite(self.loss) else None, "budget": self.budget,
                "allocation": self.allocation, "layers": [s.to_dict() for s in self.scores],
                "not_scored": self.not_scored}


def suggest(gm: GrowModel, cal: Calibration, *, budget: int | None = None, lr: float = 0.01, scale: float = 0.5,
            candidates: int = 32, seed: int = 0) -> Suggestion:
    """Score every layer and share ``budget`` units (default: :func:`default_budget`) among them."""
    scores, skipped, loss = score_layers(gm, cal, lr=lr, scale=scale, candidates=candidates, seed=seed)
    n = budget if budget is not None else default_budget(scores)
    return Suggestion(scores, skipped, loss, n, allocate(scores, n))
