"""growcli column MODEL -o OUT: add a progressive-network column for a new task, old tasks exactly unchanged."""

from __future__ import annotations

from typing import Annotated

import typer

from growcli.cli.options import (AllowMismatch, Arch, ArchKwargs, Atol, Batches, Device, Dtype, Format, InputsFile, InputShape, Json,
                                 Model, Outputs, Overwrite, Quiet, Rtol, SeqLen, Seed, TrustPickle, verify_settings)
from growcli.cli.render import handle_errors, render_grow_report
from growcli.core.errors import UsageError


def register(app: typer.Typer) -> None:
    @app.command("column")
    @handle_errors
    def column_cmd(
        model: Model,
        # The flag of the column transform: help and default are ColumnSpec's (growcli/transforms/column.py),
        # word for word; tests/test_options.py fails when they drift. (Read from the spec, they would import torch.)
        adapter: Annotated[str, typer.Option("--adapter", help="Lateral adapters into a conv layer: 1x1 (a 1×1 conv "
                                             "with the layer's stride, where its output size matches the layer's; "
                                             "else the layer's geometry) or layer (the layer's kernel, stride and "
                                             "padding).")] = "1x1",
        output: Outputs = None, format: Format = None, arch: Arch = None, arch_kwargs: ArchKwargs = None,
        trust_pickle: TrustPickle = False, input_shape: InputShape = None, inputs: InputsFile = None,
        seed: Seed = 0, batches: Batches = 3, seq_len: SeqLen = None, dtype: Dtype = "float64", device: Device = "cpu", atol: Atol = None,
        rtol: Rtol = None, allow_mismatch: AllowMismatch = False, overwrite: Overwrite = False, json_out: Json = False,
        quiet: Quiet = False,  # accepted everywhere; this command shows no progress
    ) -> None:
        """Add a column for a new task (progressive networks): forward(x, task=k); old tasks' outputs stay exact.

        Example: growcli column fixtures/mlp.pt --arch growcli.zoo:mlp -o grown/mlp-2tasks.safetensors
        """
        from growcli.run.runner import Output, Source, Step, grow
        from growcli.transforms.catalog import build_spec

        options = {"adapter": adapter}
        build_spec("column", options)  # every option problem at once, before loading anything
        if not output:
            raise UsageError("column needs at least one -o OUTPUT")
        report = grow(Source(model, arch, arch_kwargs, trust_pickle, input_shape, inputs), [Step("column", options)],
                      [Output(p, format) for p in output], seed=seed,
                      settings=verify_settings(batches, dtype, atol, rtol, allow_mismatch, seq_len=seq_len, device=device),
                      overwrite=overwrite)
        render_grow_report(report, json_out)
