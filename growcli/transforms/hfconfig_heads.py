"""Every config key the attentions read their number of heads from.

A transform growing the heads writes ``num_attention_heads`` (and ``num_key_value_heads``). Some configs
send that name to one key of several: BART's, MVP's and Whisper's ``attribute_map`` sends it to
``encoder_attention_heads``, while the decoder's self- and cross-attention read ``decoder_attention_heads``.
A model built from the config would then give the decoder the old number of heads, each wider, which is
not the grown model. Which keys count heads is decided by building, never by a key's name: a key that
holds an old count is one when setting it to the new count (on top of the transform's own updates)
makes a model built on the meta device (:func:`growcli.transforms.hfconfig.with_config`) disagree with the
grown attentions in fewer size attributes (the decoder's ``head_dim`` back to its old value), the test
:func:`growcli.transforms.hfconfig.fit_sizes` applies to weight shapes.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from growcli.core.model import GrowModel
from growcli.transforms.hfconfig import config_items, with_config


def head_count_keys(gm: GrowModel, modules: Iterable[str], updates: dict[str, int], counts: dict[int, int],
                    sizes: dict[int, set[int]]) -> dict[str, int]:
    """The config keys, besides those in ``updates``, that hold an old head count of ``counts`` (old → new) and
    that the attention modules ``modules`` read it from, with their new values.

    An integer attribute of one of ``modules`` agrees with the grown model when a model built from the config
    has its value in ``gm.module`` or one of the new values ``sizes`` allows for it. A key qualifies when a
    model built from ``config + updates + {key: new}`` has fewer attributes that disagree than one built from
    ``config + updates``, and the same tensor names (a key that also counts layers describes another model).
    Returns ``{}`` when the model is not a Hugging Face one or the config with ``updates`` does not build.
    """
    config = getattr(gm.module, "config", None)
    counts = {old: new for old, new in counts.items() if old != new}
    if not gm.is_hf or config is None or not counts:
        return {}
    have = _attributes(gm.module, set(modules))
    try:
        base = with_config(gm, updates)
    except Exception:  # noqa: BLE001 — the updates do not build: the transform's own checks say why
        return {}
    names = set(base.state_dict())
    bad = _disagreements(base, have, sizes)
    found: dict[str, int] = {}
    for key, value in config_items(config):
        if isinstance(value, bool) or not isinstance(value, int) or value not in counts or not bad:
            continue
        try:
            built = with_config(gm, {**updates, **found, key: counts[value]})
        except Exception:  # noqa: BLE001 — typed fields and constructors reject values that do not fit
            continue
        after = _disagreements(built, have, sizes)
        if after < bad and set(built.state_dict()) == names:
            found[key], bad = counts[value], after
    return found


def _attributes(model: nn.Module, modules: set[str]) -> dict[tuple[str, str], int]:
    """Every integer attribute of the modules named in ``modules``: ``(module, attribute) → value``."""
    out = {}
    for name, m in model.named_modules():
        if name in modules:
            out.update({(name, attr): v for attr, v in vars(m).items()
                        if isinstance(v, int) and not isinstance(v, bool) and not attr.startswith("_")})
    return out


def _disagreements(built: nn.Module, have: dict[tuple[str, str], int], sizes: dict[int, set[int]]) -> int:
    """How many of the attributes ``have`` a model ``built`` from a config gives a value that is neither the
    same nor a new value ``sizes`` allows."""
    got = _attributes(built, {name for name, _ in have})
    return sum(1 for at, v in have.items() if at in got and got[at] != v and got[at] not in sizes.get(v, ()))
