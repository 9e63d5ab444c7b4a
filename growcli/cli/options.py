"""Options every command shares, declared once as ``Annotated`` types, and how the verification ones are read.

A command spells ``arch: Arch = None`` and gets the same flag, help and checks as every other
command. Options of a transform are not here: they are the transform's spec fields
(``growcli.transforms``), and ``tests/test_options.py`` proves each command's flags agree with them.
This module imports neither torch nor any transform, so ``growcli --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

# Options shared by every command that loads a model.
# A Hub id stays a Path here; growcli.io.hub resolves it where the model is read (a local path always wins).
Model = Annotated[Path, typer.Argument(help="Checkpoint: .pt2, .safetensors, .pt/.pth, a Hugging Face directory, or a "
                                       "Hugging Face id org/name[@revision] (read from the local cache first).",
                                       show_default=False)]
Arch = Annotated[Optional[str], typer.Option("--arch", help="package.module:factory that builds the model for a state_dict.")]
ArchKwargs = Annotated[Optional[str], typer.Option("--arch-kwargs", help="JSON keyword arguments for --arch.")]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="Allow unpickling a whole module (runs code from the file).")]
InputShape = Annotated[Optional[str], typer.Option("--input-shape", help="Input shape(s), e.g. 1,3,32,32 or '2,8:int64'.")]
InputsFile = Annotated[Optional[Path], typer.Option("--inputs", help="Tensors to run: .safetensors/.pt, keys 0,1,… or argument names.")]
# Strings, not Paths: a trailing / (a directory output) must reach growcli.io.save.output_format.
Outputs = Annotated[Optional[list[str]], typer.Option("-o", "--output", metavar="PATH", help="Output path; repeat for "
                    "several formats. A directory (Hugging Face format) if it ends with /, exists as one or has no "
                    ".safetensors/.pt2/.onnx/.pt/.pth suffix.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs: files, and directories "
                      "growcli wrote (they hold its growth_report.json). Without it an existing file or non-empty "
                      "directory is refused; an input is never replaced.")]
Format = Annotated[Optional[str], typer.Option("--format", help="safetensors, pt2, onnx, hf or pt (default: from the suffix).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for every random choice.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or hints on stderr.")]
Atol = Annotated[Optional[float], typer.Option("--atol", help="Absolute tolerance (default: from the weights' dtype and whether the step is exact in it, see docs/recipes.md#precision).")]
Rtol = Annotated[Optional[float], typer.Option("--rtol", help="Tolerance relative to the output's max |value| (default: as for --atol).")]
Batches = Annotated[int, typer.Option("--batches", min=1, help="Number of input batches to compare.")]
SeqLen = Annotated[Optional[int], typer.Option("--seq-len", min=1, help="Base length of generated token sequences (batches vary around it).")]
Dtype = Annotated[str, typer.Option("--dtype", help="float64 (falls back to float32 if unsupported) or float32.")]
Device = Annotated[str, typer.Option("--device", help="Where verification runs both models: cpu or cuda (the transforms "
                                     "themselves run on the CPU).")]
AllowMismatch = Annotated[bool, typer.Option("--allow-mismatch", help="Write the output even if verification fails.")]


def verify_settings(batches: int, dtype: str, atol: float | None, rtol: float | None, allow_mismatch: bool = False,
                    seq_len: int | None = None, device: str = "cpu"):
    """The :class:`growcli.run.steps.VerifySettings` for the shared verification options (torch is imported here)."""
    import torch

    from growcli.core.errors import UsageError
    from growcli.run.steps import VerifySettings

    if dtype not in ("float64", "float32"):
        raise UsageError(f"--dtype {dtype!r}: expected float64 or float32")
    check_device(device)
    return VerifySettings(batches=batches, dtype=getattr(torch, dtype), atol=atol, rtol=rtol, allow_mismatch=allow_mismatch,
                          seq_len=seq_len, device=device)


def check_device(device: str) -> None:
    """``--device``: cpu, or cuda when torch finds a CUDA device (:class:`UsageError` otherwise)."""
    import torch

    from growcli.core.errors import UsageError

    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: expected cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch finds no CUDA device on this machine (this torch build: "
                         f"{torch.__version__}); use --device cpu")
