"""Phase 2 of the residual-stream analysis: how every hidden tensor and parameter grows.

:class:`_Planner` walks the tensors :class:`~growcli.analysis.stream_tensors.StreamAnalysis` found, in
graph order, tracking each hidden tensor's scale ``α`` and what is known about its padded
entries, and writes the result as a :class:`StreamPlan`: a :class:`ParamPlan` per parameter,
the ``eps`` constants to rescale (:class:`EpsFix`) and scalar buffers the new config changes
(:class:`Constant`). The rules are in :mod:`growcli.analysis.stream`'s docstring and GROWTH.md section 6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from growcli.core.errors import NotGrowableError
from growcli.analysis.stream_tensors import (NORMS, PRODUCERS, STAT_POWER, StreamAnalysis, _attr, _data_of, _flat, _module_of,
                                     _weight_of)
from growcli.analysis.trace import ADDMM, BINARY, METADATA_CHECKS, REDUCE, REINDEX, UNARY, VIEW, _source_dim, op_name, shape, where

aten = torch.ops.aten
# Ops with f(c·x) = c·f(x) for c > 0, and f(0) = 0: they keep both the scale and zero padding.
LINEAR_UNARY = {aten.neg.default, aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
                aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.type_as.default, aten.dropout.default,
                aten.feature_dropout.default, aten.alpha_dropout.default, aten.mul.Scalar, aten.div.Scalar}
POSITIVE_HOMOGENEOUS = {aten.relu.default, aten.relu_.default, aten.abs.default}
# Element-wise ops with f(0) = 0 (zero padding survives them, the scale does not).
ZERO_TO_ZERO = {aten.gelu.default, aten.silu.default, aten.silu_.default, aten.tanh.default, aten.hardtanh.default,
                aten.hardtanh_.default, aten.relu6.default, aten.leaky_relu.default, aten.elu.default,
                aten.hardswish.default, aten.mish.default, aten.erf.default, aten.square.default} | POSITIVE_HOMOGENEOUS
# Element-wise ops that are finite wherever their input is: safe on padded entries whose value is unknown
# (an infinite padded entry would turn a reader's zero column into NaN).
FINITE = ZERO_TO_ZERO | {aten.sigmoid.default, aten.hardsigmoid.default, aten.softplus.default, aten.exp.default,
                         aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.relu6.default}
if hasattr(aten, "log_sigmoid"):
    FINITE.add(aten.log_sigmoid.default)

MEANS = {aten.mean.dim, aten.mean.default}
SUMS = {aten.sum.dim_IntList, aten.sum.default}

MEAN, ZERO = "mean", "zero"  # what is known about the padded entries of a hidden tensor


@dataclass
class ParamPlan:
    """How one parameter grows along its hidden dimension ``dim``.

    ``name`` is the parameter's name in the model (the owning module's own name for tied
    weights), ``fqn`` its name in the trace. ``kind`` says how: ``producer`` (tiled; padded rows
    are the mean of the rows, or zero), ``consumer`` (tiled and divided by ``k``; padded
    columns zero), ``added`` (a bias, position embedding or token added to the stream: tiled,
    padded like the stream), ``scale`` (multiplies the stream: tiled; padding irrelevant),
    ``norm_weight``/``norm_bias`` (γ and β of a norm). ``factor`` multiplies the tiles.
    """

    name: str
    fqn: str
    dim: int
    kind: str
    factor: float = 1.0
    shift: float = 0.0  # added after scaling: ``a·p + b`` (Gemma's ``1 + γ``) scales as a whole


@dataclass
class Constant:
    """A scalar buffer ``buffer`` (in module ``module``) multiplying the hidden states, e.g. an embedding
    scale of √hidden_size. ``producers`` are the plans of the layers writing what it multiplies, which can
    absorb a change of its value."""

    module: str
    buffer: str
    value: float
    producers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class EpsFix:
    """An ``eps`` that must be multiplied by ``factor``: attribute ``attr`` of module ``module``."""

    module: str
    attr: str
    old: float
    new: float


@dataclass
class StreamPlan:
    """Everything that changes when the group grows from ``size`` to ``new_size``."""

    size: int
    new_size: int
    pad: str | None  # MEAN, ZERO, or None when new_size is a multiple of size
    params: list[ParamPlan] = field(default_factory=list)
    eps: list[EpsFix] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    handled: dict[str, set] = field(default_factory=dict)  # trace parameter name → the ops that planned it
    constants: list[Constant] = field(default_factory=list)

    @property
    def k(self) -> int:
        return self.new_size // self.size

    @property
    def r(self) -> int:
        return self.new_size % self.size


# --------------------------------------------------------------------------- phase 2: how each tensor grows
@dataclass
class _St:
    """A hidden tensor: tiles are ``alpha`` × the original; ``pads`` is what is known about the padded entries;
    ``cause`` names the op that last made them lose a property (for messages)."""

    alpha: float
    pads: frozenset
    cause: str = ""
    cause_is_norm: bool = False


@dataclass
class _Stat:
    alpha: float
    mean_of: fx.Node | None = None  # the stat is exactly the per-token mean of this hidden tensor


class _Planner:
    """Walks the stream in graph order (see module docstring) and builds the :class:`StreamPlan`."""

    def __init__(self, root: nn.Module, analysis: StreamAnalysis, new_size: int, pad: str | None):
        self.root = root
        self.a = analysis
        self.d = analysis.group.size
        self.plan = StreamPlan(self.d, new_size, pad)
        k, r = self.plan.k, self.plan.r
        # The share of the new size the tiles fill: means over d' entries of zero-padded tensors scale by it.
        self.c = k * self.d / new_size
        self.mode = frozenset({pad}) if pad else frozenset({MEAN, ZERO})
        self.st: dict[fx.Node, _St] = {}
        self.stats: dict[fx.Node, _Stat] = {}
        # Tensors computed from one parameter and literals: (fqn, hidden dim, a, b) for ``a·param + b``.
        self.params: dict[fx.Node, tuple[str, int, float, float]] = {}
        self.producer_of: dict[fx.Node, list[tuple[str, str]]] = {}  # hidden tensor → plans of the layer writing it
        self.plans: dict[tuple[str, str], ParamPlan] = {}
        self.handled: dict[str, set[fx.Node]] = {}  # parameter (trace name) → the ops that planned it
        self.exact_r = r == 0
        self.named = dict(root.named_parameters(remove_duplicate=False))

    # -- bookkeeping
    def refuse(self, msg: str):
        raise NotGrowableError(f"hidden size {self.d} → {self.plan.new_size}: {msg}")

    def param(self, fqn: str, dim: int, kind: str, factor: float, node: fx.Node,
              affine: tuple[float, float] = (1.0, 0.0)) -> tuple[str, str]:
        """Plan parameter ``fqn`` used by ``node``; ``affine = (a, b)`` when the op sees ``a·param + b``,
        whose value as a whole must scale by ``factor``. Returns the plan's key."""
        name = _owner_name(self.root, self.named, fqn, node)
        self.handled.setdefault(fqn, set()).add(node)
        key = (name, fqn)
        a, b = affine
        new = ParamPlan(name, fqn, dim, kind, factor, (factor - 1.0) * b / a)
        prev = self.plans.get(key)
        if prev is not None and (prev.dim, prev.kind) == (dim, kind) and math.isclose(prev.factor, factor, rel_tol=1e-12) \
                and math.isclose(prev.shift, new.shift, abs_tol=1e-15):
            return key
        if prev is not None:
            self.refuse(f"parameter {name} is used as {prev.kind} and as {kind} of the hidden states")
        self.plans[key] = new
        return key

    def eps_fix(self, node: fx.Node, eps: float, factor: float) -> None:
        if math.isclose(factor, 1.0, rel_tol=1e-15):
            return
        path = _module_of(node)
        module = self.root.get_submodule(path) if path else self.root
        attrs = [k for k, v in vars(module).items() if isinstance(v, float) and not isinstance(v, bool)
                 and math.isclose(v, eps, rel_tol=1e-9)]
        if len(attrs) != 1:
            self.refuse(f"the eps {eps:g} of {op_name(node)}{where(node)} must be multiplied by {factor:.6g}, but "
                        f"'{path}' has {len(attrs)} attributes holding it")
        if all(f.module != path or f.attr != attrs[0] for f in self.plan.eps):
            self.plan.eps.append(EpsFix(path, attrs[0], eps, eps * factor))

    def pads_at(self, node: fx.Node, want: str, what: str) -> None:
        """A norm or statistic needs the padded entries of ``node`` to be ``want`` (mean or zero)."""
        if self.exact_r:
            return
        s = self.st[node]
        if want not in s.pads:
            other = "the per-token mean" if want == MEAN else "zero"
            cause = f", which {s.cause} does not keep" if s.cause else ""
            hint = (" (a LayerNorm output on the residual stream, i.e. post-LN, leaves them constant)"
                    if want == MEAN and s.cause_is_norm else "")
            self.refuse(f"{what} needs the padded entries to be {other}{cause}{hint}; "
                        f"grow by a whole multiple of {self.d} instead")

    def set(self, node: fx.Node, alpha: float, pads, inputs: list[_St]) -> None:
        """Record ``node``'s state; the cause of a lost padding property is this op if every input had it."""
        pads = frozenset(pads)
        lost = self.mode - pads
        if any(all(p in i.pads for i in inputs) for p in lost):
            self.st[node] = _St(alpha, pads, f"{op_name(node)}{where(node)}", node.target in NORMS)
        else:
            origin = next((i for i in inputs if lost - i.pads), None)
            self.st[node] = _St(alpha, pads, origin.cause if origin else "", bool(origin and origin.cause_is_norm))

    # -- classifying operands
    def operand(self, arg, node: fx.Node, out_dim: int | None):
        """('core', _St) | ('stat', _Stat) | ('param', (fqn, dim, a, b)) | ('broadcast', None) | ('literal', value)."""
        if not isinstance(arg, fx.Node):
            return "literal", arg
        if arg in self.st:
            return "core", self.st[arg]
        if arg in self.stats:
            return "stat", self.stats[arg]
        if arg in self.params:
            return "param", self.params[arg]
        fqn = _attr(arg)
        s, out = shape(arg), shape(node)
        if out_dim is not None and s is not None:
            d = out_dim - (len(out) - len(s))
            if d < 0 or s[d] == 1:
                return "broadcast", None
            if fqn is not None:
                return "param", (fqn, d, 1.0, 0.0)
        if s is not None and s == () or s is not None and all(x == 1 for x in s):
            return "broadcast", None
        self.refuse(f"{op_name(node)}{where(node)} combines the hidden states with '{arg.name}', "
                    "which growcli cannot follow")

    # -- the walk
    def run(self) -> StreamPlan:
        core, stats = self.a.core, self.a.stats
        for node in self.a.trace.graph.nodes:
            if node.op != "call_function" or node.target in METADATA_CHECKS:
                continue
            ins = [x for x in _flat(node.args) if isinstance(x, fx.Node)]
            if node in core or node in stats or any(x in self.st or x in self.stats for x in ins):
                self.visit(node)
        self.plan.params = list(self.plans.values())
        self.plan.handled = self.handled
        return self.plan

    def visit(self, node: fx.Node) -> None:
        t = node.target
        core = self.a.core
        if t in PRODUCERS and _weight_of(node) is not None:
            return self.producer_op(node)
        if node in self.a.stats:
            return self.stat_op(node)
        if node not in core:
            self.refuse(f"{op_name(node)}{where(node)} uses the hidden states and growcli has no rule for it")
        dim = core[node]
        ins = [x for x in _flat(node.args) if isinstance(x, fx.Node)]
        if not any(x in self.st or x in self.stats for x in ins):
            expr = self.param_expr(node, dim)
            if expr is None:
                self.refuse(f"{op_name(node)}{where(node)} makes hidden states from tensors growcli cannot follow")
            self.params[node] = expr  # a parameter reshaped (a CLS token) or shifted (Gemma's 1 + γ)
            return
        if t in NORMS:
            return self.norm_op(node)
        if t in BINARY:
            return self.binary_op(node, dim)
        if t in REDUCE:  # over other dimensions (the hidden one makes a statistic)
            s = self.st[node.args[0]]
            linear = t in (aten.mean.dim, aten.sum.dim_IntList, aten.mean.default, aten.sum.default)
            self.set(node, s.alpha, s.pads if linear else s.pads & {ZERO}, [s])
            return
        if t == aten.cat.default:
            return self.cat_op(node, dim)
        if node.args[0] not in self.st:
            self.refuse(f"{op_name(node)}{where(node)} makes hidden states from '{node.args[0]}', which growcli cannot follow")
        if t in REINDEX or t in VIEW:
            self.st[node] = self.st[node.args[0]]
            return
        if t in UNARY:
            return self.unary_op(node)
        self.refuse(f"{op_name(node)}{where(node)} transforms the hidden states and growcli has no rule for it")

    def param_expr(self, node: fx.Node, dim: int) -> tuple[str, int, float, float] | None:
        """``(fqn, hidden dim, a, b)`` if ``node`` is ``a·param + b`` of one parameter, else None."""
        t = node.target
        src = node.args[0] if node.args else None
        if t in REINDEX or t in VIEW or t in LINEAR_UNARY and t not in (aten.mul.Scalar, aten.div.Scalar, aten.neg.default):
            if src in self.params:
                return self.params[src]
            return (_attr(src), _param_dim(node, dim), 1.0, 0.0) if _attr(src) is not None else None
        base = [(i, self.params.get(a) or ((_attr(a), _param_dim_of(node, a, dim), 1.0, 0.0) if _attr(a) else None))
                for i, a in enumerate(node.args[:2]) if isinstance(a, fx.Node)]
        lits = [a for a in node.args[1:2] + node.args[:1] if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if len(base) != 1 or base[0][1] is None or (len(lits) != 1 and t != aten.neg.default):
            return None
        pos, (fqn, pd, a, b) = base[0]
        c = float(lits[0]) if lits else -1.0
        if t in (aten.add.Tensor, aten.add.Scalar):
            return fqn, pd, a, b + c
        if t in (aten.sub.Tensor, aten.sub.Scalar):
            return (fqn, pd, a, b - c) if pos == 0 else (fqn, pd, -a, c - b)
        if t in (aten.mul.Tensor, aten.mul.Scalar, aten.neg.default):
            return fqn, pd, a * c, b * c
        if t in (aten.div.Tensor, aten.div.Scalar) and pos == 0:
            return fqn, pd, a / c, b / c
        return None

    def producer_op(self, node: fx.Node) -> None:
        t = node.target
        data = _data_of(node)
        weight = _weight_of(node)
        if data in self.stats:
            self.refuse(f"{op_name(node)}{where(node)} reads a statistic over the hidden dimension")
        if data in self.st:  # reads the hidden states: a consumer
            if data is not node.args[0] and t != ADDMM and t != aten.embedding.default:
                self.refuse(f"{op_name(node)}{where(node)} uses the hidden states as its weight")
            if t == aten.embedding.default:
                self.refuse(f"embedding{where(node)} uses the hidden states as indices")
            cdim = 0 if t == ADDMM else 1
            self.param(weight, cdim, "consumer", 1.0 / self.st[data].alpha, node)
            self.plan.consumers.append(_module_of(node))
        if node in self.a.core:  # writes the hidden states: a producer
            pdim = 1 if t in (ADDMM, aten.embedding.default) else 0
            self.param(weight, pdim, "producer", 1.0, node)
            bias = _attr(node.args[0]) if t == ADDMM else (_attr(node.args[2]) if t != aten.embedding.default
                                                               and len(node.args) > 2 else None)
            if bias is not None:
                self.param(bias, 0, "producer", 1.0, node)
            self.set(node, 1.0, self.mode, [])
            self.producer_of[node] = [key for key in self.plans if node in self.handled.get(key[1], ())
                                      and self.plans[key].kind == "producer"]
            self.plan.producers.append(_module_of(node))

    def norm_op(self, node: fx.Node) -> None:
        x = node.args[0]
        s = self.st[x]
        is_ln = node.target == aten.layer_norm.default
        self.pads_at(x, MEAN if is_ln else ZERO, f"{'LayerNorm' if is_ln else 'RMSNorm'}{where(node)}")
        # var' = c·α²·var: eps follows, γ' = γ·√c restores the unit scale (GROWTH.md section 6).
        eps_index = 4 if is_ln else 3
        eps = node.args[eps_index] if len(node.args) > eps_index and node.args[eps_index] is not None else None
        if eps is None:
            if not (self.exact_r and math.isclose(s.alpha, 1.0)):
                self.refuse(f"{op_name(node)}{where(node)} uses a default eps that growcli cannot rescale")
        else:
            self.eps_fix(node, float(eps), self.c * s.alpha ** 2)
        weight = _attr(node.args[2]) if len(node.args) > 2 else None
        bias = _attr(node.args[3]) if is_ln and len(node.args) > 3 else None
        root_c = math.sqrt(self.c)
        if weight is not None:
            self.param(weight, 0, "norm_weight", root_c, node)
        if bias is not None:
            self.param(bias, 0, "norm_bias", 1.0 if weight is not None else 1.0 / root_c, node)
        self.set(node, 1.0 if weight is not None else 1.0 / root_c, {ZERO}, [s])
        self.plan.norms.append(_module_of(node))

    def binary_op(self, node: fx.Node, dim: int) -> None:
        t = node.target
        ops = [self.operand(a, node, dim) for a in node.args[:2]]
        cores = [s for kind, s in ops if kind == "core"]
        stats = [s for kind, s in ops if kind == "stat"]
        params = [p for kind, p in ops if kind == "param"]
        others = [kind for kind, _ in ops if kind in ("broadcast", "literal")]
        if t == aten.where.self or t not in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
                                             aten.add_.Tensor, aten.mul_.Tensor):
            if not self.exact_r or any(not math.isclose(c.alpha, 1.0) for c in cores) or params or stats:
                self.refuse(f"{op_name(node)}{where(node)} combines the hidden states in a way growcli cannot keep exact")
            self.set(node, 1.0, (), cores)
            return
        if not cores:
            self.refuse(f"{op_name(node)}{where(node)} makes hidden states from tensors growcli cannot follow")
        additive = t in (aten.add.Tensor, aten.sub.Tensor, aten.add_.Tensor)
        alpha = cores[0].alpha
        if additive:
            for c in cores[1:] + stats:
                if not math.isclose(c.alpha, alpha, rel_tol=1e-12):
                    self.refuse(f"{op_name(node)}{where(node)} adds hidden states of different scales ({alpha:.6g} and "
                                f"{c.alpha:.6g})")
            pads = cores[0].pads
            for c in cores[1:]:
                pads = pads & c.pads
            for fqn, pdim, a, b in params:
                self.param(fqn, pdim, "added", alpha, node, (a, b))
                pads = pads & self.mode
            if others or stats:
                if others and not math.isclose(alpha, 1.0):
                    self.refuse(f"{op_name(node)}{where(node)} adds a constant to rescaled hidden states")
                mean_of = stats[0].mean_of if stats else None
                x = node.args[0]
                centred = t == aten.sub.Tensor and mean_of is not None and x is mean_of and MEAN in self.st[x].pads
                pads = (pads & {MEAN}) | ({ZERO} if centred else frozenset())
            self.set(node, alpha, pads, cores)
            return
        # multiplicative
        if t == aten.div.Tensor and (params or len(cores) > 1 or ops[1][0] == "core"):
            self.refuse(f"{op_name(node)}{where(node)} divides by the hidden states or by a parameter")
        pads = cores[0].pads
        if len(cores) == 2:
            alpha *= cores[1].alpha
            pads = (cores[0].pads | cores[1].pads) & {ZERO}
        for s in stats:
            alpha = alpha / s.alpha if t == aten.div.Tensor else alpha * s.alpha
        for fqn, pdim, a, b in params:
            self.param(fqn, pdim, "scale", 1.0 / alpha, node, (a, b))
            alpha, pads = 1.0, pads & {ZERO}
        for arg in node.args[:2]:
            buffer = _scalar_buffer(arg)
            if buffer is not None:  # e.g. an embedding scale √hidden_size: the transform decides if it changes
                source = next((a for a in node.args[:2] if a in self.st), None)
                value = float(self.root.get_buffer(buffer))
                self.plan.constants.append(Constant(_module_of(node), buffer, value, self.producer_of.get(source, [])))
        self.set(node, alpha, pads, cores)

    def cat_op(self, node: fx.Node, dim: int) -> None:
        if node.args[1] % len(shape(node)) == dim:
            self.refuse(f"cat{where(node)} concatenates along the hidden dimension")
        parts = [self.operand(a, node, dim) for a in node.args[0]]
        cores = [s for kind, s in parts if kind == "core"]
        alpha = cores[0].alpha if cores else 1.0
        pads = self.mode
        for c in cores:
            if not math.isclose(c.alpha, alpha, rel_tol=1e-12):
                self.refuse(f"cat{where(node)} joins hidden states of different scales")
            pads = pads & c.pads
        for kind, p in parts:
            if kind == "param":
                self.param(p[0], p[1], "added", alpha, node, (p[2], p[3]))
            elif kind != "core":
                self.refuse(f"cat{where(node)} joins the hidden states with a tensor growcli cannot grow")
        self.set(node, alpha, pads, cores)

    def unary_op(self, node: fx.Node) -> None:
        t = node.target
        s = self.st[node.args[0]]
        if t in LINEAR_UNARY:
            self.st[node] = s
            if node.args[0] in self.producer_of:
                self.producer_of[node] = self.producer_of[node.args[0]]
        elif t in (aten.add.Scalar, aten.sub.Scalar):
            if not math.isclose(s.alpha, 1.0):
                self.refuse(f"{op_name(node)}{where(node)} shifts rescaled hidden states")
            self.set(node, 1.0, s.pads & {MEAN}, [s])
        elif t == aten.pow.Tensor_Scalar and isinstance(node.args[1], (int, float)) and node.args[1] > 0:
            self.set(node, s.alpha ** node.args[1], s.pads & {ZERO}, [s])
        elif t == aten.square.default:
            self.set(node, s.alpha ** 2, s.pads & {ZERO}, [s])
        elif t in POSITIVE_HOMOGENEOUS:
            self.set(node, s.alpha, s.pads & {ZERO}, [s])
        else:
            if not math.isclose(s.alpha, 1.0, rel_tol=1e-12):
                self.refuse(f"{op_name(node)}{where(node)} is not linear and its input is rescaled by {s.alpha:.6g}")
            if not self.exact_r and t not in FINITE:
                self.refuse(f"{op_name(node)}{where(node)} may make the padded entries infinite or NaN")
            self.set(node, 1.0, s.pads & {ZERO} if t in ZERO_TO_ZERO else (), [s])

    def stat_op(self, node: fx.Node) -> None:
        t = node.target
        if t in REDUCE and node.args[0] in self.st:  # the statistic itself
            x = node.args[0]
            s = self.st[x]
            d, k, r = self.d, self.plan.k, self.plan.r
            if t in MEANS or t in SUMS:
                if not self.exact_r and not s.pads & {MEAN, ZERO}:
                    self.refuse(f"{op_name(node)}{where(node)} averages over padded entries that are neither the mean nor zero")
                # The grown sum is k·Σx plus r times the pad value (the mean m = Σx/d, or 0).
                filled = k * d + (r if MEAN in s.pads else 0)
                is_mean = t in MEANS
                ratio = filled / self.plan.new_size if is_mean else filled / d
                exact_mean = is_mean and (MEAN in s.pads or self.exact_r)
                self.stats[node] = _Stat(s.alpha * ratio, x if exact_mean else None)
                self.plan.norms.append(_module_of(node))
                return
            if not self.exact_r:
                self.refuse(f"{op_name(node)}{where(node)} takes a maximum over the hidden dimension with padded entries")
            self.stats[node] = _Stat(s.alpha)
            return
        ins = [self.operand(a, node, None) for a in node.args[:2]]
        stats = [s for kind, s in ins if kind == "stat"]
        lits = [v for kind, v in ins if kind == "literal"]
        alpha = stats[0].alpha
        if t in STAT_POWER:
            alpha = alpha ** STAT_POWER[t]
        elif t == aten.pow.Tensor_Scalar:
            alpha = alpha ** float(node.args[1])
        elif t in (aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar):
            for s in stats[1:]:
                if not math.isclose(s.alpha, alpha, rel_tol=1e-12):
                    self.refuse(f"{op_name(node)}{where(node)} adds statistics of different scales")
            for v in lits:  # mean(x²) + eps: eps must scale with the statistic
                if isinstance(v, (int, float)) and v != 0:
                    self.eps_fix(node, float(v), alpha)
            if any(kind == "broadcast" for kind, _ in ins) and not math.isclose(alpha, 1.0, rel_tol=1e-15):
                self.refuse(f"{op_name(node)}{where(node)} adds a tensor to a rescaled statistic over the hidden dimension")
        elif t in (aten.mul.Tensor, aten.mul.Scalar):
            for s in stats[1:]:
                alpha *= s.alpha
        elif t in (aten.div.Tensor, aten.div.Scalar):
            if len(stats) > 1:
                alpha = stats[0].alpha / stats[1].alpha
        elif not (t in REINDEX or t in VIEW or t in LINEAR_UNARY):
            self.refuse(f"{op_name(node)}{where(node)} transforms a statistic over the hidden dimension "
                        "and growcli has no rule for it")
        self.stats[node] = _Stat(alpha)


def _scalar_buffer(arg) -> str | None:
    """The name of a one-element buffer that ``arg`` is (possibly cast), else None."""
    while isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in LINEAR_UNARY:
        arg = arg.args[0]
    if _attr(arg) is None or shape(arg) is None or math.prod(shape(arg)) != 1:
        return None
    return _attr(arg)


def _param_dim_of(node: fx.Node, arg: fx.Node, dim: int) -> int:
    """The dimension of operand ``arg`` (broadcast against ``node``'s output) that is output dim ``dim``."""
    return dim - (len(shape(node)) - len(shape(arg)))


def _param_dim(node: fx.Node, dim: int) -> int:
    """The parameter dimension behind output dim ``dim`` of a reshaped/expanded parameter."""
    src_dim = _source_dim(node, dim) if node.target not in UNARY else dim
    if src_dim is None:
        raise NotGrowableError(f"hidden size: {op_name(node)}{where(node)} reshapes a parameter in a way growcli cannot follow")
    return src_dim


def _owner_name(root: nn.Module, named: dict[str, nn.Parameter], fqn: str, node: fx.Node) -> str:
    """The name of parameter ``fqn`` as owned by the module that runs ``node`` (a tied weight has several)."""
    path = _module_of(node)
    leaf = fqn.rpartition(".")[2]
    target = named.get(fqn)
    if target is None or not path:
        return fqn
    try:
        mine = getattr(root.get_submodule(path), leaf, None)
    except AttributeError:
        return fqn
    return f"{path}.{leaf}" if mine is target else fqn
