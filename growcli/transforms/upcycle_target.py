"""Where an upcycled model goes: the mixture-of-experts architecture, its config and its layout.

The output of ``upcycle`` is by definition a named Hugging Face architecture, so the choice of
target is one small table of data (:data:`TARGETS`, dense ``model_type`` → MoE ``model_type``);
everything else is read off the two models. The MoE config is the dense config's values plus
the expert fields the MoE config class declares (:func:`moe_config`); the MoE blocks are the
modules of the MoE model holding 3-D expert weights, and each must sit where the dense model
has its feed-forward network (:func:`plan_upcycle`). The FFN's gate, up and down projections are
told apart by running the dense module, never by their names (:func:`ffn_roles`). Every dense
tensor outside the FFNs must reappear in the MoE model under its name with its shape, and every
MoE tensor must be either such a copy or one of the new expert/router tensors: otherwise the
architectures differ somewhere else and the step is refused, naming the tensor.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from growcli.core.errors import NotGrowableError, UsageError

# Dense model_type → the MoE model_type whose layers are the dense ones with sparse FFNs.
TARGETS = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
ROLES = ("gate", "up", "down")  # FFN(x) = down(act(gate(x)) * up(x))
_NOT_COPIED = {"architectures", "model_type", "transformers_version", "auto_map", "_name_or_path", "dtype",
               "torch_dtype", "intermediate_size"}


@dataclass
class Block:
    """One dense FFN and the MoE block that replaces it (model parameter names)."""

    path: str  # e.g. model.layers.3.mlp (the same in both models)
    layer: int  # index of the block among the MoE blocks
    dense: dict[str, str]  # role → dense parameter name
    experts: dict[str, str]  # "gate_up" / "down" → the 3-D MoE parameter name
    router: str
    shared: dict[str, str] = field(default_factory=dict)  # role → shared expert parameter (if the target has one)
    shared_gate: str | None = None


@dataclass
class UpcyclePlan:
    """What upcycling will build, decided before any change (shared by in-memory and streaming)."""

    source_type: str
    target_type: str
    target_class: str
    config: Any  # the MoE config object
    experts: int
    top_k: int
    hidden: int
    intermediate: int
    blocks: list[Block]
    copied: list[str]  # MoE parameter names copied unchanged from the dense model
    renormalises: str  # how the routing renormalises: "always" or "norm_topk_prob"
    has_shared: bool  # the target's MoE block has a shared expert


def transformers_module():
    import transformers

    return transformers


def target_type(config) -> str:
    """The MoE model_type for a dense config; :class:`NotGrowableError` listing the supported ones."""
    src = getattr(config, "model_type", None)
    if src not in TARGETS:
        pairs = ", ".join(f"{a} → {b}" for a, b in TARGETS.items())
        raise NotGrowableError(f"upcycle: no mixture-of-experts architecture for model_type {src!r}; supported: {pairs}")
    return TARGETS[src]


def target_class(dense: nn.Module, moe_type: str) -> str:
    """The MoE class with the dense class's head: the auto mapping that maps the dense type to it."""
    from transformers.models.auto import modeling_auto

    dense_type, name = dense.config.model_type, type(dense).__name__
    for attr in sorted(vars(modeling_auto)):
        table = getattr(modeling_auto, attr)
        if attr.endswith("_MAPPING_NAMES") and isinstance(table, dict) and table.get(dense_type) == name:
            found = table.get(moe_type)
            if isinstance(found, str):
                return found
    raise NotGrowableError(f"upcycle: transformers has no {moe_type} counterpart of {name}")


def moe_config(dense_config, moe_type: str, spec) -> Any:
    """The MoE config: every dense value, then the expert fields the MoE config class declares."""
    transformers = transformers_module()
    cls = transformers.AutoConfig.for_model(moe_type).__class__
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    values = {k: v for k, v in dense_config.to_dict().items() if k not in _NOT_COPIED}
    ffn = dense_config.intermediate_size
    values.update(num_experts_per_tok=spec.top_k, intermediate_size=ffn)
    values["num_local_experts" if "num_local_experts" in fields else "num_experts"] = spec.experts
    for key, value in {"moe_intermediate_size": ffn, "shared_expert_intermediate_size": ffn, "norm_topk_prob": True,
                       "decoder_sparse_step": 1, "mlp_only_layers": [], "output_router_logits": False}.items():
        if key in fields:
            values[key] = value
    if "qkv_bias" in fields:  # Qwen2 projects q, k and v with biases; its MoE config makes that a field
        values["qkv_bias"] = True
    config = cls(**values)
    config.use_cache = getattr(dense_config, "use_cache", None)
    config._attn_implementation = getattr(dense_config, "_attn_implementation", None)
    return config


def meta_build(cls_name: str, config) -> nn.Module:
    cls = getattr(transformers_module(), cls_name)
    with torch.device("meta"):
        return cls(config).eval()


def ffn_roles(ffn: nn.Module, act_name: str) -> dict[str, str]:
    """role → parameter name of a dense gated FFN, found by running it (random float64 weights).

    Refuses an FFN that is not ``down(act(gate(x)) * up(x))`` with three bias-free matrices.
    """
    from transformers.activations import ACT2FN

    params = dict(ffn.named_parameters())
    if len(params) != 3 or any(p.dim() != 2 for p in params.values()):
        raise NotGrowableError(f"upcycle: the feed-forward network has parameters {sorted(params)}; growcli upcycles "
                               "gated FFNs of three bias-free matrices (experts have no biases)")
    probe = copy.deepcopy(ffn).to_empty(device="cpu").to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    for p in probe.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    weights = dict(probe.named_parameters())
    x = torch.randn(3, _hidden_of(weights), generator=gen, dtype=torch.float64)
    act = ACT2FN[act_name]
    with torch.no_grad():
        out = probe(x)
        for down in weights:
            rest = [n for n in weights if n != down]
            for gate, up in (rest, rest[::-1]):
                if weights[down].shape[1] != weights[gate].shape[0] or weights[gate].shape[1] != x.shape[1]:
                    continue
                mine = (act(x @ weights[gate].T) * (x @ weights[up].T)) @ weights[down].T
                if mine.shape == out.shape and torch.allclose(mine, out, rtol=1e-12, atol=1e-12):
                    return {"gate": gate, "up": up, "down": down}
    raise NotGrowableError(f"upcycle: {type(ffn).__name__} does not compute down(act(gate(x)) * up(x)) with the "
                           f"config's activation {act_name}; its experts could not copy it")


def _hidden_of(weights: dict[str, torch.Tensor]) -> int:
    """The input width of a gated FFN: the width two of its three matrices read."""
    ins = [p.shape[1] for p in weights.values()]
    return max(set(ins), key=ins.count)


def plan_upcycle(dense: nn.Module, spec) -> UpcyclePlan:
    """Decide the target, its config and where every tensor comes from; changes nothing.

    ``dense`` may live on the meta device. Raises :class:`NotGrowableError` or :class:`UsageError`.
    """
    config = getattr(dense, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise NotGrowableError("upcycle: needs a Hugging Face model (it writes a mixture-of-experts architecture)")
    moe_type = target_type(config)
    cls_name = target_class(dense, moe_type)
    mconfig = moe_config(config, moe_type, spec)
    fields = {f.name for f in dataclasses.fields(type(mconfig))}
    has_shared = "shared_expert_intermediate_size" in fields
    if spec.shared and not has_shared:
        with_shared = sorted(b for b in TARGETS.values() if "shared_expert_intermediate_size" in
                             {f.name for f in dataclasses.fields(type(transformers_module().AutoConfig.for_model(b)))})
        raise NotGrowableError(f"upcycle --shared: {moe_type} has no shared expert; --shared needs a target with one "
                               f"({', '.join(with_shared)})")
    moe = meta_build(cls_name, mconfig)
    dense_params = {k: tuple(v.shape) for k, v in dense.state_dict().items()}
    moe_params = {k: tuple(v.shape) for k, v in moe.state_dict().items()}
    experts = sorted({n.rpartition(".")[0] for n, p in moe.named_parameters() if p.dim() == 3})
    if not experts:
        raise NotGrowableError(f"upcycle: {cls_name} in transformers {transformers_module().__version__} keeps no "
                               "3-D expert weights; growcli writes the fused expert layout")
    blocks: list[Block] = []
    roles = None
    for layer, path in enumerate(e.rpartition(".")[0] for e in experts):
        try:
            ffn = dense.get_submodule(path)
        except AttributeError:
            raise NotGrowableError(f"upcycle: {cls_name} has a mixture of experts at {path}, which "
                                   f"{type(dense).__name__} does not have") from None
        roles = roles or ffn_roles(ffn, config.hidden_act)
        blocks.append(_block(moe, path, layer, roles, spec.experts, config.hidden_size, has_shared))
    blocks.sort(key=lambda b: _natural(b.path))
    for k, b in enumerate(blocks):
        b.layer = k
    made = {n for b in blocks for n in (*b.experts.values(), b.router, *b.shared.values(), b.shared_gate) if n}
    ffn_params = {n for b in blocks for n in b.dense.values()}
    copied = [n for n in moe_params if n not in made]
    for name in copied:
        if dense_params.get(name) != moe_params[name]:
            what = "has no tensor" if name not in dense_params else f"has {list(dense_params[name])}"
            raise NotGrowableError(f"upcycle: {cls_name} needs {name} {list(moe_params[name])}; {type(dense).__name__} "
                                   f"{what} there")
    left = sorted(set(dense_params) - set(copied) - ffn_params)
    if left:
        raise NotGrowableError(f"upcycle: {cls_name} has no place for {left[0]} of {type(dense).__name__} "
                               f"(the architectures differ outside the feed-forward networks)")
    return UpcyclePlan(config.model_type, moe_type, cls_name, mconfig, spec.experts, spec.top_k, config.hidden_size,
                       config.intermediate_size, blocks, copied,
                       "norm_topk_prob" if "norm_topk_prob" in fields else "always", has_shared)


def _block(moe: nn.Module, path: str, layer: int, roles: dict[str, str], experts: int, hidden: int,
           has_shared: bool) -> Block:
    block = moe.get_submodule(path)
    ffn_prefix = f"{path}."
    params = dict(block.named_parameters())
    three = {n: p for n, p in params.items() if p.dim() == 3}
    gate_up = next((n for n in three if n.endswith("gate_up_proj")), None)
    down = next((n for n in three if n.endswith("down_proj")), None)
    if gate_up is None or down is None or len(three) != 2:
        raise NotGrowableError(f"upcycle: the experts of {path} are {sorted(three)}; growcli writes the fused "
                               "gate_up_proj / down_proj layout")
    router = [n for n, p in params.items() if p.dim() == 2 and tuple(p.shape) == (experts, hidden)]
    if len(router) != 1:
        raise NotGrowableError(f"upcycle: cannot tell the router of {path} (weights of shape {[experts, hidden]}: {router})")
    shared: dict[str, str] = {}
    shared_gate = None
    if has_shared:
        for child, _ in block.named_children():  # the child holding the dense FFN's own parameter names
            names = {role: f"{child}.{roles[role]}" for role in ROLES}
            if all(n in params and params[n].dim() == 2 for n in names.values()):
                shared = {role: ffn_prefix + n for role, n in names.items()}
        gates = [n for n, p in params.items() if p.dim() == 2 and tuple(p.shape) == (1, hidden)]
        if not shared or len(gates) != 1:
            raise NotGrowableError(f"upcycle: cannot find the shared expert and its gate in {path}")
        shared_gate = ffn_prefix + gates[0]
    dense_names = {role: f"{path}.{name}" for role, name in roles.items()}
    return Block(path, layer, dense_names, {"gate_up": ffn_prefix + gate_up, "down": ffn_prefix + down},
                 ffn_prefix + router[0], shared, shared_gate)


def _natural(name: str) -> list:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def check_counts(experts: int | None, top_k: int | None) -> None:
    if experts is None or top_k is None:
        raise UsageError("upcycle needs --experts E and --top-k K")
    if experts < 2:
        raise UsageError(f"--experts {experts}: expected at least 2 experts")
    if not 1 <= top_k <= experts:
        raise UsageError(f"--top-k {top_k}: expected 1 ≤ K ≤ {experts} (the number of experts)")
