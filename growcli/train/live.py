"""Grow a live ``nn.Module`` in place, mid-training, with its optimizer: :func:`grow_`.

The same registered transforms and the same verification as the offline commands: each step
runs through :func:`growcli.run.steps.run_step`, which compares the model before and after on
the given inputs (and generated batches). What is added for a model in training:

- the module object and every unchanged parameter keep their identity (no re-wrapping needed
  for a plain optimizer; DDP must be re-wrapped because its buckets hold the old parameters);
- the optimizer, when given, holds the new parameters with their state grown by the weights'
  own map (:mod:`growcli.train.optim`); learning-rate schedulers keep their place since they
  only read the param groups' ``lr``;
- train/eval mode is what it was before the step;
- a failed step leaves the model exactly as it was, the same parameter objects included.

Returns a :class:`LiveReport` with the step reports, what happened to the optimizer, and
``new_mask``: per parameter, which positions are new (for users who freeze the old weights,
as LLaMA-Pro does with its inserted blocks).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from growcli.analysis.calibration import attach as attach_calibration, from_tensors
from growcli.core.errors import NotGrowableError
from growcli.core.inputs import Batch, InputSpec, make_batches, spec_from_batch
from growcli.core.model import GrowModel
from growcli.run.steps import VerifySettings, run_step
from growcli.train.optim import Carried, carry_optimizer, check_optimizer, new_positions
from growcli.transforms.registry import Context


@dataclass
class LiveReport:
    steps: list[dict[str, Any]]
    optimizer: dict[str, Any] | None
    params_before: int
    params_after: int
    new_mask: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    edits: list[dict[str, Any]] = field(default_factory=list, repr=False)  # the structural edits, for replay

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "optimizer": self.optimizer, "params_before": self.params_before,
                "params_after": self.params_after}


def as_batch(example: Any) -> Batch | None:
    """A model input as ``(args, kwargs)``: a tensor, a tuple/list of tensors, or a dict of keyword tensors."""
    if example is None:
        return None
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, (tuple, list)) and len(example) == 2 and isinstance(example[1], dict):
        return tuple(example[0]), dict(example[1])
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    raise TypeError(f"example_inputs: expected a tensor, a tuple of tensors or a dict, got {type(example).__name__}")


def steps_of(step_or_plan: Any, options: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``"widen"`` + options, ``{"transform": ..., "options": ...}``, or a list of such."""
    if isinstance(step_or_plan, str):
        return [(step_or_plan, dict(options))]
    if options:
        raise TypeError("keyword options go with a transform name: grow_(model, 'widen', layer='fc1', by=4)")
    if isinstance(step_or_plan, dict):
        return [(step_or_plan["transform"], dict(step_or_plan.get("options") or {}))]
    if isinstance(step_or_plan, (list, tuple)):
        return [s for item in step_or_plan for s in steps_of(item, {})]
    raise TypeError(f"grow_: expected a transform name, a step dict or a list of them, got {type(step_or_plan).__name__}")


def live_model(model: nn.Module, example: Batch | None) -> GrowModel:
    """A :class:`GrowModel` around a module in memory (a Hugging Face model is recognised by its config)."""
    config = getattr(model, "config", None)
    is_hf = config is not None and hasattr(config, "to_dict") and hasattr(config, "model_type")
    if example is not None:
        inputs = spec_from_batch(example)
    elif is_hf:
        from growcli.io.hf_dir import hf_input_spec

        inputs = hf_input_spec(model)
    else:
        from growcli.io.weights import infer_input_spec

        inputs = infer_input_spec(model)
    kind = "hf" if is_hf else "pickle"
    hf_class = type(model).__name__ if is_hf else None
    return GrowModel(model, kind, Path("<live model>"), "", inputs or InputSpec(), hf_class=hf_class)


def grow_(model: nn.Module, step_or_plan: Any, optimizer: torch.optim.Optimizer | None = None,
          example_inputs: Any = None, *, seed: int = 0, settings: VerifySettings | None = None,
          **options: Any) -> LiveReport:
    """Grow ``model`` in place by one or more registered transforms, each verified; see the module docstring.

    ``example_inputs`` (a held-out batch) is compared first, then generated batches of its shape.
    Raises :class:`growcli.core.errors.VerificationFailed` if an exact step changed the function
    (the model and optimizer are then as before).
    """
    example = as_batch(example_inputs)
    if optimizer is not None:
        check_optimizer(optimizer)
    gm = live_model(model, example)
    settings = settings or VerifySettings()
    if example is not None and settings.inputs is None:
        settings = dataclasses.replace(settings, inputs=[example] + make_batches(gm.inputs, settings.batches, seed)[1:])
    was_training = model.training
    before = dict(model.named_parameters(remove_duplicate=False))
    snapshot = _snapshot(model)
    ctx = Context(seed=seed)
    params_before = gm.num_parameters()
    reports = []
    config = getattr(model, "config", None) if gm.is_hf else None
    use_cache = getattr(config, "use_cache", None)
    if use_cache:  # caches are for generation; tracing and verification run whole sequences
        config.use_cache = False
    steps = [(name, _with_data(ctx, gm, opts)) for name, opts in steps_of(step_or_plan, options)]
    # calibration files named by gradient-informed steps (in-memory data is already in ctx.data)
    attach_calibration(ctx, gm, [opts for _, opts in steps if opts.get("data") not in ctx.data])
    try:
        for name, opts in steps:
            reports.append(run_step(gm, name, opts, ctx, settings, restore=False).to_dict())
            if gm.module is not model:  # e.g. column: the grown model is a new root holding this one
                raise NotGrowableError(f"{name} makes a new root module around the model, and grow_ grows the "
                                       "model you hold in place; use growcli.apply on a GrowModel instead")
    except BaseException:
        _restore(snapshot)
        raise
    finally:
        model.train(was_training)
        if use_cache:
            config.use_cache = use_cache
    after = dict(model.named_parameters(remove_duplicate=False))
    derived = gm.edits.derived
    carried: Carried | None = carry_optimizer(optimizer, before, after, derived) if optimizer is not None else None
    kept = {id(p) for p in before.values()}
    mask = {n: new_positions(derived.get(id(p)), p.shape) for n, p in after.items() if id(p) not in kept}
    return LiveReport(reports, carried.to_dict() if carried else None, params_before, gm.num_parameters(), mask,
                      list(gm.edits.records))


def _with_data(ctx: Context, gm: GrowModel, options: dict[str, Any]) -> dict[str, Any]:
    """Calibration data given in memory (``data={"input": x, "target": y}``) instead of a file name."""
    data = options.get("data")
    if not isinstance(data, dict):
        return options
    name = f"in-memory data {len(ctx.data)}"
    ctx.data[name] = from_tensors(data, gm.inputs, loss=options.get("loss", "auto"), batch_size=options.get("batch_size"),
                                  max_batches=options.get("data_batches"), source="in-memory calibration data")
    return {**options, "data": name}


def _snapshot(model: nn.Module) -> tuple[list, list]:
    """Every submodule's attributes, parameters, buffers and children, the parameters' values, and
    the attributes of every (Hugging Face) config object a module holds (growth edits configs)."""
    out, configs = [], {}
    for m in model.modules():
        values = {k: (p.detach().clone(), p.requires_grad) for k, p in m._parameters.items() if p is not None}
        out.append((m, dict(vars(m)), dict(m._parameters), dict(m._buffers), dict(m._modules), values))
        config = vars(m).get("config")
        if config is not None and hasattr(config, "to_dict") and id(config) not in configs:
            configs[id(config)] = (config, copy.deepcopy(vars(config)))
    return out, list(configs.values())


def _restore(snapshot) -> None:
    """Undo a failed step: the same module, parameter and config objects, with their old values."""
    modules, configs = snapshot
    for config, attrs in configs:
        vars(config).clear()
        vars(config).update(attrs)
    for m, attrs, params, buffers, children, values in modules:
        vars(m).clear()
        vars(m).update(attrs)
        m._parameters.clear()
        m._parameters.update(params)
        m._buffers.clear()
        m._buffers.update(buffers)
        m._modules.clear()
        m._modules.update(children)
        with torch.no_grad():
            for k, (v, requires_grad) in values.items():
                params[k].requires_grad_(requires_grad)
                if params[k].shape == v.shape:
                    params[k].copy_(v)
