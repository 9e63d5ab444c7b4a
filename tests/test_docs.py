"""The documentation stays true: links resolve, the plan reference matches the registry, the API
examples run, and the repository is self-contained.

- every relative link in README.md and docs/*.md points to a file inside the repository, and
  every ``#anchor`` to a heading of that file (GitHub's slugs);
- no tracked file points outside the repository for its background material;
- docs/plans.md lists every registered transform and every option of its spec, with its default,
  and its generated block is exactly what ``docs/gen_options.py`` prints;
- the ``python`` code blocks of docs/api.md run, in order, in a temporary directory;
- the README's one-example-per-command block and its Python example run on the bundled fixtures.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(\s*([^)\s]+)")
REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(\S+)", re.M)
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)


# --------------------------------------------------------------------------- slugs and links
def strip_code_blocks(text: str) -> str:
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup removed, lower case, punctuation dropped, spaces → '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images keep their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "").replace("~", "")
    text = text.lower()
    out = []
    for ch in text:
        if ch in (" ", "-", "_") or ch.isalnum():
            out.append("-" if ch == " " else ch)
        elif unicodedata.category(ch).startswith(("L", "N", "M")):
            out.append(ch)
    return "".join(out)


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes for ``path``: heading slugs (repeats get -1, -2, …) and HTML anchors."""
    text = strip_code_blocks(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    result = set(HTML_ANCHOR.findall(text))
    for m in HEADING.finditer(text):
        base = slug(m.group(2))
        n = seen.get(base, 0)
        result.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return result


def links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("", strip_code_blocks(path.read_text(encoding="utf-8")))
    return LINK.findall(text) + IMAGE.findall(text) + REFDEF.findall(text)


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I))  # https:, mailto:, …


def test_slugs_follow_github():
    assert slug("## 1. Wider layers (Net2WiderNet)".lstrip("# ")) == "1-wider-layers-net2widernet"
    assert slug("Widen: copy and split") == "widen-copy-and-split"
    assert slug("`widen --hidden` and `widen --heads`") == "widen---hidden-and-widen---heads"
    assert slug("Precedence: command line, plan, defaults") == "precedence-command-line-plan-defaults"


def test_link_parser_finds_links_but_not_code():
    page = DOCS / "_probe.md"
    try:
        page.write_text("# T\n[a](x.md#y) `[b](no.md)` ![i](img.png)\n```\n[c](no2.md)\n```\n[r]: ref.md\n")
        assert sorted(links(page)) == ["img.png", "ref.md", "x.md#y"]
    finally:
        page.unlink()


def test_docs_exist():
    for name in ("recipes.md", "plans.md", "api.md", "security.md", "cli.md"):
        assert (DOCS / name).is_file(), f"docs/{name} is missing"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    problems = []
    for target in links(page):
        if is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page.resolve()
        if not dest.is_relative_to(ROOT):
            problems.append(f"{target}: points outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{target}: {dest.relative_to(ROOT)} does not exist")
            continue
        if anchor:
            if not dest.is_file() or dest.suffix != ".md":
                problems.append(f"{target}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{target}: no heading in {dest.relative_to(ROOT)} has the anchor #{anchor}")
    assert not problems, f"{page.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


def test_readme_links_every_transform_to_its_recipe():
    """From the README alone a newcomer finds the recipe of every registered transform."""
    from growcli.transforms.catalog import all_transforms

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    recipe_anchors = anchors(DOCS / "recipes.md")
    linked = set(re.findall(r"\]\(docs/recipes\.md#([^)\s]+)\)", readme))
    for name in all_transforms():
        assert name in recipe_anchors, f"docs/recipes.md has no section #{name}"
        assert name in linked, f"README.md does not link docs/recipes.md#{name}"


def test_recipe_anchors_are_stable():
    """The anchors code, messages and other pages cite: one per transform and recipe, and the
    numbered sections of earlier versions of docs/recipes.md."""
    have = anchors(DOCS / "recipes.md")
    stable = {"widen", "widen-copy-and-split", "widen-zero-init", "widen-gradmax-init", "heads", "hidden",
              "hidden-tiling", "hidden-padding", "hidden-pair-noise", "deepen", "deepen-identity-layers",
              "deepen-identity-batchnorm", "deepen-network-morphism", "deepen-residual-blocks", "stack",
              "stack-copies", "stack-identity-init", "stack-orders-and-layer-maps", "stack-streaming", "suggest",
              "verification", "precision", "references", "block-wise-verification", "branch", "branch-add",
              "branch-concat", "column", "upcycle", "upcycle-shared-expert", "upcycle-streaming", "vocab",
              "embedding-models", "prune", "widen-firefly-init",
              "1-wider-layers-net2widernet", "2-deeper-networks-net2deepernet-network-morphism",
              "3-residual-blocks-that-start-as-the-identity", "4-progressive-stacking", "5-transformer-width",
              "6-gradmax-initialisation-and-suggest"}
    assert sorted(stable - have) == []


# --------------------------------------------------------------------------- self-contained
def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_no_tracked_file_points_outside_the_repository():
    """Background material lives in docs/, not in a file beside the checkout."""
    needles = ("GROWTH" + ".md", ".." + "/shared")  # spelled apart so this file does not match itself
    me = Path(__file__).resolve()
    hits = []
    for path in tracked_files():
        if path.resolve() == me or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if any(needle in line for needle in needles):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not hits, "files that refer to material outside the repository:\n  " + "\n  ".join(hits)


# --------------------------------------------------------------------------- plans.md
def gen_options():
    spec = importlib.util.spec_from_file_location("gen_options", DOCS / "gen_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def option_rows(text: str, name: str) -> dict[str, list[str]]:
    """The option table under ``### `name``` in docs/plans.md: option → its cells."""
    m = re.search(rf"^### `{re.escape(name)}`\n(.*?)(?=^#{{1,3}} |\Z)", text, re.S | re.M)
    assert m, f"docs/plans.md has no section ### `{name}`"
    rows = {}
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    return rows


def test_plans_reference_lists_every_transform_option_and_default():
    from growcli.transforms.catalog import all_transforms

    text = (DOCS / "plans.md").read_text(encoding="utf-8")
    transforms = all_transforms()
    assert transforms, "no transform is registered"
    for name, t in transforms.items():
        rows = option_rows(text, name)
        fields = dataclasses.fields(t.spec)
        assert sorted(rows) == sorted(f.name for f in fields), f"{name}: options in docs/plans.md differ from its spec"
        for f in fields:
            default_cell = rows[f.name][2]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                assert default_cell == "required", f"{name}.{f.name}: documented default {default_cell!r}, but it is required"
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            documented = yaml.safe_load(default_cell.strip("`"))
            if isinstance(default, tuple):
                default = list(default)
            assert documented == default and type(documented) is type(default), \
                f"{name}.{f.name}: docs/plans.md says {default_cell}, the spec's default is {default!r}"
            help_text = " ".join(f.metadata.get("help", "").split())
            assert help_text.replace("|", "\\|") in rows[f.name][3], f"{name}.{f.name}: help text differs"


def test_plans_reference_is_what_gen_options_prints():
    g = gen_options()
    text = (DOCS / "plans.md").read_text(encoding="utf-8")
    assert g.BEGIN in text and g.END in text, "docs/plans.md lost its generated-block markers"
    block = text[text.index(g.BEGIN) + len(g.BEGIN):text.index(g.END)]
    assert block.strip() == g.options_markdown().strip(), "docs/plans.md is stale: run python docs/gen_options.py --write"


def test_plans_reference_names_every_schema_key():
    text = (DOCS / "plans.md").read_text(encoding="utf-8")
    keys = {"version", "seed", "steps", "verify", "output", "description", "batches", "dtype", "atol", "rtol",
            "inputs", "path", "format", "shard_size"}
    for module in ("growcli.run.planschema", "growcli.run.plan"):  # the schema's own key lists
        try:
            schema = importlib.import_module(module)
            keys |= set(schema.TOP_KEYS) | set(schema.VERIFY_KEYS) | set(schema.OUTPUT_KEYS)
            break
        except (ImportError, AttributeError):
            continue
    missing = [k for k in sorted(keys) if f"| `{k}` |" not in text]
    assert not missing, f"docs/plans.md has no table row for plan keys {missing}"


# --------------------------------------------------------------------------- api.md
def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", path.read_text(encoding="utf-8"), re.S | re.M)


def test_api_examples_run(tmp_path):
    blocks = python_blocks(DOCS / "api.md")
    assert len(blocks) >= 3, "docs/api.md should show its examples as python code blocks"
    script = tmp_path / "api_examples.py"
    # One script, blocks in order (later ones use names the earlier ones defined), run in a fresh
    # interpreter inside an empty directory so the examples create every file they use.
    script.write_text("\n\n".join(f"# --- block {i + 1}\n{b}" for i, b in enumerate(blocks)), encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, str(script)], cwd=work, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"docs/api.md examples failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert (work / "grown" / "mlp.safetensors").is_file(), "the examples should write grown/mlp.safetensors"


# --------------------------------------------------------------------------- README examples
def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"README.md has no section '## {title}'"
    return m.group(1)


def test_readme_examples_run(cli, tmp_path, monkeypatch):
    """Every command of "One example per command" exits 0 on the bundled fixtures, in order."""
    import torch
    from safetensors.torch import save_file

    section = readme_section("One example per command")
    bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [shlex.split(line, comments=True) for line in bash.splitlines() if line.strip()]
    names = {c[1] for c in commands}
    assert {"inspect", "widen", "deepen", "stack", "suggest", "grow", "validate", "verify", "convert"} <= names
    monkeypatch.chdir(tmp_path)
    for name in ("fixtures", "examples"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    g = torch.Generator().manual_seed(0)  # calibration data for suggest, shaped for growcli.zoo's MLP
    save_file({"input": torch.randn(64, 16, generator=g), "target": torch.randint(0, 4, (64,), generator=g)},
              "calib.safetensors")
    for argv in commands:
        assert argv[0] == "growcli"
        r = cli(*argv[1:], "--quiet")
        assert r.code == 0, f"README example failed ({r.code}): {shlex.join(argv)}\n{r.err}"
    assert (tmp_path / "grown" / "mlp.safetensors").is_file() and (tmp_path / "plan.yaml").is_file()

    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(python, "README.md", "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "grown" / "cnn2.safetensors").is_file()
