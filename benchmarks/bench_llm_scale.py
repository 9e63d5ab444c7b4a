"""Benchmark: streaming growth of generated ~1.1B and ~3B-parameter Llama-shaped bf16 checkpoints.

    python benchmarks/bench_llm_scale.py                       # both sizes (needs ~25 GB of free disk)
    python benchmarks/bench_llm_scale.py --sizes 1.1b          # TinyLlama-1.1B shape only
    python benchmarks/bench_llm_scale.py --sizes tiny          # a 4-layer smoke run of the script itself

For each size a sharded safetensors checkpoint with random bf16 weights is generated tensor
by tensor (``bench_stack.generate``; the model is never built). Then, each in a child process
started after ``sync``:

- ``growcli deepen --block --streaming`` after every 4th block (blocks 3, 7, 11, …);
- ``growcli stack --streaming --factor 2 --init identity``;
- a streaming widen, heads or hidden step if ``growcli/run/stream_executors.py`` has an
  executor for it (FFN ×1.5, heads ×2, hidden ×1.5);
- a plain copy (``shutil.copyfile``/``copy_file_range``) of as many bytes as that output holds, twice:
  from the page cache (warm: the input was just read), and cold, every input file evicted from the
  page cache right before it is copied (``posix_fadvise(POSIX_FADV_DONTNEED)`` on the clean,
  synced file: no root needed, unlike ``drop_caches``; ``fincore`` checks how much stayed resident).

Every growcli run starts with its input read once (page-cache warm), as the warm copy's is.

Every growcli run verifies its output in full (outputs above 512 MB block by block from disk,
float64). Printed per run: wall time (process start to exit, imports and verification
included), growcli's own write time, the ``sync`` that follows (its dirty pages reaching the
disk), the verification time (growcli's ``check`` timing: structure check + block-wise run of
both models), the peak RSS of the growcli process (``os.wait4``), and write + sync against the
warm and the cold plain copy + its sync. Targets: peak RSS ≤ 1.5 GB, write ≤ 1.3× the copy. The figures are
saved to ``benchmarks/results/llm_scale.json`` and ``.txt``; generated files are deleted
afterwards unless ``--keep``; ``--reuse DIR`` generates them in ``DIR`` once and reuses them on the next
run (the 1-min load average before each run is recorded: the machine may be shared). Not a test: it prints
figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_stack import COPY

# COPY, with each input file evicted from the page cache just before it is read (it is clean: synced)
COLD_COPY = COPY.replace("    target = os.path.join(dst, f'{k}.bin')\n",
                         "    target = os.path.join(dst, f'{k}.bin')\n"
                         "    fd = os.open(f, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)\n")

HERE = Path(__file__).resolve().parent
# name → Llama shape (layers, hidden, intermediate, heads, kv heads, vocab)
SIZES = {
    "tiny": (4, 512, 1408, 8, 2, 8000),
    "1.1b": (22, 2048, 5632, 32, 4, 32000),  # TinyLlama-1.1B
    "3b": (28, 3072, 8192, 24, 8, 32000),  # Llama-3.2-3B's blocks, a 32k vocabulary, untied head
}


def _generate(directory: Path, shape: tuple, shard_size: str) -> int:
    """Generate in a child process (the parent never imports torch); returns the bytes of tensor data."""
    layers, hidden, inter, heads, kv, vocab = shape
    argv = [sys.executable, "-c",
            "import sys, argparse; sys.path.insert(0, sys.argv[1]); from bench_stack import generate; "
            "a = argparse.Namespace(layers=int(sys.argv[3]), "
            "hidden=int(sys.argv[4]), intermediate=int(sys.argv[5]), heads=int(sys.argv[6]), kv_heads=int(sys.argv[7]), "
            "vocab=int(sys.argv[8]), shard_bytes=int(sys.argv[9])); "
            "from pathlib import Path; print(generate(Path(sys.argv[2]), a))",
            str(HERE), str(directory), *map(str, shape), str(_bytes(shard_size))]
    return int(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.split()[-1])


def _bytes(size: str) -> int:
    """``"2GB"`` → 2·10⁹, ``"500MB"``, ``"1GiB"``, or a plain byte count (as growcli's ``--shard-size``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKMGT]?)(i?)B?\s*", size)
    if not m:
        raise SystemExit(f"--shard-size {size!r}: expected a size like 2GB or 500MB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def _warm(directory: Path) -> None:
    """Read every shard of ``directory`` once, so that the next run reads it from the page cache."""
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def _with_rss(argv: list[str]) -> dict:
    """Wall time, peak RSS (MB, ``os.wait4``) and stdout of one child started after ``sync``, and the ``sync`` after it."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    t = time.perf_counter()
    os.sync()
    synced = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise RuntimeError(f"{' '.join(argv[2:5])}… exit {code}: {err.decode().strip()[-500:]}")
    return {"wall_s": wall, "sync_s": synced, "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": out.decode()}


def streaming_steps() -> set[str]:
    """The width transforms ``growcli widen --streaming`` can run: executor and flag both in the growcli that runs.

    Read from the source files of the package a child process imports (the parent imports no growcli).
    """
    where = subprocess.run([sys.executable, "-c", "import growcli.cli, os; print(os.path.dirname(growcli.cli.__file__))"],
                           check=True, capture_output=True, text=True).stdout.strip()
    package = Path(where).parent
    text = (package / "run" / "stream_executors.py").read_text()
    found = set(re.findall(r'^\s*"(\w+)":', text[text.index("EXECUTORS"):], re.M))
    return found if "--streaming" in (package / "cli" / "commands" / "widen.py").read_text() else set()


def arms(shape: tuple, available: set[str]) -> list[tuple[str, list[str]]]:
    """(name, growcli arguments after the model) of every run for a checkpoint of ``shape`` (see :data:`SIZES`)."""
    layers, _, inter, heads = shape[:4]
    every4 = [a for i in range(3, layers, 4) for a in ("--after", f"model.layers.{i}")]
    out = [(f"deepen --block after every 4th block ({len(every4) // 2} copies)", ["deepen", "--block", *every4]),
           ("stack x2 --init identity", ["stack", "--factor", "2", "--init", "identity"])]
    if "widen" in available:
        out.append(("widen FFN x1.5", ["widen", "--layer", "model.layers.*.mlp.up_proj", "--to", str(inter * 3 // 2)]))
    if "heads" in available:
        out.append(("widen --heads 2x", ["widen", "--heads", str(2 * heads)]))
    if "hidden" in available:
        out.append(("widen --hidden 1.5x", ["widen", "--hidden", "1.5x"]))
    return out


def run_size(name: str, work: Path, args: argparse.Namespace) -> list[dict]:
    shape = SIZES[name]
    src = (args.reuse or work) / f"src-{name}"
    t = time.perf_counter()
    if args.reuse and _same_shape(src, shape):
        data = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"[{name}] reusing {src} ({data / 1e9:.2f} GB)", flush=True)
    else:
        shutil.rmtree(src, ignore_errors=True)
        data = _generate(src, shape, args.shard_size)
        print(f"[{name}] generated {src}: {data / 1e9:.2f} GB of bf16 weights ({data / 2e9:.2f} B parameters) "
              f"in {time.perf_counter() - t:.1f} s", flush=True)
    rows = []
    skip = [p.strip() for p in args.skip.split(",") if p.strip()]
    for arm, argv in arms(shape, streaming_steps()):
        if any(arm.startswith(p) for p in skip):
            continue
        runs = []
        for k in range(args.repeat):
            row = run_arm(name, arm, argv, src, work, args)
            row["repeat"] = k + 1
            print(f"[{name}] {_line(row)}" + (f"  (run {k + 1} of {args.repeat})" if args.repeat > 1 else ""), flush=True)
            runs.append(row)
        rows.append(median_row(runs) if args.repeat > 1 else runs[0])
    if not args.reuse:
        shutil.rmtree(src)
    return rows


def run_arm(name: str, arm: str, argv: list[str], src: Path, work: Path, args: argparse.Namespace) -> dict:
    """One run of ``arm`` (growcli, then the warm and the cold plain copy of as many bytes): its figures."""
    out = work / f"out-{name}"
    _warm(src)
    time.sleep(args.settle)
    load = os.getloadavg()[0]
    try:
        child = _with_rss([sys.executable, "-m", "growcli", argv[0], str(src), *argv[1:], "--streaming",
                           "--shard-size", args.shard_size, "--batches", str(args.batches), "--json", "-q",
                           "-o", str(out)])
    except RuntimeError as exc:  # a run that fails is reported, and the others still run
        print(f"[{name}] {arm}: FAILED: {exc}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        return {"size": name, "arm": arm, "error": str(exc)}
    report = json.loads(child["stdout"])
    output = report["outputs"][0]
    written = output["bytes"]
    shutil.rmtree(out)
    os.sync()
    time.sleep(args.settle)
    copy = _with_rss([sys.executable, "-c", COPY, str(src), str(work / "copy"), str(written)])
    shutil.rmtree(work / "copy")
    os.sync()
    time.sleep(args.settle)
    cold = _with_rss([sys.executable, "-c", COLD_COPY, str(src), str(work / "copy"), str(written)])
    shutil.rmtree(work / "copy")
    timing = report["timing"]
    v = report["verification"] or {}
    row = {"size": name, "params_before": report["params_before"], "params_after": report["params_after"],
           "arm": arm, "bytes_written": written, "shards": output["shards"],
           "wall_s": round(child["wall_s"], 2), "plan_s": timing.get("plan"), "write_s": timing.get("write"),
           "sync_after_write_s": round(child["sync_s"], 2), "verify_s": timing.get("check"),
           "peak_rss_mb": round(child["peak_rss_mb"]),
           "copy_s": round(copy["wall_s"], 2), "copy_sync_s": round(copy["sync_s"], 2),
           "copy_peak_rss_mb": round(copy["peak_rss_mb"]),
           "cold_copy_s": round(cold["wall_s"], 2), "cold_copy_sync_s": round(cold["sync_s"], 2),
           "verified_with": output.get("loaded_with"), "passed": v.get("passed"),
           "max_abs_diff": v.get("max_abs_diff"), "verify_dtype": v.get("dtype"), "batches": v.get("batches"),
           "load_1min_before": round(load, 2), "load_1min_after": round(os.getloadavg()[0], 2)}
    done = row["write_s"] + row["sync_after_write_s"]
    row["write_mb_s"] = round(written / 1e6 / row["write_s"], 1)
    row["write_vs_copy"] = round(done / (row["copy_s"] + row["copy_sync_s"]), 3)  # the warm copy
    row["write_vs_cold_copy"] = round(done / (row["cold_copy_s"] + row["cold_copy_sync_s"]), 3)
    return row


def median_row(runs: list[dict]) -> dict:
    """One row for the repeated runs of an arm: the median of every figure (the runs are kept under ``runs``)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    row = dict(ok[0])
    for key, value in ok[0].items():  # figures that differ between the runs; the rest are the same in each
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "repeat" \
                and any(r[key] != value for r in ok):
            row[key] = round(statistics.median(r[key] for r in ok), 3)
    row["passed"] = all(r["passed"] for r in ok)
    row["max_abs_diff"] = max((r["max_abs_diff"] for r in ok if r["max_abs_diff"] is not None), default=None)
    row["repeat"] = f"median of {len(ok)}" + (f" ({len(runs) - len(ok)} failed)" if len(ok) < len(runs) else "")
    row["runs"] = runs
    return row


def _same_shape(src: Path, shape: tuple) -> bool:
    """Whether ``src`` holds a complete generated checkpoint of ``shape`` (see :data:`SIZES`)."""
    try:
        c = json.loads((src / "config.json").read_text())
    except (OSError, ValueError):
        return False
    have = (c.get("num_hidden_layers"), c.get("hidden_size"), c.get("intermediate_size"), c.get("num_attention_heads"),
            c.get("num_key_value_heads"), c.get("vocab_size"))
    return have == tuple(shape) and any(src.glob("*.safetensors"))


HEAD = (f"{'size':5} {'run':44} {'GB out':>7} {'wall s':>7} {'write s':>8} {'+sync':>6} {'MB/s':>6} {'warm cp':>8} "
        f"{'+sync':>6} {'w/warm':>7} {'cold cp':>8} {'+sync':>6} {'w/cold':>7} {'verify s':>9} {'peak RSS MB':>12} "
        f"{'passed':>7} {'max|diff|':>10}")


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['size']:5} {r['arm']:44} FAILED: {r['error']}"
    diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.3g}"
    return (f"{r['size']:5} {r['arm']:44} {r['bytes_written'] / 1e9:7.2f} {r['wall_s']:7.1f} {r['write_s']:8.1f} "
            f"{r['sync_after_write_s']:6.1f} {r['write_mb_s']:6.0f} {r['copy_s']:8.1f} {r['copy_sync_s']:6.1f} "
            f"{r['write_vs_copy']:6.2f}x {r['cold_copy_s']:8.1f} {r['cold_copy_sync_s']:6.1f} "
            f"{r['write_vs_cold_copy']:6.2f}x {r['verify_s']:9.1f} {r['peak_rss_mb']:12.0f} {str(r['passed']):>7} "
            f"{diff:>10}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1.1b,3b", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--shard-size", default="2GB", help="input and output shard size")
    ap.add_argument("--batches", type=int, default=1, help="verification batches per run")
    ap.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temporary directory)")
    ap.add_argument("--skip", default="", help="comma-separated run names to leave out, by prefix (e.g. 'widen --hidden')")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="generate the checkpoints in DIR/src-<size> and keep them there; one found there with the "
                         "right shape is reused instead of generated again (delete DIR yourself afterwards)")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds to wait before each timed process (growcli, warm copy, cold copy), after the "
                         "previous one's output is deleted and synced: a virtual machine that hands freed memory back "
                         "to its host within seconds (this one does) makes writes into memory not used lately several "
                         "times slower than into memory just freed, which favours whichever process runs right after "
                         "a deletion (the copies, by default); 30 puts every process in the same state")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every arm (growcli, warm copy, cold copy) this many times, in turn, and report the "
                         "median of each figure (each run is printed and kept in the JSON)")
    ap.add_argument("--note", default="", help="a line added to the results (e.g. what else ran on the machine)")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "llm_scale",
                    help="write <this>.json and <this>.txt (default benchmarks/results/llm_scale)")
    args = ap.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        raise SystemExit(f"--sizes: unknown {bad}; choose from {', '.join(SIZES)}")
    work = Path(tempfile.mkdtemp(prefix="bench_llm_scale_", dir=args.workdir))
    rows: list[dict] = []
    started = time.perf_counter()
    try:
        for name in sizes:
            rows += run_size(name, work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    lines = [HEAD, *map(_line, rows), "",
             "wall: growcli process start to exit (imports, meta-device plan and trace, writing, structure check, "
             "block-wise verification); write: growcli's timing of writing the shards; +sync: the sync after the "
             "process (dirty pages to disk); MB/s: bytes written / write; warm cp: a plain copy of as many bytes "
             "from the page cache; cold cp: the same with every input file evicted from the page cache "
             "(posix_fadvise DONTNEED) just before it is read; w/warm, w/cold: (write + sync) / (copy + sync); "
             "verify: growcli's check timing; peak RSS: the growcli process's own (wait4)",
             f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
             f"shard size {args.shard_size}; {args.batches} verification batch(es); settle {args.settle:g} s; "
             f"{'median of ' + str(args.repeat) + ' runs per row; ' if args.repeat > 1 else ''}total {time.perf_counter() - started:.0f} s; "
             f"1-min load average {', '.join(str(r.get('load_1min_before')) for r in rows)} (before each run)",
             *([f"note: {args.note}"] if args.note else [])]
    print("\n".join(lines))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".json").write_text(json.dumps({"shapes": {s: SIZES[s] for s in sizes}, "runs": rows,
                                                             "shard_size": args.shard_size, "batches": args.batches,
                                                             "settle_s": args.settle, "repeat": args.repeat,
                                                             "note": args.note},
                                                            indent=2) + "\n")
    args.results.with_suffix(".txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
