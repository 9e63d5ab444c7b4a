"""The names and slices a mixture-of-experts checkpoint has on disk, read off transformers' own save conversion.

transformers 5 keeps experts fused in 3-D parameters in memory (``experts.gate_up_proj``
``[E, 2I, H]``) and converts them when saving (Mixtral: one ``block_sparse_moe.experts.{e}.w1``
per expert and projection). :func:`saved_layout` learns that conversion from a two-layer,
three-expert model of the target class in which every weight is a distinct number: the
reverse conversion is run and each saved tensor is found again as a parameter or as an
expert's block of rows. :func:`real_layout` applies what it learnt to the real model's
parameters; the layer and expert indices in saved names are located by comparing layer 0 with
layer 1 and one expert with another. A saved tensor that is not such a slice is refused. Used
by the streaming executor (:mod:`growcli.run.upcycle_stream`) to write what ``save_pretrained``
would.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from dataclasses import dataclass

import torch

from growcli.core.errors import NotGrowableError
from growcli.transforms.upcycle_target import UpcyclePlan, transformers_module


@dataclass(frozen=True)
class Saved:
    """One tensor as the MoE checkpoint stores it: parameter ``param`` (of expert ``expert``), rows ``rows``."""

    name: str
    param: str
    expert: int | None
    rows: tuple[int, int] | None  # row range of the expert's matrix (3-D parameters; in saved_layout: part k of n)


def _probe_config(plan: UpcyclePlan):
    """A two-layer, three-expert config of the target class with tiny widths (for :func:`saved_layout`)."""
    cls = type(plan.config)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in plan.config.to_dict().items() if k in fields or k == "head_dim"}
    values.update(vocab_size=8, hidden_size=8, intermediate_size=4, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=4, num_experts_per_tok=1, layer_types=None)
    values["num_local_experts" if "num_local_experts" in fields else "num_experts"] = 3
    for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if key in fields:
            values[key] = 4
    if "max_window_layers" in fields:
        values["max_window_layers"] = 2
    return cls(**{k: v for k, v in values.items() if k not in ("architectures", "model_type", "transformers_version")})


def saved_layout(plan: UpcyclePlan) -> dict[str, list[Saved]]:
    """Tiny-model parameter name → the tensors transformers saves for it (layer 1 and the global ones).

    Every weight of a two-layer probe gets distinct values; transformers' reverse conversion is
    run on them and each saved tensor is found again as a parameter (or an expert's rows of
    one). A saved tensor that is not such a slice is refused: it could not be streamed.
    """
    from transformers.core_model_loading import revert_weight_conversion

    cls = getattr(transformers_module(), plan.target_class)
    probe = cls(_probe_config(plan)).to(torch.float64)
    state = {k: v.detach().clone() for k, v in probe.state_dict().items()}
    starts, names, offset = [], [], 0
    for name, tensor in state.items():
        tensor.copy_(torch.arange(offset, offset + tensor.numel(), dtype=torch.float64).reshape(tensor.shape))
        starts.append(offset)
        names.append(name)
        offset += tensor.numel()
    saved = revert_weight_conversion(probe, dict(state))
    for tied in (getattr(probe, "_tied_weights_keys", None) or {}) if plan.config.tie_word_embeddings else ():
        saved.pop(tied, None)
    layout: dict[str, list[Saved]] = {}
    for key, tensor in saved.items():
        first = int(tensor.reshape(-1)[0]) if tensor.numel() else -1
        k = bisect.bisect_right(starts, first) - 1
        param, source = names[k], state[names[k]]
        flat = first - starts[k]
        if source.dim() == 3:
            expert, row = divmod(flat // source.shape[2], source.shape[1])
            piece = source[expert, row:row + tensor.shape[0]]
        else:
            expert, row, piece = None, 0, source
        if tuple(piece.shape) != tuple(tensor.shape) or not torch.equal(piece, tensor):
            raise NotGrowableError(f"upcycle --streaming: transformers saves {plan.target_class}'s {key} as a "
                                   "transformed tensor growcli cannot write piece by piece; use --no-streaming")
        rows = None
        if source.dim() == 3:  # as part k of n equal row blocks, which holds at any width
            if row % tensor.shape[0] or source.shape[1] % tensor.shape[0]:
                raise NotGrowableError(f"upcycle --streaming: transformers saves {key} as an uneven slice of {param}; "
                                       "use --no-streaming")
            rows = (row // tensor.shape[0], source.shape[1] // tensor.shape[0])
        layout.setdefault(param, []).append(Saved(key, param, expert, rows))
    return layout


def _layer_pattern(plan: UpcyclePlan) -> re.Pattern:
    """The layer index in parameter names, from the first MoE block's path (``model.layers.0.mlp``)."""
    m = re.match(r"(.*?\.)(\d+)(\..*)", plan.blocks[0].path)
    if m is None:
        raise NotGrowableError(f"upcycle --streaming: the MoE block {plan.blocks[0].path} is not in a numbered list")
    return re.compile(rf"^({re.escape(m.group(1))})(\d+)(\..*)$")


def real_layout(plan: UpcyclePlan, shapes: dict[str, tuple[int, ...]]) -> list[Saved]:
    """The saved tensors of the real model's parameters (name → shape), from the probe's saved names.

    Where a saved name holds the layer index and the expert index is read off the probe by
    comparing layer 0 with layer 1 and one expert with another (the tokens that differ).
    """
    probe = saved_layout(plan)
    layer = _layer_pattern(plan)
    out: list[Saved] = []
    for name, shape in shapes.items():
        m = layer.match(name)
        tiny = f"{m.group(1)}1{m.group(3)}" if m else name
        if tiny not in probe:
            raise NotGrowableError(f"upcycle --streaming: transformers saves no tensor for {name}; use --no-streaming")
        twin = {(t.expert, t.rows): t.name.split(".") for t in probe.get(f"{m.group(1)}0{m.group(3)}", [])} if m else {}
        for s in probe[tiny]:
            tokens = s.name.split(".")
            layer_slot = _slot(tokens, twin.get((s.expert, s.rows)), name) if m else None
            if layer_slot is not None:
                tokens[layer_slot] = m.group(2)
            if s.expert is None:
                out.append(Saved(".".join(tokens), name, None, s.rows))
                continue
            if s.expert != 0:
                continue  # expert 0's names are the template for all of them
            other = next(t.name.split(".") for t in probe[tiny] if t.expert != s.expert and t.rows == s.rows)
            expert_slot = _slot(s.name.split("."), other, name)
            part, parts = s.rows
            rows = (part * shape[1] // parts, (part + 1) * shape[1] // parts)
            for e in range(plan.experts):
                tokens[expert_slot] = str(e)
                out.append(Saved(".".join(tokens), name, e, rows))
    return out


def _slot(a: list[str], b: list[str] | None, name: str) -> int:
    """The one token position where two saved names differ (a layer or an expert index)."""
    diff = [i for i, (x, y) in enumerate(zip(a, b or [])) if x != y]
    if b is None or len(a) != len(b) or len(diff) != 1 or not a[diff[0]].isdigit():
        raise NotGrowableError(f"upcycle --streaming: cannot tell how transformers numbers the saved tensors of "
                               f"{name}; use --no-streaming")
    return diff[0]
