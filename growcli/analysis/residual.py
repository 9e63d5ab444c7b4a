"""Residual writers: the operations through which a block writes into its residual stream.

A block's *stream* runs from its input to its output through adds (or ``x - F``), value-
preserving ops (dropout, views, widening casts), normalisations after an add (post-LN,
reported) and, after the last add, idempotent activations (ResNet's ``relu(x + F(x))``). Each
add brings in a *branch*; its *writers* are the parameters of its last parametric op (linear,
conv, ``addmm``, matmul, a norm's ``γ, β``, a learned scale; fused experts' ``bmm`` of ``w[ids]`` or
grouped matmul, reached back through the gathers that route rows to experts) plus biases added after
it, over parallel sub-branches. Zeroed, the branch writes exactly zero and a copy computes ``post(x)``:
the identity without post-LN when ``x`` is a fixed point of ``post`` (:func:`follows`).
Recipes: docs/recipes.md#deepen-residual-blocks and #stack-identity-init. Read from a trace of real or meta-device weights,
with blocks found by the trace's module stack, never from names; an op without a rule makes
the block not growable, and :class:`Refusal` names the block, the op and the module.

A branch may end in a product or quotient whose factors are not parameters, as a norm after
its last layer does (sandwich and output norms, ``t·rsqrt(mean(t²) + ε)·(1 + γ)``): it is zero
when zeroing one factor's writers makes it zero, which :func:`at_zero` decides from the ops'
values at 0 (``ε > 0`` needed; ``t/‖t‖`` is 0/0 and refused). Longer than 400 lines because
those value-at-zero rules belong with the writer analysis they decide for.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from growcli.analysis.matmuls import GROUPED_MM
from growcli.analysis.trace import METADATA_CHECKS, Trace, attr_of, in_scope, module_of, shape
from growcli.core.errors import NotGrowableError

# Ops whose output equals their input's values (casts are checked separately: only widening ones).
VALUE_PRESERVING = {"clone", "contiguous", "dropout", "native_dropout", "feature_dropout", "alpha_dropout", "alias",
                    "detach", "view", "_unsafe_view", "reshape", "lift_fresh_copy", "reshape_as", "view_as"}
CASTS = {"to", "_to_copy", "type_as"}
# Ops that map an all-zero input to an all-zero output (layout changes, slicing, negation, sums).
ZERO_PRESERVING = VALUE_PRESERVING | CASTS | {
    "transpose", "permute", "t", "numpy_T", "unsqueeze", "squeeze", "flatten", "unflatten", "expand", "expand_as",
    "select", "slice", "split", "split_with_sizes", "sum", "chunk", "unbind", "narrow", "neg", "repeat", "repeat_interleave",
    "index", "index_select", "gather", "roll"}
# Pads move their input's values and fill the new positions: zero-preserving when the fill is 0 or copied
# (reflect, replicate, circular), never for a nonzero constant (:func:`moves_zeros`).
PADS = {"pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d",
        "replication_pad2d", "replication_pad3d", "_pad_circular"}
# Gathers read their first operand at positions the others give: a gathered zero is zero whatever the indices
# (the rows of a mixture-of-experts layer, routed to their experts and back).
GATHERS = {"index", "index_select", "gather"}
NORM_OPS = {"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "group_norm", "native_group_norm",
            "batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
            "instance_norm"}
# Batch norm also reads running statistics (buffers); they stay, γ and β are zeroed.
STATS_OPS = {op for op in NORM_OPS if "batch_norm" in op}
LINEAR_OPS = {"linear", "addmm", "mm", "matmul", "bmm", "conv1d", "conv2d", "conv3d", "convolution", "_convolution",
              "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
# Idempotent activations, φ(φ(x)) = φ(x): allowed after a block's last add.
IDEMPOTENT = {"relu", "relu6", "hardtanh"}
# dtype → the dtypes whose every value it represents exactly.
_HOLDS = {torch.float64: {torch.float64, torch.float32, torch.float16, torch.bfloat16},
          torch.float32: {torch.float32, torch.float16, torch.bfloat16}}


@dataclass(frozen=True)
class Refusal:
    """Why block ``block`` cannot start as the identity: ``op`` (``aten.relu``) in ``module`` and the reason."""

    block: str
    op: str
    module: str
    reason: str


class ResidualRefusal(NotGrowableError):
    """A :class:`NotGrowableError` carrying its :class:`Refusal`; the message is ``block B: reason`` by default."""

    def __init__(self, refusal: Refusal, message: str | None = None):
        super().__init__(message or f"block {refusal.block}: {refusal.reason}")
        self.refusal = refusal


@dataclass(frozen=True)
class BlockWriters:
    """One block's residual structure; parameter and module names are relative to the block."""

    block: str
    writers: tuple[str, ...]  # parameters a copy zeroes to write nothing into the stream
    post_norms: tuple[str, ...] = ()  # modules normalising the stream after an add (post-LN: inexact)
    norm_sites: tuple[tuple[str, str], ...] = ()  # those norms as (op, module), e.g. ("aten.layer_norm", "enc.0.ln")
    post: tuple[tuple, ...] = ()  # idempotent activations after the last add, as (op, lower, upper)
    post_sites: tuple[tuple[str, str], ...] = ()  # those activations as (op, module), e.g. ("aten.relu", "layer1.0")
    source: fx.Node | None = field(default=None, compare=False, repr=False)  # where the stream enters
    output: fx.Node | None = field(default=None, compare=False, repr=False)  # the stream's last node


def op_of(node: fx.Node) -> str:
    """``aten.linear.default`` → ``"linear"``; in-place variants by their functional name (``add_`` → ``add``)."""
    packet = getattr(node.target, "overloadpacket", None)
    name = packet.__name__ if packet is not None else getattr(node.target, "__name__", str(node.target))
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def at(node: fx.Node) -> str:
    """``aten.relu in layer1.0`` for messages."""
    return f"aten.{op_of(node)} in {module_of(node) or '(root)'}"


def moves_zeros(node: fx.Node) -> bool:
    """Whether op ``node`` maps an all-zero first operand to all zeros (a :data:`ZERO_PRESERVING` op, or a pad
    whose fill is zero: ``constant_pad_nd(x, p, 0)``, ``pad(x, p)``, ``pad(x, p, "reflect")``)."""
    op, args, kwargs = op_of(node), node.args, node.kwargs
    if op in ZERO_PRESERVING or op in PADS - {"pad", "constant_pad_nd"}:
        return True
    if op == "pad" and (args[2] if len(args) > 2 else kwargs.get("mode", "constant")) != "constant":
        return True
    if op not in ("pad", "constant_pad_nd"):
        return False
    k = 3 if op == "pad" else 2
    fill = args[k] if len(args) > k else kwargs.get("value")
    return fill is None or _number(fill) == "zero"


def _tensors(node: fx.Node) -> list[fx.Node]:
    return [a for a in tree_leaves((node.args, node.kwargs)) if isinstance(a, fx.Node)]


def _resolve(node: fx.Node) -> fx.Node:
    """``getitem(op, k)`` stands for ``op`` (native_layer_norm, native_dropout, split…)."""
    while node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _clamp(node: fx.Node) -> tuple:
    """An idempotent activation as ``(kind, lower, upper)``: ReLU6 and hardtanh(0, 6) are the same map."""
    if op_of(node) in ("relu", "relu6"):
        return ("clamp", 0.0, 6.0 if op_of(node) == "relu6" else None)
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
    return ("clamp", float(lo), float(hi))


def _dtype(node: fx.Node) -> torch.dtype | None:
    return getattr(node.meta.get("val"), "dtype", None)


class _Block:
    """The analysis of one block of a trace (see the module docstring)."""

    def __init__(self, trace: Trace, params: set[str], block: str):
        self.block, self.params = block, params
        self.nodes = {n for n in trace.graph.nodes if n.op == "call_function" and in_scope(n, block)}
        self.order = {n: k for k, n in enumerate(trace.graph.nodes)}
        self.memo: dict[fx.Node, tuple | None] = {}

    def refuse(self, node: fx.Node | None, reason: str) -> ResidualRefusal:
        site = (f"aten.{op_of(node)}", module_of(node)) if node is not None else ("", self.block)
        return ResidualRefusal(Refusal(self.block, *site, reason))

    def relative(self, path: str) -> str:
        return path[len(self.block) + 1:] if path.startswith(self.block + ".") else path

    def run(self) -> BlockWriters:
        if not self.nodes:
            raise self.refuse(None, "the trace shows no operation of this block (is it called in forward?)")
        outputs = sorted((n for n in self.nodes if any(u not in self.nodes for u in n.users
                                                       if u.target not in METADATA_CHECKS)), key=self.order.get)
        found = [(n, r) for n in outputs if (r := self.stream(n)) is not None and r[1]]
        if not found:
            raise self.diagnose(outputs[-1] if outputs else None)
        out, (source, adds, norms, posts, casts) = found[-1]
        if shape(source) != shape(out):
            raise self.refuse(_resolve(out), f"the stream changes shape from {list(shape(source) or [])} to "
                                             f"{list(shape(out) or [])}, so a copy of it cannot follow it")
        for cast in casts:
            if _dtype(source) not in _HOLDS.get(_dtype(cast), {_dtype(cast)}):
                raise self.refuse(cast, f"{at(cast)} casts the residual stream from {_dtype(source)} to "
                                        f"{_dtype(cast)}, which is not exact")
        writers, visited = {}, set()
        for _add, branch in adds:
            self.branch(branch, writers, visited)
        for name, node in writers.items():
            outside = [u for u in node.users if u not in visited and u.target not in METADATA_CHECKS]
            if outside:
                raise self.refuse(outside[0], f"parameter {name} is also read by {at(outside[0])}; zeroing it "
                                              "would change more than the residual branch")
            if not name.startswith(self.block + "."):
                raise self.refuse(next(iter(node.users), None), f"its residual writer {name} belongs to another "
                                  "module (shared weights)")
        norms_named = tuple(dict.fromkeys(self.relative(module_of(n)) or f"aten.{op_of(n)}" for n in norms))
        return BlockWriters(self.block, tuple(sorted(self.relative(w) for w in writers)), norms_named,
                            tuple(dict.fromkeys((f"aten.{op_of(n)}", module_of(n)) for n in norms)),
                            tuple(_clamp(p) for p in posts), tuple((f"aten.{op_of(p)}", module_of(p)) for p in posts),
                            source, out)

    def stream(self, node: fx.Node) -> tuple | None:
        """``(source, [(add, branch)], norms, posts, casts)`` when ``node`` is on the residual stream, else None."""
        if node not in self.nodes:
            return None if node.op == "get_attr" else (node, [], [], [], [])
        if node in self.memo:
            return self.memo[node]
        self.memo[node] = None  # guards against revisiting while the answer is being computed
        base = _resolve(node)
        op, tensors = op_of(base), _tensors(base)
        result = None
        if op in VALUE_PRESERVING | CASTS and tensors:
            r = self.stream(tensors[0])
            result = r and (r[0], r[1], r[2], r[3], r[4] + ([base] if op in CASTS else []))
        elif op in ("add", "sub") and len(tensors) == 2:
            a, b = tensors
            ra = self.stream(a)
            rb = self.stream(b) if op == "add" else None  # for sub only x - F(x) keeps x
            if ra is not None and rb is not None:
                raise self.refuse(base, f"both operands of {at(base)} come from the residual stream")
            r, branch = (ra, b) if ra is not None else (rb, a)
            if r is not None:
                if r[3]:
                    post = r[3][-1]
                    raise self.refuse(post, f"{at(post)} sits between two residual adds; {op_of(post)}(x + 0) = x "
                                            f"only for x it leaves unchanged, which the stream inside the block need "
                                            "not be")
                result = (r[0], r[1] + [(base, branch)], r[2], r[3], r[4])
        elif op in NORM_OPS | IDEMPOTENT and tensors:  # after an add: a post-LN norm, or a post activation
            r = self.stream(tensors[0])
            if r is not None and r[1]:
                norm = op in NORM_OPS
                result = (r[0], r[1], r[2] + [base] * norm, r[3] + [base] * (not norm), r[4])
        self.memo[node] = result
        return result

    def zeroable(self, node: fx.Node) -> fx.Node | None:
        """The op reading the first writer of branch ``node`` if :meth:`branch` accepts it, else ``None``."""
        try:
            found: dict[str, fx.Node] = {}
            self.branch(node, found, set())
        except NotGrowableError:
            return None
        return next((u for p in found.values() for u in p.users if u.op == "call_function"), None)

    def diagnose(self, last: fx.Node | None) -> ResidualRefusal:
        """Why no residual stream runs through the block: the first op back from ``last`` that breaks it."""
        cur = _resolve(last) if last is not None else None
        while cur is not None and cur in self.nodes:
            op, tensors = op_of(cur), _tensors(cur)
            if op in ("add", "sub") and len(tensors) == 2:
                found = [self.zeroable(t) for t in tensors]
                if all(found):
                    return self.refuse(cur, f"both inputs of the add ({at(cur)}) are computed by layers ({at(found[0])} and "
                                            f"{at(found[1])}), so the block has no identity path (a projection "
                                            "shortcut changes the stream)")
                return self.refuse(cur, f"no operand of {at(cur)} reaches the block's input through the residual "
                                        "stream, so a copy with zeroed writers would not be the identity")
            if op in VALUE_PRESERVING | CASTS | NORM_OPS | IDEMPOTENT and tensors:
                cur = _resolve(tensors[0])
                continue
            break
        inside = cur is not None and cur in self.nodes
        return self.refuse(cur if inside else None, "no residual stream runs from its input to its output through "
                           "adds" + (f": its output comes from {at(cur)}, not from a residual add (x + F(x))" * inside))

    def branch(self, node: fx.Node, writers: dict[str, fx.Node], visited: set[fx.Node]) -> None:
        """Collect the parameters whose zeroing makes ``node`` (a residual branch) exactly zero."""
        if node.op == "get_attr" and attr_of(node) in self.params:
            writers[attr_of(node)] = node
            return
        if node not in self.nodes:
            raise self.refuse(node if node.op == "call_function" else None,
                              f"a residual branch adds {node.name}, which is computed outside the block")
        visited.add(node)
        base = _resolve(node)
        visited.add(base)
        op, tensors = op_of(base), _tensors(base)
        chains = {t: c for t in tensors if (c := self.param_chain(t))}  # parameters, maybe through t()/view/casts
        params = list(chains)
        others = [t for t in tensors if t not in chains]
        if moves_zeros(base) and tensors:
            self.branch(tensors[0], writers, visited)
        elif op in ("mul", "div") and len(tensors) == 1 and base.args and base.args[0] is tensors[0]:
            self.branch(tensors[0], writers, visited)  # scaled by a constant: zero stays zero
        elif op == "mul" and len(params) == 1 and len(others) == 1:
            self.write(chains[params[0]], writers, visited)  # a learned scale (ReZero α, layer scale): the last writer
        elif op in ("mul", "div") and (factor := self.zero_factor(base)) is not None:
            self.branch(factor, writers, visited)  # norm(0) = 0, gate ⊙ 0 = 0: zero the writers before it
        elif op in ("add", "sub") and tensors and all(_number(a) in (None, "zero") for a in base.args):
            for t in tensors:  # (a nonzero constant, as in 1 + γ, is no writer: it stays when the rest is zero)
                self.branch(t, writers, visited)  # a bias added after the layer, or parallel branches
        elif op in GROUPED_MM and len(base.args) > 1 and (chain := self.param_chain(base.args[1])):
            self.write(chain, writers, visited)  # grouped_mm(x, w, offs): w = 0 gives 0 in every group of rows
        elif op in LINEAR_OPS or op in NORM_OPS:
            data = [t for t in others if not (op in STATS_OPS and t.op == "get_attr")]
            if not params or len(data) != 1:
                raise self.refuse(base, f"{at(base)} writes to the residual stream but its weights are not "
                                        "parameters of the block")
            for p in params:
                self.write(chains[p], writers, visited)
        else:
            raise self.refuse(base, f"{at(base)} sits on a residual branch and growcli has no rule to make it "
                                    "write zero")

    def param_chain(self, node: fx.Node) -> list[fx.Node] | None:
        """``[op…, param]`` when ``node`` is a parameter of the model seen through zero-preserving ops of the block
        (FalconLinear's ``x @ W.T``, a ``weight.float()``): zeroing the parameter zeroes ``node``; else ``None``."""
        chain = []
        while node.op == "call_function" and node in self.nodes:
            base = _resolve(node)
            tensors = _tensors(base)
            gather = op_of(base) in GATHERS and tensors and base.args[0] is tensors[0]  # w[expert_ids]
            if not gather and (not moves_zeros(base) or len(tensors) != 1):
                return None
            chain += [node, base]
            node = tensors[0]
        return chain + [node] if node.op == "get_attr" and attr_of(node) in self.params else None

    @staticmethod
    def write(chain: list[fx.Node], writers: dict[str, fx.Node], visited: set[fx.Node]) -> None:
        writers[attr_of(chain[-1])] = chain[-1]
        visited.update(chain[:-1])

    def zero_factor(self, node: fx.Node) -> fx.Node | None:
        """The operand of ``node`` (a mul or div) whose zeroing makes ``node`` exactly zero, if one does.

        An operand ``t`` qualifies when :meth:`branch` can zero it and :func:`at_zero` shows that
        ``node`` is then zero: every other factor is unchanged or finite once the writers (and so
        every node between them and ``t``) are zero. That
        covers a norm after the branch's last layer (RMSNorm ``t·rsqrt(mean(t²) + ε)·(1 + γ)`` with
        ``ε > 0`` is 0 at ``t = 0``: sandwich and output norms) and gates ``g ⊙ F``.
        """
        tensors = _tensors(node)
        for t in tensors[:1] if op_of(node) == "div" else tensors:
            if t.op == "get_attr" or t not in self.nodes:
                continue
            writers: dict[str, fx.Node] = {}
            zeroed: set[fx.Node] = set()
            try:
                self.branch(t, writers, zeroed)
            except NotGrowableError:
                continue
            if at_zero(node, zeroed | set(writers.values()), self.nodes, {}) == "zero":
                return t
        return None


# What a node is when some nodes of the trace are all zeros (see :func:`at_zero`).
_KEEP_AT_ZERO = VALUE_PRESERVING | CASTS  # values unchanged: zero stays zero, positive stays positive
_ZERO_AT_ZERO = ZERO_PRESERVING | {"abs", "tanh", "relu", "gelu", "silu", "leaky_relu", "sqrt", "sum", "var", "std",
                                   "amax", "amin", "mean"}  # φ(0) = 0 for these maps and reductions
_POSITIVE = {"exp", "sigmoid", "softplus"}  # positive on every finite input


def _number(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return "zero" if value == 0 else "pos" if value > 0 else "finite"


def at_zero(node: fx.Node, zeros: set[fx.Node], scope: set[fx.Node], memo: dict) -> str | None:
    """What ``node`` is when the nodes ``zeros`` are all zeros: ``"zero"``, ``"pos"`` (finite, > 0), ``"finite"``,
    ``"same"`` (reads none of ``zeros``: its value, finite in a model that computes) or ``None`` (unknown).

    Rules are the ops' values at 0 (``0·a = 0`` for finite ``a``, ``mean(0²) + ε = ε > 0``,
    ``rsqrt(ε)`` finite); an op without a rule that reads ``zero`` is unknown, never guessed.
    """
    if node in zeros:
        return "zero"
    if node.op != "call_function" or node not in scope:
        return "same"
    if node in memo:
        return memo[node]
    memo[node] = None
    base = _resolve(node)
    op, tensors = op_of(base), _tensors(base)
    states = [at_zero(t, zeros, scope, memo) for t in tensors]
    numbers = [s for a in base.args[1:] if (s := _number(a)) is not None]
    result: str | None = None
    if all(s == "same" for s in states):
        result = "same"
    elif None in states or not tensors:
        result = None
    elif (op in CASTS or moves_zeros(base)) and op not in ("neg",) and base.args and base.args[0] is tensors[0]:
        first = states[0]  # a cast's other tensor (type_as) gives only its dtype
        narrows = op in CASTS and _dtype(tensors[0]) not in _HOLDS.get(_dtype(base), {_dtype(base)})
        if first == "zero" or not narrows:  # a narrowing cast may overflow a nonzero value to inf
            result = first if op in _KEEP_AT_ZERO else "zero" if first == "zero" else "finite"
    elif op in ("add", "sub"):
        both = states + numbers
        if all(s == "zero" for s in both):
            result = "zero"
        elif op == "add" and all(s in ("zero", "pos") for s in both):
            result = "pos"
        else:
            result = "finite"
    elif op == "mul":
        both = states + numbers
        result = "zero" if "zero" in both else "pos" if all(s == "pos" for s in both) else "finite"
    elif op == "div" and base.args and base.args[0] is tensors[0]:
        den = states[1] if len(states) > 1 else (numbers[0] if numbers else None)
        if den in ("pos",) or (den == "finite" and len(states) == 1):  # a nonzero number or a positive tensor
            result = "zero" if states[0] == "zero" else "finite"
    elif op == "pow" and len(tensors) == 1 and numbers and numbers[0] == "pos":
        integer = isinstance(base.args[1], int) or float(base.args[1]).is_integer()  # (-1)^0.5 is NaN
        result = states[0] if states[0] in ("zero", "pos") else "finite" if integer else None
    elif op in ("rsqrt", "sqrt") and states[0] == "pos":
        result = "pos"
    elif op in _ZERO_AT_ZERO and states[0] == "zero":
        result = "zero"
    elif op in _POSITIVE and states[0] in ("zero", "pos", "finite"):
        result = "pos"
    memo[node] = result
    return result


def block_writers(trace: Trace, root: nn.Module, block: str) -> BlockWriters:
    """Analyse block ``block`` (a module path) of ``trace``; :class:`ResidualRefusal` when it has no exact writers."""
    return _Block(trace, {n for n, _ in root.named_parameters(remove_duplicate=False)}, block).run()


def stack_writers(trace: Trace, root: nn.Module, container: str) -> dict[int, BlockWriters]:
    """Analyse every block of ``container``; each must read its stream from the block before it (:func:`chains`)."""
    found = {i: block_writers(trace, root, f"{container}.{i}") for i in range(len(root.get_submodule(container)))}
    for i in range(1, len(found)):
        refusal = chains(found[i], found[i - 1].block)
        if refusal is not None:
            raise ResidualRefusal(refusal)
    return found


def chains(block: BlockWriters, previous: str) -> Refusal | None:
    """``None`` when ``block``'s stream starts (through value-preserving ops) in block ``previous``, else why not.

    A zeroed copy passes its stream's source on, so that must be the previous block's output
    (a block adding a tensor from elsewhere, say the embeddings, is refused).
    """
    src = block.source
    while src.op == "call_function" and not in_scope(src, previous) and op_of(_resolve(src)) in VALUE_PRESERVING:
        src = _resolve(src).args[0]
    if src.op == "call_function" and in_scope(src, previous):
        return None
    call = src.op == "call_function"
    return Refusal(block.block, f"aten.{op_of(src)}" if call else "", module_of(src) if call else "",
                   f"its residual stream starts at {at(src) if call else src.name}, not at the output of block "
                   f"{previous}, so a copy would pass that tensor on")


def follows(block: BlockWriters, previous: BlockWriters) -> Refusal | None:
    """``None`` when a zeroed copy of ``block`` right after ``previous`` is the identity, else why not.

    The copy computes ``post(x)`` on ``previous``'s output ``x``: the identity when ``post`` is
    empty or each of its activations is the one ``previous`` ends in (``φ(φ(y)) = φ(y)``).
    """
    if not block.post:
        return None
    last = previous.post[-1] if previous.post else None
    if all(p == last for p in block.post):
        return None
    op, module = block.post_sites[0]
    ends = f"ends in {previous.post_sites[-1][0]}" if last is not None else "does not end in it"
    return Refusal(block.block, op, module, f"{op} in {module} after its residual add is the identity only on its own "
                                            f"outputs, but a copy of {block.block} would follow {previous.block}, "
                                            f"which {ends}, so the copy would change its input")
