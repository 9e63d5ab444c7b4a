"""Benchmark: how long the command line takes to answer before any model is loaded.

    python benchmarks/bench_cli.py            # 7 runs of each command, median and min printed
    python benchmarks/bench_cli.py --runs 15

Each command runs in a fresh interpreter (``python -m growcli …`` through the installed
console script when there is one), so the figure includes Python's own start-up. Also prints
whether torch was imported (it must not be, for ``--help`` and ``--version``) and the import
time of ``growcli`` alone. Target: ``growcli --help`` under 0.5 s on 2 cores.
Not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = [["--help"], ["--version"], ["widen", "--help"], ["stack", "--help"], ["grow", "--help"]]

PROBE = ("import sys, growcli.cli.app as a; a.get_app(); "
         "print('torch' in sys.modules)")


def wall(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    exe = shutil.which("growcli")
    base = [exe] if exe else [sys.executable, "-m", "growcli"]
    print(f"{'command':<28} {'median s':>9} {'min s':>7}")
    for cmd in COMMANDS:
        t = wall(base + cmd, args.runs)
        print(f"{'growcli ' + ' '.join(cmd):<28} {statistics.median(t):9.3f} {min(t):7.3f}")
    t = wall([sys.executable, "-c", "pass"], args.runs)
    print(f"{'(python -c pass)':<28} {statistics.median(t):9.3f} {min(t):7.3f}")
    t = wall([sys.executable, "-c", "import growcli"], args.runs)
    print(f"{'(python -c import growcli)':<28} {statistics.median(t):9.3f} {min(t):7.3f}")
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=False)
    print(f"torch imported by building the CLI: {probe.stdout.strip() or probe.stderr.strip()[-200:]}")


if __name__ == "__main__":
    main()
