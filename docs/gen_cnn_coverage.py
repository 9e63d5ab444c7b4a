"""Generate docs/coverage_cnn.md: which growth commands are exact, per convolutional image classifier.

Models: the installed transformers' vision classifiers with convolutions (ResNet, ConvNeXt,
MobileNet, EfficientNet, RegNet, BiT, PoolFormer, MobileViT, LeViT, SwiftFormer, FocalNet,
TextNet, HGNet-V2…), each built offline from a tiny config (``cnn_zoo.HF_MODELS``), and five
re-implementations of torchvision's classic nets written as plain torch modules
(``docs/cnn_zoo.py``: VGG, DenseNet, SqueezeNet, ShuffleNetV2, MobileNetV3). Every model gets a
small seeded random perturbation of every weight and BatchNorm statistic (so no γ, β, mean or
variance is trivially 0 or 1), is cast to float64 and saved: a Hugging Face model with
``save_pretrained``; a plain module as a ``.pt2`` program (for the layer columns) and as a
state_dict with ``--arch cnn_zoo:NAME`` (for the block columns: a ``.pt2`` has no block modules).

Columns, each run through :func:`growcli.run.runner.grow` on the saved model, the output read
back from disk and compared (safetensors with the recorded edits replayed, directories with ``from_pretrained``):

- ``widen``: up to 5 conv layers spread over the model, chosen from the widen candidates list
  (layers whose weight is 4-D, never by name), each ×2 on its own; ``k/n exact (max d)`` and the
  first refusal.
- ``deepen``: an identity layer after the first conv layer the deepen candidates list as
  deepenable (``k/n`` of the conv layers are), else the first conv layer's refusal.
- ``deepen --block``: a copy with zeroed residual writers after the first block the deepen
  candidates list as insertable, else the first block's refusal.
- ``stack --init identity``: ×2 on the stacks of repeated blocks, longest first (``--blocks``),
  the first that is exact, else the first refusal.

Block columns of a Hugging Face model write a directory; when no config describes the grown
model (a stage deeper than the config's per-stage lists say), the same step is run again
writing ``.safetensors`` and the cell says so.

A cell says ``exact (d)`` with ``d`` the largest max abs difference (step and read-back,
float64), ``refused: reason`` for a clean refusal, ``error: …`` for anything else (a bug).

Usage::

    python docs/gen_cnn_coverage.py                     # every model, writes docs/coverage_cnn.md
    python docs/gen_cnn_coverage.py --models resnet,vgg   # re-run these, merge into the table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from cnn_zoo import HF_MODELS  # noqa: E402
from gen_coverage import EXACT, cell, one_line, parse_table, run_family  # noqa: E402

OUT = HERE / "coverage_cnn.md"
COMMAND = "python docs/gen_cnn_coverage.py"
WIDEN_LAYERS = 5
NUM_LABELS = 5
COLUMNS = ("widen", "deepen", "block", "stack")
HEADINGS = {"widen": f"`widen --factor 2` (up to {WIDEN_LAYERS} conv layers, one at a time)",
            "deepen": "`deepen --after CONV` (identity layer)", "block": "`deepen --block`",
            "stack": "`stack --factor 2 --init identity`"}

ZOO_MODELS = ("vgg", "densenet", "squeezenet", "shufflenet", "mobilenet_v3")  # docs/cnn_zoo.py
ZOO_NAMES = {"vgg": "VGG-11-BN", "densenet": "DenseNet", "squeezenet": "SqueezeNet 1.1", "shufflenet": "ShuffleNetV2",
             "mobilenet_v3": "MobileNetV3-small"}


def hf_class(model_type: str):
    """The family's image-classification class (the first, when the mapping lists several)."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    name = auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[model_type]
    return getattr(transformers, name[0] if isinstance(name, (tuple, list)) else name)


def perturb(model) -> None:
    """Seeded noise on every weight and BatchNorm statistic (variances stay positive)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)
        for name, b in model.named_buffers():
            if b.is_floating_point() and name.endswith("running_mean"):
                b.add_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * 0.1)
            elif b.is_floating_point() and name.endswith("running_var"):
                b.mul_(1 + torch.rand(b.shape, generator=gen, dtype=b.dtype))


def build(label: str, directory: Path) -> tuple[str, dict]:
    """Save ``label``'s tiny float64 model under ``directory``; its class name and the growcli sources to run.

    The sources: ``{"layers": Source, "blocks": Source}`` (a Hugging Face model's directory for both;
    a plain module's ``.pt2`` for layers and its state_dict with ``--arch`` for blocks)."""
    import torch
    from growcli.run.runner import Source

    torch.manual_seed(0)
    if label in HF_MODELS:
        from transformers import CONFIG_MAPPING

        model_type, keys, size = HF_MODELS[label]
        config = CONFIG_MAPPING[model_type](num_labels=NUM_LABELS, image_size=size, **keys)
        model = hf_class(model_type)(config).to(torch.float64).eval()
        perturb(model)
        model.save_pretrained(directory / "hf")
        src = Source(directory / "hf")
        return type(model).__name__, {"layers": src, "blocks": src}
    import cnn_zoo
    from safetensors.torch import save_file

    model = cnn_zoo.FACTORIES[label]().to(torch.float64).eval()
    perturb(model)
    directory.mkdir(parents=True, exist_ok=True)
    example = (torch.randn(*cnn_zoo.IMAGE, generator=torch.Generator().manual_seed(2), dtype=torch.float64),)
    torch.export.save(torch.export.export(model, example), directory / "model.pt2")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "weights.safetensors")
    blocks = Source(directory / "weights.safetensors", arch=f"cnn_zoo:{label}",
                    input_shape=",".join(map(str, cnn_zoo.IMAGE)))
    return f"{type(model).__name__.lstrip('_')} (re-implementation)", {"layers": Source(directory / "model.pt2"),
                                                                          "blocks": blocks}


def is_conv(gm, name: str) -> bool:
    """``name``'s weight is 4-D (a 2-D convolution's), read from the parameters, not the name."""
    params = dict(gm.module.named_parameters())
    weight = params.get(f"{name}.weight", params.get(name))
    return weight is not None and weight.dim() == 4


def spread(items: list, k: int) -> list:
    """At most ``k`` of ``items``, evenly spaced from the first to the last."""
    if len(items) <= k:
        return list(items)
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def run_step(source, step, out: Path) -> dict:
    """One grow run; ``{"status", "detail"}`` as in gen_coverage (exact / inexact / refused / error)."""
    from growcli.core.errors import GrowError, NotGrowableError, VerificationFailed
    from growcli.run.runner import Output, grow

    try:
        report = grow(source, [step], [Output(out)], seed=0)
    except NotGrowableError as e:
        return {"status": "refused", "detail": one_line(e)}
    except VerificationFailed as e:
        return {"status": "error", "detail": "verification failed: " + one_line(e)}
    except GrowError as e:
        return {"status": "refused", "detail": f"{type(e).__name__}: {one_line(e)}"}
    except Exception as e:  # anything but a clean refusal is a bug to report
        return {"status": "error", "detail": f"{type(e).__name__}: {one_line(e)}"[:400]}
    worst = max(float(d) for d in [report["verification"]["max_abs_diff"]] +
                [o["max_abs_diff"] for o in report["outputs"]])
    exact = report["function_preserving"] and worst <= EXACT
    return {"status": "exact" if exact else "inexact", "detail": f"{worst:.1e}" if worst else "0", "worst": worst}


def _candidates(source, transform: str) -> tuple:
    """The loaded model and ``transform``'s candidates on it (name → None, or why not)."""
    from growcli.transforms.catalog import get_transform

    gm = source.load()
    return gm, get_transform(transform).candidates(gm)


def column_widen(sources: dict, work: Path) -> dict:
    from growcli.run.runner import Step

    gm, found = _candidates(sources["layers"], "widen")
    convs = spread([name for name in found if is_conv(gm, name)], WIDEN_LAYERS)
    if not convs:
        return {"status": "refused", "detail": "widen lists no conv layer"}
    results = [(name, run_step(sources["layers"], Step("widen", {"layer": name, "factor": 2}),
                               work / f"widen{i}.safetensors")) for i, name in enumerate(convs)]
    exact = [r for _, r in results if r["status"] == "exact"]
    text = f"{len(exact)}/{len(convs)} exact"
    if exact:
        worst = max(r["worst"] for r in exact)
        text += f" ({worst:.1e})" if worst else " (0)"
    others = [(n, r) for n, r in results if r["status"] != "exact"]
    if others:
        name, r = others[0]
        text += f"; {r['status']} `{name}`: {r['detail']}"
    status = "error" if any(r["status"] in ("error", "inexact") for _, r in results) else (
        "exact" if len(exact) == len(convs) else "partial" if exact else "refused")
    return {"status": status, "detail": text}


def column_deepen(sources: dict, work: Path) -> dict:
    from growcli.run.runner import Step

    gm, found = _candidates(sources["layers"], "deepen")
    convs = [name for name in found if not name.endswith("(--block)") and is_conv(gm, name)]
    if not convs:
        return {"status": "refused", "detail": "deepen lists no conv layer"}
    ok = [name for name in convs if found[name] is None]
    if not ok:
        return {"status": "refused", "detail": f"0/{len(convs)} conv layers; `{convs[0]}`: {one_line(found[convs[0]])}"}
    r = run_step(sources["layers"], Step("deepen", {"after": ok[0]}), work / "deepen.safetensors")
    return {**r, "detail": f"{r['detail']}; after `{ok[0]}`, {len(ok)}/{len(convs)} conv layers listed"}


NO_CONFIG = "UsageError: the grown model cannot be described by a Hugging Face config"


def run_blocks(source, step, work: Path, name: str) -> dict:
    """A block step written as a Hugging Face directory for a Hugging Face model (read back with
    ``from_pretrained``), else as safetensors; when no config describes the grown model, again as
    safetensors (read back with the recorded edits), so the cell says whether the growth itself is exact."""
    if source.arch is not None:
        return run_step(source, step, work / f"{name}.safetensors")
    r = run_step(source, step, work / f"{name}/")
    if r["status"] != "refused" or not r["detail"].startswith(NO_CONFIG):
        return r
    again = run_step(source, step, work / f"{name}.safetensors")
    if again["status"] == "refused":
        return r
    return {**again, "detail": f"{again['detail']} as .safetensors; no Hugging Face config describes it"}


def column_block(sources: dict, work: Path) -> dict:
    from growcli.run.runner import Step

    _, found = _candidates(sources["blocks"], "deepen")
    blocks = [name.removesuffix(" (--block)") for name in found if name.endswith("(--block)")]
    if not blocks:
        return {"status": "refused", "detail": "no stack of repeated blocks (ModuleList/Sequential of same-typed blocks)"}
    ok = [b for b in blocks if found[f"{b} (--block)"] is None]
    if not ok:
        return {"status": "refused", "detail": f"0/{len(blocks)} blocks; `{blocks[0]}`: "
                                               f"{one_line(found[blocks[0] + ' (--block)'])}"}
    r = run_blocks(sources["blocks"], Step("deepen", {"after": ok[0], "block": True}), work, "block")
    return {**r, "detail": f"{r['detail']}; after `{ok[0]}`, {len(ok)}/{len(blocks)} blocks listed"}


def column_stack(sources: dict, work: Path) -> dict:
    from growcli.analysis.blocks import block_stacks
    from growcli.run.runner import Step

    stacks = [s["name"] for s in block_stacks(sources["blocks"].load().module)]
    if not stacks:
        return {"status": "refused", "detail": "no stack of repeated blocks (ModuleList/Sequential of same-typed blocks)"}
    first = None
    for i, name in enumerate(stacks):
        r = run_blocks(sources["blocks"], Step("stack", {"factor": 2, "init": "identity", "blocks": name}), work,
                       f"stack{i}")
        if r["status"] != "refused":
            return {**r, "detail": f"{r['detail']}; `{name}`, stack {i + 1} of {len(stacks)}"}
        first = first or (name, r)
    return {"status": "refused", "detail": f"0/{len(stacks)} stacks; `{first[0]}`: {first[1]['detail']}"}


RUNNERS = {"widen": column_widen, "deepen": column_deepen, "block": column_block, "stack": column_stack}


def worker(label: str, results: Path, columns: tuple[str, ...]) -> None:
    """Build ``label`` and run ``columns``, appending one JSON line per result to ``results``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def emit(record: dict) -> None:
        with open(results, "a") as f:
            f.write(json.dumps({"model": label, **record}) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        try:
            cls, sources = build(label, Path(tmp) / "model")
        except Exception as e:
            emit({"column": "build", "status": "skipped", "detail": f"cannot build offline: {type(e).__name__}: "
                                                                    f"{one_line(e)}"[:300]})
            return
        emit({"column": "build", "status": "built", "detail": cls})
        for column in columns:
            start = time.time()
            work = Path(tmp) / column
            work.mkdir()
            try:
                record = RUNNERS[column](sources, work)
            except Exception as e:  # choosing the layers failed: a bug too
                record = {"status": "error", "detail": f"{type(e).__name__}: {one_line(e)}"[:400]}
            record.pop("worst", None)
            emit({"column": column, **record, "seconds": time.time() - start})


def run_model(label: str, timeout: float, columns: tuple[str, ...]) -> dict[str, dict]:
    """:func:`worker` for ``label`` in a subprocess with a timeout (gen_coverage's runner); results by column."""
    return run_family(label, timeout, columns, script=__file__)


def cnn_cell(record: dict | None) -> str:
    """A cell: gen_coverage's forms, and the widen column's ``k/n exact …`` summary as it is."""
    if record is not None and record["status"] == "partial":
        return record["detail"].replace("|", "\\|")
    if record is not None and record["status"] in ("exact", "refused", "error") and "/" in record["detail"][:6]:
        prefix = {"exact": "", "refused": "refused: ", "error": "error: "}[record["status"]]
        return prefix + record["detail"].replace("|", "\\|")
    return cell(record)


def row(label: str, got: dict[str, dict]) -> str:
    build = got.get("build", {"status": "error", "detail": "no result"})
    if build["status"] != "built":
        return f"| `{label}` | — | {cell(build)} |" + " |" * (len(COLUMNS) - 1)
    return f"| `{label}` | {build['detail']} | " + " | ".join(cnn_cell(got.get(c)) for c in COLUMNS) + " |"


def render(rows: dict[str, str], seconds: float) -> str:
    import torch
    import transformers

    head = ["# Coverage: growth commands per convolutional image classifier", "",
            f"<!-- Generated by `{COMMAND}` (edit the script, not this file). -->", "",
            f"Generated by `{COMMAND}` with transformers {transformers.__version__} and torch "
            f"{torch.__version__.split('+')[0]}; last run took {seconds:.0f} s (two models at a time, one thread each, on a "
            "shared 2-core machine). Each Hugging Face model is the "
            "family's image classifier built offline from a tiny config (a few channels, two or three stages of "
            f"two blocks, {NUM_LABELS} labels, 32×32 images, 64×64 for MobileViT and LeViT) and saved with "
            "`save_pretrained`; the rows marked *re-implementation* are plain torch modules in "
            "[cnn_zoo.py](cnn_zoo.py) that follow torchvision's definitions (torchvision itself is not installed "
            "here), saved as a `.pt2` program for the layer columns and as a state_dict with `--arch` for the block "
            "columns. Weights and BatchNorm statistics carry seeded random noise; everything is float64. Each "
            "command runs through growcli's runner, is verified against the original and read back from disk "
            "(`.safetensors` with `growcli.load_grown`'s replay, directories with `from_pretrained`).", "",
            f"- **exact (d)**: every verification (the step, and the read-back) agreed; d is the largest max abs "
            f"difference, at most {EXACT:g} in float64.",
            "- **refused: reason**: growcli declined with that one-line reason (nothing written).",
            "- **error**: anything else; a bug. **inexact**: passed within tolerance but above the exact bound.",
            f"- `widen`: up to {WIDEN_LAYERS} conv layers (4-D weights) from the widen candidates list, evenly spread "
            "from the first to the last, each ×2 on its own: `k/n exact (largest d)`, then the first layer that was "
            "not, with its reason.",
            "- `deepen`: an identity layer after the first conv layer the deepen candidates list as deepenable "
            "(`k/n` conv layers are listed); `deepen --block`: a zero-writer copy after the first block listed as "
            "insertable; when none is, the first one's reason. `stack`: ×2 on each stack of repeated blocks, "
            "longest first (`--blocks`), until one is not refused.", "",
            "| model | class | " + " | ".join(HEADINGS[c] for c in COLUMNS) + " |",
            "| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |"]
    return "\n".join(head + [rows[m] for m in sorted(rows)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help="comma-separated models to run and merge into the existing table")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per model (default 240)")
    ap.add_argument("--jobs", type=int, default=2, help="models run at once, one thread each (default 2)")
    ap.add_argument("--output", type=Path, default=OUT)
    ap.add_argument("--columns", default=",".join(COLUMNS), help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    columns = tuple(c for c in args.columns.split(",") if c)
    if args.worker:
        import torch

        torch.set_num_threads(1)  # tiny float64 convs: one thread is several times faster on a shared machine
        worker(args.worker, args.results, columns)
        return 0
    everything = list(HF_MODELS) + list(ZOO_MODELS)
    models = [m.strip() for m in args.models.split(",")] if args.models else everything
    unknown = [m for m in models if m not in everything]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {', '.join(everything)}")
    rows = parse_table(args.output.read_text()) if args.models and args.output.exists() else {}
    start = time.time()
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each job is a subprocess; threads only wait
        futures = {pool.submit(run_model, label, args.timeout, columns): label for label in models}
        for future in as_completed(futures):
            rows[futures[future]] = row(futures[future], future.result())
            args.output.write_text(render(rows, time.time() - start))  # keep partial progress
    args.output.write_text(render(rows, time.time() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
