"""Benchmark: does GradMax initialisation help training after widening, on real data?

scikit-learn's digits (1797 8×8 images, 10 classes; ships with the package, no download):
train a small ReLU MLP (64 → HIDDEN → 16 → 10) for PRE steps, widen its first hidden layer
to TO units with each initialisation, train every variant for STEPS more steps with the same
SGD settings and the same minibatch order, and print the training loss along the way, next
to a model of the grown size trained from scratch for PRE + STEPS steps (its row shows the
loss at the same total number of steps).

  net2net   copies of existing units, outgoing weights split (exact)
  zero      random incoming weights, zero outgoing weights (exact)
  random    random incoming and outgoing weights (not exact: the loss jumps at the widening)
  gradmax   zero incoming weights, outgoing from the top singular vectors of M on 4
            training minibatches (exact; ReLU units get a bias ε and a compensated consumer)

    pip install -e '.[bench]'     # scikit-learn, for the data set only
    python benchmarks/bench_gradmax.py [--seeds 5] [--pre 300] [--steps 300] [--hidden 8] [--to 24]

Numbers are mean ± std over seeds of the full training-set cross-entropy, and the
held-out loss at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("net2net", "zero", "random", "gradmax")
REPORT_AT = (0, 1, 5, 10, 25, 50, 100, 200, 300, 500, 1000)


class MLP(nn.Module):
    def __init__(self, hidden: int, hidden2: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden2)
        self.fc3 = nn.Linear(hidden2, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def load_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        sys.exit("this benchmark needs scikit-learn for its data set: pip install -e '.[bench]'")
    data = sk_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    x, y = x[perm], y[perm]
    return x[:1437], y[:1437], x[1437:], y[1437:]


def train(model: nn.Module, x, y, steps: int, lr: float, batch: int, gen: torch.Generator,
          log: dict[int, float] | None = None, offset: int = 0) -> None:
    """Plain SGD on minibatches drawn by ``gen``; ``log[t]`` is the full training loss after ``t``
    steps, for ``t`` in REPORT_AT, counted from ``offset`` steps into the run."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for t in range(steps + 1):
        if log is not None and (t - offset) in REPORT_AT:
            log[t - offset] = full_loss(model, x, y)
        if t == steps:
            break
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()


def full_loss(model: nn.Module, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def widen(base: nn.Module, variant: str, to: int, calib: dict[str, torch.Tensor], seed: int) -> tuple[nn.Module, float]:
    """The base model widened with ``variant`` through growcli; returns it and the loss change it caused."""
    from growcli.analysis.calibration import from_tensors
    from growcli.core.inputs import spec_from_batch
    from growcli.core.model import GrowModel
    from growcli.run.steps import VerifySettings, run_step
    from growcli.transforms.registry import Context

    module = copy.deepcopy(base).eval()
    gm = GrowModel(module, "state_dict", Path("bench"), "0", spec_from_batch(((calib["input"][:2],), {})))
    ctx = Context(seed=seed)
    options = {"layer": "fc1", "to": to, "init": "zero" if variant == "random" else variant}
    if variant == "gradmax":
        ctx.data["digits"] = from_tensors(calib, gm.inputs, batch_size=64)
        options["data"] = "digits"
    report = run_step(gm, "widen", options, ctx, VerifySettings())
    old = base.fc1.out_features
    if variant == "random":  # new units random both ways, like a fresh layer's init: not function-preserving
        gen = torch.Generator().manual_seed(seed)
        w2 = gm.module.fc2.weight
        std = float(w2[:, :old].detach().std())
        with torch.no_grad():
            w2[:, old:] = torch.randn(w2[:, old:].shape, generator=gen) * std
    return gm.module, report.verification["max_abs_diff"]


def run(args) -> dict:
    x, y, xv, yv = load_digits()
    curves: dict[str, list[dict[int, float]]] = {v: [] for v in (*VARIANTS, "scratch")}
    held: dict[str, list[float]] = {v: [] for v in curves}
    jumps: dict[str, list[float]] = {v: [] for v in VARIANTS}
    pre_losses = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        base = MLP(args.hidden)
        train(base, x, y, args.pre, args.lr, args.batch, torch.Generator().manual_seed(10_000 + seed))
        before = full_loss(base, x, y)
        pre_losses.append(before)
        calib = {"input": x[:256], "target": y[:256]}
        for variant in VARIANTS:
            model, _ = widen(base, variant, args.to, calib, seed)
            jumps[variant].append(full_loss(model, x, y) - before)
            log: dict[int, float] = {}
            train(model, x, y, args.steps, args.lr, args.batch, torch.Generator().manual_seed(20_000 + seed), log)
            curves[variant].append(log)
            held[variant].append(full_loss(model, xv, yv))
        torch.manual_seed(seed)
        scratch = MLP(args.to)
        log = {}
        train(scratch, x, y, args.pre + args.steps, args.lr, args.batch, torch.Generator().manual_seed(10_000 + seed),
              log, offset=args.pre)
        curves["scratch"].append(log)
        held["scratch"].append(full_loss(scratch, xv, yv))
    steps = sorted({t for c in curves["gradmax"] for t in c})
    table = {}
    for name, runs in curves.items():
        row = {}
        for t in steps:
            vals = [r[t] for r in runs if t in r]
            if vals:
                row[t] = (statistics.fmean(vals), statistics.pstdev(vals))
        table[name] = row
    return {"args": vars(args), "loss_before_widening": statistics.fmean(pre_losses), "curves": table,
            "held_out": {k: (statistics.fmean(v), statistics.pstdev(v)) for k, v in held.items()},
            "loss_jump_at_widening": {k: statistics.fmean(v) for k, v in jumps.items()}}


def render(result: dict) -> None:
    a = result["args"]
    print(f"digits MLP 64→{a['hidden']}→16→10, fc1 widened to {a['to']} after {a['pre']} SGD steps "
          f"(lr {a['lr']}, batch {a['batch']}), {a['seeds']} seeds; training loss before widening "
          f"{result['loss_before_widening']:.4f}")
    print("loss change caused by the widening itself: " +
          ", ".join(f"{k} {v:+.2e}" for k, v in result["loss_jump_at_widening"].items()))
    steps = sorted(result["curves"]["gradmax"])
    head = "steps after widening".ljust(22) + "".join(f"{t:>16}" for t in steps)
    print(head)
    for name, row in result["curves"].items():
        label = f"scratch ({a['to']} units)" if name == "scratch" else name
        print(label[:22].ljust(22) + "".join(f"{row[t][0]:>9.4f}±{row[t][1]:<6.4f}" if t in row else " " * 16 for t in steps))
    print("held-out loss at the end: " + ", ".join(f"{k} {m:.4f}±{s:.4f}" for k, (m, s) in result["held_out"].items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--pre", type=int, default=300, help="SGD steps before widening")
    ap.add_argument("--steps", type=int, default=300, help="SGD steps after widening")
    ap.add_argument("--hidden", type=int, default=8)
    ap.add_argument("--to", type=int, default=24)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        render(result)


if __name__ == "__main__":
    main()
