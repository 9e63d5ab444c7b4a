"""``--layer`` selection: a selector equal to a candidate's full name selects exactly that module.

On a ResNet-like name list (stem ``conv1`` plus blocks with their own ``conv1``), ``conv1`` is the stem only;
a dotted suffix that is no full name (``0.conv1``) still matches by suffix; a glob is unchanged.
"""

from __future__ import annotations

import pytest

from growcli.core.errors import NoMatchingModuleError
from growcli.core.select import select

NAMES = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer2.0.conv1", "fc"]


def test_full_name_wins_over_suffix():
    assert select("conv1", NAMES) == ["conv1"]


def test_full_name_in_a_list_wins_and_other_entries_still_match_by_suffix():
    assert select(["conv1", "conv2"], NAMES) == ["conv1", "layer1.0.conv2"]


def test_suffix_applies_when_no_full_name_matches():
    assert select("layer1.0.conv1", NAMES) == ["layer1.0.conv1"]
    assert select("0.conv1", NAMES) == ["layer1.0.conv1", "layer2.0.conv1"]


def test_glob_selects_every_block_conv1():
    assert select("*.conv1", NAMES) == ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1"]


def test_nothing_matches_names_near_misses():
    with pytest.raises(NoMatchingModuleError, match=r"layer 'conv9' matches nothing; did you mean conv1"):
        select("conv9", NAMES)
