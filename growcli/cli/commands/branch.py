"""growcli branch MODEL --layer NAME --merge add|concat: replace a layer or block by parallel branches."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from growcli.cli.options import (AllowMismatch, Arch, ArchKwargs, Atol, Batches, Device, Dtype, Format, InputsFile, InputShape, Json,
                                 Model, Outputs, Overwrite, Quiet, Rtol, SeqLen, Seed, TrustPickle, verify_settings)
from growcli.cli.render import handle_errors, render_grow_report
from growcli.core.errors import UsageError


def register(app: typer.Typer) -> None:
    @app.command("branch")
    @handle_errors
    def branch_cmd(
        model: Model,
        # Flags of the branch transform: help and default are BranchSpec's (growcli/transforms/branch.py), word
        # for word; tests/test_options.py fails when they drift. (Read from the spec, they would import torch.)
        layer: Annotated[list[str], typer.Option("--layer", "-l", help="Layer or block to branch (a Linear, a Conv, "
                                                 "or a module returning one tensor): name, dotted suffix, glob or "
                                                 "regex; a list branches each. Repeat --layer for a list.")],
        merge: Annotated[str, typer.Option("--merge", help="add (copies whose outputs are summed with merge weights "
                                           "that sum to 1) or concat (each branch computes its share of the output "
                                           "channels; the shares are concatenated).")],
        branches: Annotated[int, typer.Option("--branches", "-n", help="Number of branches (at least 2).")] = 2,
        weights: Annotated[Optional[list[float]], typer.Option("--weights", help="add only: merge weights, one per "
                                                               "branch, positive, summing to 1 (default: 1/N each; "
                                                               "powers of two such as 0.5, 0.25, 0.25 are exact in "
                                                               "every dtype). Repeat --weights, one per branch.")] = None,
        sizes: Annotated[Optional[list[int]], typer.Option("--sizes", help="concat only: output channels of each "
                                                           "branch (default: as even as possible). Repeat --sizes, "
                                                           "one per branch.")] = None,
        output: Outputs = None, format: Format = None, arch: Arch = None, arch_kwargs: ArchKwargs = None,
        trust_pickle: TrustPickle = False, input_shape: InputShape = None, inputs: InputsFile = None,
        seed: Seed = 0, batches: Batches = 3, seq_len: SeqLen = None, dtype: Dtype = "float64", device: Device = "cpu", atol: Atol = None, rtol: Rtol = None,
        allow_mismatch: AllowMismatch = False, overwrite: Overwrite = False, json_out: Json = False,
        quiet: Quiet = False,  # accepted everywhere; this command shows no progress
    ) -> None:
        """Branch a layer or block: N parallel paths, added or concatenated; the grown model computes the same function.

        Example: growcli branch fixtures/cnn.pt --arch growcli.zoo:cnn --layer conv2 --merge concat -o grown.safetensors
        """
        from growcli.run.runner import Output, Source, Step, grow
        from growcli.transforms.catalog import build_spec

        options = {"layer": layer[0] if len(layer) == 1 else list(layer), "merge": merge, "branches": branches,
                   "weights": list(weights) if weights else None, "sizes": list(sizes) if sizes else None}
        options = {k: v for k, v in options.items() if v is not None}
        build_spec("branch", options)  # every option problem at once, before loading anything
        if not output:
            raise UsageError("branch needs at least one -o OUTPUT")
        report = grow(Source(model, arch, arch_kwargs, trust_pickle, input_shape, inputs), [Step("branch", options)],
                      [Output(p, format) for p in output], seed=seed,
                      settings=verify_settings(batches, dtype, atol, rtol, allow_mismatch, seq_len=seq_len, device=device), overwrite=overwrite)
        render_grow_report(report, json_out)
