"""What a search leaves behind, as text and pictures: the plan of the chosen steps, the leaderboard, the plot.

- :func:`plan_text`: a version-1 growth plan with the best model's path of steps, which
  ``growcli grow`` replays on the original model to the same architecture. It cannot give the
  same weights: the search trained the model between steps, which the plan's comments describe;
  the trained weights are in the best model file.
- :func:`leaderboard`: one row per child of every round (the chosen one marked), for the table
  ``growcli search`` prints and for ``--json``.
- :func:`plot_png`: validation accuracy (or loss) against parameters for every child of every
  round, coloured by round, the chosen children joined by a line (matplotlib, no display).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from growcli.search.fit import TrainSettings
from growcli.search.loop import SearchResult


def _flow(options: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(options, default_flow_style=True, sort_keys=True, width=1_000).strip()


def plan_text(result: SearchResult, train: TrainSettings, *, model: str = "MODEL", data: str = "the training data",
              seed: int = 0, run_hint: str = "") -> str:
    """The best model's path as a version-1 plan, with the training between steps in its comments."""
    lines = [
        "# Written by growcli search: the growth steps that made the best model, in order, from the original",
        f"# model ({model}). `growcli grow` with this plan rebuilds the best model's architecture (structure and",
        "# shapes) from the original. It does not rebuild its weights: the search trained the model after every",
        "# step, as each step's comment says; the trained weights are in the best model file the search wrote.",
        f"# Training after each step: {train.describe()}, on {data}.",
    ]
    if run_hint:
        lines.append(f"# run: {run_hint}")
    lines += ["version: 1", f"seed: {seed}",
              f"description: growcli search, {len(result.path)} step(s), the model trained after each"]
    if not result.path:
        lines.append("# no round finished: the best model is the original, and there is no step to replay")
        lines.append("steps: []")
        return "\n".join(lines) + "\n"
    lines.append("steps:")
    for child in result.path:
        acc = f"accuracy {child.val.accuracy:.4f}, " if child.val.accuracy is not None else ""
        lines.append(f"  # round {child.round}, child {child.index}: {child.params:,} parameters; started at the "
                     f"parent's validation loss {child.parent_loss:.6g} (measured {child.start_loss:.6g}); then "
                     f"trained: validation {acc}loss {child.val.loss:.4g}")
        lines.append(f"  - {child.move.transform}: {_flow(dict(child.move.options))}")
    lines += ["verify:", "  batches: 2", "  dtype: float64"]
    return "\n".join(lines) + "\n"


def leaderboard(result: SearchResult) -> list[dict[str, Any]]:
    """Every child of every round, best first within its round; ``chosen`` marks the new parent."""
    rows = []
    for record in result.rounds:
        ranked = sorted(record.children, key=lambda c: (c.status != "trained",
                                                        -(c.val.accuracy or 0.0) if c.val else 0.0,
                                                        c.val.loss if c.val else 0.0, c.index))
        for rank, c in enumerate(ranked, 1):
            rows.append({**c.to_dict(), "rank": rank, "chosen": c.index == record.chosen})
    return rows


def table_text(result: SearchResult) -> str:
    """The leaderboard as a plain-text table, a block per round."""
    out = []
    for record in result.rounds:
        acc = f", accuracy {record.parent.accuracy:.4f}" if record.parent.accuracy is not None else ""
        out.append(f"round {record.round}: parent {record.parent_params:,} parameters, validation loss "
                   f"{record.parent.loss:.4g}{acc}")
        out.append(f"  {'':2}{'rank':>4}  {'child':>5}  {'move':<32} {'params':>10}  {'start Δloss':>11}  "
                   f"{'val loss':>9}  {'val acc':>7}  status")
        for row in (r for r in leaderboard(result) if r["round"] == record.round):
            delta = f"{row['start_diff']:.2g}" if row["start_diff"] is not None else "-"
            loss = f"{row['val_loss']:.4g}" if row["val_loss"] is not None else "-"
            acc = f"{row['val_accuracy']:.4f}" if row["val_accuracy"] is not None else "-"
            status = row["status"] + (f" ({row['message']})" if row["message"] and row["status"] != "trained" else "")
            out.append(f"  {'*' if row['chosen'] else ' ':2}{row['rank']:>4}  {row['child']:>5}  {row['label']:<32} "
                       f"{row['params']:>10,}  {delta:>11}  {loss:>9}  {acc:>7}  {status}")
    return "\n".join(out)


def plot_png(result: SearchResult, path: Path) -> None:
    """Write the accuracy-against-parameters plot of every trained child to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    rows = [r for r in leaderboard(result) if r["status"] == "trained"]
    metric = "val_accuracy" if any(r["val_accuracy"] is not None for r in rows) else "val_loss"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        cmap = plt.get_cmap("viridis")
        rounds = max(1, len(result.rounds))
        for record in result.rounds:
            mine = [r for r in rows if r["round"] == record.round]
            ax.scatter([r["params"] for r in mine], [r[metric] for r in mine], color=cmap(record.round / (rounds + 1)),
                       label=f"round {record.round}", s=24)
        chosen = [r for r in rows if r["chosen"]]
        first = result.original_score.accuracy if metric == "val_accuracy" else result.original_score.loss
        xs = [result.original.num_parameters()] + [r["params"] for r in chosen]
        ys = [first] + [r[metric] for r in chosen]
        ax.plot(xs, ys, color="black", linewidth=1, marker="x", label="chosen (from the original)")
        ax.set_xlabel("parameters")
        ax.set_ylabel("validation accuracy" if metric == "val_accuracy" else "validation loss")
        ax.set_title("growcli search: every child of every round")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
