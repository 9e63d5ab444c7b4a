"""docs/gen_cnn_coverage.py: the CNN coverage table's worker and its cells.

The worker runs in this process on one tiny model and one column (the full table runs every
model in a subprocess, ``python docs/gen_cnn_coverage.py``); the cells are checked for their
format and for the exactness number they carry (float64, bound 1e-10: the identity layer and
the Dirac conv add exact zeros and ones, so only summation order can differ).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def gen():
    sys.path.insert(0, str(DOCS))
    try:
        spec = importlib.util.spec_from_file_location("gen_cnn_coverage", DOCS / "gen_cnn_coverage.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(DOCS))


def run_worker(gen, tmp_path, label: str, columns: tuple[str, ...]) -> dict[str, dict]:
    import torch

    results = tmp_path / "results.jsonl"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script's worker process runs: tiny float64 convs are faster on one thread
    try:
        gen.worker(label, results, columns)
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert all(r["model"] == label for r in records)
    return {r["column"]: r for r in records}


def test_deepen_cell_on_a_hugging_face_resnet(gen, tmp_path):
    got = run_worker(gen, tmp_path, "resnet-basic", ("deepen",))
    assert got["build"] == {"model": "resnet-basic", "column": "build", "status": "built",
                            "detail": "ResNetForImageClassification"}
    record = got["deepen"]
    assert record["status"] == "exact", record
    m = re.fullmatch(r"(0|\d\.\de-\d\d); after `([\w.]+)`, (\d+)/(\d+) conv layers listed", record["detail"])
    assert m, record["detail"]
    assert float(m.group(1)) <= 1e-10
    assert 1 <= int(m.group(3)) <= int(m.group(4))
    line = gen.row("resnet-basic", got)
    cells = line.strip("| ").split(" | ")
    assert cells == ["`resnet-basic`", "ResNetForImageClassification", "—", f"exact ({record['detail']})", "—", "—"]


def test_block_cell_refuses_a_model_without_block_stacks(gen, tmp_path):
    """The VGG re-implementation has no ModuleList/Sequential of same-typed blocks with parameters."""
    got = run_worker(gen, tmp_path, "vgg", ("block",))
    assert got["build"]["detail"] == "VGG (re-implementation)"
    assert got["block"]["status"] == "refused"
    assert gen.cnn_cell(got["block"]) == ("refused: no stack of repeated blocks (ModuleList/Sequential of "
                                          "same-typed blocks)")


def test_widen_summary_cells(gen):
    partial = {"status": "partial", "detail": "3/5 exact (4.4e-16); refused `a.b`: the channels are normalised | x"}
    assert gen.cnn_cell(partial) == "3/5 exact (4.4e-16); refused `a.b`: the channels are normalised \\| x"
    assert gen.cnn_cell({"status": "exact", "detail": "5/5 exact (0)"}) == "5/5 exact (0)"
    assert gen.cnn_cell({"status": "refused", "detail": "0/5 exact; refused `c`: why"}) == "refused: 0/5 exact; refused `c`: why"
    assert gen.cnn_cell({"status": "exact", "detail": "2.2e-16"}) == "exact (2.2e-16)"
    assert gen.cnn_cell({"status": "error", "detail": "KeyError: 'x'"}) == "error: KeyError: 'x'"


def test_spread_picks_evenly_from_first_to_last(gen):
    assert gen.spread(list(range(10)), 5) == [0, 2, 4, 7, 9]
    assert gen.spread([1, 2], 5) == [1, 2]
