"""CLI commands, one module each; every module has ``register(app)``.

The imports are static so that the import graph (tests/test_layout.py) sees every command.
"""

from __future__ import annotations

from growcli.cli.commands import (branch, column, convert, cpg, deepen, grow, inspect, nest, prune, search, stack, suggest,
                                  upcycle, validate, verify, vocab, widen)

# In the order ``growcli --help`` lists them.
COMMANDS = (inspect, verify, convert, widen, grow, validate, stack, deepen, branch, column, upcycle, vocab, prune, nest, cpg,
            suggest, search)
COMMAND_MODULES = [m.__name__.rsplit(".", 1)[1] for m in COMMANDS]

_registered: set[int] = set()


def register_all(app) -> None:
    if id(app) in _registered:
        return
    _registered.add(id(app))
    for module in COMMANDS:
        module.register(app)
