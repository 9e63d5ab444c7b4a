"""Growth under real torch.distributed DDP: 2 processes, gloo backend, growth at step 5."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GROW_AT, STEPS = 5, 25


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _train(rank, out_dir)  # returns with its DDP wrappers freed, before the process group goes
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        gc.collect()
        dist.destroy_process_group()


def _train(rank: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from growcli import zoo
    from growcli.train.ddp import grow_ddp_, parameter_hash

    torch.manual_seed(0)  # the same initial model on every rank
    model = DistributedDataParallel(zoo.mlp())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    x = torch.randn(32, 16, generator=g)
    y = (x[:, :4].argmax(1))  # a learnable target
    held_out = torch.randn(4, 16, generator=torch.Generator().manual_seed(7))  # the same on every rank
    losses, hashes = [], {}
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == GROW_AT:
            hashes["before"] = parameter_hash(model.module)
            model, report = grow_ddp_(model, "widen", opt, held_out, layer="fc1", by=8, seed=3)
            hashes["after"] = parameter_hash(model.module)
            width = model.module.fc1.out_features
    hashes["end"] = parameter_hash(model.module)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"losses": losses, "hashes": hashes, "width": width, "mapped": report.optimizer["mapped"]}))


def test_two_process_ddp_grows_identically_and_keeps_training(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["width"] == r1["width"] == 32 + 8
    assert r0["hashes"] == r1["hashes"]  # equal before, right after growth, and at the end
    assert r0["hashes"]["before"] != r0["hashes"]["after"]
    assert r0["mapped"] == ["fc1.weight", "fc1.bias", "fc2.weight"]
    for r in (r0, r1):
        after = r["losses"][GROW_AT:]
        assert after[-1] < after[0], after  # training goes on after growth, loss decreasing
