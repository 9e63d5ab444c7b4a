"""The NeST driver (Dai, Yin, Jha 2018): grow connections and neurons, then prune iteratively, training between.

:func:`nest` runs the phases on a :class:`~growcli.core.model.GrowModel` in memory:

1. ``mask`` the chosen layers (exact, verified; layers masked already, e.g. by an earlier run, stay as they are);
2. ``grow_connections`` on the training data (exact, verified), then train — skipped when no
   connection is missing (a dense model has nothing to grow);
3. ``grow_neurons`` in the chosen layers that feed a chosen masked Linear through an activation
   (exact, verified), then train;
4. ``magnitude_prune`` to ``sparsity · i / prune_steps`` for ``i = 1 … prune_steps``, each followed
   by retraining; with ``min_accuracy``, a pruning step whose retrained accuracy falls below it
   is undone and pruning stops (the model of the step before is kept).

Every transform runs through :func:`growcli.run.steps.run_step`, so each exact step is checked by
running the model before and after it; training (Adam, the masked weights kept at zero by
:func:`growcli.nn.masks.keep_masked_zero`) happens between steps and is not a step. After each
phase the model is evaluated on the validation data: parameters, nonzero parameters, sparsity of
the masked layers, accuracy (cross-entropy targets) and loss. :func:`run_nest` adds the I/O of a
command: it loads the model and the data, runs :func:`nest` and writes the outputs (each read
back and run) and ``<stem>.growth_report.json`` together, or nothing. Recipe: docs/recipes.md#nest.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from growcli.analysis.calibration import Calibration, DataRequest, batch_loss, load_calibration, prediction
from growcli.core.errors import NotGrowableError, UsageError
from growcli.core.inputs import cast_batch
from growcli.core.model import GrowModel, eval_mode
from growcli.core.select import select
from growcli.io.atomic import check_distinct, check_output_path, transaction
from growcli.io.save import check_output
from growcli.nn.masks import MASKED_TYPES, MaskedLinear, keep_masked_zero, masked_layers
from growcli.run.outputs import save_models
from growcli.run.runner import Output, Source, report_path, write_report
from growcli.run.steps import VerifySettings, run_step, verification_batches
from growcli.transforms.nest import mask_candidates
from growcli.transforms.nest_neurons import find_consumer
from growcli.transforms.registry import Context
from growcli.verification.compare import VerifyReport


@dataclass(frozen=True)
class NestSettings:
    """What :func:`nest` does; the transform options keep their specs' names and defaults."""

    layer: str | list[str]
    sparsity: float
    connections: float = 0.1  # 0: no connection growth
    neurons: int = 1  # 0: no neuron growth
    pairs: float = 0.05
    dense: bool = False
    loss: str = "auto"
    data_batches: int | None = None
    batch_size: int | None = None
    epochs: int = 2
    lr: float = 0.01
    prune_steps: int = 3
    min_accuracy: float | None = None

    def __post_init__(self):
        problems = []
        if not 0 <= self.sparsity < 1:
            problems.append(f"sparsity must be a fraction in [0, 1), got {self.sparsity}")
        if not 0 <= self.connections <= 1:
            problems.append(f"connections must be a fraction in [0, 1] (0 skips connection growth), got {self.connections}")
        if self.neurons < 0 or self.epochs < 0 or self.prune_steps < 1:
            problems.append("neurons and epochs must be zero or more, prune_steps positive")
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.min_accuracy is not None and not 0 <= self.min_accuracy <= 1:
            problems.append(f"min_accuracy must be in [0, 1], got {self.min_accuracy}")
        if problems:
            raise UsageError("; ".join(problems))


# --------------------------------------------------------------------------- measuring
def nonzero_parameters(module: torch.nn.Module) -> int:
    """Parameters that are not zero in what the model computes with (a masked weight counts ``weight * mask``)."""
    masked = {id(m.weight): m for _, m in masked_layers(module)}
    total = 0
    for p in module.parameters():
        layer = masked.get(id(p))
        total += int((layer.masked_weight() != 0).sum()) if layer is not None else int(p.count_nonzero())
    return total


def sparsity(module: torch.nn.Module) -> float | None:
    """Fraction of the masked layers' connections that are missing (``None`` without masked layers)."""
    layers = [m for _, m in masked_layers(module)]
    total = sum(m.mask.numel() for m in layers)
    return 1 - sum(int(m.mask.count_nonzero()) for m in layers) / total if total else None


def _accuracy_hits(pred: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    if tuple(pred.shape[:-1]) == tuple(target.shape):
        guess = pred.argmax(-1)
    else:
        guess = pred.argmax(1)
    return int((guess == target).sum()), target.numel()


def evaluate(module: torch.nn.Module, data: Calibration) -> dict[str, float | None]:
    """Mean loss over ``data`` (eval mode) and, for cross-entropy targets, accuracy."""
    eval_mode(module)
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    loss_sum, hits, count = 0.0, 0, 0
    with torch.no_grad():
        for batch, target in data.batches:
            args, kwargs = cast_batch(batch, dtype)
            out = module(*args, **kwargs)
            n = int((args[0] if args else next(iter(kwargs.values()))).shape[0])
            loss_sum += float(batch_loss(out, target, data.loss, data.source)) * n
            if data.loss == "cross_entropy":
                h, c = _accuracy_hits(prediction(out), target)
                hits, count = hits + h, count + c
    return {"val_loss": loss_sum / data.samples, "val_accuracy": hits / count if count else None}


def train(module: torch.nn.Module, data: Calibration, epochs: int, lr: float, seed: int) -> None:
    """``epochs`` passes of Adam over ``data`` in a seeded order; masked weights stay exactly zero."""
    if epochs == 0:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    hook = keep_masked_zero(optimizer, module)
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    gen = torch.Generator().manual_seed(seed)
    module.train()
    try:
        for _ in range(epochs):
            for i in torch.randperm(len(data.batches), generator=gen).tolist():
                batch, target = data.batches[i]
                args, kwargs = cast_batch(batch, dtype)
                optimizer.zero_grad(set_to_none=True)
                batch_loss(module(*args, **kwargs), target, data.loss, data.source).backward()
                optimizer.step()
    finally:
        hook.remove()
        eval_mode(module)


# --------------------------------------------------------------------------- the phases
def nest(gm: GrowModel, settings: NestSettings, train_data: Calibration, val_data: Calibration, data_name: str, *,
         seed: int = 0, verify: VerifySettings | None = None) -> list[dict[str, Any]]:
    """Run NeST's phases on ``gm`` in place (see the module docstring); returns one row per phase.

    ``data_name`` is the ``data`` option the growth steps name; the calibration batches for it must
    be in the context this function builds (the training data, limited to ``data_batches``).
    """
    s = settings
    verify = verify or VerifySettings()
    ctx = Context(seed=seed)
    calibration = dataclasses.replace(train_data, batches=train_data.batches[: s.data_batches or None])
    ctx.data[DataRequest(data_name, s.loss, s.data_batches, s.batch_size)] = calibration
    data = {"data": data_name, "loss": s.loss, "data_batches": s.data_batches, "batch_size": s.batch_size}
    data = {k: v for k, v in data.items() if v is not None}
    rows: list[dict[str, Any]] = []

    def row(phase: str, first_step: int, note: str = "") -> dict[str, Any]:
        entry = {"phase": phase, "parameters": gm.num_parameters(), "nonzero": nonzero_parameters(gm.module),
                 "sparsity": sparsity(gm.module), **evaluate(gm.module, val_data),
                 "steps": list(range(first_step + 1, len(gm.steps) + 1)), "note": note}
        rows.append(entry)
        return entry

    def step(name: str, options: dict[str, Any]) -> None:
        run_step(gm, name, options, ctx, verify)

    row("input", 0)
    first = len(gm.steps)
    verdicts = mask_candidates(gm)
    if not verdicts:  # a .pt2 program, or no Linear/Conv layer: the mask step says why
        step("mask", {"layer": s.layer, "dense": s.dense})
    layers = select(s.layer, list(verdicts), "layer")
    plain = [n for n in layers if not isinstance(gm.module.get_submodule(n), MASKED_TYPES)]
    if plain:
        step("mask", {"layer": plain, "dense": s.dense})
    row("mask", first, "" if plain else "skipped: the layers are masked already")
    if s.connections > 0:
        first = len(gm.steps)
        if any(bool((m.mask == 0).any()) for n, m in masked_layers(gm.module) if n in layers):
            step("grow_connections", {"layer": layers, "connections": s.connections, **data})
            train(gm.module, train_data, s.epochs, s.lr, seed + 1)
            row("grow connections", first)
        else:
            row("grow connections", first, "skipped: no connection is missing (the layers are dense)")
    if s.neurons > 0:
        first = len(gm.steps)
        eligible = neuron_layers(gm, layers)
        if eligible:
            step("grow_neurons", {"layer": eligible, "neurons": s.neurons, "pairs": s.pairs, **data})
            train(gm.module, train_data, s.epochs, s.lr, seed + 2)
            row("grow neurons", first)
        else:
            row("grow neurons", first, "skipped: no chosen layer is a masked Linear read by another through an "
                                       "activation")
    for i in range(1, s.prune_steps + 1):
        target = s.sparsity * i / s.prune_steps
        first = len(gm.steps)
        saved = {k: v.detach().clone() for k, v in gm.module.state_dict().items()}
        step("magnitude_prune", {"layer": layers, "sparsity": target})
        train(gm.module, train_data, s.epochs, s.lr, seed + 10 + i)
        entry = row(f"prune {i}/{s.prune_steps}", first)
        accuracy = entry["val_accuracy"]
        if s.min_accuracy is not None and accuracy is not None and accuracy < s.min_accuracy:
            gm.module.load_state_dict(saved)
            entry["note"] = (f"undone: accuracy {accuracy:.4f} < {s.min_accuracy} after retraining; the model of the "
                             "phase before is kept and pruning stops")
            gm.steps[-1]["notes"].append("undone by the NeST driver (accuracy below min_accuracy)")
            break
    return rows


def neuron_layers(gm: GrowModel, layers: list[str]) -> list[str]:
    """The chosen masked Linear layers whose units feed one chosen masked Linear through element-wise ops."""
    out = []
    for name in layers:
        if not isinstance(gm.module.get_submodule(name), MaskedLinear):
            continue
        try:
            consumer = find_consumer(gm, name)
        except NotGrowableError:
            continue
        if consumer in layers and isinstance(gm.module.get_submodule(consumer), MASKED_TYPES):
            out.append(name)
    return out


# --------------------------------------------------------------------------- the command's run
def run_nest(source: Source, outputs: list[Output], settings: NestSettings, data: Path, val: Path, *, seed: int = 0,
             verify: VerifySettings | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Load, run :func:`nest`, write every output (read back and run) and the report; returns the report."""
    started = time.perf_counter()
    verify = verify or VerifySettings()
    if not outputs:
        raise UsageError("nest needs at least one -o OUTPUT")
    inputs = (source.inputs_file, data, val)
    check_distinct([o.path for o in outputs])
    gm = source.load()
    formats = [check_output(gm, o.path, o.format, overwrite=overwrite, inputs=inputs) for o in outputs]
    if formats[0] != "hf":
        check_output_path(report_path(outputs[0].path, formats[0]), (source.path, *inputs), overwrite=overwrite)
    train_data = load_calibration(DataRequest(str(data), settings.loss, None, settings.batch_size), gm.inputs, gm.kind)
    val_data = load_calibration(DataRequest(str(val), train_data.loss, None, settings.batch_size), gm.inputs, gm.kind)
    params_before = gm.num_parameters()
    rows = nest(gm, settings, train_data, val_data, str(data), seed=seed, verify=verify)
    batches = verification_batches(gm, verify, seed)
    with transaction():
        written = save_models(gm, [(o.path, fmt, o.shard_size) for o, fmt in zip(outputs, formats)], batches=batches,
                              settings=verify)
        report = {"input": str(source.path), "phases": rows, "steps": gm.steps, "function_preserving": False,
                  "params_before": params_before, "params_after": gm.num_parameters(), "outputs": written,
                  "data": train_data.describe(), "val": val_data.describe(),
                  "checked": [f"step {i} ({st['transform']}): ran the model before and after the step: "
                              f"{VerifyReport.from_dict(st['verification']).summary()}" for i, st in enumerate(gm.steps, 1)]
                  + [f"read back {o['path']} with {o['loaded_with']}: {VerifyReport.from_dict(o['readback']).summary()}"
                     for o in written if o.get("readback")],
                  "seconds": round(time.perf_counter() - started, 3)}
        write_report(report, outputs[0].path, formats[0])
    return report
