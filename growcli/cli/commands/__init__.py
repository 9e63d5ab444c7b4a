"""CLI commands, one module each; every module has ``register(app)``."""

from __future__ import annotations

import importlib

COMMAND_MODULES = ["inspect", "verify", "convert", "widen", "grow", "validate", "stack", "deepen", "suggest"]

_registered: set[int] = set()


def register_all(app) -> None:
    if id(app) in _registered:
        return
    _registered.add(id(app))
    for name in COMMAND_MODULES:
        importlib.import_module(f"growcli.cli.commands.{name}").register(app)
