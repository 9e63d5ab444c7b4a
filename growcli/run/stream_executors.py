"""Every streaming executor, by transform name: how a step rewrites a checkpoint tensor by tensor.

A transform whose ``modes`` include ``"streaming"`` has exactly one entry here; the runner
(:func:`growcli.run.runner.grow`) looks executors up in :data:`EXECUTORS` and nowhere else. A run
of several steps streams through :func:`growcli.run.stream_chain.stream_chain`, which plans each
step with the same analysis and composes their tensor maps.
"""

from __future__ import annotations

from growcli.run.deepen_stream import stream_deepen, streamable
from growcli.run.streaming import stream_stack
from growcli.run.upcycle_stream import stream_upcycle
from growcli.run.width_stream import stream_heads, stream_hidden, stream_widen

EXECUTORS = {
    "stack": stream_stack,
    "upcycle": stream_upcycle,
    "hidden": stream_hidden,
    "heads": stream_heads,
    "widen": stream_widen,
    "deepen": stream_deepen,
}
# Transforms only some of whose steps stream (options → whether this one does); unlisted: every step.
APPLIES = {"deepen": streamable}
# Why a step APPLIES turns down does not stream, for the refusal when streaming is forced on it.
DOES_NOT_STREAM = {"deepen": "deepen streams only block copies: block: true"}
