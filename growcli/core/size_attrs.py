"""The one rule from a module's tensor shapes to its size attributes (``in_features``, ``num_features``, …).

A ``torch.nn`` layer keeps its sizes twice: in its tensors and in constructor attributes that its
``repr``, its spec (:func:`growcli.core.module_specs.module_spec`) and some forwards read
(``LayerNorm`` passes ``normalized_shape`` to ``F.layer_norm``). :func:`size_attributes` says what the
attributes must be for the tensors the module holds now. Two callers share it, so they cannot drift apart:

- the width transforms, through :func:`growcli.transforms.resize.sync_attributes`, which records every
  change as an ``attr`` edit;
- :func:`growcli.core.replay.replay`, which applies it to every module whose tensors a recorded ``param``
  edit replaced (:func:`sync_sizes`). A model grown as a loaded ``.pt2`` program records no attribute
  edits (the program's modules are plain holders of tensors), so this is what gives the ``torch.nn``
  original those edits are replayed onto (``growcli.load_grown``) sizes that match its tensors.

Only types are tested (``isinstance``), never names; a module the rule does not know is left alone.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn


def _shape(t: Any) -> tuple[int, ...] | None:
    """The shape of a materialised tensor; ``None`` for no tensor or a lazy module's uninitialised one."""
    if not isinstance(t, torch.Tensor) or isinstance(t, nn.parameter.UninitializedTensorMixin):
        return None
    return tuple(t.shape)


def size_attributes(m: nn.Module) -> dict[str, Any]:
    """The size attributes of ``m`` that its tensors determine, each with the value they determine.

    ``{}`` when ``m`` is of no type the rule knows or holds no tensor to read the sizes from (a norm
    without affine weights or running statistics). Order matters where one value reads another:
    a convolution's channels are ``weight.shape[·] × groups`` with its current ``groups``.
    """
    w = _shape(getattr(m, "weight", None))
    if isinstance(m, nn.Linear) and w is not None and len(w) == 2:
        return {"out_features": w[0], "in_features": w[1]}
    if isinstance(m, nn.modules.conv._ConvTransposeNd) and w is not None:  # weight [in, out/groups, k…]
        return {"in_channels": w[0], "out_channels": w[1] * m.groups}
    if isinstance(m, nn.modules.conv._ConvNd) and w is not None:  # weight [out, in/groups, k…]
        return {"out_channels": w[0], "in_channels": w[1] * m.groups}
    if isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm, InstanceNorm
        size = w if w is not None else _shape(getattr(m, "running_mean", None))
        return {"num_features": size[0]} if size else {}
    if isinstance(m, nn.GroupNorm):
        return {"num_channels": w[0]} if w else {}
    norms = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
    if isinstance(m, norms):
        return {"normalized_shape": w} if w is not None else {}
    if isinstance(m, nn.PReLU) and w is not None:
        return {"num_parameters": w[0]}
    if isinstance(m, nn.Embedding) and w is not None and len(w) == 2:
        return {"num_embeddings": w[0], "embedding_dim": w[1]}
    if _is_hf_conv1d(m) and w is not None:  # transformers' Conv1D (GPT-2): weight [nx, nf]; its forward views to nf
        return {"nf": w[1], "nx": w[0]}
    return {}


def stale_sizes(m: nn.Module) -> dict[str, Any]:
    """The entries of :func:`size_attributes` that ``m``'s attributes do not hold yet (tuples and lists alike)."""
    def differs(attr: str, value: Any) -> bool:
        have = getattr(m, attr, None)
        if isinstance(value, tuple) and isinstance(have, (tuple, list)):
            return tuple(have) != value
        return have != value

    return {a: v for a, v in size_attributes(m).items() if hasattr(m, a) and differs(a, v)}


def sync_sizes(m: nn.Module) -> dict[str, Any]:
    """Set ``m``'s size attributes to what its tensors say (not recorded anywhere); returns what changed."""
    changed = stale_sizes(m)
    for attr, value in changed.items():
        setattr(m, attr, value)
    return changed


def _is_hf_conv1d(m: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (looked up only if transformers is already imported)."""
    cls = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return cls is not None and isinstance(m, cls)
