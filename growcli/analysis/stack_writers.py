"""Residual writers of every block in a stack, from one ``torch.export`` trace (GROWTH.md section 3).

A block computes ``x + F₁(…) + F₂(…)``: a *residual stream* runs from the block's input to
its output through adds (and value-preserving ops such as dropout or dtype casts), and each
add brings in one *branch*. The *writers* of a branch are the parameters of its last
parametric layer — a Linear/Conv (weight and bias, also as ``addmm``) or a normalisation's
``γ, β`` — plus any bias added after it; zeroing them makes the branch write exactly zero.

What ``stack`` needs beyond ``growcli.analysis.residual`` (used by ``deepen``): the whole model is
traced once — on real or meta-device weights, so the streaming path can analyse a
checkpoint it never loads — every block is analysed from its nodes' ``nn_module_stack``,
branches may hold parallel sub-branches, and a normalisation on the stream itself
(post-LN: ``LN(x + F(x))``) is *reported* in ``post_norms`` together with the writers rather
than refused, so ``--allow-mismatch`` can still build the (inexact) identity copy.
Nothing is assumed from parameter or class names; an operation without a rule here stops
the analysis with :class:`NotGrowableError` naming the operation and its module.
"""

from __future__ import annotations

import operator
import re
import warnings
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from growcli.core.errors import NotGrowableError
from growcli.core.inputs import Batch

# Ops whose output equals their input's values: the stream passes through them unchanged.
VALUE_PRESERVING = {"to", "_to_copy", "clone", "contiguous", "dropout", "native_dropout", "feature_dropout",
                    "alpha_dropout", "alias", "detach", "view", "_unsafe_view", "reshape", "type_as",
                    "lift_fresh_copy"}
# Ops that map an all-zero input to an all-zero output (layout changes, slicing, negation).
ZERO_PRESERVING = VALUE_PRESERVING | {"transpose", "permute", "t", "unsqueeze", "squeeze", "flatten", "unflatten",
                                      "expand", "select", "slice", "split", "split_with_sizes", "chunk", "unbind",
                                      "narrow", "neg", "repeat"}
NORM_OPS = {"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "group_norm", "native_group_norm",
            "batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
            "instance_norm"}
# Batch norm also reads running statistics (buffers); they stay, γ and β are zeroed.
STATS_OPS = {"batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training"}
LINEAR_OPS = {"linear", "addmm", "mm", "matmul", "bmm", "conv1d", "conv2d", "conv3d", "convolution", "_convolution",
              "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}


@dataclass(frozen=True)
class Residual:
    """One block's residual structure: writer parameters and post-add norms, both block-relative."""

    writers: tuple[str, ...]
    post_norms: tuple[str, ...]


def _op(node: fx.Node) -> str:
    packet = getattr(node.target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(node.target, "__name__", str(node.target))


def _tensors(node: fx.Node) -> list[fx.Node]:
    return [a for a in tree_leaves((node.args, node.kwargs)) if isinstance(a, fx.Node)]


def _resolve(node: fx.Node) -> fx.Node:
    """``getitem(op, k)`` stands for ``op`` (native_layer_norm, native_dropout, split…)."""
    while node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _export(module: nn.Module, batch: Batch) -> torch.export.ExportedProgram:
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    args, kwargs = batch
    args = tuple(a.to(device) for a in args)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(module, args, kwargs, strict=False)
        except Exception as exc:  # any tracing failure means: cannot analyse, refuse
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise NotGrowableError(f"stack --init identity: torch.export could not trace {type(module).__name__} to find "
                                   f"the blocks' residual writers ({type(exc).__name__}: {first}); use --init copy") from None


def stack_residuals(module: nn.Module, container: str, batch: Batch) -> dict[int, Residual]:
    """Trace ``module`` once on ``batch`` and analyse every block of ``container``.

    Works on real or meta-device modules (the trace uses fake tensors either way). Raises
    :class:`NotGrowableError` when the model cannot be traced or a block has no residual
    stream whose branches end in parametric layers.
    """
    program = _export(module, batch)
    params = dict(program.graph_signature.inputs_to_parameters)
    buffers = dict(program.graph_signature.inputs_to_buffers)
    length = len(module.get_submodule(container))
    pattern = re.compile(rf"{re.escape(container)}\.(\d+)(?:\..*)?")
    members: dict[int, set[fx.Node]] = {i: set() for i in range(length)}
    for node in program.graph.nodes:
        for path, _cls in (node.meta.get("nn_module_stack") or {}).values():
            m = pattern.fullmatch(path)
            if m and int(m.group(1)) < length:
                members[int(m.group(1))].add(node)
                break
    order = {n: k for k, n in enumerate(program.graph.nodes)}
    return {i: _BlockAnalysis(f"{container}.{i}", members[i], params, buffers, order).run() for i in range(length)}


class _BlockAnalysis:
    def __init__(self, prefix: str, nodes: set[fx.Node], params: dict[str, str], buffers: dict[str, str],
                 order: dict[fx.Node, int]):
        self.prefix, self.nodes, self.params, self.buffers, self.order = prefix, nodes, params, buffers, order
        self.memo: dict[fx.Node, tuple | None] = {}

    def module_of(self, node: fx.Node) -> str:
        """The block-relative name of the module that ran ``node`` ("" for the block itself)."""
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        path = stack[-1][0] if stack else ""
        return path[len(self.prefix) + 1:] if path.startswith(self.prefix + ".") else ""

    def where(self, node: fx.Node) -> str:
        rel = self.module_of(node)
        return f"aten.{_op(node)} in {self.prefix}{'.' + rel if rel else ''}"

    def refuse(self, why: str) -> NotGrowableError:
        return NotGrowableError(f"stack --init identity: block {self.prefix}: {why}; use --init copy")

    def is_param(self, node: fx.Node) -> bool:
        return node.op == "placeholder" and node.name in self.params

    def run(self) -> Residual:
        if not self.nodes:
            raise self.refuse("the trace shows no operation of this block (is it called in forward?)")
        outputs = sorted((n for n in self.nodes if any(u not in self.nodes for u in n.users)), key=self.order.get)
        found = [(n, r) for n in outputs if (r := self.stream(n)) is not None and r[1]]
        if not found:
            last = outputs[-1] if outputs else None
            raise self.refuse("no residual stream runs from its input to its output through adds"
                              + (f" (its output comes from {self.where(_resolve(last))})" if last is not None else ""))
        out, (source, adds, norms) = found[-1]
        shape_in, shape_out = (getattr(n.meta.get("val"), "shape", None) for n in (source, out))
        if shape_in is not None and shape_out is not None and tuple(shape_in) != tuple(shape_out):
            raise self.refuse(f"the stream changes shape from {list(shape_in)} to {list(shape_out)}")
        writers: dict[str, fx.Node] = {}
        visited: set[fx.Node] = set()
        for _add, branch in adds:
            self.branch(branch, writers, visited)
        for name, node in writers.items():
            outside = [u for u in node.users if u not in visited]
            if outside:
                raise self.refuse(f"parameter {name} is also read by {self.where(outside[0])}; zeroing it would change "
                                  "more than the residual branch")
        relative = []
        for name in writers:
            if not name.startswith(self.prefix + "."):
                raise self.refuse(f"its residual writer {name} belongs to another module (shared weights)")
            relative.append(name[len(self.prefix) + 1:])
        norms_named = tuple(dict.fromkeys(self.module_of(n) or f"aten.{_op(n)}" for n in norms))
        return Residual(tuple(sorted(relative)), norms_named)

    def stream(self, node: fx.Node) -> tuple[fx.Node, list, list] | None:
        """``(block input, [(add, branch)], [norms])`` when ``node`` is on the residual stream, else None."""
        if node not in self.nodes:
            is_weight = node.op == "placeholder" and (node.name in self.params or node.name in self.buffers)
            return None if is_weight else (node, [], [])
        if node in self.memo:
            return self.memo[node]
        self.memo[node] = None  # guards against revisiting while the answer is being computed
        base = _resolve(node)
        op = _op(base)
        result = None
        tensors = _tensors(base)
        if op in VALUE_PRESERVING and tensors:
            result = self.stream(tensors[0])
        elif op in ("add", "sub") and len(tensors) == 2:
            a, b = tensors
            ra = self.stream(a)
            rb = self.stream(b) if op == "add" else None  # for sub only x - F(x) keeps x
            if ra is not None and rb is not None:
                raise self.refuse(f"both operands of {self.where(base)} come from the residual stream")
            if ra is not None:
                result = (ra[0], ra[1] + [(base, b)], ra[2])
            elif rb is not None:
                result = (rb[0], rb[1] + [(base, a)], rb[2])
        elif op in NORM_OPS and tensors:
            r = self.stream(tensors[0])
            if r is not None and r[1]:  # a norm after an add on the stream: post-LN
                result = (r[0], r[1], r[2] + [base])
        self.memo[node] = result
        return result

    def branch(self, node: fx.Node, writers: dict[str, fx.Node], visited: set[fx.Node]) -> None:
        """Collect the parameters whose zeroing makes ``node`` (a residual branch) exactly zero."""
        if self.is_param(node):
            writers[self.params[node.name]] = node
            return
        if node not in self.nodes:
            raise self.refuse(f"a residual branch adds {node.name}, which is computed outside the block")
        visited.add(node)
        base = _resolve(node)
        visited.add(base)
        op = _op(base)
        tensors = _tensors(base)
        params = [t for t in tensors if self.is_param(t)]
        others = [t for t in tensors if not self.is_param(t)]
        if op in ZERO_PRESERVING and tensors:
            self.branch(tensors[0], writers, visited)
        elif op in ("mul", "div") and len(tensors) == 1 and base.args and base.args[0] is tensors[0]:
            self.branch(tensors[0], writers, visited)  # scaled by a constant: zero stays zero
        elif op == "mul" and len(params) == 1 and len(others) == 1:
            self.branch(others[0], writers, visited)  # a learned per-channel scale (layer scale)
        elif op in ("add", "sub") and tensors:
            for t in tensors:
                self.branch(t, writers, visited)  # a bias added after the layer, or parallel branches
        elif op in LINEAR_OPS or op in NORM_OPS:
            data = [t for t in others if not (op in STATS_OPS and t.op == "placeholder" and t.name in self.buffers)]
            if not params or len(data) != 1:
                raise self.refuse(f"{self.where(base)} writes to the residual stream but its weights are not "
                                  "parameters of the block")
            for p in params:
                writers[self.params[p.name]] = p
        else:
            raise self.refuse(f"{self.where(base)} sits on a residual branch and growcli has no rule to make it write "
                              "zero")
