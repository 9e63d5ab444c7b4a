"""A resized torch.nn module's size attributes (``in_features``, ``out_channels``, …) follow its parameters.

Every width transform calls :func:`sync_attributes` after changing a module's parameters, so that
the module's ``repr``, its ``extra_repr`` and code reading those attributes agree with the shapes.
Changes go through ``gm.edits`` so that they are recorded and replayed with the weights.
"""

from __future__ import annotations

from growcli.core.model import GrowModel
from growcli.core.size_attrs import stale_sizes


def sync_attributes(gm: GrowModel, name: str) -> None:
    """Keep a torch.nn module's size attributes equal to its (new) parameter shapes (recorded as edits).

    The rule is :func:`growcli.core.size_attrs.size_attributes`, the one a replay applies too."""
    m = gm.module.get_submodule(name) if name else gm.module
    for attr, value in stale_sizes(m).items():
        gm.edits.attr(gm.module, name, attr, value)
