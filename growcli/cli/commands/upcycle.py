"""growcli upcycle MODEL --experts E --top-k K -o OUT: dense FFNs → mixture of experts, in memory or streaming."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from growcli.cli.options import (AllowMismatch, Atol, Batches, Device, Dtype, Format, InputsFile, Json, Model, Outputs,
                                 Overwrite, Quiet, Rtol, SeqLen, Seed, verify_settings)
from growcli.cli.render import byte_progress_bar, console, handle_errors, render_streamed
from growcli.core.errors import UsageError


def register(app: typer.Typer) -> None:
    @app.command("upcycle")
    @handle_errors
    def upcycle_cmd(
        model: Model,
        experts: Annotated[Optional[int], typer.Option("--experts", help="Number of experts E in every MoE layer "
                           "(each starts as a copy of the dense FFN).")] = None,
        top_k: Annotated[Optional[int], typer.Option("--top-k", help="Experts each token is routed to (1 ≤ K ≤ E).")] = None,
        shared: Annotated[bool, typer.Option("--shared", help="Keep the dense FFN as the target's shared expert "
                          "(Qwen2-MoE) and start the routed experts at zero output: exact whatever the router.")] = False,
        router: Annotated[str, typer.Option("--router", help="Router init: zero (all experts tie), normal (N(0, "
                          "initializer_range²)), or auto (normal where that is exact: --shared or top-k 1; zero "
                          "otherwise).")] = "auto",
        noise: Annotated[float, typer.Option("--noise", help="Gaussian noise on every expert copy, times each weight "
                         "matrix's standard deviation (breaks the experts' symmetry; approximate unless --shared).")] = 0.0,
        drop: Annotated[float, typer.Option("--drop", help="Drop-Upcycling: fraction of each expert's FFN units "
                        "re-initialised from the dense weights' mean and std (approximate unless --shared).")] = 0.0,
        streaming: Annotated[Optional[bool], typer.Option("--streaming/--no-streaming", help="Upcycle a Hugging Face "
                             "directory tensor by tensor without loading it (default: above 1 GiB).")] = None,
        shard_size: Annotated[Optional[str], typer.Option("--shard-size", help="Largest weights file of the output "
                              "directory (default when streaming: 5GB).")] = None,
        output: Outputs = None, format: Format = None, inputs: InputsFile = None,
        seed: Seed = 0, batches: Batches = 3, seq_len: SeqLen = None, dtype: Dtype = "float64", device: Device = "cpu", atol: Atol = None,
        rtol: Rtol = None, allow_mismatch: AllowMismatch = False, overwrite: Overwrite = False, json_out: Json = False,
        quiet: Quiet = False,
    ) -> None:
        """Turn every dense FFN of a Hugging Face decoder into a mixture of experts (sparse upcycling).

        Example: growcli upcycle fixtures/llama-tiny --experts 4 --top-k 2 -o llama-moe/
        """
        from growcli.io.save import output_format
        from growcli.run.runner import Output, Source, Step, grow
        from growcli.run.streaming import parse_shard_size
        from growcli.transforms.catalog import build_spec

        if not output:
            raise UsageError("upcycle needs an output directory: -o OUTPUT/")
        options = {"experts": experts, "top_k": top_k, "shared": shared, "router": router, "noise": noise, "drop": drop}
        build_spec("upcycle", options)  # every option problem is reported before anything is loaded
        for path in output:
            if output_format(path, format) != "hf":
                raise UsageError(f"{path}: upcycle writes a Hugging Face directory (a mixture-of-experts architecture "
                                 "that from_pretrained loads); the recorded-edits formats cannot describe the new "
                                 "architecture. Use -o DIR/")
        settings = verify_settings(batches, dtype, atol, rtol, allow_mismatch, seq_len=seq_len, device=device)
        size = parse_shard_size(shard_size) if shard_size is not None else None
        with byte_progress_bar(console(quiet, json_out), "upcycling") as advance:
            report = grow(Source(model, inputs_file=inputs), [Step("upcycle", options)],
                          [Output(p, format, size) for p in output], seed=seed, settings=settings, overwrite=overwrite,
                          streaming=streaming, progress=advance)
        render_streamed(report, json_out)

