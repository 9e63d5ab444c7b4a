"""Benchmark: streaming ``growcli stack`` of a ~1B-parameter Llama-shaped bf16 checkpoint vs a plain copy.

    python benchmarks/bench_stack.py                      # TinyLlama-1.1B shape: 22 layers, hidden 2048
    python benchmarks/bench_stack.py --layers 4 --hidden 512 --intermediate 1408 --vocab 8000   # quick

Generates a sharded safetensors checkpoint with random bf16 weights tensor by tensor (the
model is never built), then measures in child processes, each after ``sync``:

- a plain copy (``shutil.copyfile``, i.e. sendfile) of as many bytes as the stacked output holds;
- ``growcli stack --streaming --factor 2`` with ``--init copy`` and with ``--init identity``.

Prints wall time (process start to exit, imports included), the time growcli reports for
writing the shards, and each child's peak RSS (``os.wait4``). Target: stacking within 1.2× the
copy's time, peak RSS under 1 GB. Generated files are deleted afterwards unless ``--keep``.
Not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def generate(directory: Path, args: argparse.Namespace) -> int:
    """Write config.json, shards and the index; returns the bytes of tensor data."""
    import torch
    import transformers as T

    config = T.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           num_key_value_heads=args.kv_heads, tie_word_embeddings=False, dtype="bfloat16",
                           architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in T.LlamaForCausalLM(config).state_dict().items()}
    directory.mkdir(parents=True)
    config.save_pretrained(str(directory))
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = 2 * _numel(shape)
        if shards[-1] and size + n > args.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            n = 2 * _numel(shapes[name])
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / fname, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            for name in names:  # one tensor in memory at a time
                t = (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)
                fh.write(t.view(torch.uint8).numpy().tobytes())
                weight_map[name] = fname
        total += offset
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _child_with_rusage(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of one child, reaped with ``wait4`` for its own peak RSS."""
    os.sync()  # earlier writes are flushed before the clock starts
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed with exit code {proc.returncode}")
    return wall, usage.ru_maxrss / 1024, out.decode()


COPY = """
import os, shutil, sys
src, dst, need = sys.argv[1], sys.argv[2], int(sys.argv[3])
files = sorted(os.path.join(src, f) for f in os.listdir(src) if f.endswith('.safetensors'))
os.mkdir(dst)
k = 0
while need > 0:
    f = files[k % len(files)]
    size = os.path.getsize(f)
    target = os.path.join(dst, f'{k}.bin')
    if size <= need:
        shutil.copyfile(f, target)
        need -= size
    else:
        with open(f, 'rb') as a, open(target, 'wb') as b:
            while need > 0:
                need -= os.copy_file_range(a.fileno(), b.fileno(), need)
    k += 1
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-size", default="1GB", help="input and output shard size")
    ap.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and outputs")
    ap.add_argument("--repeat", type=int, default=1, help="measure each kind N times, report the fastest")
    ap.add_argument("--generate-into", type=Path, help=argparse.SUPPRESS)  # the generating child process
    args = ap.parse_args()
    if args.generate_into:
        from growcli.run.streaming import parse_shard_size as parse_size

        args.shard_bytes = parse_size(args.shard_size)
        print(generate(args.generate_into, args))
        return
    # The parent imports neither torch nor growcli: a forked child starts with its parent's
    # resident pages, which would inflate every child's peak RSS.
    work = Path(tempfile.mkdtemp(prefix="bench_stack_", dir=args.workdir))
    src = work / "src"
    try:
        t = time.perf_counter()
        data = int(subprocess.run([sys.executable, __file__, *sys.argv[1:], "--generate-into", str(src)],
                                  check=True, capture_output=True, text=True).stdout.split()[-1])
        print(f"generated {src}: {data / 1e9:.2f} GB of bf16 weights ({data // 2 / 1e9:.2f} B parameters) "
              f"in {time.perf_counter() - t:.1f} s")
        rows = []
        for attempt in range(args.repeat):  # interleaved, so a noisy neighbour hits all kinds alike
            for init in ("copy", "identity"):
                out = work / f"stacked-{init}"
                wall, rss, stdout = _child_with_rusage(
                    [sys.executable, "-m", "growcli", "stack", str(src), "-o", str(out), "--streaming", "--factor",
                     "2", "--init", init, "--shard-size", args.shard_size, "--json", "-q"])
                report = json.loads(stdout)
                written = report["outputs"][0]["bytes"]
                rows.append((f"stack x2 --init {init}", wall, report["timing"]["write"], rss, written))
                shutil.rmtree(out)
            wall, rss, _ = _child_with_rusage([sys.executable, "-c", COPY, str(src), str(work / "copy"), str(written)])
            shutil.rmtree(work / "copy")
            rows.append(("plain copy (shutil.copyfile)", wall, wall, rss, written))
        best: dict[str, tuple] = {}
        for row in rows:  # the fastest attempt of each kind
            if row[0] not in best or row[1] < best[row[0]][1]:
                best[row[0]] = row
        copy_row = best["plain copy (shutil.copyfile)"]
        print(f"{'':32} {'wall s':>7} {'vs copy':>8} {'write s':>8} {'write GB/s':>11} {'vs copy':>8} "
              f"{'peak RSS MB':>12} {'GB written':>11}")
        for name, w, write, r, b in best.values():
            print(f"{name:32} {w:7.2f} {w / copy_row[1]:7.2f}x {write:8.2f} {b / 1e9 / write:11.2f} "
                  f"{write / copy_row[2]:7.2f}x {r:12.0f} {b / 1e9:11.2f}")
        print("wall: child process start to exit (imports, meta model, trace for identity, writing, checks); "
              "write: growcli's own timing of writing the shards")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
