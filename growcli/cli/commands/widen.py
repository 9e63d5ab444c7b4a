"""growcli widen MODEL --layer NAME --to N: exact Net2WiderNet; --heads N / --hidden N|2x for transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from growcli.cli.options import (AllowMismatch, Arch, ArchKwargs, Atol, Batches, Device, Dtype, Format, InputsFile, InputShape, Json,
                                 Model, Outputs, Overwrite, Quiet, Rtol, SeqLen, Seed, TrustPickle, verify_settings)
from growcli.cli.render import byte_progress_bar, console, handle_errors, render_streamed
from growcli.core.errors import UsageError


def register(app: typer.Typer) -> None:
    @app.command("widen")
    @handle_errors
    def widen_cmd(
        model: Model,
        # Flags of the widen transform: help and default are WidenSpec's (growcli/transforms/widen.py), word
        # for word; tests/test_options.py fails when they drift. (Read from the spec, they would import torch.)
        layer: Annotated[Optional[list[str]], typer.Option("--layer", "-l", help="Module name, dotted suffix, glob or "
                                                           "regex; a list grows several layers. Repeat --layer for "
                                                           "a list.")] = None,
        to: Annotated[Optional[int], typer.Option("--to", help="New number of units/channels.")] = None,
        by: Annotated[Optional[int], typer.Option("--by", help="Number of units/channels to add.")] = None,
        factor: Annotated[Optional[float], typer.Option("--factor", help="Multiply the number of units by F.")] = None,
        init: Annotated[str, typer.Option("--init", help="net2net (copy units, split outgoing weights), zero (random "
                                          "incoming, zero outgoing weights), gradmax (zero incoming, outgoing from "
                                          "the gradient on data) or firefly (the best new or split units by their "
                                          "loss decrease on data).")] = "net2net",
        split: Annotated[str, typer.Option("--split", help="asymmetric (random shares summing to 1) or uniform.")] = "asymmetric",
        noise: Annotated[float, typer.Option("--noise", help="Net2Net noise on the copies' incoming weights (relative "
                                             "to the weights' std); makes the step approximate.")] = 0.0,
        scale: Annotated[float, typer.Option("--scale", help="gradmax: new outgoing weights' norm relative to the mean "
                                             "of the existing ones.")] = 0.5,
        data: Annotated[Optional[Path], typer.Option("--data", help="gradmax, firefly: calibration data, .safetensors/.pt with "
                                                     "'input' and 'target'. See growcli suggest --help.")] = None,
        loss: Annotated[str, typer.Option("--loss", help="gradmax, firefly: auto, cross_entropy, mse or "
                                           "model.")] = "auto",
        data_batches: Annotated[Optional[int], typer.Option("--data-batches", min=1, help="gradmax, firefly: use only the first "
                                                            "N calibration batches.")] = None,
        batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="gradmax, firefly: samples per "
                                                          "calibration batch (default 32).")] = None,
        candidates: Annotated[int, typer.Option("--candidates", min=0, help="firefly: new units with random incoming "
                                                "weights scored per layer (besides a split of every existing "
                                                "unit).")] = 32,
        budget: Annotated[Optional[int], typer.Option("--budget", min=1, help="firefly: new units shared among all the "
                                                      "layers by score, instead of to, by or factor per layer. Repeat "
                                                      "--layer to name the layers.")] = None,
        eps: Annotated[float, typer.Option("--eps", help="firefly: the candidates' step ε, relative to the existing "
                                           "weights' norms (new units' outgoing weights, splits' offsets); scores are "
                                           "the loss decrease predicted at ε.")] = 0.1,
        firefly_steps: Annotated[int, typer.Option("--firefly-steps", min=0, help="firefly: gradient steps on the kept "
                                                   "candidates' ε after selection; 0 keeps ε = 0 (exact), more makes "
                                                   "the step approximate.")] = 0,
        firefly_lr: Annotated[float, typer.Option("--firefly-lr", help="firefly: learning rate of the steps on ε "
                                                  "(halved when a step raises the loss).")] = 1.0,
        # Flags that drive the heads and hidden transforms (renamed: see tests/test_options.py).
        heads: Annotated[Optional[int], typer.Option("--heads", help="Transformers: grow every attention to N query heads "
                                                     "(whole heads, head_dim kept; with --hidden: heads after it).")] = None,
        hidden: Annotated[Optional[str], typer.Option("--hidden", help="Transformers: grow the hidden size to N, or by a "
                                                      "factor like 2x (every embedding, norm and projection on the "
                                                      "residual stream).")] = None,
        pair_noise: Annotated[float, typer.Option("--pair-noise", help="With --hidden: +N/-N noise on paired tiles of the "
                                                  "matrices reading the hidden states (exact; breaks symmetry).")] = 0.0,
        streaming: Annotated[Optional[bool], typer.Option("--streaming/--no-streaming", help="Widen a Hugging Face "
                             "directory tensor by tensor without loading it (default: above 1 GiB).")] = None,
        shard_size: Annotated[Optional[str], typer.Option("--shard-size", help="Largest weights file of the output "
                              "directory (default when streaming: 5GB).")] = None,
        output: Outputs = None, format: Format = None, arch: Arch = None, arch_kwargs: ArchKwargs = None,
        trust_pickle: TrustPickle = False, input_shape: InputShape = None, inputs: InputsFile = None,
        seed: Seed = 0, batches: Batches = 3, seq_len: SeqLen = None, dtype: Dtype = "float64", device: Device = "cpu", atol: Atol = None, rtol: Rtol = None,
        allow_mismatch: AllowMismatch = False, overwrite: Overwrite = False, json_out: Json = False,
        quiet: Quiet = False,
    ) -> None:
        """Widen a layer's units or channels; the grown model computes the same function.

        Example: growcli widen model.pt2 --layer fc1 --to 512 -o grown.safetensors
        (transformers: growcli widen llama/ --hidden 2x --heads 16 -o grown/ ; growcli widen llama/ --heads 8 -o grown/)
        (gradmax: growcli widen model.pt2 --layer fc1 --by 8 --init gradmax --data calib.safetensors -o grown.safetensors)
        (firefly: growcli widen model.pt2 --layer fc1 --layer fc2 --budget 8 --init firefly --data calib.safetensors -o g.safetensors)
        (streaming: growcli widen llama/ --hidden 2x --streaming --shard-size 2GB -o grown/ ; above 1 GiB by default)
        """
        from growcli.run.runner import Output, Source, Step, grow
        from growcli.run.streaming import parse_shard_size

        if not output:
            raise UsageError("widen needs at least one -o OUTPUT")
        if not layer and heads is None and hidden is None:
            raise UsageError("widen needs --layer NAME, --heads N or --hidden N")
        if not layer and (to, by, factor, budget) != (None, None, None, None):
            raise UsageError("--to, --by, --factor and --budget size the --layer; --heads and --hidden take their own sizes")
        steps = _transformer_steps(heads, hidden, pair_noise, split)
        selector = (layer[0] if len(layer) == 1 else list(layer)) if layer else None
        options = {"layer": selector, "to": to, "by": by, "factor": factor,
                   "init": init, "split": split, "noise": noise, "scale": scale,
                   "data": str(data) if data is not None else None, "loss": loss, "data_batches": data_batches,
                   "batch_size": batch_size, "budget": budget}
        size = parse_shard_size(shard_size) if shard_size is not None else None
        if layer and init in ("gradmax", "firefly") and streaming is None:
            streaming = False  # their gradients on calibration data need the model in memory, whatever its size
        firefly = {"candidates": candidates, "eps": eps, "firefly_steps": firefly_steps, "firefly_lr": firefly_lr}
        # only for init firefly, or when set (so the spec can refuse them for another init)
        options.update({k: v for k, v in firefly.items() if init == "firefly" or v != _FIREFLY_DEFAULTS[k]})
        with byte_progress_bar(console(quiet, json_out), "widening") as advance:
            report = grow(Source(model, arch, arch_kwargs, trust_pickle, input_shape, inputs),
                          ([Step("widen", {k: v for k, v in options.items() if v is not None})] if layer else []) + steps,
                          [Output(p, format, size) for p in output], seed=seed,
                          settings=verify_settings(batches, dtype, atol, rtol, allow_mismatch, seq_len=seq_len, device=device),
                          overwrite=overwrite, protect=(data,) if data is not None else (), streaming=streaming,
                          progress=advance)
        render_streamed(report, json_out)


_FIREFLY_DEFAULTS = {"candidates": 32, "eps": 0.1, "firefly_steps": 0, "firefly_lr": 1.0}


def _transformer_steps(heads: int | None, hidden: str | None, pair_noise: float, split: str) -> list:
    """The ``hidden``/``heads`` steps for ``--hidden N|Fx`` and ``--heads N``."""
    from growcli.run.runner import Step

    if hidden is None:
        if pair_noise:
            raise UsageError("--pair-noise applies to --hidden")
        return [Step("heads", {"to": heads, "split": split})] if heads is not None else []
    text = hidden.strip().lower()
    try:
        size = {"factor": float(text[:-1])} if text.endswith("x") else {"to": int(text)}
    except ValueError:
        raise UsageError(f"--hidden {hidden!r}: expected a size like 1024 or a factor like 2x") from None
    options = {**size, "noise": pair_noise, "split": split}
    if heads is not None:
        options["heads"] = heads
    return [Step("hidden", options)]
