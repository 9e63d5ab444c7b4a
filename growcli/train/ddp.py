"""Growth under ``torch.distributed`` data parallelism: :func:`grow_ddp_`.

A ``DistributedDataParallel`` wrapper holds the parameters it was built with (in its gradient
buckets), so growth goes through the wrapped module and the wrapper is built again. Every rank
must grow identically: the same transform, options and seed on the same model, which growcli's
transforms guarantee (all randomness comes from the seed). :func:`grow_ddp_` checks it — a
hash of every parameter is gathered from all ranks and compared — before wrapping again.
FSDP shards parameters across ranks, so no rank holds a whole weight to grow: not supported.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from growcli.core.errors import GrowError
from growcli.train.live import LiveReport, grow_


def parameter_hash(module: nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype and bytes, in module order."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        t = p.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def grow_ddp_(ddp: DistributedDataParallel, step_or_plan: Any, optimizer: torch.optim.Optimizer | None = None,
              example_inputs: Any = None, *, seed: int = 0, ddp_kwargs: dict[str, Any] | None = None,
              **options: Any) -> tuple[DistributedDataParallel, LiveReport]:
    """Grow ``ddp.module`` on this rank like :func:`growcli.grow_`, check all ranks agree, wrap again.

    Call it on every rank at the same step with the same arguments. Returns the new wrapper (use
    it from now on) and this rank's report. ``ddp_kwargs`` are passed to the new wrapper (e.g.
    ``device_ids``); raises :class:`GrowError` when the ranks' grown parameters differ.
    """
    module = ddp.module
    report = grow_(module, step_or_plan, optimizer, example_inputs, seed=seed, **options)
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, parameter_hash(module))
    if len(set(digests)) != 1:
        raise GrowError(f"ranks grew differently (parameter hashes {', '.join(d[:12] for d in digests)}); "
                        "every rank must run the same growth with the same seed on the same model")
    return DistributedDataParallel(module, **(ddp_kwargs or {})), report
