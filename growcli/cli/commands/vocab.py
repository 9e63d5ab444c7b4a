"""growcli vocab MODEL --add-tokens FILE|N: new tokens in the embedding and the LM head, old logits exact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from growcli.cli.options import (AllowMismatch, Arch, ArchKwargs, Atol, Batches, Device, Dtype, Format, InputsFile, InputShape, Json,
                                 Model, Outputs, Overwrite, Quiet, Rtol, SeqLen, Seed, TrustPickle, verify_settings)
from growcli.cli.render import handle_errors, render_grow_report
from growcli.core.errors import UsageError


def read_tokens(value: str) -> int | list[str]:
    """``--add-tokens``: a UTF-8 file with one token per line (blank lines skipped, spaces kept), or a count N."""
    path = Path(value)
    if path.is_file():
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"--add-tokens {value}: not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise UsageError(f"--add-tokens {value}: cannot read ({exc.strerror or exc})") from None
        tokens = [line for line in text.removeprefix("\ufeff").splitlines() if line]
        if not tokens:
            raise UsageError(f"--add-tokens {value}: the file holds no tokens")
        return tokens
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise UsageError(f"--add-tokens {value}: no such file, and not a positive number of placeholder tokens")


def register(app: typer.Typer) -> None:
    @app.command("vocab")
    @handle_errors
    def vocab_cmd(
        model: Model,
        # Flags of the vocab transform: help and default are VocabSpec's (growcli/transforms/vocab.py), word
        # for word; tests/test_options.py fails when they drift. (Read from the spec, they would import torch.)
        add_tokens: Annotated[str, typer.Option("--add-tokens", metavar="FILE|N", help="New tokens: a list of "
                                                "strings, or N to add N placeholder tokens <extra_ID> (ID = the new "
                                                "token's id). Here: a UTF-8 file with one token per line, or N.",
                                                show_default=False)],
        noise: Annotated[float, typer.Option("--noise", help="Gaussian noise added to the new input-embedding rows, "
                                             "relative to the std of the existing rows (0: exactly their mean).")] = 0.0,
        output_init: Annotated[str, typer.Option("--output-init", help="New LM-head rows: mean (each new token's "
                                                 "logit is the mean of the old logits) or zero (logit 0); tied "
                                                 "embeddings: mean only.")] = "mean",
        pad_to_multiple_of: Annotated[Optional[int], typer.Option("--pad-to-multiple-of", help="Round the new "
                                                                  "vocabulary size up to a multiple of M (the extra "
                                                                  "rows have no token).")] = None,
        output: Outputs = None, format: Format = None, arch: Arch = None, arch_kwargs: ArchKwargs = None,
        trust_pickle: TrustPickle = False, input_shape: InputShape = None, inputs: InputsFile = None,
        seed: Seed = 0, batches: Batches = 3, seq_len: SeqLen = None, dtype: Dtype = "float64", device: Device = "cpu", atol: Atol = None,
        rtol: Rtol = None, allow_mismatch: AllowMismatch = False, overwrite: Overwrite = False, json_out: Json = False,
        quiet: Quiet = False,  # accepted everywhere; this command shows no progress
    ) -> None:
        """Add tokens: new rows in the input embedding and the LM head; old tokens' logits stay exactly the same.

        Example: growcli vocab fixtures/llama-tiny --add-tokens new_tokens.txt -o grown/llama-vocab/
        """
        from growcli.run.runner import Output, Source, Step, grow
        from growcli.transforms.catalog import build_spec

        options = {"tokens": read_tokens(add_tokens), "noise": noise, "output_init": output_init,
                   "pad_to_multiple_of": pad_to_multiple_of}
        options = {k: v for k, v in options.items() if v is not None}
        build_spec("vocab", options)  # every option problem at once, before loading anything
        if not output:
            raise UsageError("vocab needs at least one -o OUTPUT")
        report = grow(Source(model, arch, arch_kwargs, trust_pickle, input_shape, inputs), [Step("vocab", options)],
                      [Output(p, format) for p in output], seed=seed,
                      settings=verify_settings(batches, dtype, atol, rtol, allow_mismatch, seq_len=seq_len, device=device),
                      overwrite=overwrite)
        render_grow_report(report, json_out)
