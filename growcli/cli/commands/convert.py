"""growcli convert MODEL -o OUT: load → verify → save, no growth (a format round trip)."""

from __future__ import annotations

import typer

from growcli.cli.options import (AllowMismatch, Arch, ArchKwargs, Atol, Batches, Device, Dtype, Format, InputsFile, InputShape,
                                 Json, Model, Outputs, Overwrite, Quiet, Rtol, SeqLen, Seed, TrustPickle, verify_settings)
from growcli.cli.render import handle_errors, render_grow_report, status
from growcli.core.errors import UsageError


def register(app: typer.Typer) -> None:
    @app.command("convert")
    @handle_errors
    def convert_cmd(model: Model, output: Outputs = None, format: Format = None, arch: Arch = None,
                    arch_kwargs: ArchKwargs = None, trust_pickle: TrustPickle = False, input_shape: InputShape = None,
                    inputs: InputsFile = None, seed: Seed = 0, batches: Batches = 3, seq_len: SeqLen = None, dtype: Dtype = "float64", device: Device = "cpu",
                    atol: Atol = None, rtol: Rtol = None, allow_mismatch: AllowMismatch = False,
                    overwrite: Overwrite = False, json_out: Json = False, quiet: Quiet = False) -> None:
        """Write a checkpoint in other formats and check each one computes the same function.

        Each output is loaded back from disk (before it is moved into place) the way its user
        would load it and run against the source model on the verification batches; the
        reported verification is the first output's. Any difference exits 3 and writes nothing.

        Example: growcli convert fixtures/mlp.pt2 -o mlp.safetensors -o mlp.onnx
        """
        from growcli.run.runner import Output, Source, grow

        if not output:
            raise UsageError("convert needs at least one -o OUTPUT")
        settings = verify_settings(batches, dtype, atol, rtol, allow_mismatch, seq_len=seq_len, device=device)
        with status(f"converting {model}", quiet, json_out):
            report = grow(Source(model, arch, arch_kwargs, trust_pickle, input_shape, inputs), [],
                          [Output(p, format) for p in output], seed=seed, settings=settings, overwrite=overwrite)
        render_grow_report(report, json_out)
        if not json_out:
            # No steps: the model in memory is the source as loaded, so each read-back is the
            # written file run against the source (the report's verification is the first one's).
            for out in report["outputs"]:
                rb = out.get("readback")
                if out.get("loaded_with") and rb and out["format"] != "onnx":
                    typer.echo(f"read back {out['path']} with {out['loaded_with']}: equal to the source in "
                               f"{rb['dtype']} over {rb['batches']} batches, max abs diff {out['max_abs_diff']:.3g}")
