"""Benchmark: widen every hidden layer of a ~110M-parameter model (BERT-base shape, random weights).

Prints wall time and peak RSS for two modes, each measured in a fresh child process:
  one-at-a-time  each FFN intermediate layer widened in its own step (trace + rewrite + verify)
  all-at-once    one step whose pattern matches every FFN intermediate layer

    python benchmarks/bench_widen.py [--layers 12] [--hidden 768] [--factor 1.25]

Verification runs in float64 on 3 batches of 2×16 tokens, as the CLI does by default.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(mode: str, layers: int, hidden: int, factor: float) -> None:
    import warnings

    warnings.simplefilter("ignore")
    import torch
    from transformers import BertConfig, BertModel

    from growcli.io.hf_dir import hf_input_spec
    from growcli.core.model import GrowModel
    from growcli.run.steps import VerifySettings, run_step
    from growcli.transforms.registry import Context
    from pathlib import Path

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                 intermediate_size=4 * hidden)).eval()
    gm = GrowModel(model, "hf", Path("bench"), "0", hf_input_spec(model, seq=16), hf_class="BertModel")
    params = gm.num_parameters()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    worst = 0.0
    if mode == "one-at-a-time":
        for i in range(layers):
            r = run_step(gm, "widen", {"layer": f"encoder.layer.{i}.intermediate.dense", "factor": factor}, Context(), VerifySettings())
            worst = max(worst, r.verification["max_abs_diff"])
    else:
        r = run_step(gm, "widen", {"layer": "encoder.layer.*.intermediate.dense", "factor": factor}, Context(), VerifySettings())
        worst = r.verification["max_abs_diff"]
    elapsed = time.perf_counter() - start
    print(json.dumps({"mode": mode, "params_before": params, "params_after": gm.num_parameters(), "seconds": elapsed,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_after_build_mb": rss0 / 1024, "max_abs_diff": worst}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--factor", type=float, default=1.25)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.layers, a.hidden, a.factor)
        return
    print(f"{'mode':<14} {'params':>22} {'wall s':>8} {'peak RSS MB':>12} {'model RSS MB':>13} {'max abs diff':>13}")
    for mode in ("one-at-a-time", "all-at-once"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--layers", str(a.layers), "--hidden", str(a.hidden),
                              "--factor", str(a.factor)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['mode']:<14} {r['params_before']:>10,} → {r['params_after']:>10,} {r['seconds']:>8.1f} "
              f"{r['peak_rss_mb']:>12.0f} {r['rss_after_build_mb']:>13.0f} {r['max_abs_diff']:>13.2e}")


if __name__ == "__main__":
    main()
