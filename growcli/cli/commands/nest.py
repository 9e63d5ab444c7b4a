"""growcli nest MODEL --layer L --data TRAIN --val VAL --sparsity S -o OUT: NeST grow-and-prune with training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from growcli.cli.options import (AllowMismatch, Arch, ArchKwargs, Atol, Batches, Device, Dtype, Format, InputsFile, InputShape, Json,
                                 Model, Outputs, Overwrite, Quiet, Rtol, SeqLen, Seed, TrustPickle, verify_settings)
from growcli.cli.render import emit_json, handle_errors


def register(app: typer.Typer) -> None:
    @app.command("nest")
    @handle_errors
    def nest_cmd(
        model: Model,
        # Flags of the mask, grow_connections, grow_neurons and magnitude_prune transforms: help and default are
        # their specs' (growcli/transforms/nest.py, nest_neurons.py), word for word; tests/test_options.py checks them.
        layer: Annotated[list[str], typer.Option("--layer", "-l", help="Module name, dotted suffix, glob or regex; a "
                                                 "list selects several layers. Repeat --layer for a list.")],
        data: Annotated[Path, typer.Option("--data", help="Calibration data, .safetensors/.pt with 'input' and "
                                           "'target' (the gradient comes from it). nest also trains on it.")],
        sparsity: Annotated[float, typer.Option("--sparsity", help="Fraction of each layer's connections missing "
                                                "(mask 0) after pruning, in [0, 1); the smallest |w| go first. "
                                                "nest reaches it in --prune-steps equal steps.")],
        val: Annotated[Path, typer.Option("--val", help="Validation data (same keys as --data): accuracy and loss "
                                          "after every phase.")],
        connections: Annotated[float, typer.Option("--connections", help="Fraction of each layer's missing "
                                                   "connections to grow: those with the largest |∂L/∂w| on the data "
                                                   "(NeST's top percentile); they start at weight 0. 0 skips "
                                                   "connection growth.")] = 0.1,
        neurons: Annotated[int, typer.Option("--neurons", min=0, help="New units per layer, each connected to the "
                                             "(input, output) pairs with the largest |δ_m x_n| on the data; outgoing "
                                             "weights start at 0 (exact). 0 skips neuron growth.")] = 1,
        pairs: Annotated[float, typer.Option("--pairs", help="Fraction of a layer's (input, output) pairs, largest "
                                             "|δ_m x_n| first, that new units may connect (NeST's top "
                                             "percentile).")] = 0.05,
        dense: Annotated[bool, typer.Option("--dense", help="Start from a mask of ones; by default weights that are "
                                            "exactly zero start masked out (missing connections).")] = False,
        loss: Annotated[str, typer.Option("--loss", help="auto, cross_entropy, mse or model.")] = "auto",
        data_batches: Annotated[Optional[int], typer.Option("--data-batches", min=1, help="Use only the first N "
                                                            "calibration batches. (Training uses them all.)")] = None,
        batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Samples per calibration batch "
                                                          "(default 32). Training uses the same batches.")] = None,
        # The driver's own options (growcli/train/nest.py).
        epochs: Annotated[int, typer.Option("--epochs", min=0, help="Training epochs after each growth and each "
                                            "pruning step (Adam).")] = 2,
        lr: Annotated[float, typer.Option("--lr", help="Adam's learning rate.")] = 0.01,
        prune_steps: Annotated[int, typer.Option("--prune-steps", min=1, help="Pruning steps to reach --sparsity, "
                                                 "each followed by retraining.")] = 3,
        min_accuracy: Annotated[Optional[float], typer.Option("--min-accuracy", help="Stop pruning when the "
                                                              "retrained validation accuracy falls below A, undoing "
                                                              "that step.")] = None,
        output: Outputs = None, format: Format = None, arch: Arch = None, arch_kwargs: ArchKwargs = None,
        trust_pickle: TrustPickle = False, input_shape: InputShape = None, inputs: InputsFile = None,
        seed: Seed = 0, batches: Batches = 3, seq_len: SeqLen = None, dtype: Dtype = "float64", device: Device = "cpu", atol: Atol = None, rtol: Rtol = None,
        allow_mismatch: AllowMismatch = False, overwrite: Overwrite = False, json_out: Json = False,
        quiet: Quiet = False,  # accepted everywhere; this command shows no progress
    ) -> None:
        """NeST: mask layers, grow connections and neurons by gradient, prune by magnitude; train between phases.

        Every growth step is exact and verified; pruning is measured. Prints one row per phase.

        Example: growcli nest mlp.pt --arch growcli.zoo:mlp --layer fc1 --layer fc2 --data train.safetensors --val val.safetensors --sparsity 0.8 -o sparse.safetensors
        (outputs keep their masks: -o sparse.pt2 -o sparse.onnx; run nest again on sparse.safetensors to regrow connections)
        """
        from growcli.run.runner import Output, Source
        from growcli.train.nest import NestSettings, run_nest

        settings = NestSettings(layer=layer[0] if len(layer) == 1 else list(layer), sparsity=sparsity,
                                connections=connections, neurons=neurons, pairs=pairs, dense=dense, loss=loss,
                                data_batches=data_batches, batch_size=batch_size, epochs=epochs, lr=lr,
                                prune_steps=prune_steps, min_accuracy=min_accuracy)
        report = run_nest(Source(model, arch, arch_kwargs, trust_pickle, input_shape, inputs),
                          [Output(p, format) for p in output or []], settings, data, val, seed=seed,
                          verify=verify_settings(batches, dtype, atol, rtol, allow_mismatch, seq_len=seq_len, device=device),
                          overwrite=overwrite)
        if json_out:
            emit_json(report)
        else:
            typer.echo(phase_table(report["phases"]))
            for o in report["outputs"]:
                typer.echo(f"wrote {o['path']} ({o['format']}, read back with {o['loaded_with']})")


def phase_table(rows: list[dict]) -> str:
    """The phases as a fixed-width text table: phase, parameters, nonzero, sparsity, val accuracy, val loss."""
    head = ("phase", "parameters", "nonzero", "sparsity", "val acc", "val loss")
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    lines = [(r["phase"], str(r["parameters"]), str(r["nonzero"]), fmt(r["sparsity"], ".3f"),
              fmt(r["val_accuracy"], ".4f"), fmt(r["val_loss"], ".4f")) for r in rows]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in [head, *lines]]
    notes = [f"  {r['phase']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(out + notes)
