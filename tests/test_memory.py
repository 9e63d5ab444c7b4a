"""growcli.core.memory: freed memory reused inside ``reuse_freed`` and returned on leaving it (glibc only).

Each case runs in a child process: the allocator settings are process-wide, and the test
process keeps its own. Resident memory is read from /proc/self/statm.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator settings")

SCRIPT = r"""
import os, sys, torch
from growcli.core import memory
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') >> 20
def churn():
    t = torch.ones(48 << 20, dtype=torch.uint8)  # 48 MB: above the 32 MB map threshold
    del t
if sys.argv[1] == 'fixed':
    memory.fix_map_threshold(32 << 20)
base = rss()
churn()
after_plain = rss()
with memory.reuse_freed():
    churn()
    inside = rss()
after = rss()
print(base, after_plain, inside, after)
"""


def _run(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], check=True, capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def test_reuse_freed_keeps_freed_memory_inside_and_returns_it_on_leaving():
    base, after_plain, inside, after = _run("fixed")
    assert after_plain - base < 8  # mapped on its own: given back when freed
    assert inside - base >= 40  # kept by the allocator for the next tensor
    assert after - base < 8  # trimmed on leaving


def test_reuse_freed_changes_nothing_where_growcli_does_not_own_the_allocator():
    base, after_plain, inside, after = _run("default")
    assert inside - base < 8 and after - base < 8
