"""Stacks of repeated blocks: the containers progressive stacking and block insertion work on.

:func:`block_stacks` lists them; :func:`find_stack` picks the one to stack and
:func:`check_repeated` / :func:`check_not_shared` refuse stacks a copy could not extend
(blocks of different shapes, such as a stage's downsampling first block, or parameters
tied to modules outside the stack).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from growcli.core.errors import NoMatchingModuleError, NotGrowableError


def block_stacks(module: nn.Module, min_len: int = 2) -> list[dict[str, Any]]:
    """Containers (``ModuleList``/``Sequential``) of ``min_len``+ same-typed blocks with parameters, longest first."""
    stacks = []
    for name, m in module.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) < min_len:
            continue
        children = list(m)
        types = {type(c) for c in children}
        if len(types) == 1 and any(True for _ in children[0].parameters()) and not isinstance(children[0], (nn.Linear, nn.Conv2d)):
            stacks.append({"name": name, "type": type(children[0]).__name__, "length": len(children),
                           "params_per_block": sum(p.numel() for p in children[0].parameters())})
    return sorted(stacks, key=lambda s: (-s["length"], s["name"]))


def find_stack(module: nn.Module, blocks: str | None) -> str:
    """The container to stack: ``blocks`` if given, else the longest list of same-typed blocks."""
    if blocks is not None:
        try:
            container = module.get_submodule(blocks)
        except AttributeError:
            near = [s["name"] for s in block_stacks(module)]
            hint = f"; stacks found: {', '.join(near)}" if near else ""
            raise NoMatchingModuleError(f"--blocks {blocks!r}: no such module{hint}") from None
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 1:
            raise NotGrowableError(f"stack: --blocks {blocks} is a {type(container).__name__}, not a ModuleList/Sequential of blocks")
        if len({type(b) for b in container}) != 1:
            raise NotGrowableError(f"stack: the blocks in {blocks} are of different types; stacking needs repeated blocks")
        return blocks
    stacks = block_stacks(module)
    if not stacks:
        raise NotGrowableError(f"stack: {type(module).__name__} has no ModuleList/Sequential of two or more same-typed "
                               "blocks; name one with --blocks PATH")
    return stacks[0]["name"]


def check_repeated(module: nn.Module, container: str) -> None:
    """Refuse stacks whose blocks differ in parameter names or shapes (a stage's downsampling block…)."""
    stack = module.get_submodule(container)
    first = {k: tuple(v.shape) for k, v in stack[0].state_dict().items()}
    for i, block in enumerate(stack):
        shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
        if shapes != first:
            diff = sorted(set(shapes.items()) ^ set(first.items()))[0][0]
            raise NotGrowableError(f"stack: the blocks of {container} are not repeats of one another ({container}.{i}."
                                   f"{diff} {list(shapes.get(diff, ()))} vs {container}.0.{diff} "
                                   f"{list(first.get(diff, ()))}); a copy could not follow every block")


def check_not_shared(module: nn.Module, container: str) -> None:
    """Refuse blocks that share parameters with modules outside the stack: a copy would break the tie."""
    stack = module.get_submodule(container)
    inside = {id(p) for p in stack.parameters()}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in inside and not name.startswith(container + "."):
            raise NotGrowableError(f"stack: {container} shares parameter {name} with a module outside the stack; "
                                   "copies would either share it or silently untie it")
