"""growcli deepen MODEL --after NAME: insert layers or residual blocks that start as the identity.

``--block`` on a Hugging Face directory can stream (``--streaming``, automatic above 1 GiB):
the checkpoint is rewritten tensor by tensor with a progress bar in bytes on stderr.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from growcli.cli.options import (AllowMismatch, Arch, ArchKwargs, Atol, Batches, Device, Dtype, Format, InputsFile, InputShape, Json,
                                 Model, Outputs, Overwrite, Quiet, Rtol, SeqLen, Seed, TrustPickle, verify_settings)
from growcli.cli.render import byte_progress_bar, console, handle_errors, render_streamed
from growcli.core.errors import UsageError


def register(app: typer.Typer) -> None:
    @app.command("deepen")
    @handle_errors
    def deepen_cmd(
        model: Model,
        # Flags of the deepen transform: help and default are DeepenSpec's (growcli/transforms/deepen.py), word
        # for word; tests/test_options.py fails when they drift. (Read from the spec, they would import torch.)
        after: Annotated[list[str], typer.Option("--after", "-a", help="Layer (or, with block, block) to insert after: "
                                                 "name, dotted suffix, glob or regex; a list inserts after each. "
                                                 "Repeat --after for a list.")],
        init: Annotated[str, typer.Option("--init", help="identity (Net2DeeperNet: needs an idempotent activation "
                                          "such as ReLU after the layer) or morph (parametric activation a·x + "
                                          "(1−a)·φ(x) at a=1, exact after any layer).")] = "identity",
        activation: Annotated[Optional[str], typer.Option("--activation", help="φ of morph's parametric activation: "
                                                          "relu, gelu, tanh, silu, … (default: the model's "
                                                          "activation after the layer, else relu).")] = None,
        split: Annotated[Optional[str], typer.Option("--split", help="morph only: identity (new layer = I), or a "
                                                     "dense factorisation of the layer: orthogonal or svd.")] = None,
        kernel: Annotated[Optional[int], typer.Option("--kernel", help="Kernel size of a new conv (odd; default: "
                                                      "the layer's, 1 for a dense split).")] = None,
        bn: Annotated[bool, typer.Option("--bn", help="Add a BatchNorm that is the identity in eval mode.")] = False,
        block: Annotated[bool, typer.Option("--block", help="Insert a copy of the residual block after it, with "
                                            "its residual writers zeroed (pre-LN transformers, ResNets).")] = False,
        streaming: Annotated[Optional[bool], typer.Option("--streaming/--no-streaming", help="With --block, insert "
                             "the copies into a Hugging Face directory tensor by tensor without loading it (default: "
                             "above 1 GiB).")] = None,
        shard_size: Annotated[Optional[str], typer.Option("--shard-size", help="Largest weights file of the output "
                              "directory (default when streaming: 5GB).")] = None,
        output: Outputs = None, format: Format = None, arch: Arch = None, arch_kwargs: ArchKwargs = None,
        trust_pickle: TrustPickle = False, input_shape: InputShape = None, inputs: InputsFile = None,
        seed: Seed = 0, batches: Batches = 3, seq_len: SeqLen = None, dtype: Dtype = "float64", device: Device = "cpu", atol: Atol = None, rtol: Rtol = None,
        allow_mismatch: AllowMismatch = False, overwrite: Overwrite = False, json_out: Json = False,
        quiet: Quiet = False,
    ) -> None:
        """Add depth: layers or residual blocks that start as the identity; the grown model computes the same function.

        Example: growcli deepen fixtures/mlp.pt2 --after fc1 -o grown.safetensors
        """
        from growcli.run.runner import Output, Source, Step, grow
        from growcli.run.streaming import parse_shard_size
        from growcli.transforms.catalog import build_spec

        options = {"after": after[0] if len(after) == 1 else list(after), "init": init, "activation": activation,
                   "split": split, "kernel": kernel, "bn": bn or None, "block": block or None}
        options = {k: v for k, v in options.items() if v is not None}
        build_spec("deepen", options)  # every option problem at once, before loading anything
        if not output:
            raise UsageError("deepen needs at least one -o OUTPUT")
        if streaming and not block:
            raise UsageError("--streaming: deepen streams only --block (copies of residual blocks); drop --streaming "
                             "to insert layers")
        size = parse_shard_size(shard_size) if shard_size is not None else None
        with byte_progress_bar(console(quiet, json_out), "deepening") as advance:
            report = grow(Source(model, arch, arch_kwargs, trust_pickle, input_shape, inputs), [Step("deepen", options)],
                          [Output(p, format, size) for p in output], seed=seed,
                          settings=verify_settings(batches, dtype, atol, rtol, allow_mismatch, seq_len=seq_len, device=device),
                          overwrite=overwrite, streaming=streaming if block else False, progress=advance)
        render_streamed(report, json_out)
