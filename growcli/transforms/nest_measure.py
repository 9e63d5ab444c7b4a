"""NeST's measurements on calibration data: ``∂L/∂(w·m)`` of masked layers and ``G = Σ δ xᵀ`` across a unit.

A masked layer (:mod:`growcli.nn.masks`) computes with ``weight * mask``. The gradient NeST ranks
missing connections by is the gradient of the loss with respect to that product, which is not
zero where the mask is (the gradient of ``weight`` there is). :class:`_Observe` (a
:class:`~torch.overrides.TorchFunctionMode`) recognises the product of a layer's own ``weight``
and ``mask`` tensors and returns it as a leaf tensor that requires grad, so ``∂L/∂(w·m)`` is that
leaf's gradient; calls using the leaf as their weight have their input recorded and a zero
``aux`` added to their output, whose gradient is ``δ`` (what neuron growth needs). Also here:
the option help shared by the NeST transforms, and how they find masked layers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from growcli.analysis.calibration import Calibration, batch_loss, run_on_batch
from growcli.core.errors import NoMatchingModuleError, NotGrowableError
from growcli.core.inputs import cast_batch
from growcli.core.select import select
from growcli.nn.masks import MASKED, MASKED_TYPES

LAYER_HELP = "Module name, dotted suffix, glob or regex; a list selects several layers."
DATA_HELP = "Calibration data, .safetensors/.pt with 'input' and 'target' (the gradient comes from it)."
LOSS_HELP = "auto, cross_entropy, mse or model."
DATA_BATCHES_HELP = "Use only the first N calibration batches."
BATCH_SIZE_HELP = "Samples per calibration batch (default 32)."

_MUL = {torch.Tensor.mul, torch.Tensor.__mul__, torch.mul}


def masked_names(root: nn.Module) -> list[str]:
    return [n for n, m in root.named_modules() if isinstance(m, MASKED_TYPES)]


def select_masked(root: nn.Module, selector: str | list[str], op: str) -> list[str]:
    """The masked layers ``selector`` names; :class:`NotGrowableError` when it names unmasked layers only."""
    masked = masked_names(root)
    if not masked:
        raise NotGrowableError(f"{op}: the model has no masked layer; add a mask step first (transform mask, "
                               "or growcli nest)")
    try:
        return select(selector, masked, "masked layer")
    except NoMatchingModuleError:
        plain = [n for n, m in root.named_modules() if type(m) in MASKED]
        hit = select(selector, plain + masked, "layer")  # an unknown name: the usual error with near misses
        raise NotGrowableError(f"{op}: {', '.join(map(repr, hit))} {'is' if len(hit) == 1 else 'are'} not masked; "
                               "add a mask step for it first") from None


class _Observe(TorchFunctionMode):
    def __init__(self, layers: dict[str, nn.Module]):
        super().__init__()
        self.pairs = {id(m.weight): (name, m.mask) for name, m in layers.items()}
        self.leaf_of: dict[int, str] = {}
        self.leaves: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        self.inputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        self.auxes: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MUL and len(args) == 2 and id(args[0]) in self.pairs and args[1] is self.pairs[id(args[0])][1]:
            name = self.pairs[id(args[0])][0]
            leaf = func(*args, **kwargs).detach().requires_grad_(True)
            self.leaves[name].append(leaf)
            self.leaf_of[id(leaf)] = name
            return leaf
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        name = self.leaf_of.get(id(weight)) if isinstance(weight, torch.Tensor) else None
        out = func(*args, **kwargs)
        if name is not None and isinstance(out, torch.Tensor):
            self.inputs[name].append(args[0].detach())
            aux = torch.zeros_like(out, requires_grad=True)
            self.auxes[name].append(aux)
            out = out + aux
        return out


def measure(module: nn.Module, layers: list[str], cal: Calibration,
            pairs: list[tuple[str, str]] = ()) -> tuple[dict[str, torch.Tensor], dict[tuple[str, str], torch.Tensor]]:
    """``∂L/∂(w·m)`` for each masked layer and ``G = Σ δ_consumer x_producerᵀ`` for each Linear ``pairs`` entry.

    Both in float64, of the mean loss over all calibration samples (each batch weighted by its
    share). The model runs in its dtype and mode (eval); parameters' ``.grad`` are not touched.
    Raises :class:`InputsError` when the model rejects the data and :class:`NotGrowableError` when
    a layer is not seen computing with its masked weight exactly once per batch.
    """
    mods = {n: module.get_submodule(n) for n in dict.fromkeys(layers + [x for p in pairs for x in p])}
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    grads = {n: torch.zeros(mods[n].weight.shape, dtype=torch.float64) for n in layers}
    cross: dict[tuple[str, str], torch.Tensor] = {}
    total = cal.samples
    for i, (batch, target) in enumerate(cal.batches):
        args, kwargs = cast_batch(batch, dtype)
        n = int((args[0] if args else next(iter(kwargs.values()))).shape[0])
        mode = _Observe(mods)
        with torch.enable_grad(), mode:
            output = run_on_batch(module, cal, i, args, kwargs)
        for name in mods:
            if len(mode.leaves[name]) != 1 or len(mode.auxes[name]) != 1:
                raise NotGrowableError(f"'{name}': NeST could not observe it computing with its masked weight once per "
                                       f"batch (seen {len(mode.leaves[name])} times)")
        loss = batch_loss(output, target, cal.loss, cal.source) * (n / total)
        wanted = [mode.leaves[name][0] for name in layers] + [mode.auxes[c][0] for _, c in pairs]
        got = torch.autograd.grad(loss, wanted, allow_unused=True)
        for name, g in zip(layers, got):
            if g is not None:
                grads[name] += g.double()
        for (p, c), g in zip(pairs, got[len(layers):]):
            x = mode.inputs[p][0].double()
            delta = g.double() if g is not None else torch.zeros_like(mode.auxes[c][0], dtype=torch.float64)
            m = delta.reshape(-1, delta.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            cross[(p, c)] = m if (p, c) not in cross else cross[(p, c)] + m
    return grads, cross
