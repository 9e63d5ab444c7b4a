"""Transformer width: more attention heads and a larger hidden size, keeping the function exact.

Recipes: GROWTH.md section 6 (bert2BERT, LEMON, HyperCloning). The FFN intermediate size is
plain Net2WiderNet (``widen`` on the up projection; gated MLPs couple the gate projection).

- ``heads``: whole heads are added, keeping ``head_dim``. A new head copies the q, k and v rows
  of a source head; the output projection's columns of a source and its copies split the
  source's columns (shares summing to 1). With grouped-query attention key/value heads grow
  by the same factor, each new one bringing copies of its source's query heads, so every
  query head keeps its key/value head; multi-query attention keeps its single one.
- ``hidden``: the hidden size grows from ``d`` to ``d' = k·d + r``; every hidden vector
  becomes ``[x, …, x, p]`` (see :mod:`growcli.stream` for the analysis and the padding rules).
  Where the model's config ties the attention width to the hidden size (BERT, GPT-2, ViT:
  ``heads × head_dim = hidden_size``), heads grow with it.

Where a Hugging Face config describes the model, it is updated (``hidden_size``,
``num_attention_heads``, ``num_key_value_heads``, norm ``eps``, and sizes the model derives,
like GPT-2's ``n_inner``), and the size attributes of every module are set to what a model
built from the new config has, so the in-memory model, the saved directory and
``from_pretrained`` agree.

The transforms live in :mod:`growcli.transforms.heads` and :mod:`growcli.transforms.hidden`,
the planned edit they share and its application in :mod:`growcli.transforms.width_edit`.
Importing this module registers both transforms (``heads`` first); the names stay importable
from here.
"""

from __future__ import annotations

# Re-exported; importing heads before hidden keeps the registry's order.
from growcli.transforms.heads import (HeadsSpec, _head_maps, _plan_heads, _probe_heads,  # noqa: F401
                                      _size_map, _uniform, grow_heads, heads_candidates)
from growcli.transforms.hidden import (PAD_OF_KIND, HiddenSpec, _extra_groups, _heads_for_hidden,  # noqa: F401
                                       _hidden_constants, _plan_stream, _stream_size, grow_hidden, hidden_candidates)
from growcli.transforms.width_edit import (DimMap, _apply, _check_shared, _Edit, _is_view_of_param,  # noqa: F401
                                           _module_name, _paired_noise, _rewrite, _sync_norm, _trace)
