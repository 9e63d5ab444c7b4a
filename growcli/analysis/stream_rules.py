"""Phase 2 of the residual-stream analysis: the rule of each op on the hidden states.

:class:`Planner` walks the tensors :class:`~growcli.analysis.stream_tensors.StreamAnalysis` found
in graph order and, op by op, derives each hidden tensor's scale ``α`` and what is known about
its padded entries, and plans the parameters the op reads: producers and consumers (Linear,
Conv, Embedding, ``addmm``), norms (their ``eps`` and ``γ``), additive and multiplicative
operands, concatenations, element-wise ops, per-token statistics, and mixture-of-experts layers
(the experts' per-expert matmuls, :meth:`Planner.expert_op`; whole hidden vectors moved between rows and summed
back onto their tokens, :meth:`Planner.accumulate_op`, or written there, :meth:`Planner.index_put_op`), and Linears
over another dim (token mixing, :meth:`Planner.batch_linear_op`). Whatever breaks the invariants
is refused, naming the op and the module. Ops whose results nothing uses are skipped
(:mod:`growcli.analysis.liveness`); rows of a parameter gathered as hidden states, concatenations (a class
token; whole hidden vectors side by side, read block by block) are in :mod:`growcli.analysis.stream_more`.
The plan's types and the bookkeeping are in :mod:`growcli.analysis.stream_plan`; :mod:`growcli.analysis.stream`
has the overview.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from growcli.analysis.stream_plan import (Constant, FINITE, HiddenState, LINEAR_UNARY, MEAN, MEANS, POSITIVE_HOMOGENEOUS,
                                          PlanBook, SUMS, StatState, StreamPlan, ZERO, ZERO_TO_ZERO)
from growcli.analysis.matmuls import param_matmul
from growcli.analysis.stream_more import MoreRules
from growcli.analysis.stream_tensors import ACCUMULATE, NORMS, PRODUCERS, ROW_OPS, STAT_POWER, ZEROS
from growcli.analysis.trace import (ADDMM, BINARY, INDEX_PUT, METADATA_CHECKS, REDUCE, REINDEX, SHAPE_AS, UNARY, VIEW,
                                    attr_of, data_of, flat_args, module_of, op_name, shape, weight_of, where)

aten = torch.ops.aten


class Planner(MoreRules, PlanBook):
    """Walks the stream in graph order (see module docstring) and builds the :class:`StreamPlan`."""

    # -- the walk
    def run(self) -> StreamPlan:
        core, stats = self.a.core, self.a.stats
        for node in self.a.trace.graph.nodes:
            if node.op != "call_function" or node.target in METADATA_CHECKS or node in self.a.dead:
                continue
            ins = [x for x in flat_args(node.args) if isinstance(x, fx.Node)]
            if node in core or node in stats or any(x in self.st or x in self.stats or x in self.cats for x in ins):
                self.visit(node)
        self.plan.params = list(self.plans.values())
        self.plan.handled = self.handled
        out = next(n for n in self.a.trace.graph.nodes if n.op == "output")
        for i, arg in enumerate(flat_args(out.args)):
            if arg in self.a.outputs and arg in self.st:
                self.plan.outputs.append((i, self.a.outputs[arg], self.st[arg].alpha))
        return self.plan

    def visit(self, node: fx.Node) -> None:
        t = node.target
        core = self.a.core
        if node in self.a.derived or any(x in self.cats for x in node.all_input_nodes):
            return self.concat_op(node)  # hidden vectors side by side along the hidden dim, and their readers
        if t == aten.linear.default and node in core and core[node] < len(shape(node)) - 1:
            return self.batch_linear_op(node)  # the hidden dim is a batch dim of this Linear (token mixing)
        if t in PRODUCERS and weight_of(node) is not None:
            return self.producer_op(node)
        if node in self.a.stats:
            return self.stat_op(node)
        if param_matmul(node) is not None:
            return self.expert_op(node)
        if node not in core:
            self.refuse(f"{op_name(node)}{where(node)} uses the hidden states and growcli has no rule for it")
        dim = core[node]
        if t in ZEROS:  # zero at every position: any scale, both paddings
            self.st[node] = HiddenState(1.0, self.mode, zero=True)
            return
        if t in ACCUMULATE:
            return self.accumulate_op(node)
        if t in INDEX_PUT:
            return self.index_put_op(node)
        ins = [x for x in flat_args(node.args) if isinstance(x, fx.Node)]
        if not any(x in self.st or x in self.stats for x in ins):
            expr = self.param_expr(node, dim)
            if expr is None and self.gathered_rows(node, dim):
                return
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
        if t in REINDEX or t in VIEW or t in SHAPE_AS or t in ROW_OPS:  # ROW_OPS: whole hidden vectors move between rows
            self.st[node] = self.st[node.args[0]]
            return
        if t in UNARY:
            return self.unary_op(node)
        self.refuse(f"{op_name(node)}{where(node)} transforms the hidden states and growcli has no rule for it")


    def producer_op(self, node: fx.Node) -> None:
        t = node.target
        data = data_of(node)
        weight = weight_of(node)
        if data in self.stats:
            self.refuse(f"{op_name(node)}{where(node)} reads a statistic over the hidden dimension")
        if data in self.st:  # reads the hidden states: a consumer
            if data is not node.args[0] and t != ADDMM and t != aten.embedding.default:
                self.refuse(f"{op_name(node)}{where(node)} uses the hidden states as its weight")
            if t == aten.embedding.default:
                self.refuse(f"embedding{where(node)} uses the hidden states as indices")
            cdim = 0 if t == ADDMM else 1
            self.param(weight, cdim, "consumer", 1.0 / self.st[data].alpha, node)
            self.plan.consumers.append(module_of(node))
        if node in self.a.core:  # writes the hidden states: a producer
            pdim = 1 if t in (ADDMM, aten.embedding.default) else 0
            self.param(weight, pdim, "producer", 1.0, node)
            bias = attr_of(node.args[0]) if t == ADDMM else (attr_of(node.args[2]) if t != aten.embedding.default
                                                               and len(node.args) > 2 else None)
            if bias is not None:
                self.param(bias, 0, "producer", 1.0, node)
            self.set(node, 1.0, self.mode, [])
            self.producer_of[node] = [key for key in self.plans if node in self.handled.get(key[1], ())
                                      and self.plans[key].kind == "producer"]
            self.plan.producers.append(module_of(node))

    def expert_op(self, node: fx.Node) -> None:
        """A product by a weight (``x @ W.T``, a per-expert matmul): ``experts.gate_up_proj`` reads the hidden states
        like a Linear's columns, in every expert (consumer: tiled, divided by ``k``, padded with zero);
        ``experts.down_proj`` writes them like a Linear's rows (producer: tiled, padded like the stream, every
        expert alike)."""
        m = param_matmul(node)
        if m.data in self.stats:
            self.refuse(f"{op_name(node)}{where(node)} reads a statistic over the hidden dimension")
        if m.data in self.st:
            if node in self.a.core:
                self.refuse(f"{op_name(node)}{where(node)} reads the hidden states in a dimension it does not contract")
            self.param(m.fqn, m.weight_in, "consumer", 1.0 / self.st[m.data].alpha, node)
            self.plan.consumers.append(module_of(node))
        elif node in self.a.core:
            self.param(m.fqn, m.weight_out, "producer", 1.0, node)
            self.set(node, 1.0, self.mode, [])
            self.producer_of[node] = [key for key, plan in self.plans.items() if key[1] == m.fqn and plan.kind == "producer"]
            self.plan.producers.append(module_of(node))
        else:
            self.refuse(f"{op_name(node)}{where(node)} uses the hidden states as its weight")

    def accumulate_op(self, node: fx.Node) -> None:
        """``self`` plus rows of ``source`` added at their indices: a sum of hidden vectors, which keeps their
        common scale and their padding (zero stays zero, a sum of per-token means is the mean of the sum)."""
        self._sum_into(node, node.args[3], "adds hidden states to a tensor growcli cannot follow", "adds")

    def index_put_op(self, node: fx.Node) -> None:
        """``out = x; out[indices] (+)= values`` along other dims than the hidden one: each hidden vector of ``out`` is
        one of ``x``'s, one of ``values``' or their sum, so the common scale and the padding are kept (as a sum)."""
        self._sum_into(node, node.args[2], "writes a tensor growcli cannot follow into the hidden states", "writes")

    def _sum_into(self, node: fx.Node, values_arg: object, unknown: str, verb: str) -> None:
        """``node``'s hidden vectors are ``args[0]``'s, ``values_arg``'s or sums of both: one common scale, the
        padding both keep."""
        base, values = (self.st.get(a) if isinstance(a, fx.Node) else None for a in (node.args[0], values_arg))
        if base is None or values is None:
            self.refuse(f"{op_name(node)}{where(node)} {unknown}")
        if not base.zero and not math.isclose(base.alpha, values.alpha, rel_tol=1e-12):
            self.refuse(f"{op_name(node)}{where(node)} {verb} hidden states of different scales ({base.alpha:.6g} and "
                        f"{values.alpha:.6g})")
        self.set(node, values.alpha, base.pads & values.pads, [base, values])

    def batch_linear_op(self, node: fx.Node) -> None:
        """A Linear over another dim of hidden states (``W · x[…, c, :] + b`` for each hidden channel ``c``, MLP-Mixer
        token mixing): tiles stay tiles and a mean of the channels stays one (an affine map commutes with it); its
        bias breaks a scale other than 1 and zero padding. Its weight does not grow."""
        data = data_of(node)
        if data in self.stats:
            self.refuse(f"{op_name(node)}{where(node)} reads a statistic over the hidden dimension")
        if data not in self.st or any(a in self.st for a in node.args[1:]):
            self.refuse(f"{op_name(node)}{where(node)} uses the hidden states as its weight or bias")
        s = self.st[data]
        bias = len(node.args) > 2 and node.args[2] is not None
        if bias and not math.isclose(s.alpha, 1.0, rel_tol=1e-12):
            self.refuse(f"{op_name(node)}{where(node)} adds its bias to hidden states rescaled by {s.alpha:.6g}")
        self.set(node, s.alpha, s.pads & {MEAN} if bias else s.pads, [s])

    def norm_op(self, node: fx.Node) -> None:
        x = node.args[0]
        s = self.st[x]
        is_ln = node.target == aten.layer_norm.default
        self._note_cast(node)
        self.pads_at(x, MEAN if is_ln else ZERO, f"{'LayerNorm' if is_ln else 'RMSNorm'}{where(node)}")
        # var' = c·α²·var: eps follows, γ' = γ·√c restores the unit scale (docs/recipes.md#hidden-padding).
        eps_index = 4 if is_ln else 3
        eps = node.args[eps_index] if len(node.args) > eps_index and node.args[eps_index] is not None else None
        if eps is None:
            if not (self.exact_r and math.isclose(s.alpha, 1.0)):
                self.refuse(f"{op_name(node)}{where(node)} uses a default eps that growcli cannot rescale")
        else:
            self.eps_fix(node, float(eps), self.c * s.alpha ** 2)
        weight = self._norm_weight(node.args[2]) if len(node.args) > 2 else None
        bias = attr_of(node.args[3]) if is_ln and len(node.args) > 3 else None
        root_c = math.sqrt(self.c)
        if weight is not None:
            self.param(weight[0], weight[1], "norm_weight", root_c, node, weight[2:])
        if bias is not None:
            self.param(bias, 0, "norm_bias", 1.0 if weight is not None else 1.0 / root_c, node)
        self.set(node, 1.0 if weight is not None else 1.0 / root_c, {ZERO}, [s])
        self.plan.norms.append(module_of(node))

    def _norm_weight(self, arg) -> tuple[str, int, float, float] | None:
        """The norm's ``γ`` as ``(fqn, dim, a, b)`` when it is ``a·param + b`` (Nemotron's LayerNorm1P passes
        ``1 + weight``), None when the norm has none; refuses a ``γ`` computed from anything else."""
        if not isinstance(arg, fx.Node):
            return None
        if attr_of(arg) is not None:
            return attr_of(arg), 0, 1.0, 0.0
        expr = self.params.get(arg) or self.param_expr(arg, 0)
        if expr is None:
            self.refuse(f"the weight of the norm{where(arg)} is computed by {op_name(arg)}, which growcli cannot follow")
        return expr

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
                self.plan.constants.append(Constant(module_of(node), buffer, value, self.producer_of.get(source, [])))
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

    def _note_cast(self, node: fx.Node) -> None:
        """Record a norm computed in a less precise float dtype than the weights' (``StreamPlan.casts``).

        LayerNorm's variance (Welford's running sums), and any norm of a padded vector, round differently
        over ``d'`` entries than over ``d``; an RMSNorm of a vector tiled a power-of-two times sums
        each half to the same value and scales by a power of two, so it stays bit-exact."""
        src = _dtype(node.args[0])
        weights = next((p.dtype for p in self.named.values() if p.is_floating_point()), None)
        if src is None or weights is None or not src.is_floating_point or torch.finfo(src).eps <= torch.finfo(weights).eps:
            return
        k = self.plan.k
        if node.target != aten.layer_norm.default and self.exact_r and k & (k - 1) == 0:
            return
        what = f"{module_of(node) or 'the model'} ({str(src).removeprefix('torch.')})"
        if what not in self.plan.casts:
            self.plan.casts.append(what)

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
                self.stats[node] = StatState(s.alpha * ratio, x if exact_mean else None)
                self.plan.norms.append(module_of(node))
                self._note_cast(node)  # a decomposed norm (x.float() · rsqrt(mean(x²) + eps)) rounds there too
                return
            if not self.exact_r:
                self.refuse(f"{op_name(node)}{where(node)} takes a maximum over the hidden dimension with padded entries")
            self.stats[node] = StatState(s.alpha)
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
        self.stats[node] = StatState(alpha)


def _dtype(node) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return getattr(val, "dtype", None)


def _scalar_buffer(arg) -> str | None:
    """The name of a one-element buffer that ``arg`` is (possibly cast), else None."""
    while isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in LINEAR_UNARY:
        arg = arg.args[0]
    if attr_of(arg) is None or shape(arg) is None or math.prod(shape(arg)) != 1:
        return None
    return attr_of(arg)
