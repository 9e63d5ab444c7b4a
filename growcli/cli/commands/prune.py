"""growcli prune MODEL --layer NAME [--to N | --remove I ...]: remove dead or duplicate units exactly, or by magnitude."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from growcli.cli.options import (AllowMismatch, Arch, ArchKwargs, Atol, Batches, Device, Dtype, Format, InputsFile, InputShape, Json,
                                 Model, Outputs, Overwrite, Quiet, Rtol, SeqLen, Seed, TrustPickle, verify_settings)
from growcli.cli.render import handle_errors, render_grow_report
from growcli.core.errors import UsageError


def register(app: typer.Typer) -> None:
    @app.command("prune")
    @handle_errors
    def prune_cmd(
        model: Model,
        # Flags of the prune transform: help and default are PruneSpec's (growcli/transforms/prune.py), word
        # for word; tests/test_options.py fails when they drift. (Read from the spec, they would import torch.)
        layer: Annotated[list[str], typer.Option("--layer", "-l", help="Module name, dotted suffix, glob or regex; a "
                                                 "list prunes several layers. Repeat --layer for a list.")],
        to: Annotated[Optional[int], typer.Option("--to", help="Keep N units (default with criterion exact: remove "
                                                  "every dead or duplicate unit).")] = None,
        remove: Annotated[Optional[list[int]], typer.Option("--remove", help="Indices of the units to remove (one "
                                                            "layer only). Repeat --remove for a list.")] = None,
        criterion: Annotated[str, typer.Option("--criterion", help="exact (only dead units, and duplicates merged into "
                                               "a twin) or magnitude (the smallest ‖incoming‖·‖outgoing‖; "
                                               "approximate).")] = "exact",
        output: Outputs = None, format: Format = None, arch: Arch = None, arch_kwargs: ArchKwargs = None,
        trust_pickle: TrustPickle = False, input_shape: InputShape = None, inputs: InputsFile = None,
        seed: Seed = 0, batches: Batches = 3, seq_len: SeqLen = None, dtype: Dtype = "float64", device: Device = "cpu", atol: Atol = None, rtol: Rtol = None,
        allow_mismatch: AllowMismatch = False, overwrite: Overwrite = False, json_out: Json = False,
        quiet: Quiet = False,  # accepted everywhere; this command shows no progress
    ) -> None:
        """Remove units or channels: dead ones and duplicates exactly (widen's inverse), or the smallest by magnitude.

        Example: growcli prune grown.safetensors --arch growcli.zoo:mlp --layer fc1 -o pruned.safetensors
        (approximate: growcli prune model.pt2 --layer fc1 --to 24 --criterion magnitude -o pruned.safetensors)
        """
        from growcli.run.runner import Output, Source, Step, grow
        from growcli.transforms.catalog import build_spec

        options = {"layer": layer[0] if len(layer) == 1 else list(layer), "to": to,
                   "remove": list(remove) if remove else None, "criterion": criterion}
        options = {k: v for k, v in options.items() if v is not None}
        build_spec("prune", options)  # every option problem at once, before loading anything
        if not output:
            raise UsageError("prune needs at least one -o OUTPUT")
        report = grow(Source(model, arch, arch_kwargs, trust_pickle, input_shape, inputs), [Step("prune", options)],
                      [Output(p, format) for p in output], seed=seed,
                      settings=verify_settings(batches, dtype, atol, rtol, allow_mismatch, seq_len=seq_len, device=device), overwrite=overwrite)
        render_grow_report(report, json_out)
