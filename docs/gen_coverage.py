"""Generate docs/coverage.md: which growth commands are exact, per Hugging Face model family.

For every family (a ``model_type`` of the installed transformers) the script builds a tiny
model offline from the family's default config shrunk by one shared rule (:data:`SHRINK`:
hidden size 32, 2 layers, 4 heads, 2 KV heads, vocabulary 128, intermediate 64…), gives every
weight a small seeded random perturbation (so no norm, bias or scale is trivially 0 or 1),
saves it in float64 with ``save_pretrained`` and runs five growth steps through
:func:`growcli.run.runner.grow`, each from the saved directory, each written to a Hugging
Face directory that is read back with ``from_pretrained`` and compared (the FFN widen, whose
blocks then differ, writes growcli safetensors read back with ``load_grown``):

- ``stack --factor 2 --init identity``
- FFN ``widen --factor 2`` of the first block's largest widenable layer (chosen from the
  widen candidates, never by name)
- ``widen --heads 2x`` (heads ×2)
- ``widen --hidden 2x``
- ``deepen --block`` after the first block of the stack

A cell says ``exact (d)`` with ``d`` the largest max abs difference (step and read-back,
float64), ``refused: reason`` for a clean refusal, ``error: …`` for anything else (a bug).

Usage::

    python docs/gen_coverage.py                       # the default families, writes docs/coverage.md
    python docs/gen_coverage.py --families gemma2,olmo2   # re-run these, merge into the table
    python docs/gen_coverage.py --all --timeout 300   # every causal/masked LM family installed
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "coverage.md"
COMMAND = "python docs/gen_coverage.py"
EXACT = 1e-10

# Well-known decoder/encoder families; those missing from the installed transformers are left out.
DEFAULT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "gpt2",
                    "gpt_neox", "gptj", "falcon", "opt", "bloom", "mpt", "stablelm", "olmo", "olmo2", "cohere",
                    "cohere2", "granite", "starcoder2", "gpt_bigcode", "codegen", "bert", "roberta", "distilbert",
                    "electra", "albert", "deberta-v2", "vit", "olmo3", "glm4", "exaone4", "persimmon", "nemotron",
                    "xglm", "biogpt", "helium", "modernbert")
COLUMNS = ("stack", "widen", "heads", "hidden", "deepen")
HEADINGS = {"stack": "`stack --factor 2 --init identity`", "widen": "`widen` (first block's FFN ×2)",
            "heads": "`widen --heads 2x`", "hidden": "`widen --hidden 2x`", "deepen": "`deepen --block`"}

HIDDEN, HEADS, KV_HEADS, LAYERS, INTERMEDIATE, VOCAB, POSITIONS = 32, 4, 2, 2, 64, 128, 128
# One rule for every family: each key present in the family's default config gets this value.
SHRINK = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "embedding_size"), HIDDEN),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "num_layers"), LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads"), KV_HEADS),
    **dict.fromkeys(("intermediate_size", "n_inner", "ffn_dim", "hidden_dim", "d_ff"), INTERMEDIATE),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx"), POSITIONS),
    "vocab_size": VOCAB, "head_dim": HIDDEN // HEADS, "rotary_dim": HIDDEN // HEADS // 2,
    "image_size": 32, "patch_size": 8,
}


def model_class(family: str):
    """The family's masked-LM class, else causal-LM, else image classifier, else base model."""
    from transformers.models.auto import modeling_auto as auto

    import transformers

    for table in ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                  "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "MODEL_MAPPING_NAMES"):
        name = getattr(auto, table, {}).get(family)
        if isinstance(name, (tuple, list)):
            name = name[0]
        if name and hasattr(transformers, name):
            return getattr(transformers, name)
    raise LookupError(f"no model class for {family} in the auto mappings")


def all_families() -> list[str]:
    from transformers.models.auto import modeling_auto as auto

    return sorted(set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES))


def build(family: str, directory: Path) -> str:
    """Save a tiny float64 ``family`` model in ``directory``; its class name."""
    import torch
    from transformers import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[family]
    default = config_cls().to_dict()
    kwargs = {k: v for k, v in SHRINK.items() if k in default}
    for key, value in default.items():  # special token ids must lie in the small vocabulary
        if key.endswith("token_id") and isinstance(value, int) and value >= VOCAB:
            kwargs[key] = VOCAB - 1
    config = config_cls(**kwargs)
    torch.manual_seed(0)
    model = model_class(family)(config).to(torch.float64).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)
    model.save_pretrained(directory)
    return type(model).__name__


def widen_layer(path: Path) -> tuple[str | None, str | None]:
    """``(layer, None)``: the first block's largest widenable layer (the model's, without a stack of blocks);
    ``(None, reason)`` when none is."""
    import growcli
    from growcli.analysis.blocks import find_stack
    from growcli.transforms.catalog import get_transform

    from growcli.core.errors import NotGrowableError

    gm = growcli.load_model(path)
    try:
        prefix = find_stack(gm.module, None) + ".0."
    except NotGrowableError:  # no stack of blocks (ALBERT's shared layer): every layer of the model
        prefix = ""
    found = {k: v for k, v in get_transform("widen").candidates(gm).items() if k.startswith(prefix)}
    if not found:
        return None, f"widen lists no candidate layer in {prefix[:-1] or 'the model'}"

    def size(name: str) -> int:
        params = dict(gm.module.named_parameters())
        if name in params:  # a fused 3-D expert parameter, named by itself
            return params[name].numel()
        return sum(p.numel() for p in gm.module.get_submodule(name).parameters(recurse=False))

    ranked = sorted(found, key=lambda k: (found[k] is not None, -size(k)))  # growable first, then largest
    best = ranked[0]
    return (best, None) if found[best] is None else (None, f"{best}: {found[best]}")


def steps_for(column: str, path: Path):
    from growcli.analysis.blocks import find_stack
    from growcli.run.runner import Step

    if column == "stack":
        return [Step("stack", {"factor": 2, "init": "identity"})], None
    if column == "widen":
        layer, reason = widen_layer(path)
        return ([Step("widen", {"layer": layer, "factor": 2})], None) if layer else (None, reason)
    if column == "heads":
        return [Step("heads", {"factor": 2})], None
    if column == "hidden":
        return [Step("hidden", {"factor": 2})], None
    import growcli
    from growcli.core.errors import NotGrowableError

    gm = growcli.load_model(path)
    try:
        container = find_stack(gm.module, None)
    except NotGrowableError as e:
        return None, f"deepen --block needs a stack of repeated blocks: {str(e).removeprefix('stack: ')}"
    return [Step("deepen", {"after": container + ".0", "block": True})], None


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def run_column(column: str, path: Path, work: Path) -> dict:
    """Run one column's step on the model saved at ``path``; the cell's status and detail."""
    from growcli.core.errors import GrowError, NotGrowableError, VerificationFailed
    from growcli.run.runner import Output, Source, grow

    start = time.time()
    try:
        steps, reason = steps_for(column, path)
        if steps is None:
            return {"status": "refused", "detail": one_line(reason), "seconds": time.time() - start}
        # One widened layer makes the blocks differ, which no config describes: that step writes safetensors.
        out = Output(work / "widen.safetensors") if column == "widen" else Output(str(work / column) + "/")
        report = grow(Source(path), steps, [out], seed=0)
    except NotGrowableError as e:
        return {"status": "refused", "detail": one_line(e), "seconds": time.time() - start}
    except VerificationFailed as e:
        return {"status": "error", "detail": "verification failed: " + one_line(e), "seconds": time.time() - start}
    except GrowError as e:
        return {"status": "refused", "detail": f"{type(e).__name__}: {one_line(e)}", "seconds": time.time() - start}
    except Exception as e:  # anything but a clean refusal is a bug to report
        return {"status": "error", "detail": f"{type(e).__name__}: {one_line(e)}"[:400], "seconds": time.time() - start}
    diffs = [report["verification"]["max_abs_diff"]] + [o["max_abs_diff"] for o in report["outputs"]]
    worst = max(float(d) for d in diffs)
    exact = report["function_preserving"] and worst <= EXACT
    return {"status": "exact" if exact else "inexact", "detail": f"{worst:.1e}" if worst else "0",
            "seconds": time.time() - start}


def worker(family: str, results: Path, columns: tuple[str, ...]) -> None:
    """Build ``family`` and run ``columns``, appending one JSON line per result to ``results``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"

        def emit(record: dict) -> None:
            with open(results, "a") as f:
                f.write(json.dumps({"family": family, **record}) + "\n")

        try:
            cls = build(family, path)
        except Exception as e:
            emit({"column": "build", "status": "skipped", "detail": f"cannot build offline: {type(e).__name__}: "
                                                                    f"{one_line(e)}"[:300]})
            return
        emit({"column": "build", "status": "built", "detail": cls})
        for column in columns:
            emit({"column": column, **run_column(column, path, Path(tmp))})


def run_family(family: str, timeout: float, columns: tuple[str, ...], script: str = __file__) -> dict[str, dict]:
    """Run ``script --worker family`` (this script's :func:`worker`, or another table's) in a subprocess, so a
    timeout cannot hang the table; results by column."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        results = Path(f.name)
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", family, "--results", str(results),
           "--columns", ",".join(columns)]
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        crash = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["exit code"])[-1]
    except subprocess.TimeoutExpired:
        crash = f"timeout after {timeout:.0f} s"
    got = {}
    for line in results.read_text().splitlines():
        record = json.loads(line)
        got[record["column"]] = record
    results.unlink()
    for column in ("build",) + columns:
        if column not in got and "skipped" not in {r["status"] for r in got.values()}:
            got[column] = {"status": "error", "detail": one_line(crash or "no result")}
    print(f"{family}: {time.time() - start:.0f} s " + " ".join(f"{c}={got[c]['status']}" for c in got if c in columns),
          file=sys.stderr, flush=True)
    return got


def cell(record: dict | None) -> str:
    if record is None:
        return "—"
    detail = record["detail"].replace("|", "\\|")
    if record["status"] == "exact":
        return f"exact ({detail})"
    if record["status"] == "inexact":
        return f"**inexact** (max abs diff {detail})"
    return f"{record['status']}: {detail}"


def parse_table(text: str) -> dict[str, str]:
    """Rows of an existing table by family, kept verbatim when merging."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| `([^`]+)` \|", line)
        if m:
            rows[m.group(1)] = line
    return rows


def render(rows: dict[str, str], seconds: float) -> str:
    import torch
    import transformers

    exact = sum(line.count("| exact (") for line in rows.values())
    refused = sum(line.count("| refused: ") for line in rows.values())
    errors = sum(line.count("| error: ") + line.count("| **inexact**") for line in rows.values())
    head = ["# Coverage: growth commands per Hugging Face model family", "",
            f"<!-- Generated by `{COMMAND}` (edit the script, not this file). -->", "",
            f"Generated by `{COMMAND}` with transformers {transformers.__version__} and torch "
            f"{torch.__version__.split('+')[0]}; last run took {seconds:.0f} s. Each family is a tiny model built "
            f"offline from its default config with one shared rule (hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, "
            f"{KV_HEADS} KV heads where the family has them, intermediate {INTERMEDIATE}, vocabulary {VOCAB}), "
            "seeded random weights, saved in float64. Each command runs on the saved directory through growcli's "
            "runner; the grown model is verified against the original and read back with `from_pretrained` (the FFN "
            "`widen`, after which the blocks differ, writes `.safetensors` read back with `growcli.load_grown`).", "",
            f"- **exact (d)**: every verification (the step, and the read-back) agreed; d is the largest max abs "
            f"difference, at most {EXACT:g} in float64.",
            "- **refused: reason**: growcli declined with that one-line reason (nothing written).",
            "- **error**: anything else; a bug. **inexact**: passed within tolerance but above the exact bound.",
            "- The FFN `widen` grows the first block's largest layer that the widen candidates list as growable "
            "(×2), never chosen by name; `deepen --block` inserts a copy after the first block.", "",
            f"Totals: {exact} exact, {refused} refused, {errors} error/inexact, over {len(rows)} families.", "",
            "| family | class | " + " | ".join(HEADINGS[c] for c in COLUMNS) + " |",
            "| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |"]
    return "\n".join(head + [rows[f] for f in sorted(rows)]) + "\n"


def row(family: str, got: dict[str, dict]) -> str:
    build = got.get("build", {"status": "error", "detail": "no result"})
    if build["status"] != "built":
        return f"| `{family}` | — | {cell(build)} |" + " |" * (len(COLUMNS) - 1)
    return f"| `{family}` | {build['detail']} | " + " | ".join(cell(got.get(c)) for c in COLUMNS) + " |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", help="comma-separated model_types to run and merge into the existing table")
    ap.add_argument("--all", action="store_true", help="every causal/masked LM family of the installed transformers")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per family (default 600)")
    ap.add_argument("--output", type=Path, default=OUT)
    ap.add_argument("--columns", default=",".join(COLUMNS), help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    columns = tuple(c for c in args.columns.split(",") if c)
    if args.worker:
        worker(args.worker, args.results, columns)
        return 0
    from transformers import CONFIG_MAPPING

    if args.families:
        families, merge = [f.strip() for f in args.families.split(",") if f.strip()], True
    else:
        families, merge = (all_families() if args.all else [f for f in DEFAULT_FAMILIES if f in CONFIG_MAPPING]), False
    rows = parse_table(args.output.read_text()) if merge and args.output.exists() else {}
    start = time.time()
    for family in families:
        if family not in CONFIG_MAPPING:
            rows[family] = row(family, {"build": {"status": "skipped", "detail": "cannot build offline: not a model_type"
                                                                                  " of the installed transformers"}})
            continue
        rows[family] = row(family, run_family(family, args.timeout, columns))
        args.output.write_text(render(rows, time.time() - start))  # keep partial progress
    args.output.write_text(render(rows, time.time() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
