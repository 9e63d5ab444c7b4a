"""Sparse upcycling: every dense FFN of a Hugging Face decoder becomes a mixture of experts (docs/recipes.md#upcycle).

Each routed expert starts as a copy of the dense FFN and a router is added (Komatsuzaki et al.
2022). With top-k weights renormalised to sum to one, ``Σ_k g_k · FFN(x) = FFN(x)`` whatever
the router; transformers computes that renormalisation in float32, so the sum is exactly one
only when every selected weight is the same power of two: top-k 1 (``p/p = 1``) or a zero
router (all experts tie at ``1/E``) with a top-k that is a power of two. With ``shared`` the
target's shared expert holds the dense FFN and the routed experts' down projections are zero,
exact whatever the router: Qwen2-MoE gates its shared expert with ``sigmoid(w·x)``, so the gate
is zero (``sigmoid(0) = 1/2`` exactly) and the shared down projection is twice the dense one.
Noise on the copies and Drop-Upcycling's partial re-initialisation break the experts'
symmetry; without a shared expert they change the function and are reported as approximate.

The target architecture, its config and where each tensor goes are decided in
:mod:`growcli.transforms.upcycle_target`; every new tensor is made by :func:`expert_part`,
:func:`router_weight` and :func:`shared_part`, which the streaming executor
(:mod:`growcli.run.upcycle_stream`) calls too, so both paths write the same tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from growcli.core.errors import NotGrowableError, UsageError
from growcli.core.model import GrowModel
from growcli.transforms.registry import Context, StepReport, option, register
from growcli.transforms.upcycle_target import ROLES, Block, UpcyclePlan, check_counts, meta_build, plan_upcycle

Router = Literal["auto", "zero", "normal"]
_SALT = {"gate": 0, "up": 1, "down": 2, "router": 3, "drop": 4}


@dataclass(frozen=True)
class UpcycleSpec:
    """Options of ``upcycle``: ``experts`` and ``top_k`` are required."""

    experts: int | None = option(None, "Number of experts E in every MoE layer (each starts as a copy of the dense FFN).")
    top_k: int | None = option(None, "Experts each token is routed to (1 ≤ K ≤ E).")
    shared: bool = option(False, "Keep the dense FFN as the target's shared expert (Qwen2-MoE) and start the routed "
                                 "experts at zero output: exact whatever the router.")
    router: Router = option("auto", "Router init: zero (all experts tie), normal (N(0, initializer_range²)), or auto "
                                    "(normal where that is exact: --shared or top-k 1; zero otherwise).")
    noise: float = option(0.0, "Gaussian noise on every expert copy, times each weight matrix's standard deviation "
                               "(breaks the experts' symmetry; approximate unless --shared).")
    drop: float = option(0.0, "Drop-Upcycling: fraction of each expert's FFN units re-initialised from the dense "
                              "weights' mean and std (approximate unless --shared).")

    def __post_init__(self):
        check_counts(self.experts, self.top_k)
        if self.router not in ("auto", "zero", "normal"):
            raise UsageError(f"--router {self.router!r}: expected auto, zero or normal")
        if not self.noise >= 0:
            raise UsageError(f"--noise {self.noise}: expected a scale ≥ 0")
        if not 0 <= self.drop <= 1:
            raise UsageError(f"--drop {self.drop}: expected a fraction between 0 and 1")


def router_kind(spec: UpcycleSpec) -> str:
    """``zero`` or ``normal``: what ``auto`` means for these options."""
    if spec.router != "auto":
        return spec.router
    return "normal" if spec.shared or spec.top_k == 1 else "zero"


def _power_of_two(k: int) -> bool:
    return k > 0 and k & (k - 1) == 0


def is_exact(spec: UpcycleSpec) -> bool:
    """Whether the upcycled model computes the dense one's function (see the module docstring)."""
    if spec.shared:
        return True
    if spec.noise or spec.drop:
        return False
    return spec.top_k == 1 or (router_kind(spec) == "zero" and _power_of_two(spec.top_k))


def _generator(seed: int, layer: int, expert: int, what: str) -> torch.Generator:
    return Context(seed=seed).generator(1 + (layer * 65536 + expert) * 8 + _SALT[what])


def _dropped(plan: UpcyclePlan, spec: UpcycleSpec, seed: int, layer: int, expert: int) -> torch.Tensor:
    """The FFN units Drop-Upcycling re-initialises in one expert (the same set for gate, up and down)."""
    count = round(spec.drop * plan.intermediate)
    return torch.randperm(plan.intermediate, generator=_generator(seed, layer, expert, "drop"))[:count]


def expert_part(plan: UpcyclePlan, spec: UpcycleSpec, seed: int, block: Block, expert: int, role: str,
                base: torch.Tensor) -> torch.Tensor:
    """Expert ``expert``'s matrix for ``role`` (gate/up ``[I, H]``, down ``[H, I]``), made from the dense ``base``.

    Returns ``base`` itself when the expert is a plain copy (the streaming path then copies bytes).
    """
    if spec.shared and role == "down":
        return torch.zeros_like(base)
    touched = spec.noise > 0 or (spec.drop > 0 and round(spec.drop * plan.intermediate) > 0)
    if not touched:
        return base
    w = base.detach().to(torch.float64, copy=True)  # never changes the dense tensor in place
    std = float(w.std()) if w.numel() > 1 else 0.0
    if spec.noise > 0:
        w = w + spec.noise * std * torch.randn(w.shape, generator=_generator(seed, block.layer, expert, role),
                                               dtype=torch.float64)
    if spec.drop > 0:
        units = _dropped(plan, spec, seed, block.layer, expert)
        if len(units):
            gen = _generator(seed, block.layer, expert, role)
            gen.manual_seed(gen.initial_seed() + 7919)  # independent of the noise draws
            shape = (len(units), w.shape[1]) if role != "down" else (w.shape[0], len(units))
            fresh = float(base.double().mean()) + std * torch.randn(shape, generator=gen, dtype=torch.float64)
            if role == "down":
                w[:, units] = fresh
            else:
                w[units, :] = fresh
    return w.to(base.dtype)


def router_weight(plan: UpcyclePlan, spec: UpcycleSpec, seed: int, block: Block, dtype: torch.dtype) -> torch.Tensor:
    """The router of ``block``: ``[E, H]``, zero or N(0, initializer_range²) from the seed."""
    if router_kind(spec) == "zero":
        return torch.zeros(plan.experts, plan.hidden, dtype=dtype)
    std = float(getattr(plan.config, "initializer_range", 0.02))
    gen = _generator(seed, block.layer, 0, "router")
    return (std * torch.randn(plan.experts, plan.hidden, generator=gen, dtype=torch.float64)).to(dtype)


def shared_part(spec: UpcycleSpec, role: str, base: torch.Tensor) -> torch.Tensor:
    """The shared expert's matrix for ``role``: the dense FFN (down doubled: its gate halves it), or zero output."""
    if role != "down":
        return base
    return base * 2 if spec.shared else torch.zeros_like(base)


def shared_gate(plan: UpcyclePlan, dtype: torch.dtype) -> torch.Tensor:
    """The shared expert's gate ``[1, H]``: zero, so that ``sigmoid`` gives exactly 1/2."""
    return torch.zeros(1, plan.hidden, dtype=dtype)


def moe_state(plan: UpcyclePlan, spec: UpcycleSpec, seed: int,
              read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of the MoE model (parameter names), reading dense tensors by name through ``read``."""
    state = {name: read(name) for name in plan.copied}
    for block in plan.blocks:
        base = {role: read(block.dense[role]) for role in ROLES}
        parts = {role: [expert_part(plan, spec, seed, block, e, role, base[role]) for e in range(plan.experts)]
                 for role in ROLES}
        state[block.experts["gate_up"]] = torch.stack([torch.cat([g, u]) for g, u in zip(parts["gate"], parts["up"])])
        state[block.experts["down"]] = torch.stack(parts["down"])
        state[block.router] = router_weight(plan, spec, seed, block, base["gate"].dtype)
        for role, name in block.shared.items():
            state[name] = shared_part(spec, role, base[role]).clone()
        if block.shared_gate:
            state[block.shared_gate] = shared_gate(plan, base["gate"].dtype)
    return state


def build_moe(plan: UpcyclePlan, state: dict[str, torch.Tensor], dense: torch.nn.Module) -> torch.nn.Module:
    """The MoE model holding ``state``; buffers outside the state_dict (rotary frequencies) come from ``dense``."""
    moe = meta_build(plan.target_class, plan.config)
    moe.load_state_dict(state, strict=True, assign=True)
    buffers = dict(dense.named_buffers())
    for name, buf in list(moe.named_buffers()):
        if buf.is_meta:
            if name not in buffers or buffers[name].shape != buf.shape:
                raise NotGrowableError(f"upcycle: {plan.target_class} has a buffer {name} the dense model does not")
            owner, _, leaf = name.rpartition(".")
            (moe.get_submodule(owner) if owner else moe)._buffers[leaf] = buffers[name]
    if getattr(plan.config, "tie_word_embeddings", False):
        moe.tie_weights()
    # The default grouped_mm kernel has no float64; batched_mm runs in every dtype and torch.export traces it.
    moe.set_experts_implementation("batched_mm")
    return moe.eval()


def exactness_notes(plan: UpcyclePlan, spec: UpcycleSpec) -> list[str]:
    """Why the step is exact, or where exactness ends (the report's notes)."""
    kind = router_kind(spec)
    notes = [f"{plan.source_type} → {plan.target_type} ({plan.target_class}): {len(plan.blocks)} FFNs, {plan.experts} "
             f"experts each, top-{plan.top_k}, router {kind}"]
    renorm = ("renormalises the selected weights always" if plan.renormalises == "always" else
              "renormalises the selected weights (norm_topk_prob set to true)")
    if spec.shared:
        notes.append("exact: the shared expert holds the dense FFN (down projection ×2, gate 0: sigmoid(0)·2 = 1) and "
                     "the routed experts' down projections are zero, so the routing adds exactly 0")
        if spec.noise or spec.drop:
            notes.append("noise/drop touched only the routed experts' gate and up projections (their output stays 0)")
        return notes
    if plan.has_shared:
        notes.append("the shared expert starts at zero output (down projection and gate zero)")
    if spec.noise or spec.drop:
        notes.append(f"approximate: noise {spec.noise} and drop {spec.drop} change the experts, so Σ g_k·FFN_k(x) ≠ "
                     "FFN(x)")
    elif is_exact(spec):
        why = "top-1: g = p/p = 1" if spec.top_k == 1 else (f"zero router: every selected weight is 1/{spec.top_k}, a "
                                                              "power of two, so they sum to 1 exactly")
        notes.append(f"exact: every expert copies the dense FFN and the routing {renorm}; {why}")
    else:
        notes.append(f"approximate: the routing {renorm}, but in float32, so Σ g_k = 1 only to about 1e-7 with a "
                     f"{kind} router and top-{spec.top_k}; use --router zero with a top-k that is a power of two, "
                     "top-k 1, or --shared for an exact step")
    return notes


def step_report(plan: UpcyclePlan, spec: UpcycleSpec, dense_class: str, params_before: int,
                params_after: int) -> StepReport:
    """The step's report (without verification), shared by the in-memory and streaming paths."""
    report = StepReport("upcycle", dataclasses.asdict(spec), matched=[b.path for b in plan.blocks],
                        params_before=params_before, params_after=params_after, exact=is_exact(spec),
                        # exact cases are copies with selected weights 1/2^m (or p/p, or sigmoid(0)·2): no rounding
                        exact_in_dtype=is_exact(spec))
    report.changes = [{"name": "architecture", "before": dense_class, "after": plan.target_class},
                      {"name": "config.model_type", "before": plan.source_type, "after": plan.target_type}]
    report.notes = exactness_notes(plan, spec)
    return report


def _candidates(gm: GrowModel) -> dict[str, str | None]:
    try:
        plan = plan_upcycle(gm.module, UpcycleSpec(experts=2, top_k=1))
    except (NotGrowableError, UsageError, AttributeError, TypeError, ValueError) as exc:
        return {"(model)": str(exc)}
    return {b.path: None for b in plan.blocks}


@register("upcycle", UpcycleSpec, exact=is_exact, candidates=_candidates, modes=("memory", "streaming"),
          help="Turn every dense FFN of a Hugging Face decoder into a mixture of experts (sparse upcycling)")
def upcycle(gm: GrowModel, spec: UpcycleSpec, ctx: Context) -> StepReport:
    """Replace ``gm.module`` by the MoE model per ``spec`` (same dtype); the dense model is what it is verified against.

    Raises :class:`NotGrowableError` when the model has no MoE counterpart or differs from it
    outside the FFNs.
    """
    if not gm.is_hf:
        raise NotGrowableError("upcycle: needs a Hugging Face model directory (it writes a mixture-of-experts "
                               "architecture)")
    dense = gm.module
    params_before = gm.num_parameters()
    plan = plan_upcycle(dense, spec)
    tensors = dense.state_dict()
    moe = build_moe(plan, moe_state(plan, spec, ctx.seed, tensors.__getitem__), dense)
    dense_class = type(dense).__name__
    gm.module = moe
    gm.hf_class = plan.target_class
    return step_report(plan, spec, dense_class, params_before, gm.num_parameters())
