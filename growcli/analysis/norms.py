"""Rules of the coupled-channel analysis for normalisations over the grown channels: exact by whole copies.

A LayerNorm (or RMSNorm) whose normalised dims include the channels, and a GroupNorm over them, see
statistics over the channels. If every channel of the group is copied the same number of times ``k`` (new
size ``k·C``), the grown vector holds each original value ``k`` times: its mean, variance and mean square are
the original's, so the normalised outputs are copies of the original outputs, and with ``γ``, ``β`` copied
along the same channel map the norm's outputs are copies too. A GroupNorm with ``G`` groups needs each copy
inside its source's group, so that every new group holds the ``k`` copies of one original group
(:func:`growcli.transforms.channels.channel_map` with the group's blocks). The walk records each such norm
in :attr:`growcli.analysis.coupled_group.Group.norms` (:class:`~growcli.analysis.coupled_group.NormSite`);
the transform then chooses the whole-copy map and refuses a size that is not a whole multiple, or an init
whose new channels are not copies.

The norm's output passes the channels on, in the same dim; ``γ``/``β`` are per-channel parameters (``copy``);
a ``.pt2`` program's literal ``normalized_shape`` follows the channels (a :class:`ViewPatch` of argument 1).
Refused, naming the norm: normalising concatenated or flattened channels (positions that are not copies), the
channels used as its weight, a GroupNorm over another dim than 1, and a LayerNorm whose output feeds an
attention (a product of two computed tensors or ``scaled_dot_product_attention`` reached through its
projections): those channels are a transformer's hidden size, grown by ``widen --hidden``
(docs/recipes.md#hidden), which also keeps the config in step. :class:`NormRules` is a base of
:class:`growcli.analysis.coupling_forward.ForwardRules`; a subclass that grows the channels otherwise sets
:attr:`NormRules.whole_copy_norms` to ``False`` and gets the plain refusals.
"""

from __future__ import annotations

import torch
from torch import fx

from growcli.analysis.coupled_group import GroupWalk, NormSite, ViewPatch
from growcli.analysis.layouts import CORE, Layout
from growcli.analysis.matmuls import param_matmul
from growcli.analysis.trace import ADDMM, CONV, CONV_TRANSPOSE, Refuse, attr_of, module_of, op_name, shape, where

aten = torch.ops.aten
RMS_NORM = {aten.rms_norm.default} if hasattr(aten, "rms_norm") else set()
LAYER_NORMS = {aten.layer_norm.default} | RMS_NORM
GROUP_NORM = aten.group_norm.default
# What an attention computes its scores with: a fused kernel, or a product of two computed tensors (q·kᵀ).
ATTENTION = {aten.scaled_dot_product_attention.default} | (
    {aten._native_multi_head_attention.default} if hasattr(aten, "_native_multi_head_attention") else set())
PRODUCTS = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default, aten.mm.default, aten.einsum.default}
WEIGHTED = CONV | CONV_TRANSPOSE | {aten.linear.default, ADDMM, aten.embedding.default}


def _product_of_data(node: fx.Node) -> bool:
    """``node`` multiplies two computed tensors (no parameter among its two matrices)."""
    if node.target == aten.einsum.default:
        ops = list(node.args[1]) if len(node.args) > 1 else []
    else:
        ops = list(node.args[1:3]) if node.target == aten.baddbmm.default else list(node.args[:2])
    return len(ops) == 2 and all(isinstance(a, fx.Node) and a.op == "call_function" for a in ops)


def attention_after(norm: fx.Node) -> fx.Node | None:
    """The attention reading ``norm``'s output, or None: walking forward through ops without weights to the
    projections (Linear, ``addmm``, ``x @ W.T``) that read it, then from their outputs, again through ops without
    weights, to a fused attention or a product of two computed tensors (an attention reading the normalised
    tensor itself counts too). Convolutions and other weighted ops end a path."""
    todo, seen = [(norm, False)], {norm}
    while todo:
        node, projected = todo.pop()
        for user in node.users:
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            if user.target in ATTENTION or (projected and user.target in PRODUCTS and _product_of_data(user)):
                return user
            is_projection = user.target in (aten.linear.default, ADDMM) or param_matmul(user) is not None
            if is_projection and not projected:
                todo.append((user, True))
            elif not is_projection and user.target not in WEIGHTED:
                todo.append((user, projected))
    return None


class NormRules(GroupWalk):
    """The normalisation rules of the walk (see module docstring)."""

    whole_copy_norms = True  # False: normalisations over the channels are refused (a subclass growing them otherwise)

    def _layer_norm(self, src: fx.Node, node: fx.Node, dim: int, layout: Layout) -> None:
        """``layer_norm(x, normalized_shape, γ, β, eps)`` / ``rms_norm(x, normalized_shape, γ, eps)``."""
        rank, normed = len(shape(src)), len(node.args[1])
        if dim < rank - normed:  # the channels are a batch dim of the norm
            self._propagate(src, node, dim)
            return
        kind = "RMSNorm" if node.target in RMS_NORM else "LayerNorm"
        what = f"{kind}{where(node)}"
        if not self.whole_copy_norms:
            raise Refuse(f"{what} normalises over the grown dimension "
                         "(its statistics would change; grow the hidden size with the transformer recipes)")
        if node.args[0] is not src:
            raise Refuse(f"{what} uses the channels as its weight or bias")
        if layout is not CORE:
            raise Refuse(f"{what} normalises over concatenated or flattened channels, which whole copies of the "
                         "channels do not keep in proportion")
        attention = attention_after(node)
        if attention is not None:
            raise Refuse(f"{what} normalises over the grown dimension and its output feeds the attention"
                         f"{where(attention)} ({op_name(attention)}): these channels are a transformer's hidden size; "
                         "grow it with widen --hidden (docs/recipes.md#hidden)")
        pos = dim - (rank - normed)
        self._norm_params(node, node.args[2:3] if node.target in RMS_NORM else node.args[2:4], pos)
        if self.trace.is_model:  # a loaded .pt2 program: the literal normalized_shape follows the channels
            self.group.patches.append(ViewPatch(node.name, pos, CORE))
        self.group.norms.append(NormSite(kind, module_of(node), 1, pos))
        self._propagate(src, node, dim)

    def _group_norm(self, src: fx.Node, node: fx.Node, dim: int, layout: Layout) -> None:
        """``group_norm(x, G, γ, β, eps, cudnn)``: statistics per group of ``C / G`` channels (and every position)."""
        what = f"GroupNorm{where(node)}"
        if not self.whole_copy_norms:
            raise Refuse(f"{what} normalises over the grown channels")
        if node.args[0] is not src:
            raise Refuse(f"{what} uses the channels as its weight or bias")
        if dim != 1:
            raise Refuse(f"{what} normalises the channels of dim 1, and the grown channels are in dim {dim}")
        if layout is not CORE:
            raise Refuse(f"{what} normalises concatenated or flattened channels, which whole copies of the channels "
                         "do not keep in proportion")
        groups = int(node.args[1])
        self._norm_params(node, node.args[2:4], 0)
        self.group.norms.append(NormSite("GroupNorm", module_of(node), groups))
        self._propagate(src, node, dim)

    def _norm_params(self, node: fx.Node, params, dim: int) -> None:
        """γ and β (when given) index the channels in ``dim``: copied along the map, or computed from what is."""
        for arg in params:
            if not isinstance(arg, fx.Node):
                continue
            fqn = attr_of(arg)
            if fqn is not None:
                self._use(fqn, dim, "copy")
            else:
                self._mark(arg, dim, backward=True)  # a computed γ (1 + w): what it is computed from follows
