"""The written checkpoint of a streamed width step (:mod:`growcli.run.width_stream`): the names it saves,
and the checks run on it once written (its config rebuilds its tensors; outputs small enough are run
against the input).
"""

from __future__ import annotations

from pathlib import Path

from growcli.core.errors import NotGrowableError
from growcli.core.model import GrowModel
from growcli.io.load import load_model
from growcli.run.steps import VerifySettings, verification_batches
from growcli.run.stream_names import checkpoint_names, meta_model
from growcli.transforms.registry import StepReport
from growcli.verification.compare import VerifyReport, verify_models


def saved_names(gm: GrowModel, names: dict[str, str] | None = None) -> set[str]:
    """The checkpoint names ``save_pretrained`` writes for the grown (meta) model: tied copies once, no
    non-persistent buffers (``names``: parameter → checkpoint name, default :func:`checkpoint_names`)."""
    module = gm.module
    names = checkpoint_names(module) if names is None else names
    seen: dict[int, str] = {}
    tied = set(getattr(module, "_tied_weights_keys", None) or ())
    for n, t in module.state_dict(keep_vars=True).items():
        if id(t) in seen and n in names:
            continue
        seen[id(t)] = n
    keep = {names[n] for n in seen.values() if n in names}
    if getattr(module.config, "tie_word_embeddings", False):
        keep -= {names.get(k, k) for k in tied}
    return keep


def _structure(tmp: Path, written: dict[str, tuple[int, ...]]) -> str:
    """The written config rebuilds (on the meta device) exactly the written tensors: names and shapes."""
    fresh = meta_model(tmp)
    names = checkpoint_names(fresh)
    shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    want = {names.get(k, k): shapes[k] for k in shapes}
    bad = [f"{k} {list(s)} vs config {list(want[k])}" for k, s in written.items() if k in want and want[k] != tuple(s)]
    bad += [f"unexpected {k}" for k in written if k not in want]
    if bad:
        raise NotGrowableError(f"the written tensors do not fit the new config ({bad[0]})")
    return f"the new config rebuilds {len(want)} tensors; all {len(written)} written ones match in name and shape"


def _run_both(src: Path, tmp: Path, report: StepReport, settings: VerifySettings, seed: int) -> tuple[str, VerifyReport]:
    """The written directory loaded back from disk and run against the input, also loaded from disk, at the
    tolerance the in-memory step gets (exact in the weights' dtype or not)."""
    original = load_model(src)
    grown = load_model(tmp)
    batches = verification_batches(original, settings, seed)
    result = verify_models(original.module, grown.module, batches, dtype=settings.dtype, atol=settings.atol,
                           rtol=settings.rtol, exact_in_dtype=report.exact_in_dtype if report.exact else None,
                           output_maps=getattr(report, "output_maps", None))
    return f"transformers.{grown.hf_class}.from_pretrained", result
