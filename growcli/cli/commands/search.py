"""growcli search MODEL --data TRAIN --val VAL -o BEST: architecture search by exact growth steps (NASH, EAS)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from growcli.cli.options import (Arch, ArchKwargs, Format, InputShape, Json, Model, Outputs, Overwrite, Quiet, Seed,
                                 TrustPickle)
from growcli.cli.render import console, emit_json, handle_errors

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C

Data = Annotated[Path, typer.Option("--data", help="Training data: .safetensors/.pt with 'input' (or 0,1,… or argument "
                                    "names) and 'target'.", show_default=False)]
Val = Annotated[Path, typer.Option("--val", help="Validation data, with the same keys as --data.", show_default=False)]


def register(app: typer.Typer) -> None:
    @app.command("search")
    @handle_errors
    def search_cmd(
        model: Model, data: Data, val: Val,
        rounds: Annotated[int, typer.Option("--rounds", min=1, help="Rounds of children; the best child of a round "
                                            "is the next round's parent.")] = 3,
        children: Annotated[int, typer.Option("--children", min=1, help="Children per round, each one distinct "
                                              "growth step.")] = 4,
        epochs: Annotated[int, typer.Option("--epochs", min=0, help="Training epochs per child (one SGDR cycle).")] = 2,
        budget_params: Annotated[Optional[int], typer.Option("--budget-params", min=1, help="Stop when the parent "
                                                             "has this many parameters; larger children are not "
                                                             "trained.")] = None,
        policy: Annotated[str, typer.Option("--policy", help="random (NASH) or controller (EAS: REINFORCE, reward "
                                            "tan(acc·π/2)).")] = "random",
        policy_state: Annotated[Optional[Path], typer.Option("--policy-state", help="Controller state file: read if "
                                                             "it exists (resume), written after every round.")] = None,
        transform: Annotated[Optional[list[str]], typer.Option("--transform", help="Only this transform's moves; "
                                                               "repeat for several (default: widen, deepen, hidden, "
                                                               "heads, stack, branch, upcycle).")] = None,
        jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Train children in N processes (same result "
                                          "for any N).")] = 1,
        optimizer: Annotated[str, typer.Option("--optimizer", help="sgd (momentum) or adamw.")] = "sgd",
        lr: Annotated[float, typer.Option("--lr", help="Learning rate at the start of each child's cosine "
                                          "cycle.")] = 0.05,
        lr_min: Annotated[float, typer.Option("--lr-min", help="Learning rate at the end of the cycle.")] = 0.0,
        momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum.")] = 0.9,
        weight_decay: Annotated[float, typer.Option("--weight-decay", help="Weight decay.")] = 0.0,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Samples per training batch.")] = 32,
        loss: Annotated[str, typer.Option("--loss", help="auto, cross_entropy or mse.")] = "auto",
        plan_out: Annotated[Optional[Path], typer.Option("--plan-out", help="Write the best model's growth steps "
                                                         "as a plan (YAML) for growcli grow.")] = None,
        plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of validation accuracy against "
                                                     "parameters for every child.")] = None,
        output: Outputs = None, format: Format = None, arch: Arch = None, arch_kwargs: ArchKwargs = None,
        trust_pickle: TrustPickle = False, input_shape: InputShape = None, seed: Seed = 0,
        overwrite: Overwrite = False, json_out: Json = False, quiet: Quiet = False,
    ) -> None:
        """Search architectures by growth: children made by exact growth steps, trained briefly, the best kept.

        Example: growcli search mlp.pt --arch growcli.zoo:mlp --data train.safetensors --val val.safetensors -o best.safetensors
        """
        from growcli.core.errors import UsageError
        from growcli.io.load import load_model
        from growcli.search import (SearchOutputs, SearchSettings, TrainSettings, check_search_outputs,
                                    load_policy_state, load_search_data, run_log, save_policy_state, search,
                                    search_plan, table_text, write_search_outputs)

        if loss not in ("auto", "cross_entropy", "mse"):
            raise UsageError(f"--loss {loss!r}: expected auto, cross_entropy or mse")
        settings = SearchSettings(rounds=rounds, children=children, budget_params=budget_params, policy=policy,
                                  jobs=jobs, seed=seed, transforms=tuple(transform) if transform else None)
        train = TrainSettings(epochs=epochs, optimizer=optimizer, lr=lr, lr_min=lr_min, momentum=momentum,
                              weight_decay=weight_decay)
        if policy_state is not None and policy != "controller":
            raise UsageError("--policy-state holds a controller's state; it needs --policy controller")
        gm = load_model(model, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle, input_shape=input_shape)
        outs = SearchOutputs([(Path(p), format) for p in output or []], plan=plan_out, plot=plot)
        check_search_outputs(gm, outs, (data, val, *((policy_state,) if policy_state else ())), overwrite)
        found = load_search_data(data, val, gm.inputs, loss=loss, batch_size=batch_size, kind=gm.kind)
        state = load_policy_state(policy_state)
        con = console(quiet, json_out)
        with _progress(con) as on_child:
            result = search(gm, found, settings, train, policy_state=state, on_child=on_child,
                            on_round=lambda so_far: save_policy_state(so_far.policy_state, policy_state))
        save_policy_state(result.policy_state, policy_state)
        plan = search_plan(result, train, model=str(model), data=str(data), seed=seed, arch=arch, plan_path=plan_out)
        log = run_log(result, settings, train, model=str(model), data=str(data), val=str(val))
        written = write_search_outputs(result, outs, plan=plan, log=log)
        if json_out:
            emit_json({**log, "outputs": written, "plan": str(plan_out) if plan_out else None,
                       "plot": str(plot) if plot else None, "log": str(outs.log)})
        else:
            typer.echo(table_text(result))
            typer.echo(f"best: {result.best.num_parameters():,} parameters after {len(result.path)} step(s), "
                       f"{_score(result.best_score)} (the original: {_score(result.original_score)}); stopped: "
                       f"{result.stop}")
            for out in written:
                typer.echo(f"wrote {out['path']} [{out['format']}]")
            for p in (plan_out, plot, outs.log):
                if p is not None:
                    typer.echo(f"wrote {p}")
        if result.interrupted:
            typer.echo("growcli: interrupted; the best model so far and the log were written", err=True)
            raise typer.Exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def _progress(con):
    """A progress bar per round on stderr (nothing when quiet, with --json or off a terminal); yields the callback."""
    if con.quiet:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    tasks: dict[int, int] = {}
    with Progress(TextColumn("round {task.fields[round]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=con, transient=False) as bar:
        def on_child(round_: int, done: int, total: int) -> None:
            if round_ not in tasks:
                tasks[round_] = bar.add_task("", total=total, round=round_)
            bar.update(tasks[round_], completed=done)

        yield on_child


def _score(score) -> str:
    acc = f"validation accuracy {score.accuracy:.4f}, " if score.accuracy is not None else ""
    return f"{acc}loss {score.loss:.4g}"
