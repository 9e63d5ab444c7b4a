"""growcli cpg MODEL --tasks DIR -o OUT: continual learning by Compacting, Picking and Growing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from growcli.cli.options import Arch, ArchKwargs, Json, Model, Overwrite, Quiet, Seed, TrustPickle
from growcli.cli.render import console, emit_json, handle_errors

Tasks = Annotated[Path, typer.Option("--tasks", help="Directory of task files task0.safetensors, task1.safetensors, … "
                                     "with 'input' and 'target' (optionally 'val_input', 'val_target').",
                                     show_default=False)]
Out = Annotated[Path, typer.Option("-o", "--output", metavar="PATH", help="Output .safetensors: the shared weights, "
                                   "every task's masks and head, and the structure in its metadata.", show_default=False)]


def register(app: typer.Typer) -> None:
    @app.command("cpg")
    @handle_errors
    def cpg_cmd(
        model: Model, tasks: Tasks, output: Out,
        epochs: Annotated[int, typer.Option("--epochs", min=0, help="Training epochs per task, and again after "
                                            "every growth.")] = 10,
        lr: Annotated[float, typer.Option("--lr", help="Adam learning rate (weights, heads, mask logits).")] = 0.01,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Samples per training batch.")] = 32,
        prune_ratio: Annotated[float, typer.Option("--prune-ratio", help="Fraction of each task's own hidden weights "
                                                   "compaction releases for later tasks.")] = 0.5,
        keep_accuracy: Annotated[Optional[float], typer.Option("--keep-accuracy", help="Allowed accuracy drop "
                                                               "while pruning; a pruning step that drops more is "
                                                               "undone and pruning stops.")] = None,
        prune_steps: Annotated[int, typer.Option("--prune-steps", min=1, help="Steps of gradual pruning, each "
                                                 "followed by retraining.")] = 3,
        accuracy_goal: Annotated[Optional[float], typer.Option("--accuracy-goal", help="Grow the hidden layers "
                                                               "while a task's accuracy is below this (0–1).")] = None,
        grow_by: Annotated[int, typer.Option("--grow-by", min=1, help="Units added to every hidden layer per "
                                             "growth.")] = 8,
        max_grows: Annotated[int, typer.Option("--max-grows", min=0, help="Growths per task at most.")] = 2,
        arch: Arch = None, arch_kwargs: ArchKwargs = None, trust_pickle: TrustPickle = False, seed: Seed = 0,
        overwrite: Overwrite = False, json_out: Json = False, quiet: Quiet = False,
    ) -> None:
        """Learn tasks one after another in one network (CPG); earlier tasks' outputs stay bit-identical.

        MODEL is a chain of Linear/Conv layers (or a CPG network written by this command, to learn more tasks).

        Example: growcli cpg fixtures/mlp.pt --arch growcli.zoo:mlp --tasks tasks/ -o cpg.safetensors
        """
        from growcli.cl import CPGConfig, learn_tasks, load_cpg, load_task_dir, save_cpg
        from growcli.cl.store import is_cpg_file
        from growcli.core.errors import UsageError
        from growcli.io.atomic import check_output_path
        from growcli.io.hub import resolve_path
        from growcli.io.load import load_model

        config = CPGConfig(epochs=epochs, lr=lr, batch_size=batch_size, prune_ratio=prune_ratio,
                           keep_accuracy=keep_accuracy, prune_steps=prune_steps, accuracy_goal=accuracy_goal,
                           grow_by=grow_by, max_grows=max_grows, seed=seed)
        check_output_path(output, [resolve_path(model), tasks], overwrite=overwrite)  # before any training
        data = load_task_dir(tasks)
        if is_cpg_file(model):
            if arch or arch_kwargs:
                raise UsageError(f"{model} is a CPG network (it holds its own structure); --arch does not apply")
            net = load_cpg(model)
        else:
            net = load_model(model, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle).module
        con = console(quiet, json_out)
        net, reports = learn_tasks(net, data, config, on_task=lambda r: con.print(
            f"task {r.task}: accuracy {r.accuracy:.4f}, {r.units_added} units added, earlier tasks unchanged"))
        rows = [r.to_dict() for r in reports]
        save_cpg(net, output, overwrite=overwrite, report=rows, inputs=[resolve_path(model), tasks])
        if json_out:
            emit_json({"model": str(model), "output": str(output), "tasks": rows, "earlier_tasks_bit_identical": True})
            return
        typer.echo(render_table(rows))
        typer.echo(f"every earlier task's outputs verified bit-identical after each task; wrote {output}")


def render_table(rows: list[dict]) -> str:
    """The per-task table: accuracy after learning, every earlier task's accuracy now, ownership and growth."""
    head = f"{'task':>4}  {'accuracy':>8}  {'earlier tasks now':<24}  {'owned':>7}  {'released':>8}  {'picked':>6}  {'units added':>11}"
    lines = [head]
    for r in rows:
        earlier = " ".join("-" if a is None else f"{a:.3f}" for a in r["earlier"]) or "-"
        picked = "-" if r["picked"] is None else f"{r['picked']:.3f}"
        lines.append(f"{r['task']:>4}  {r['accuracy']:>8.4f}  {earlier:<24}  {r['owned']:>7}  {r['released']:>8.3f}  "
                     f"{picked:>6}  {r['units_added']:>11}")
    return "\n".join(lines)
