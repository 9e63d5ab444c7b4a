"""``vocab``: add tokens to the input embedding and the LM head, keeping old tokens' logits exact.

Recipe: docs/recipes.md#vocab. Both tensors are found in the ``torch.export`` trace, never by
attribute name: the input embedding is the ``embedding`` op whose indices are a model input
(the token ids); the LM head is the ``linear`` op whose output reaches the model's output
through position-wise ops only (a cast, a scale, a soft cap), with the vocabulary along the
last dimension. Tied embeddings are one parameter in both roles (the same object), and stay one.

New input rows are the mean of the existing rows (plus optional noise). New head rows are the
mean of the existing rows (each new token's logit is then the mean of the old logits) or zero
(logit 0). Old rows are not touched, so for inputs made of old tokens every old logit is
unchanged exactly; only the softmax over the larger vocabulary changes, by the probability mass
the new tokens take, which the step measures. The grown output's map (old columns first, new
ones fresh) is attached to the report as ``report.output_maps`` for the verification.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from growcli.analysis.trace import (BINARY, REINDEX, UNARY, VIEW, Trace, attr_of, module_of, op_name, shape,
                                    trace_model, weight_of, where)
from growcli.core.errors import NotGrowableError, UsageError
from growcli.core.inputs import cast_batch, make_batches
from growcli.core.model import GrowModel, eval_mode
from growcli.core.origins import AxisMap, Origin
from growcli.transforms.registry import Context, StepReport, option, register
from growcli.transforms.resize import sync_attributes
from growcli.verification.compare import flatten_outputs

aten = torch.ops.aten
_THROUGH = UNARY | VIEW | REINDEX  # ops the logits may pass on their way out, if the vocabulary stays the last dim


@dataclass(frozen=True)
class VocabSpec:
    """Add ``tokens`` (strings, or a count of placeholders) as new rows of the embedding and the LM head."""

    tokens: int | list[str] = option(help="New tokens: a list of strings, or N to add N placeholder tokens "
                                          "<extra_ID> (ID = the new token's id).")
    noise: float = option(0.0, "Gaussian noise added to the new input-embedding rows, relative to the std of the "
                               "existing rows (0: exactly their mean).")
    output_init: Literal["mean", "zero"] = option("mean", "New LM-head rows: mean (each new token's logit is the mean "
                                                          "of the old logits) or zero (logit 0); tied embeddings: "
                                                          "mean only.")
    pad_to_multiple_of: int | None = option(None, "Round the new vocabulary size up to a multiple of M (the extra "
                                                  "rows have no token).")

    def __post_init__(self):
        problems = []
        if isinstance(self.tokens, bool) or isinstance(self.tokens, int) and self.tokens < 1:
            problems.append(f"tokens {self.tokens!r}: expected a positive number or a list of tokens")
        elif not isinstance(self.tokens, int):
            if not self.tokens:
                problems.append("tokens: the list is empty")
            bad = [t for t in self.tokens if not isinstance(t, str) or not t]
            if bad:
                problems.append(f"tokens: {bad[0]!r} is not a non-empty string")
            dup = sorted({t for t in self.tokens if self.tokens.count(t) > 1}, key=str)
            if dup:
                problems.append(f"tokens: {dup[0]!r} is listed twice")
        if self.noise < 0 or not math.isfinite(self.noise):
            problems.append(f"noise must be a non-negative number, got {self.noise}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            problems.append(f"pad_to_multiple_of must be a positive integer, got {self.pad_to_multiple_of}")
        if problems:
            raise UsageError("; ".join(problems))

    def token_list(self, first_id: int) -> list[str]:
        """The tokens to add; placeholders are named by their new id."""
        if isinstance(self.tokens, int):
            return [f"<extra_{first_id + i}>" for i in range(self.tokens)]
        return list(self.tokens)

    def new_size(self, old: int) -> int:
        size = old + (self.tokens if isinstance(self.tokens, int) else len(self.tokens))
        m = self.pad_to_multiple_of
        return size if m is None else -(-size // m) * m


# --------------------------------------------------------------------------- finding the two matrices
@dataclass
class VocabSites:
    embedding: str  # the input embedding's weight (trace FQN)
    head: str | None  # the LM head's weight (None: no head, an embedding model)
    head_bias: str | None
    outputs: dict[int, int]  # position in the flat model output → rank of that output (vocabulary = last dim)
    rows: int  # the vocabulary size V
    lookup: str = ""  # the module running the embedding lookup
    head_module: str = ""


def _token_input(node) -> bool:
    """Whether an embedding's indices are a model input (through views and casts)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _THROUGH:
        node = node.args[0]
    return isinstance(node, fx.Node) and node.op == "placeholder"


def _vocab_path(head: fx.Node, vocab: int) -> tuple[dict[int, int], str | None]:
    """Where ``head``'s output reaches the model's output (position → rank), following position-wise ops.

    Returns the reason it is not a logits writer when some use mixes the vocabulary dimension.
    """
    outputs: dict[int, int] = {}
    work, seen = [head], set()
    while work:
        node = work.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if user.op == "output":
                flat = _flat(user.args[0])
                outputs.update({i: len(shape(node) or ()) for i, a in enumerate(flat) if a is node})
                continue
            out = shape(user)
            if user.op != "call_function" or not out or out[-1] != vocab:
                return outputs, f"{op_name(user)}{where(user)} changes the vocabulary dimension of the logits"
            if user.target in _THROUGH:
                work.append(user)
            elif user.target in BINARY and all(_broadcasts(a, node) for a in user.args if a is not node):
                work.append(user)
            else:
                return outputs, f"{op_name(user)}{where(user)} mixes the logits of different tokens"
    return outputs, None


def _broadcasts(arg, logits: fx.Node) -> bool:
    """A scalar, or a tensor that is the same for every token (size 1 along the vocabulary)."""
    s = shape(arg)
    return not isinstance(arg, fx.Node) or s is not None and (len(s) == 0 or s[-1] == 1) and arg is not logits


def _flat(args) -> list:
    out = []
    for a in args if isinstance(args, (list, tuple)) else [args]:
        out += _flat(a) if isinstance(a, (list, tuple)) else [a]
    return out


def find_sites(trace: Trace) -> VocabSites:
    """The input embedding and the LM head of a traced model (see the module docstring for the rules)."""
    embeds = [n for n in trace.graph.nodes if n.op == "call_function" and n.target == aten.embedding.default
              and weight_of(n) is not None and _token_input(n.args[1])]
    if not embeds:
        raise NotGrowableError("vocab: no embedding op reads the token ids (an embedding lookup of a model input); "
                               "nothing holds a vocabulary to grow")
    vocab_sizes = {shape(e.args[0])[0] for e in embeds}
    heads, blocked = [], []
    for n in trace.graph.nodes:  # a linear with as many rows as a token embedding, writing an output
        if n.op != "call_function" or n.target != aten.linear.default or weight_of(n) is None:
            continue
        rows = shape(n.args[1])[0]
        if rows not in vocab_sizes:
            continue
        outputs, reason = _vocab_path(n, rows)
        if reason is None and outputs:
            heads.append((n, outputs))
        elif reason is not None:
            blocked.append(f"'{module_of(n)}': {reason}")
    if len(heads) > 1:
        tied = [h for h in heads if weight_of(h[0]) in {weight_of(e) for e in embeds}]
        heads = tied if len(tied) == 1 else heads
    if len(heads) > 1:
        raise NotGrowableError(f"vocab: several linear layers write the model's output "
                               f"({', '.join(repr(module_of(h[0])) for h in heads)}); which is the LM head is unclear")
    out_node = next(n for n in trace.graph.nodes if n.op == "output")
    vocab_out = [a for a in _flat(out_node.args[0]) if shape(a) and shape(a)[-1] in vocab_sizes]
    if not heads and vocab_out:  # an output of the vocabulary's size that no linear writes position-wise
        why = blocked[0] if blocked else f"'{op_name(vocab_out[0])}' writes it, not a linear layer"
        raise NotGrowableError(f"vocab: the model's output has the vocabulary's size but no LM head writes it "
                               f"token by token, so the old tokens' outputs would change ({why})")
    head, outputs = heads[0] if heads else (None, {})
    rows = shape(head.args[1])[0] if head is not None else None
    matching = [e for e in embeds if rows is None or shape(e.args[0])[0] == rows]
    if head is not None:
        matching = [e for e in matching if weight_of(e) == weight_of(head)] or matching
    if len({weight_of(e) for e in matching}) != 1:
        what = ", ".join(repr(module_of(e)) for e in (matching or embeds))
        raise NotGrowableError(f"vocab: {'no' if not matching else 'several'} token embeddings fit the LM head "
                               f"'{module_of(head)}' with {rows} rows ({what})" if head is not None else
                               f"vocab: several embeddings read model inputs ({what}); which holds the vocabulary is "
                               "unclear")
    embedding = weight_of(matching[0])
    bias = attr_of(head.args[2]) if head is not None and len(head.args) > 2 else None
    if head is not None and len(head.args) > 2 and head.args[2] is not None and bias is None:
        raise NotGrowableError(f"vocab: the bias of the LM head '{module_of(head)}' is computed, not a parameter")
    return VocabSites(embedding, weight_of(head) if head is not None else None, bias, outputs,
                      shape(matching[0].args[0])[0], module_of(matching[0]), module_of(head) if head is not None else "")


def _check_uses(trace: Trace, sites: VocabSites) -> None:
    """Refuse when a grown tensor is also read by an op other than the lookup and the head (through views of it)."""
    users = trace.weight_users()
    for fqn in filter(None, (sites.embedding, sites.head, sites.head_bias)):
        work = list(users.get(fqn, []))
        while work:
            user = work.pop()
            if user.op != "call_function" or user.target == aten.embedding.default:
                continue  # any lookup reads rows by index: new rows change no old result
            if user.target == aten.linear.default and module_of(user) == sites.head_module:
                continue
            if user.target in _THROUGH:  # a view or cast of the weight: what reads it must be the lookup or the head
                work.extend(user.users)
                continue
            raise NotGrowableError(f"vocab: parameter {fqn} is also used by {op_name(user)}{where(user)}, which the "
                                   "vocabulary growth does not reach")


# --------------------------------------------------------------------------- the transform
def _sample(gm: GrowModel):
    batch = make_batches(gm.inputs, 1)[0]
    dtype = next((p.dtype for p in gm.module.parameters() if p.is_floating_point()), None)
    return cast_batch(batch, dtype) if dtype is not None else batch


def _trace(gm: GrowModel) -> Trace:
    if gm.kind == "pt2":
        raise NotGrowableError("vocab: growing the vocabulary of a .pt2 program is not supported (its recorded "
                               "shapes hard-code the vocabulary size); grow the Hugging Face directory or the state_dict")
    return trace_model(gm.module, _sample(gm))


def vocab_candidates(gm: GrowModel) -> dict[str, str | None]:
    """The token embedding (and its LM head) → None if the vocabulary can grow, else why not."""
    try:
        sites = find_sites(trace := _trace(gm))
        _check_uses(trace, sites)
    except NotGrowableError as exc:
        return {"vocabulary": str(exc).removeprefix("vocab: ")}
    head = f" + {sites.head_module}" + (" (tied)" if _tied(gm, sites) else "") if sites.head else " (no LM head)"
    return {f"{sites.lookup}{head}": None}


def _names_of(gm: GrowModel, fqn: str) -> list[str]:
    """Every name under which the parameter ``fqn`` lives in the model (tied parameters have several)."""
    target = gm.module.get_parameter(fqn)
    return sorted(n for n, p in gm.module.named_parameters(remove_duplicate=False) if p is target)


def _tied(gm: GrowModel, sites: VocabSites) -> bool:
    return sites.head is not None and gm.module.get_parameter(sites.head) is gm.module.get_parameter(sites.embedding)


def _grow_rows(old: torch.Tensor, new_rows: int, how: str, noise: float, gen: torch.Generator) -> torch.Tensor:
    """``old`` (rows = tokens) followed by ``new_rows`` rows: their mean (+ noise × std of the entries) or zeros."""
    t = old.detach().to(torch.float64)
    if how == "zero":
        fill = torch.zeros((new_rows, *t.shape[1:]), dtype=torch.float64)
    else:
        fill = t.mean(0, keepdim=True).expand(new_rows, *t.shape[1:]).clone()
        if noise > 0:
            fill += torch.randn(fill.shape, generator=gen, dtype=torch.float64) * (t.std().item() * noise)
    return torch.cat([t, fill]).to(old.dtype)


def _set(gm: GrowModel, fqn: str, tensor: torch.Tensor, rows: int, report: StepReport) -> None:
    """Write ``tensor`` as every name of parameter ``fqn``, keeping tied names one Parameter."""
    names = _names_of(gm, fqn)
    before = list(gm.module.get_parameter(fqn).shape)
    origin = Origin((AxisMap(0, tuple(range(rows)) + (-1,) * (tensor.shape[0] - rows), (1.0,) * tensor.shape[0]),))
    for name in names:  # each name is recorded, so that a replay gives each the new shape
        gm.edits.param(gm.module, name, tensor, origin)
        report.changes.append({"name": name, "before": before, "after": list(tensor.shape)})
    first = gm.module.get_parameter(names[0])
    for other in names[1:]:
        owner, _, leaf = other.rpartition(".")
        (gm.module.get_submodule(owner) if owner else gm.module)._parameters[leaf] = first
    for name in names:
        module = name.rpartition(".")[0]
        sync_attributes(gm, module)
        m = gm.module.get_submodule(module) if module else gm.module
        if isinstance(m, torch.nn.Embedding) and m.num_embeddings != tensor.shape[0]:
            gm.edits.attr(gm.module, module, "num_embeddings", tensor.shape[0])


def _output_names(gm: GrowModel, sites: VocabSites) -> dict[str, int]:
    """Name (as the verification names outputs) → rank, for each model output holding logits."""
    args, kwargs = _sample(gm)
    with torch.no_grad():
        names = list(flatten_outputs(gm.module(*args, **kwargs)))
    return {names[i]: rank for i, rank in sites.outputs.items() if i < len(names)}


def _new_token_mass(gm: GrowModel, logit_names: list[str], old: int, seed: int) -> tuple[float, float]:
    """Mean and max over positions of the softmax mass on rows ``old:`` (the default verification batches)."""
    training = gm.module.training
    eval_mode(gm.module)
    masses = []
    try:
        for args, kwargs in make_batches(gm.inputs, 3, seed=seed):
            dtype = next((p.dtype for p in gm.module.parameters() if p.is_floating_point()), None)
            args, kwargs = cast_batch((args, kwargs), dtype) if dtype is not None else (args, kwargs)
            with torch.no_grad():
                outs = flatten_outputs(gm.module(*args, **kwargs))
            for name in logit_names:
                p = torch.softmax(outs[name].to(torch.float64), dim=-1)[..., old:].sum(-1)
                mask = kwargs.get("attention_mask")
                if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(p.shape):
                    p = p[mask.bool()]
                masses.append(p.flatten())
    finally:
        gm.module.train(training)
    flat = torch.cat(masses)
    return float(flat.mean()), float(flat.max())


@register("vocab", VocabSpec, exact=True, candidates=vocab_candidates,
          help="Add tokens to the input embedding and the LM head; old tokens' logits stay exact.")
def grow_vocab(gm: GrowModel, spec: VocabSpec, ctx: Context) -> StepReport:
    """Grow the vocabulary by ``spec.tokens``; refuses (NotGrowableError) before changing anything."""
    report = StepReport("vocab", dataclasses.asdict(spec), params_before=gm.num_parameters())
    trace = _trace(gm)
    sites = find_sites(trace)
    _check_uses(trace, sites)
    tied = _tied(gm, sites)
    if tied and spec.output_init != "mean":
        raise NotGrowableError(f"vocab: {sites.embedding} is tied to the LM head (one matrix, both roles), so its new "
                               f"rows cannot be both the input rows' mean and {spec.output_init}; use output_init mean")
    old = sites.rows
    new = spec.new_size(old)
    tokens = spec.token_list(old)
    logits = _output_names(gm, sites) if sites.head is not None else {}
    gen = ctx.generator(1601)
    _set(gm, sites.embedding, _grow_rows(gm.module.get_parameter(sites.embedding), new - old, "mean", spec.noise, gen),
         old, report)
    if sites.head is not None and not tied:
        _set(gm, sites.head, _grow_rows(gm.module.get_parameter(sites.head), new - old, spec.output_init, 0.0, gen),
             old, report)
    if sites.head_bias is not None:
        _set(gm, sites.head_bias, _grow_rows(gm.module.get_parameter(sites.head_bias), new - old, spec.output_init,
                                             0.0, gen), old, report)
    config = getattr(gm.module, "config", None)
    if gm.is_hf and config is not None and getattr(config, "vocab_size", None) == old:
        gm.edits.config(gm.module, "vocab_size", new)
        report.notes.append(f"config vocab_size: {old} → {new}")
    # Old rows are copied bit for bit; only fresh rows (never compared) are rounded to the dtype.
    report.exact_in_dtype = True
    index = tuple(range(old)) + (-1,) * (new - old)
    report.output_maps = {name: AxisMap(rank - 1, index, (1.0,) * new) for name, rank in logits.items()}
    report.changes.append({"name": "vocabulary", "before": old, "after": new, "first_id": old, "tokens": tokens})
    report.matched = [f"{old} → {new} tokens (embedding '{sites.lookup}'" + (f", LM head '{sites.head_module}'"
                      if sites.head else "") + (", tied" if tied else "") + ")"]
    padded = new - old - len(tokens)
    init = "mean" if tied else spec.output_init
    report.notes.insert(0, f"{len(tokens)} tokens (ids {old}–{old + len(tokens) - 1})"
                           + (f" + {padded} padding rows (no token)" if padded else "")
                           + f"; input rows: the mean of the old rows{' + noise' if spec.noise else ''}"
                           + (f"; LM-head rows: {init}" + (" (tied)" if tied else "") if sites.head else
                              "; no LM head (an embedding model): the outputs keep their shape"))
    if logits:
        mean, worst = _new_token_mass(gm, list(logits), old, ctx.seed)
        report.changes[-1].update(new_token_mass_mean=mean, new_token_mass_max=worst)
        bound = f" (bound for mean rows without noise: {(new - old) / new:.4g})" if init == "mean" else ""
        rows = "new tokens" if not padded else "new rows (tokens and padding)"
        report.notes.append(f"old tokens' logits unchanged; the {rows} take {mean:.4g} of the probability mass on "
                            f"average, {worst:.4g} at most, on the verification batches{bound}")
    report.params_after = gm.num_parameters()
    return report
