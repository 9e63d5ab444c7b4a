"""Make, measure and train one child; run a round's children in this process or in spawned ones.

A child is its parent grown by one move with :func:`growcli.train.live.grow_` (the step verified
on the first validation batch and generated batches, the parent's optimizer state carried by the
weights' own map), then measured — its validation loss in float64 right after the step, which an
exact step leaves at the parent's — and trained for one SGDR cycle (:mod:`growcli.search.fit`).

Everything random in a child comes from its own seed, :func:`child_seed` of (search seed, round,
child index), and children run with one intra-op thread, so a child's result is the same in
this process (``jobs=1``) or in any of ``jobs`` spawned worker processes (fork is unsafe with
torch's threads; spawned workers start clean).
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import pickle
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from growcli.core.errors import GrowError, UsageError
from growcli.core.model import GrowModel, eval_mode
from growcli.run.steps import VerifySettings
from growcli.search.data import Score, SearchData, evaluate
from growcli.search.fit import TrainSettings, make_optimizer, train
from growcli.search.moves import Move
from growcli.train.live import grow_


def child_seed(seed: int, round_: int, index: int) -> int:
    """The seed of child ``index`` of round ``round_``: a function of the three numbers only."""
    return (seed * 1_000_003 + round_ * 10_007 + index * 101 + 17) % (2 ** 31 - 1)


@dataclass
class ChildJob:
    round: int
    index: int
    seed: int
    parent: GrowModel
    parent_optimizer: dict[str, Any] | None
    parent_loss: float  # the parent's validation loss in float64
    move: Move
    data: SearchData
    train: TrainSettings
    verify: VerifySettings
    budget: int | None = None


@dataclass
class ChildResult:
    round: int
    index: int
    seed: int
    move: Move
    status: str  # trained | over budget | refused
    params: int = 0
    parent_loss: float = 0.0
    start_loss: float | None = None  # float64 validation loss right after the growth step
    step_max_abs_diff: float | None = None  # the step's own verification
    val: Score | None = None  # after training
    train_losses: list[float] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0
    steps: list[dict[str, Any]] = field(default_factory=list, repr=False)
    gm: GrowModel | None = field(default=None, repr=False)
    optimizer: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def start_diff(self) -> float | None:
        return None if self.start_loss is None else abs(self.start_loss - self.parent_loss)

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "child": self.index, "seed": self.seed, "move": self.move.to_dict(),
                "label": self.move.label(), "status": self.status, "params": self.params,
                "parent_val_loss": self.parent_loss, "start_val_loss": self.start_loss, "start_diff": self.start_diff,
                "step_max_abs_diff": self.step_max_abs_diff,
                "val_loss": self.val.loss if self.val else None, "val_accuracy": self.val.accuracy if self.val else None,
                "train_losses": self.train_losses, "message": self.message, "seconds": round(self.seconds, 3)}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Intra-op threads = 1 (reductions then sum in one order, whichever process runs the child)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_child(job: ChildJob) -> ChildResult:
    """Grow ``job.parent`` by ``job.move``, measure the start, train; never raises a :class:`GrowError`.

    A move the transform refuses here, or one that would pass the parameter budget, comes back
    with that status and no model.
    """
    started = time.perf_counter()
    out = ChildResult(job.round, job.index, job.seed, job.move, "refused", parent_loss=job.parent_loss)
    with one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.seed)
        gm = copy.deepcopy(job.parent)
        gm.edits.derived = {}
        optimizer = make_optimizer(gm.module, job.train)
        if job.parent_optimizer is not None:
            optimizer.load_state_dict(copy.deepcopy(job.parent_optimizer))  # torch's load shares tensors
        try:
            report = grow_(gm.module, job.move.step, optimizer, job.data.example(), seed=job.seed,
                           settings=copy.deepcopy(job.verify))
        except GrowError as exc:
            out.message = str(exc)
            out.seconds = time.perf_counter() - started
            return out
        gm.edits.records.extend(report.edits)
        gm.steps.extend(report.steps)
        out.steps = report.steps
        out.params = report.params_after
        out.step_max_abs_diff = max(float((s.get("verification") or {}).get("max_abs_diff", 0.0)) for s in report.steps)
        if job.budget is not None and out.params > job.budget:
            out.status = "over budget"
            out.message = f"{out.params:,} parameters > budget {job.budget:,}"
            out.seconds = time.perf_counter() - started
            return out
        out.start_loss = evaluate(gm.module, job.data.val, torch.float64).loss
        if not any(p.requires_grad for p in gm.module.parameters()):
            out.message = f"{job.move.transform} left no trainable parameter"
            out.seconds = time.perf_counter() - started
            return out
        generator = torch.Generator().manual_seed(job.seed)
        out.train_losses = train(gm.module, optimizer, job.data.train, job.train, generator)
        eval_mode(gm.module)
        out.val = evaluate(gm.module, job.data.val)
        for group in optimizer.param_groups:  # the next child's cycle starts from the top again
            group["lr"] = job.train.lr
        out.optimizer = optimizer.state_dict()
        gm.edits.derived = {}
        out.gm = gm
        out.status = "trained"
    out.seconds = time.perf_counter() - started
    return out


def _check_picklable(job: ChildJob) -> None:
    """Worker processes receive the parent by pickle; refuse a model that cannot travel, before starting any."""
    try:
        pickle.dumps(job.parent)
    except Exception as exc:  # noqa: BLE001  (pickling fails with AttributeError, TypeError, PicklingError…)
        raise UsageError("--jobs: the model cannot be sent to worker processes (" + f"{type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160]}); a loaded .pt2 program cannot be pickled, use --jobs 1 "
                         "or load the weights with --arch") from None


def _init_worker() -> None:
    torch.set_num_threads(1)
    # Ctrl-C reaches the whole process group: the parent stops the workers itself (no traceback from each).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ChildRunner:
    """Runs a round's children here (``jobs == 1``) or in a pool of ``jobs`` spawned processes kept for the search.

    Use as a context manager; a ``KeyboardInterrupt`` (or any error) stops the workers at once.
    """

    def __init__(self, jobs: int = 1):
        self.jobs = jobs
        self._pool = None

    def __enter__(self) -> "ChildRunner":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._pool is not None:
            if exc_type is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()
            self._pool = None

    def run(self, jobs: list[ChildJob], on_done: Callable[[ChildResult], None] | None = None) -> list[ChildResult]:
        """Every job's result, in job order."""
        results: list[ChildResult] = []
        if self.jobs <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(run_child(job))
                if on_done:
                    on_done(results[-1])
        else:
            if self._pool is None:
                _check_picklable(jobs[0])
                self._pool = multiprocessing.get_context("spawn").Pool(self.jobs, initializer=_init_worker)
            for result in self._pool.imap_unordered(run_child, jobs):
                results.append(result)
                if on_done:
                    on_done(result)
        return sorted(results, key=lambda r: r.index)
