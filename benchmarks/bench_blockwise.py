"""Benchmark: peak memory of ``growcli verify --blockwise`` next to whole-model ``growcli verify``.

    python benchmarks/bench_blockwise.py                  # ~200 MB bf16 Llama-shaped checkpoint, 8 layers
    python benchmarks/bench_blockwise.py --layers 4 --hidden 512 --intermediate 1408 --vocab 8000   # quick

Generates a sharded safetensors checkpoint with random bf16 weights tensor by tensor (with
``bench_stack.generate``; the model is never built), copies it, and runs in child processes
``growcli verify SRC COPY --json`` with and without ``--blockwise`` (float64, ``--batches``
batches). Prints each child's wall time (imports included), peak RSS (``os.wait4``) and the
verdict, plus the float64 sizes of the largest block and of everything outside the blocks:
block-wise verification should hold about torch + transformers + the non-block tensors + one
block, whole-model verification both models in float64 (and their stored copies). Generated
files are deleted afterwards unless ``--keep``. Not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_stack import _child_with_rusage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--shard-size", default="100MB", help="input shard size")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args()
    here = Path(__file__).resolve().parent
    # The parent imports neither torch nor growcli, so each child's peak RSS is its own.
    work = Path(tempfile.mkdtemp(prefix="bench_blockwise_", dir=args.workdir))
    src, copy = work / "src", work / "copy"
    try:
        t = time.perf_counter()
        gen_args = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
                    "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--vocab", str(args.vocab),
                    "--shard-size", args.shard_size]
        data = int(subprocess.run([sys.executable, str(here / "bench_stack.py"), *gen_args, "--generate-into", str(src)],
                                  check=True, capture_output=True, text=True).stdout.split()[-1])
        shutil.copytree(src, copy)
        print(f"generated {src}: {data / 1e6:.0f} MB of bf16 weights ({data // 2 / 1e6:.0f} M parameters), "
              f"{args.layers} layers, in {time.perf_counter() - t:.1f} s")
        head, q = args.hidden // args.heads, args.hidden
        kv = args.kv_heads * head
        block = 2 * q * args.hidden + 2 * kv * args.hidden + 3 * args.hidden * args.intermediate + 2 * args.hidden
        outside = 2 * args.vocab * args.hidden + args.hidden
        print(f"float64 sizes: one block {8 * block / 1e6:.0f} MB, outside the blocks {8 * outside / 1e6:.0f} MB, "
              f"one whole model {8 * (outside + args.layers * block) / 1e6:.0f} MB")
        print(f"{'':28} {'wall s':>7} {'peak RSS MB':>12}  verdict")
        for name, extra in (("verify --blockwise", ["--blockwise"]), ("verify (whole models)", [])):
            wall, rss, stdout = _child_with_rusage(
                [sys.executable, "-m", "growcli", "verify", str(src), str(copy), "--json", "-q", "--batches",
                 str(args.batches), *extra])
            report = json.loads(stdout)
            verdict = f"{'equal' if report['passed'] else 'NOT equal'}, max abs diff {report['max_abs_diff']}"
            print(f"{name:28} {wall:7.2f} {rss:12.0f}  {verdict}")
        print("wall: child process start to exit (imports, building the models, reading the weights, the runs)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
