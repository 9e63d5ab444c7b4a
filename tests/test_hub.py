"""Models named by Hugging Face id (``org/name[@revision]``), read from a real cache layout built offline.

Each test builds a Hub cache under ``tmp_path`` the way ``huggingface_hub`` lays it out:
``models--org--name/{blobs/<sha256>, refs/<branch>, snapshots/<40-hex commit>/<file> → ../../blobs/…}``,
holding tiny Llamas saved with ``save_pretrained`` (random weights, 2 layers on ``main``, 3 on
branch ``v2``). ``HF_HOME`` points at it and ``HF_HUB_OFFLINE=1`` is set, so nothing can reach the
real Hub; the one test of a failed download points ``HF_ENDPOINT`` at a closed local port.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import growcli
from growcli.core.errors import CheckpointNotFoundError, UsageError
from growcli.io.hub import ALLOW_PATTERNS, IGNORE_PATTERNS, parse_hub_id, resolve_source
from growcli.run.runner import Source

COMMIT_MAIN = hashlib.sha1(b"main").hexdigest()
COMMIT_V2 = hashlib.sha1(b"v2").hexdigest()
SMALL = dict(vocab_size=100, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
             max_position_embeddings=64)


def _save_llama(path: Path, layers: int, seed: int) -> Path:
    import transformers as T

    torch.manual_seed(seed)
    model = T.LlamaForCausalLM(T.LlamaConfig(**SMALL, num_hidden_layers=layers))
    with torch.no_grad():  # norm weights away from 1, so an identity layer is not trivially exact
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saved")
    return {"main": _save_llama(root / "main", 2, 0), "v2": _save_llama(root / "v2", 3, 1),
            "local": _save_llama(root / "local", 1, 2)}


def cache_repo(cache: Path, repo_id: str, snapshots: dict[str, Path], refs: dict[str, str]) -> Path:
    """A Hub cache entry for ``repo_id``: blobs by content hash, snapshot files symlinked to them, refs to commits."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for commit, src in snapshots.items():
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in sorted(src.iterdir()):
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    for ref, commit in refs.items():
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return repo


@pytest.fixture
def hub(tmp_path, saved, monkeypatch) -> Path:
    """HF_HOME with ``org/name`` cached (main → 2 layers, v2 → 3 layers), offline; returns the hub cache directory."""
    home = tmp_path / "hf-home"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    cache_repo(home / "hub", "org/name", {COMMIT_MAIN: saved["main"], COMMIT_V2: saved["v2"]},
               {"main": COMMIT_MAIN, "v2": COMMIT_V2})
    return home / "hub"


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ``root``: files by sha256 of their content, symlinks by their target."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p) + " " + hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[key] = "dir"
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.double()(input_ids=ids).logits


# --- which texts are ids ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("org/name", ("org/name", None)),
    ("Org-1/na.me_2@v2", ("Org-1/na.me_2", "v2")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    (f"org/name@{COMMIT_MAIN}", ("org/name", COMMIT_MAIN)),
    ("name", None),                            # a bare name is a file path: ids need org/name
    ("grown/model.safetensors", None),         # a checkpoint suffix: a missing file, not an id
    ("a/b/c", None),                           # no @: a missing nested path
    ("/abs/org/name", None), ("./org/name", None), ("~/org/name", None),
    ("org--x/name", None),                     # not a valid id: a path
    ("weights@v2.pt", None),                   # @ but no org/: a path
    ("runs/exp@2/model.safetensors", None),    # a checkpoint suffix wins over the @
])
def test_parse_hub_id(text, expected):
    assert parse_hub_id(text) == expected


@pytest.mark.parametrize("text", ["a/b/c@", "org/name@", "a/b/c@main", "org/name@../../x", "org/na me@main", "org/@v1"])
def test_malformed_id_is_a_usage_error(text):
    with pytest.raises(UsageError, match="not a valid Hugging Face id"):
        parse_hub_id(text)


def test_download_patterns_never_fetch_code_or_pickles():
    """The patterns a download passes to huggingface_hub's own filter: weights, configs, tokenizers, top level only."""
    from huggingface_hub.utils import filter_repo_objects

    files = ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
             "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "tokenizer.model", "merges.txt", "vocab.txt", "modeling_x.py", "configuration_x.py", "pytorch_model.bin",
             "model.pt", "model.ckpt", "flax_model.msgpack", "onnx/model.onnx", "onnx/model.safetensors", "README.md"]
    kept = list(filter_repo_objects(files, allow_patterns=list(ALLOW_PATTERNS), ignore_patterns=list(IGNORE_PATTERNS)))
    assert kept == files[:11]
    assert not any(fnmatch.fnmatch("modeling_x.py", p) for p in ALLOW_PATTERNS)


# --- the CLI and the API on a cached id ------------------------------------------------------------------------

def test_inspect_by_id(hub, cli):
    r = cli("inspect", "org/name", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert Path(report["path"]) == (hub / "models--org--name" / "snapshots" / COMMIT_MAIN).resolve()
    assert report["class"] == "LlamaForCausalLM" and report["total_parameters"] > 0


@pytest.mark.parametrize("mode", ["--no-streaming", "--streaming"])
def test_stack_by_id_is_exact_and_records_the_source(hub, cli, saved, mode):
    before = tree_digest(hub)
    r = cli("stack", "org/name", "--init", "identity", mode, "-o", "out/", "--json")
    assert r.code == 0, r.err
    report = json.loads(Path("out/growth_report.json").read_text())
    assert report["execution"] == mode.lstrip("-").replace("no-streaming", "memory")
    assert report["verification"]["passed"] and report["verification"]["max_abs_diff"] <= 1e-10
    assert report["source"] == {"hub_id": "org/name", "repo_id": "org/name", "revision": "main", "commit": COMMIT_MAIN,
                                "snapshot": report["input"], "downloaded": False}
    assert Path(report["input"]).name == COMMIT_MAIN
    import transformers as T

    grown = T.LlamaForCausalLM.from_pretrained("out", local_files_only=True)
    original = T.LlamaForCausalLM.from_pretrained(str(saved["main"]), local_files_only=True)
    assert grown.config.num_hidden_layers == 4
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    diff = (_logits(grown, ids) - _logits(original, ids)).abs().max().item()
    assert diff <= 1e-10
    assert tree_digest(hub) == before  # the cache is byte-identical: nothing written, nothing added
    assert not any(p.is_symlink() for p in Path("out").iterdir())  # side files copied, not linked into the cache


@pytest.mark.parametrize("rev,layers,commit", [("v2", 3, COMMIT_V2), (COMMIT_V2, 3, COMMIT_V2), ("main", 2, COMMIT_MAIN)])
def test_revision_selects_the_snapshot(hub, rev, layers, commit):
    gm = growcli.load_model(f"org/name@{rev}")
    assert gm.module.config.num_hidden_layers == layers
    assert gm.source.name == commit
    source = Source(Path(f"org/name@{rev}"))
    assert source.hub.to_dict()["hub_id"] == f"org/name@{rev}" and source.hub.commit == commit
    assert Source(source.path).hub.hub_id == f"org/name@{commit}"  # a snapshot given as a path: its commit


def test_hub_cache_variable_wins_over_hf_home(hub, tmp_path, monkeypatch, saved):
    other = tmp_path / "other-cache"
    cache_repo(other, "org/name", {COMMIT_V2: saved["v2"]}, {"main": COMMIT_V2})
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    path, snap = resolve_source("org/name")
    assert path == (other / "models--org--name" / "snapshots" / COMMIT_V2).resolve() and snap.commit == COMMIT_V2


def test_plan_on_an_id_records_the_revision(hub, cli):
    Path("plan.yaml").write_text("version: 1\nsteps:\n  - stack: {factor: 2, init: identity}\n")
    r = cli("grow", "org/name@v2", "--plan", "plan.yaml", "-o", "planned/")
    assert r.code == 0, r.err
    report = json.loads(Path("planned/growth_report.json").read_text())
    assert report["source"]["hub_id"] == "org/name@v2" and report["source"]["commit"] == COMMIT_V2
    assert report["verification"]["max_abs_diff"] <= 1e-10 and report["params_after"] > report["params_before"]


def test_verify_takes_ids_for_both_arguments(hub, cli):
    r = cli("verify", "org/name", f"org/name@{COMMIT_MAIN}", "--batches", "1")
    assert r.code == 0, r.err


def test_missing_id_names_the_id_and_offline_mode(hub, cli, monkeypatch):
    r = cli("inspect", "org/missing")
    assert r.code == 1 and r.out == ""
    assert r.err.strip().count("\n") == 0
    assert "org/missing: not a local path, not in the Hugging Face cache (HF_HOME=" in r.err
    assert "offline mode is set (HF_HUB_OFFLINE=1)" in r.err
    r = cli("inspect", "org/name@no-such-branch")
    assert r.code == 1 and "org/name@no-such-branch: not a local path, revision 'no-such-branch' is not in the " \
        f"Hugging Face cache (HF_HOME={hub.parent}; cached: main, v2, {', '.join(sorted([COMMIT_MAIN, COMMIT_V2]))}) " \
        "and offline mode is set (HF_HUB_OFFLINE=1)" in r.err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError, match=r"org/missing: .* offline mode is set \(TRANSFORMERS_OFFLINE=1\)"):
        growcli.load_model("org/missing")


def test_unreachable_hub_is_one_line_naming_the_id(hub, cli, monkeypatch):
    """Online mode with the endpoint on a closed local port: the download fails, the id and the reason are named."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # huggingface_hub reads HF_HUB_OFFLINE once, when first imported (under the suite's HF_HUB_OFFLINE=1 if an
    # earlier test imported it): set its snapshot to what a fresh process started in this environment reads.
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    r = cli("inspect", "org/missing")
    assert r.code == 1 and r.err.strip().count("\n") == 0
    assert "org/missing: not a local path, not in the Hugging Face cache" in r.err
    assert "and the Hub is not reachable: ConnectError: " in r.err
    path, snap = resolve_source("org/name")  # cached and complete: no network needed even online
    assert path.name == COMMIT_MAIN and not snap.downloaded
    commit = hashlib.sha1(b"config only").hexdigest()
    config_only = Path("config-only")
    config_only.mkdir()
    shutil.copy(hub / "models--org--name" / "snapshots" / COMMIT_MAIN / "config.json", config_only)
    cache_repo(hub, "org/partial", {commit: config_only}, {"main": commit})
    with pytest.raises(CheckpointNotFoundError, match=rf"org/partial: its snapshot .*{commit} has no config.json or "
                       r"safetensors weights \(the Hub was not reachable"):
        resolve_source("org/partial")


@pytest.mark.parametrize("text", ["a/b/c@", "org/name@"])
def test_malformed_id_exits_2(hub, cli, text):
    r = cli("inspect", text)
    assert r.code == 2 and text in r.err and "not a valid Hugging Face id" in r.err


def test_local_directory_named_like_an_id_wins(hub, cli, saved):
    shutil.copytree(saved["local"], "org/name")
    r = cli("verify", "org/name", "org/name@main", "--batches", "1")  # the local 1-layer model is not the cached one
    assert r.code == 3, r.err
    gm = growcli.load_model("org/name")
    assert gm.source == Path("org/name") and gm.module.config.num_hidden_layers == 1
    assert Source(Path("org/name")).hub is None


def test_output_inside_the_cached_snapshot_is_refused(hub, cli):
    before = tree_digest(hub)
    snap = hub / "models--org--name" / "snapshots" / COMMIT_MAIN
    r = cli("stack", "org/name", "--init", "identity", "-o", f"{snap}/out/")
    assert r.code == 2 and "inside the input directory" in r.err
    r = cli("convert", "org/name", "-o", str(hub), "--overwrite")
    assert r.code == 2 and "would contain the input" in r.err
    assert tree_digest(hub) == before


@pytest.mark.parametrize("extra", ["modeling_x.py", "auto_map"])
def test_cached_remote_code_is_still_refused(hub, cli, saved, tmp_path, extra):
    src = tmp_path / "custom"
    shutil.copytree(saved["main"], src)
    if extra == "auto_map":
        cfg = json.loads((src / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
        (src / "config.json").write_text(json.dumps(cfg))
    else:
        canary = tmp_path / "ran"
        (src / extra).write_text(f"open({str(canary)!r}, 'w').write('code ran')\n")
    commit = hashlib.sha1(extra.encode()).hexdigest()
    cache_repo(hub, "org/custom", {commit: src}, {"main": commit})
    r = cli("inspect", "org/custom")
    assert r.code == 1 and r.err.strip().count("\n") == 0
    assert ("auto_map" in r.err) if extra == "auto_map" else ("modeling_x.py" in r.err)
    assert not (tmp_path / "ran").exists()
