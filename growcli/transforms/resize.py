"""A resized torch.nn module's size attributes (``in_features``, ``out_channels``, …) follow its parameters.

Every width transform calls :func:`sync_attributes` after changing a module's parameters, so that
the module's ``repr``, its ``extra_repr`` and code reading those attributes agree with the shapes.
Changes go through ``gm.edits`` so that they are recorded and replayed with the weights.
"""

from __future__ import annotations

import sys

from torch import nn

from growcli.core.model import GrowModel


def sync_attributes(gm: GrowModel, name: str) -> None:
    """Keep a torch.nn module's size attributes equal to its (new) parameter shapes."""
    m = gm.module.get_submodule(name) if name else gm.module
    root = gm.module

    def set_if(attr: str, value) -> None:
        if hasattr(m, attr) and getattr(m, attr) != value:
            gm.edits.attr(root, name, attr, value)

    if isinstance(m, nn.Linear):
        set_if("out_features", m.weight.shape[0])
        set_if("in_features", m.weight.shape[1])
    elif isinstance(m, nn.modules.conv._ConvTransposeNd):  # weight [in, out/groups, k…]
        set_if("in_channels", m.weight.shape[0])
        set_if("out_channels", m.weight.shape[1] * m.groups)
    elif isinstance(m, nn.modules.conv._ConvNd):
        set_if("out_channels", m.weight.shape[0])
        set_if("in_channels", m.weight.shape[1] * m.groups)
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        set_if("num_features", (m.weight if m.weight is not None else m.running_mean).shape[0])
    elif isinstance(m, nn.PReLU):
        set_if("num_parameters", m.weight.shape[0])
    elif isinstance(m, nn.Embedding):
        set_if("embedding_dim", m.weight.shape[1])
    elif _is_hf_conv1d(m):  # transformers' Conv1D (GPT-2): weight [nx, nf]; its forward views to nf
        set_if("nf", m.weight.shape[1])
        set_if("nx", m.weight.shape[0])


def _is_hf_conv1d(m: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (looked up only if transformers is already imported)."""
    cls = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return cls is not None and isinstance(m, cls)
