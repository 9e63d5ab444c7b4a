"""growcli stack MODEL -o OUT: progressive stacking of repeated blocks, in memory or streaming."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from growcli.cli.options import (AllowMismatch, Arch, ArchKwargs, Atol, Batches, Device, Dtype, Format, InputsFile, InputShape,
                                 Json, Model, Outputs, Overwrite, Quiet, Rtol, SeqLen, Seed, TrustPickle, verify_settings)
from growcli.cli.render import byte_progress_bar, console, handle_errors, render_streamed
from growcli.core.errors import UsageError


def register(app: typer.Typer) -> None:
    @app.command("stack")
    @handle_errors
    def stack_cmd(
        model: Model,
        blocks: Annotated[Optional[str], typer.Option("--blocks", help="The ModuleList of blocks (default: the longest "
                                                      "list of same-typed blocks).")] = None,
        factor: Annotated[Optional[int], typer.Option("--factor", help="Multiply the number of blocks by K (default 2).")] = None,
        to: Annotated[Optional[int], typer.Option("--to", help="Grow the stack to N blocks.")] = None,
        order: Annotated[str, typer.Option("--order", help="stack (1..L, 1..L) or interleave (1,1,2,2,…).")] = "stack",
        layers: Annotated[Optional[str], typer.Option("--layers", help="Explicit source block per new position, "
                                                      "e.g. 0-11,4-11 (depth up-scaling).")] = None,
        init: Annotated[str, typer.Option("--init", help="copy (progressive stacking; changes the function) or identity "
                                          "(new copies' residual writers zeroed; exact for pre-LN).")] = "copy",
        streaming: Annotated[Optional[bool], typer.Option("--streaming/--no-streaming", help="Stack a Hugging Face "
                             "directory tensor by tensor without loading it (default: above 1 GiB).")] = None,
        shard_size: Annotated[Optional[str], typer.Option("--shard-size", help="Largest weights file of the output "
                              "directory (default when streaming: 5GB).")] = None,
        output: Outputs = None, format: Format = None, arch: Arch = None, arch_kwargs: ArchKwargs = None,
        trust_pickle: TrustPickle = False, input_shape: InputShape = None, inputs: InputsFile = None,
        seed: Seed = 0, batches: Batches = 3, seq_len: SeqLen = None, dtype: Dtype = "float64", device: Device = "cpu", atol: Atol = None, rtol: Rtol = None,
        allow_mismatch: AllowMismatch = False, overwrite: Overwrite = False, json_out: Json = False,
        quiet: Quiet = False,
    ) -> None:
        """Duplicate a model's stack of repeated blocks (progressive stacking, depth up-scaling).

        Example: growcli stack fixtures/llama-tiny --factor 2 --init identity -o llama-4-layers/
        """
        from growcli.run.runner import Output, Source, Step, grow
        from growcli.run.streaming import parse_shard_size
        from growcli.transforms.catalog import build_spec

        if not output:
            raise UsageError("stack needs an output: -o OUTPUT")
        options = {k: v for k, v in {"blocks": blocks, "factor": factor, "to": to, "order": order, "layers": layers,
                                     "init": init, "allow_inexact": allow_mismatch}.items() if v is not None}
        build_spec("stack", options)  # every option problem is reported before anything is loaded
        settings = verify_settings(batches, dtype, atol, rtol, allow_mismatch, seq_len=seq_len, device=device)
        size = parse_shard_size(shard_size) if shard_size is not None else None
        outputs = [Output(p, format, size) for p in output]
        with byte_progress_bar(console(quiet, json_out), "stacking") as advance:
            report = grow(Source(model, arch, arch_kwargs, trust_pickle, input_shape, inputs), [Step("stack", options)],
                          outputs, seed=seed, settings=settings, overwrite=overwrite, streaming=streaming,
                          progress=advance)
        render_streamed(report, json_out)
