"""Safe YAML for plans: plain data only, bounded, with the line and column of every value.

:func:`load_located` composes the YAML node graph with a :class:`yaml.SafeLoader`
subclass and builds the Python value itself, so that it can

- accept only the plain YAML types (mappings, sequences, strings, numbers, booleans,
  null) and refuse every other tag (``!!python/...``, custom ``!tags``) by position;
- bound the work an alias can cause: every node visited counts, aliases included, so a
  "billion laughs" document stops after :data:`MAX_NODES` instead of expanding;
- bound nesting (recursive aliases included) and the size of the input;
- refuse duplicate mapping keys (PyYAML would silently keep the last one);
- remember where each value and each mapping key was written (1-based line and column).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20  # a growth plan is a few hundred bytes; anything near this is not one
MAX_NODES = 10_000  # nodes visited while building the value, each alias expansion counted again
MAX_DEPTH = 50

PathKey = tuple[Any, ...]  # ("steps", 0, "widen", "to")

_STR, _INT, _FLOAT, _BOOL, _NULL = (f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null"))
_SEQ, _MAP, _MERGE, _TIMESTAMP = (f"tag:yaml.org,2002:{t}" for t in ("seq", "map", "merge", "timestamp"))
_SCALAR_TAGS = {_STR, _INT, _FLOAT, _BOOL, _NULL}


class PlanLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-10`` as a float (YAML 1.1 needs a dot: ``1.0e-10``).

    Tolerances are written that way in practice, and reading them as strings would turn
    a correct plan into a type error.
    """


PlanLoader.add_implicit_resolver(_FLOAT, re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))


@dataclass(frozen=True)
class Loc:
    """A position in a file: 1-based line and column."""

    line: int
    column: int


class YamlError(Exception):
    """The text is not safe, well-formed YAML; ``loc`` says where (``None``: the whole file)."""

    def __init__(self, message: str, loc: Loc | None = None):
        super().__init__(message)
        self.message = message
        self.loc = loc


@dataclass
class Located:
    """A plain Python value and where each part of it was written.

    ``values[path]`` is the position of the value at ``path``, ``keys[path]`` the position
    of the mapping key that introduced it.
    """

    data: Any
    values: dict[PathKey, Loc] = field(default_factory=dict)
    keys: dict[PathKey, Loc] = field(default_factory=dict)

    def loc(self, path: PathKey, key: bool = False) -> Loc:
        """Where ``path`` was written (its key if ``key``), else the nearest enclosing position."""
        path = tuple(path)
        while True:
            found = (self.keys.get(path) if key else None) or self.values.get(path)
            if found is not None or not path:
                return found or Loc(1, 1)
            path = path[:-1]


def _loc(node: yaml.Node) -> Loc:
    return Loc(node.start_mark.line + 1, node.start_mark.column + 1)


def _tag_error(node: yaml.Node) -> YamlError:
    tag = node.tag.replace("tag:yaml.org,2002:", "!!")
    return YamlError(f"the tag {tag} is not allowed: a plan holds only plain mappings, lists, strings, numbers, "
                     "booleans and null, and never constructs Python objects", _loc(node))


def read_text(path: Path, max_bytes: int = MAX_BYTES) -> str:
    """The file's text, refusing files over ``max_bytes`` before reading them.

    Raises :class:`YamlError` for oversized or non-UTF-8 files and ``OSError`` for
    unreadable ones.
    """
    size = path.stat().st_size
    if size > max_bytes:
        raise YamlError(f"the file is {size:,} bytes; a plan may be at most {max_bytes:,} bytes")
    raw = path.read_bytes()[: max_bytes + 1]
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise YamlError(f"not UTF-8 text (byte {exc.start})") from None


def load_located(text: str, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> Located:
    """Parse one YAML document of plain data; raises :class:`YamlError` at the first problem.

    An empty document gives ``Located(None)``.
    """
    if len(text.encode("utf-8")) > MAX_BYTES:
        raise YamlError(f"the text is over {MAX_BYTES:,} bytes; a plan may be at most {MAX_BYTES:,} bytes")
    loader = PlanLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = exc.problem or exc.context or "unreadable"
            ctx, cm = exc.context, exc.context_mark
            if ctx and exc.problem and cm is not None and cm is not mark:  # where the broken construct began
                problem += f" ({ctx} at line {cm.line + 1}, column {cm.column + 1})"
            elif ctx and exc.problem:
                problem = f"{ctx}: {problem}"
            raise YamlError(f"invalid YAML: {problem}",
                            Loc(mark.line + 1, mark.column + 1) if mark else None) from None
        except yaml.YAMLError as exc:
            raise YamlError(f"invalid YAML: {exc}") from None
        out = Located(None)
        if root is not None:
            builder = _Builder(loader, out, max_nodes, max_depth)
            out.data = builder.build(root, (), 0)
        return out
    finally:
        loader.dispose()


class _Builder:
    def __init__(self, loader: PlanLoader, out: Located, max_nodes: int, max_depth: int):
        self.loader, self.out = loader, out
        self.max_nodes, self.max_depth = max_nodes, max_depth
        self.visited = 0

    def build(self, node: yaml.Node, path: PathKey, depth: int) -> Any:
        self.visited += 1
        if self.visited > self.max_nodes:
            raise YamlError(f"the document expands to more than {self.max_nodes:,} values (aliases are counted "
                            "each time they are used); a plan is much smaller than that", _loc(node))
        if depth > self.max_depth:
            raise YamlError(f"nested deeper than {self.max_depth} levels (a recursive alias?)", _loc(node))
        self.out.values.setdefault(path, _loc(node))
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node)
        if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ:
            return [self.build(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode) and node.tag == _MAP:
            return self.mapping(node, path, depth)
        raise _tag_error(node)

    def scalar(self, node: yaml.ScalarNode) -> Any:
        if node.tag == _TIMESTAMP:  # an unquoted date is data the user meant as text
            return node.value
        if node.tag not in _SCALAR_TAGS:
            raise _tag_error(node)
        return self.loader.construct_object(node)

    def mapping(self, node: yaml.MappingNode, path: PathKey, depth: int) -> dict:
        result: dict = {}
        merged: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                # ``<<: *defaults``: built through ``build`` so that the expansion is counted.
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for src in sources:
                    value = self.build(src, path, depth + 1)
                    if not isinstance(value, dict):
                        raise YamlError("a merge key '<<' takes a mapping or a list of mappings", _loc(src))
                    for k, v in value.items():
                        merged.setdefault(k, v)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlError("a mapping key must be a plain name, not a list or mapping", _loc(key_node))
            key = self.scalar(key_node)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise YamlError(f"unsupported key {key!r}", _loc(key_node))
            if key in result:
                first = self.out.keys[path + (key,)]
                raise YamlError(f"duplicate key {key!r} (first written at line {first.line}); "
                                "YAML keeps only one of them", _loc(key_node))
            self.out.keys[path + (key,)] = _loc(key_node)
            result[key] = self.build(value_node, path + (key,), depth + 1)
        for k, v in merged.items():
            result.setdefault(k, v)
        return result
