"""Phase 2 of the residual-stream analysis: the plan, and the bookkeeping of the walk that writes it.

The result is a :class:`StreamPlan`: a :class:`ParamPlan` per parameter, the ``eps`` constants
to rescale (:class:`EpsFix`) and scalar buffers the new config changes (:class:`Constant`).
:class:`PlanBook` holds the walk's state over the tensors
:class:`~growcli.analysis.stream_tensors.StreamAnalysis` found — each hidden tensor's scale ``α``
and what is known about its padded entries (:class:`HiddenState`), per-token statistics
(:class:`StatState`), tensors computed from one parameter — and records parameter plans and
``eps`` fixes, refusing conflicting ones. The rule of each op is in
:mod:`growcli.analysis.stream_rules`; the rules are in :mod:`growcli.analysis.stream`'s docstring
and docs/recipes.md#hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from growcli.analysis.stream_tensors import NORMS, StreamAnalysis
from growcli.analysis.trace import REINDEX, UNARY, VIEW, attr_of, module_of, op_name, shape, source_dim, where
from growcli.core.errors import NotGrowableError

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
    # A consumer reading hidden states concatenated along the hidden dim: (old size, scale α of the part, or None
    # for a part without hidden states, kept) per block of ``dim``, in order; each hidden block tiled on its own.
    blocks: tuple[tuple[int, float | None], ...] | None = None


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
    # Hidden states the model returns: (position in the flat graph output, hidden dim, tile scale alpha);
    # grown position i holds alpha · old[i mod size] on the tiles, the padded ones are fresh.
    outputs: list[tuple[int, int, float]] = field(default_factory=list)
    # Casts of the hidden states to a less precise float dtype inside the model ("module: float64 → float32",
    # OLMo's LayerNorm): sums over the grown dimension round there, so the step is exact only to that dtype.
    casts: list[str] = field(default_factory=list)

    @property
    def k(self) -> int:
        return self.new_size // self.size

    @property
    def r(self) -> int:
        return self.new_size % self.size


@dataclass
class HiddenState:
    """A hidden tensor: tiles are ``alpha`` × the original; ``pads`` is what is known about the padded entries;
    ``cause`` names the op that last made them lose a property (for messages)."""

    alpha: float
    pads: frozenset
    cause: str = ""
    cause_is_norm: bool = False
    zero: bool = False  # a fresh zero tensor: equal to any scale of the original (zero) tensor


@dataclass
class StatState:
    alpha: float
    mean_of: fx.Node | None = None  # the stat is exactly the per-token mean of this hidden tensor



class PlanBook:
    """The state of the phase-2 walk and how it records plans; :class:`growcli.analysis.stream_rules.Planner`
    adds the rule of each op."""

    def __init__(self, root: nn.Module, analysis: StreamAnalysis, new_size: int, pad: str | None):
        self.root = root
        self.a = analysis
        self.d = analysis.group.size
        self.plan = StreamPlan(self.d, new_size, pad)
        k, r = self.plan.k, self.plan.r
        # The share of the new size the tiles fill: means over d' entries of zero-padded tensors scale by it.
        self.c = k * self.d / new_size
        self.mode = frozenset({pad}) if pad else frozenset({MEAN, ZERO})
        self.st: dict[fx.Node, HiddenState] = {}
        self.stats: dict[fx.Node, StatState] = {}
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
        if prev is not None and (prev.dim, prev.kind, prev.blocks) == (dim, kind, None) \
                and math.isclose(prev.factor, factor, rel_tol=1e-12) and math.isclose(prev.shift, new.shift, abs_tol=1e-15):
            return key
        if prev is not None:
            self.refuse(f"parameter {name} is used as {prev.kind} and as {kind} of the hidden states")
        self.plans[key] = new
        return key

    def eps_fix(self, node: fx.Node, eps: float, factor: float) -> None:
        if math.isclose(factor, 1.0, rel_tol=1e-15):
            return
        path = module_of(node)
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

    def set(self, node: fx.Node, alpha: float, pads, inputs: list[HiddenState]) -> None:
        """Record ``node``'s state; the cause of a lost padding property is this op if every input had it."""
        pads = frozenset(pads)
        lost = self.mode - pads
        if any(all(p in i.pads for i in inputs) for p in lost):
            self.st[node] = HiddenState(alpha, pads, f"{op_name(node)}{where(node)}", node.target in NORMS)
        else:
            origin = next((i for i in inputs if lost - i.pads), None)
            self.st[node] = HiddenState(alpha, pads, origin.cause if origin else "", bool(origin and origin.cause_is_norm))

    # -- classifying operands
    def operand(self, arg, node: fx.Node, out_dim: int | None):
        """('core', HiddenState) | ('stat', StatState) | ('param', (fqn, dim, a, b)) | ('broadcast', None) | ('literal', value)."""
        if not isinstance(arg, fx.Node):
            return "literal", arg
        if arg in self.st:
            return "core", self.st[arg]
        if arg in self.stats:
            return "stat", self.stats[arg]
        if arg in self.params:
            return "param", self.params[arg]
        fqn = attr_of(arg)
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

    def param_expr(self, node: fx.Node, dim: int) -> tuple[str, int, float, float] | None:
        """``(fqn, hidden dim, a, b)`` if ``node`` is ``a·param + b`` of one parameter, else None."""
        t = node.target
        src = node.args[0] if node.args else None
        if t in REINDEX or t in VIEW or t in LINEAR_UNARY and t not in (aten.mul.Scalar, aten.div.Scalar, aten.neg.default):
            if src in self.params:
                return self.params[src]
            return (attr_of(src), _param_dim(node, dim), 1.0, 0.0) if attr_of(src) is not None else None
        base = [(i, self.params.get(a) or ((attr_of(a), _param_dim_of(node, a, dim), 1.0, 0.0) if attr_of(a) else None))
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


def _param_dim_of(node: fx.Node, arg: fx.Node, dim: int) -> int:
    """The dimension of operand ``arg`` (broadcast against ``node``'s output) that is output dim ``dim``."""
    return dim - (len(shape(node)) - len(shape(arg)))


def _param_dim(node: fx.Node, dim: int) -> int:
    """The parameter dimension behind output dim ``dim`` of a reshaped/expanded parameter."""
    src_dim = source_dim(node, dim) if node.target not in UNARY else dim
    if src_dim is None:
        raise NotGrowableError(f"hidden size: {op_name(node)}{where(node)} reshapes a parameter in a way growcli cannot follow")
    return src_dim


def _owner_name(root: nn.Module, named: dict[str, nn.Parameter], fqn: str, node: fx.Node) -> str:
    """The name of parameter ``fqn`` as owned by the module that runs ``node`` (a tied weight has several)."""
    path = module_of(node)
    leaf = fqn.rpartition(".")[2]
    target = named.get(fqn)
    if target is None or not path:
        return fqn
    try:
        mine = getattr(root.get_submodule(path), leaf, None)
    except AttributeError:
        return fqn
    return f"{path}.{leaf}" if mine is target else fqn
