"""deepen --block: insert a copy of a residual block right after it, with its residual writers zeroed.

The copy computes ``post(x + 0)`` where ``post`` is what the block applies after its last
residual add. That is ``x`` when there is nothing there, or an idempotent activation the
copy's input already went through (ResNet's ``relu(x + F(x))``: the copy receives the
block's own relu output). A normalisation there (post-LN, ``LN(x + F(x))``) re-normalises
with the copy's own weights, so it is refused. The writers come from
:mod:`growcli.analysis.residual`; the config and ``layer_idx`` follow the new depth through
:mod:`growcli.analysis.depth` (docs/recipes.md#deepen-residual-blocks).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from growcli.analysis.depth import insert_order
from growcli.analysis.residual import BlockWriters, ResidualRefusal, block_writers, chains, follows
from growcli.analysis.trace import Trace
from growcli.core.errors import NotGrowableError
from growcli.core.model import GrowModel
from growcli.transforms.rebuilt import deepen_hint, layout_depth
from growcli.transforms.registry import StepReport
from growcli.transforms.stack import StackPlan


def block_names(root: nn.Module) -> list[str]:
    """Every element of a ``ModuleList``/``Sequential``: the places a block copy can follow."""
    return [f"{n}.{i}" if n else str(i) for n, m in root.named_modules()
            if isinstance(m, (nn.ModuleList, nn.Sequential)) for i in range(len(m))]


def analyse_block(trace: Trace, root: nn.Module, block: str) -> BlockWriters:
    """The writers of ``block``, refused (:class:`NotGrowableError`) unless a zeroed copy after it is the identity."""
    found = block_writers(trace, root, block)
    if found.norm_sites:
        op, module = found.norm_sites[0]
        raise NotGrowableError(
            f"'{block}' is a post-LN block: the residual sum goes through {op} in {module}, so a copy with zeroed "
            "writers computes norm(x + 0) with its own weights, which re-normalises x instead of passing it through "
            "(docs/recipes.md#deepen-residual-blocks); only pre-LN blocks (x + F(norm(x))) can start as the identity")
    refusal = follows(found, found)  # the copy follows the block it copies
    container, index = _split(block)
    if refusal is None and index > 0:  # the copy must read its stream from the block before it, as this one does
        refusal = chains(found, _name(container, index - 1))
    elif refusal is None and len(root.get_submodule(container)) > 1:
        try:
            refusal = chains(block_writers(trace, root, _name(container, 1)), block)
        except NotGrowableError:  # the next block is no residual block: nothing says where the stream comes from
            pass
    if refusal is not None:
        raise ResidualRefusal(refusal)
    return found


def _split(block: str) -> tuple[str, int]:
    container, _, idx = block.rpartition(".")
    return container, int(idx)


def _name(container: str, index: int) -> str:
    return f"{container}.{index}" if container else str(index)


def by_position(chosen: list[str]) -> list[str]:
    """``chosen`` highest index first (per container), so inserting does not move the blocks still to be copied."""
    return sorted(chosen, key=lambda b: (_split(b)[0], -_split(b)[1]))


def block_change(container: str, old_len: int, block: str, zeroed: tuple[str, ...]) -> dict[str, str]:
    """The report's change for one copy of ``block`` inserted into ``container`` of ``old_len`` blocks."""
    index = _split(block)[1]
    return {"name": container or "(root)", "before": f"{old_len} blocks",
            "after": f"{old_len + 1} blocks: a copy of '{block}' at index {index + 1} with "
                     f"zeroed residual writers {', '.join(zeroed)}"}


def post_notes(analyses: dict[str, BlockWriters]) -> list[str]:
    """Why blocks ending in an activation after their residual add are still exact."""
    out = []
    for a in analyses.values():
        if a.post:
            ops = ", ".join(dict.fromkeys(op for op, _ in a.post_sites))
            out.append(f"'{a.block}' ends in {ops} after its residual add; exact because the copy receives "
                       "that activation's output, on which it is the identity")
    return out


def copies_layout(root: nn.Module, chosen: list[str]) -> tuple[str, list[int]]:
    """The one container of ``chosen`` and its new layout: each chosen block followed by its copy.

    ``[0, 1, 1, 2]`` for a copy of block 1 of three: the layout :mod:`growcli.analysis.depth`
    and the streaming stack executor share. Raises :class:`NotGrowableError` when the blocks
    lie in more than one container (streaming rewrites one stack).
    """
    containers = sorted({_split(b)[0] for b in chosen})
    if len(containers) != 1:
        raise NotGrowableError(f"deepen --block --streaming copies blocks of one stack; these lie in "
                               f"{', '.join(c or '(root)' for c in containers)} (use --no-streaming)")
    container = containers[0]
    return container, copies_order(len(root.get_submodule(container)), chosen)


def copies_order(length: int, matched: list[str]) -> list[int]:
    """The layout of a stack of ``length`` blocks after a copy of each ``matched`` block (``"….3"``) follows it.

    Also reads a recorded step back: a ``deepen --block`` step's ``matched`` gives its layout.
    """
    picked = {_split(b)[1] for b in matched}
    return [j for i in range(length) for j in ([i, i] if i in picked else [i])]


def insert_blocks(gm: GrowModel, trace: Trace, chosen: list[str], report: StepReport) -> list[nn.Module]:
    """Insert a zeroed copy after every block in ``chosen`` (all analysed first); returns the new blocks."""
    root = gm.module
    analyses = {b: analyse_block(trace, root, b) for b in chosen}
    config = getattr(root, "config", None)
    new_blocks = []
    for block in by_position(chosen):
        container, index = _split(block)
        seq = root.get_submodule(container)
        old_len = len(seq)
        depth, check = layout_depth(root, container, insert_order(old_len, index))
        if check is not None and check.reason():  # in memory the copy is exact; from_pretrained would rebuild it otherwise
            report.notes.append(f"{check.reason()}{deepen_hint(root, container, index)}; a Hugging Face directory "
                                "output will be refused (.safetensors + growcli.load_grown works)")
        # The copy shares the model's config object instead of cloning it.
        new = copy.deepcopy(seq[index], memo={id(config): config} if config is not None else None)
        for made, source in zip(new.parameters(), seq[index].parameters()):
            gm.edits.derive(made, source)
        gm.edits.insert(root, container, index + 1, new, {"type": "copy", "name": block})
        zeroed = analyses[block].writers
        for rel in zeroed:
            full = ".".join(p for p in (container, str(index + 1), rel) if p)
            gm.edits.param(root, full, torch.zeros_like(root.get_parameter(full)))
        for path, attr, value in depth.attrs:
            gm.edits.attr(root, path, attr, value)
        if depth.config is None:
            report.notes.append(f"no config value describes the new depth of '{container}'; a Hugging Face "
                                "directory output will be refused (.safetensors + growcli.load_grown works)")
        for key, value in (depth.config or {}).items():
            gm.edits.config(root, key, value)
        report.changes.append(block_change(container, old_len, block, zeroed))
        new_blocks.append(new)
    report.notes += post_notes(analyses)
    return new_blocks


def plan_copies(trace: Trace, root: nn.Module, chosen: list[str]) -> tuple[StackPlan, list[dict], list[str]]:
    """``deepen --block`` as a stack layout, for rewriting a checkpoint: the plan, the report's changes and notes.

    Decided on ``root`` (which may live on the meta device) without changing it: the same
    analysis (:func:`analyse_block`), config values and report entries as
    :func:`insert_blocks`, whose sequence of single inserts composes to this one layout.
    Raises :class:`NotGrowableError` when a block is refused or no config value describes the
    new depth.
    """
    analyses = {b: analyse_block(trace, root, b) for b in chosen}
    container, order = copies_layout(root, chosen)
    depth, check = layout_depth(root, container, order)
    if check is not None and check.reason():  # a streamed checkpoint is rebuilt from its config
        hint = deepen_hint(root, container, _split(chosen[0])[1]) if len(chosen) == 1 else ""
        raise NotGrowableError(f"deepen --block: {check.reason()}{hint}")
    if depth.config is None:
        raise NotGrowableError(f"deepen --block: {depth.reason}; growcli cannot keep the config in step with it")
    length = len(root.get_submodule(container))
    plan = StackPlan(container, length, order, writers={_split(b)[1]: a.writers for b, a in analyses.items()},
                     config=depth.config, attrs=depth.attrs)
    changes = [block_change(container, length + k, block, analyses[block].writers)
               for k, block in enumerate(by_position(chosen))]
    return plan, changes, post_notes(analyses)
