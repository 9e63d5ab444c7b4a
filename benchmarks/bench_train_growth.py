"""Benchmark: does growing during training save compute? A byte-level GPT-2 on real text.

    python benchmarks/bench_train_growth.py                 # the default: under 30 minutes on 2 CPU cores
    python benchmarks/bench_train_growth.py --steps 6000 --layers 8 --width 256 --corpus-mb 32   # bigger hardware

Corpus: the Python standard library's own source files (sorted by path, concatenated up to
``--corpus-mb``), as bytes; the last 5% is held out. Every machine with Python has it, so the
figures can be reproduced anywhere without a download.

Arms, all with the same AdamW hyperparameters, batch and sequence length:

- scratch: the target model (``--layers`` × ``--width``) trained for ``--steps`` steps;
- depth: half the layers, grown with ``stack`` (``init: identity`` and ``init: copy``) at 25% and
  50% of the steps;
- width: half the width (hidden size and FFN), grown with ``hidden`` ×2 and a ``widen`` of every
  FFN at 25% and 50%;

each growth arm once with the optimizer state carried (``growcli.grow_``) and once with a fresh
optimizer. Compute is counted as 6 · parameters · tokens per step (small-model steps at their
own cost). For each arm the script prints the fraction of the scratch run's compute needed to
reach scratch's final validation loss, and the validation loss just before and just after
growth (equal for the exact inits). Curves are saved to ``benchmarks/out/train_growth.png``
(with ``matplotlib``, in the ``[bench]`` extra) and the numbers to ``train_growth.json``.
Not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch


def corpus(mb: float) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    limit = int(mb * 2**20)
    chunks, size = [], 0
    for f in sorted(root.rglob("*.py")):
        if "site-packages" in f.parts:
            continue
        try:
            data = f.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def model(layers: int, width: int, seq: int):
    import transformers as T

    cfg = T.GPT2Config(vocab_size=256, n_positions=seq, n_embd=width, n_layer=layers, n_head=max(1, width // 32),
                       n_inner=4 * width, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                       bos_token_id=None, eos_token_id=None)
    return T.GPT2LMHeadModel(cfg)


class Data:
    def __init__(self, tokens: torch.Tensor, seq: int, batch: int, seed: int):
        cut = int(len(tokens) * 0.95)
        self.train, self.val = tokens[:cut], tokens[cut:]
        self.seq, self.batch = seq, batch
        self.gen = torch.Generator().manual_seed(seed)
        g = torch.Generator().manual_seed(seed + 1)
        starts = torch.randint(0, len(self.val) - seq - 1, (8 * batch,), generator=g)
        self.val_batch = torch.stack([self.val[s:s + seq] for s in starts])

    def sample(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.train) - self.seq - 1, (self.batch,), generator=self.gen)
        return torch.stack([self.train[s:s + self.seq] for s in starts])


@torch.no_grad()
def val_loss(m, data: Data) -> float:
    was = m.training
    m.eval()
    losses = [m(input_ids=b, labels=b).loss.item() for b in data.val_batch.split(data.batch)]
    m.train(was)
    return sum(losses) / len(losses)


def params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def growth_steps(kind: str, init: str | None, m) -> list[dict]:
    if kind == "depth":
        return [{"transform": "stack", "options": {"init": init}}]
    ffn = [f"transformer.h.{i}.mlp.c_fc" for i in range(len(m.transformer.h))]
    return [{"transform": "hidden", "options": {"factor": 2.0}},
            {"transform": "widen", "options": {"layer": ffn, "factor": 2.0}}]


def run_arm(name: str, args, data: Data, grow: dict | None) -> dict:
    import growcli

    torch.manual_seed(args.seed)
    layers, width = args.layers, args.width
    if grow is not None:
        layers, width = (layers // 2, width) if grow["kind"] == "depth" else (layers, width // 2)
    m = model(layers, width, args.seq)
    m.train()
    make_opt = lambda mod: torch.optim.AdamW(mod.parameters(), lr=args.lr, weight_decay=0.01)  # noqa: E731
    opt = make_opt(m)
    grow_at = int(grow["at"] * args.steps) if grow else None
    curve, flops, before, after = [], 0.0, None, None
    tokens = args.batch * args.seq
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = data.sample()
        opt.zero_grad()
        m(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        flops += 6 * params(m) * tokens
        if step == grow_at:
            before = val_loss(m, data)
            example = {"input_ids": data.val_batch[:2]}
            growcli.grow_(m, growth_steps(grow["kind"], grow.get("init"), m), opt if grow["carry"] else None, example,
                          seed=args.seed)
            if not grow["carry"]:
                opt = make_opt(m)
            after = val_loss(m, data)
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, flops, val_loss(m, data)))
    return {"name": name, "curve": curve, "before": before, "after": after, "params": params(m),
            "seconds": time.perf_counter() - start}


def fraction_to_reach(arm: dict, target: float, total: float) -> float | None:
    for _, flops, loss in arm["curve"]:
        if loss <= target:
            return flops / total
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--corpus-mb", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default="all", help="comma-separated arm names, or all")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = Data(corpus(args.corpus_mb), args.seq, args.batch, args.seed)
    arms = {"scratch": None}
    for kind, inits in (("depth", ("identity", "copy")), ("width", (None,))):
        for init in inits:
            for at in (0.25, 0.5):
                for carry in (True, False):
                    label = f"{kind}{'-' + init if init else ''}@{int(at * 100)}%-{'carried' if carry else 'fresh'}"
                    arms[label] = {"kind": kind, "init": init, "at": at, "carry": carry}
    chosen = list(arms) if args.arms == "all" else ["scratch"] + [a for a in args.arms.split(",") if a != "scratch"]
    print(f"corpus: {len(data.train) + len(data.val):,} bytes of the standard library; {args.steps} steps of "
          f"{args.batch}×{args.seq} tokens; target {args.layers} layers × {args.width}; {torch.get_num_threads()} threads")
    results = []
    for i, name in enumerate(chosen, 1):
        results.append(run_arm(name, args, data, arms[name]))
        print(f"  [{i}/{len(chosen)}] {name}: final val {results[-1]['curve'][-1][2]:.4f} "
              f"({results[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    scratch = results[0]
    target, total = scratch["curve"][-1][2], scratch["curve"][-1][1]
    print(f"\n{'arm':<34} {'compute to scratch loss':>24} {'val before':>11} {'val after':>10} {'final val':>10} {'s':>6}")
    for r in results:
        frac = fraction_to_reach(r, target, total)
        r["fraction"] = frac
        shown = f"{frac:.2f}" if frac is not None else "> 1 (not reached)"
        b = f"{r['before']:.4f}" if r["before"] is not None else "—"
        a = f"{r['after']:.4f}" if r["after"] is not None else "—"
        print(f"{r['name']:<34} {shown:>24} {b:>11} {a:>10} {r['curve'][-1][2]:>10.4f} {r['seconds']:>6.0f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_growth.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "results": results}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in results:
        xs = [f / total for _, f, _ in r["curve"]]
        ax.plot(xs, [loss for *_, loss in r["curve"]], label=r["name"], lw=2.5 if r["name"] == "scratch" else 1.2)
    ax.axhline(target, color="grey", ls=":", lw=1)
    ax.set_xlabel("compute, fraction of the scratch run")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_ylim(top=min(ax.get_ylim()[1], target * 1.6) if math.isfinite(target) else None)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out / "train_growth.png", dpi=120)
    print(f"plot: {args.out / 'train_growth.png'}")


if __name__ == "__main__":
    main()
