"""Checking a plan's YAML against schema version 1 and the transform registry, every problem at once.

The checker walks the located YAML document (:mod:`growcli.core.safeyaml`) and records a
:class:`growcli.run.planschema.Problem` with file, line and column for everything wrong: unknown
keys (with a did-you-mean), wrong types, unknown transforms, and step options their spec refuses
(:func:`growcli.transforms.catalog.spec_problems`). It keeps going after a problem, so one run
lists them all; steps with problems stay in the plan with ``valid=False``.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

from growcli.core.errors import UsageError
from growcli.core.safeyaml import Located
from growcli.core.units import parse_size
from growcli.run.planblame import blame
from growcli.run.planschema import (DTYPES, OUTPUT_KEYS, STEP_EXAMPLE, TOP_KEYS, VERIFY_KEYS, VERSION, OutputConfig, Plan,
                                    PlanStep, Problem, VerifyConfig)


class PlanChecker:
    """Checks one located YAML document; :meth:`check` returns the plan and every problem."""

    def __init__(self, doc: Located, file: str):
        self.doc, self.file = doc, file
        self.problems: list[Problem] = []

    def add(self, path: tuple, where: str, message: str, *, key: bool = False, option: str | None = None) -> None:
        self.problems.append(Problem(self.file, self.doc.loc(path, key), where, message, option))

    def check(self, text: str) -> tuple[Plan | None, list[Problem]]:
        data = self.doc.data
        if not isinstance(data, dict):
            got = "an empty file" if data is None else f"a {_kind(data)}"
            self.add((), "plan", f"expected a mapping with 'version: {VERSION}' and 'steps:', got {got}")
            return None, self.problems
        self.unknown_keys(data, (), TOP_KEYS, "plan")
        version = self.version(data)
        seed = data.get("seed")
        if "seed" in data and not (_is_int(seed) and seed >= 0):
            self.add(("seed",), "seed", f"expected a non-negative integer, got {seed!r}")
            seed = None
        if "description" in data and not isinstance(data["description"], str):
            self.add(("description",), "description", f"expected text, got {_kind(data['description'])}")
        plan = Plan(self.file, text, version, self.steps(data), seed, self.verify(data), self.output(data))
        self.problems.sort(key=lambda p: (p.loc.line, p.loc.column) if p.loc else (0, 0))
        return plan, self.problems

    def unknown_keys(self, mapping: dict, path: tuple, allowed: tuple[str, ...], where: str) -> None:
        for key in mapping:
            if key not in allowed:
                near = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"did you mean {near[0]!r}?" if near else f"expected one of {', '.join(allowed)}"
                self.add(path + (key,), where, f"unknown key {key!r}; {hint}", key=True)

    def version(self, data: dict) -> int | None:
        if "version" not in data:
            self.add((), "version", f"missing 'version: {VERSION}' (the plan schema version) at the top of the plan")
            return None
        v = data["version"]
        if not _is_int(v):
            self.add(("version",), "version", f"expected the integer {VERSION}, got {v!r}")
            return None
        if v != VERSION:
            newer = " (written for a newer growcli; upgrade it)" if v > VERSION else ""
            self.add(("version",), "version", f"unsupported plan version {v}; this growcli reads version {VERSION}{newer}")
        return v

    def steps(self, data: dict) -> list[PlanStep]:
        from growcli.transforms.catalog import all_transforms

        if "steps" not in data:
            self.add((), "steps", f"missing 'steps:', a list of transforms like {STEP_EXAMPLE}")
            return []
        items = data["steps"]
        if not isinstance(items, list):
            self.add(("steps",), "steps", f"expected a list of steps like {STEP_EXAMPLE}, got {_kind(items)}")
            return []
        if not items:
            self.add(("steps",), "steps", f"the plan has no steps; add at least one, like {STEP_EXAMPLE}")
        transforms = all_transforms()
        return [self.step(i, item, transforms) for i, item in enumerate(items)]

    def step(self, i: int, item: Any, transforms: dict) -> PlanStep:
        """The step at ``steps[i]``; a malformed one comes back with ``valid=False`` (and its problems added)."""
        path, where = ("steps", i), f"step {i + 1}"
        if isinstance(item, str):
            name, options, name_path = item, {}, path
        elif isinstance(item, dict) and len(item) == 1:
            name, options = next(iter(item.items()))
            name_path = path + (name,)
            if options is None:
                options = {}
        elif isinstance(item, dict):
            keys = list(item)
            lone = [k for k in keys if k in transforms and item[k] is None]
            hint = (f"; indent its options under '{lone[0]}:' (they are read as separate keys)" if lone
                    else f"; write one step per list item, like {STEP_EXAMPLE}")
            self.add(path, where, f"a step maps one transform name to its options, got keys {', '.join(map(repr, keys))}{hint}")
            return PlanStep(i + 1, "", {}, self.doc.loc(path), valid=False)
        else:
            self.add(path, where, f"expected a transform name with its options, like {STEP_EXAMPLE}, got {_kind(item)}")
            return PlanStep(i + 1, "", {}, self.doc.loc(path), valid=False)
        if not isinstance(name, str) or name not in transforms:
            near = difflib.get_close_matches(str(name), transforms, n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"known transforms: {', '.join(sorted(transforms)) or '(none)'}"
            self.add(name_path, where, f"unknown transform {name!r}; {hint}", key=True)
            return PlanStep(i + 1, str(name), {}, self.doc.loc(name_path, key=True), valid=False)
        where = f"step {i + 1} ({name})"
        loc = self.doc.loc(name_path, key=True)
        if not isinstance(options, dict):
            self.add(name_path, where, f"the options of {name} must be a mapping like {{option: value}}, got {_kind(options)}")
            return PlanStep(i + 1, name, {}, loc, valid=False)
        bad_keys = [k for k in options if not isinstance(k, str)]
        for k in bad_keys:
            self.add(name_path + (k,), where, f"option names are text, got {k!r}", key=True)
        options = {k: v for k, v in options.items() if isinstance(k, str)}
        option_locs = {k: self.doc.loc(name_path + (k,)) for k in options}
        valid = not bad_keys and self.step_options(name, options, name_path, where, transforms[name])
        return PlanStep(i + 1, name, options, loc, option_locs, valid)

    def step_options(self, name: str, options: dict, name_path: tuple, where: str, transform) -> bool:
        from growcli.transforms.catalog import spec_problems

        fields = {f.name for f in dataclasses.fields(transform.spec)}
        problems = spec_problems(name, options)
        for option, message in problems:
            if option is None:
                option = blame(message, options)
                path = name_path + (option,) if option else name_path
                self.add(path, where, message, key=option is None, option=option)
            else:
                # An unknown option is pointed at by its key, a wrong value by the value.
                self.add(name_path + (option,), where, message, key=option not in fields, option=option)
        return not problems

    def verify(self, data: dict) -> VerifyConfig:
        section = self.section(data, "verify", VERIFY_KEYS)
        values: dict[str, Any] = {}
        p = ("verify",)
        if "batches" in section:
            v = section["batches"]
            if _is_int(v) and v >= 1:
                values["batches"] = v
            else:
                self.add(p + ("batches",), "verify", f"batches: expected a positive integer, got {v!r}")
        if "dtype" in section:
            v = section["dtype"]
            if v in DTYPES:
                values["dtype"] = v
            else:
                self.add(p + ("dtype",), "verify", f"dtype: expected {' or '.join(DTYPES)}, got {v!r}")
        for key in ("atol", "rtol"):
            if key in section:
                v = section[key]
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
                    values[key] = float(v)
                else:
                    self.add(p + (key,), "verify", f"{key}: expected a non-negative number like 1e-10, got {v!r}")
        if "inputs" in section:
            v = section["inputs"]
            if not isinstance(v, str) or not v:
                self.add(p + ("inputs",), "verify", f"inputs: expected the path of a .safetensors or .pt file, got {v!r}")
            elif not Path(v).is_file():
                self.add(p + ("inputs",), "verify", f"inputs: no such file {v} (relative to the current directory)")
            else:
                values["inputs"] = Path(v)
        return VerifyConfig(**values)

    def output(self, data: dict) -> OutputConfig:
        from growcli.io.save import FORMATS, output_format

        section = self.section(data, "output", OUTPUT_KEYS)
        p = ("output",)
        path = fmt = size = None
        if "format" in section:
            fmt = section["format"]
            if fmt not in FORMATS:
                self.add(p + ("format",), "output", f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
                fmt = None
        if "path" in section:
            v = section["path"]
            if not isinstance(v, str) or not v:
                self.add(p + ("path",), "output", f"path: expected a file or directory path, got {v!r}")
            else:
                path = Path(v)
                try:
                    resolved = output_format(path, fmt)
                    if "shard_size" in section and resolved != "hf":
                        self.add(p + ("shard_size",), "output",
                                 f"shard_size applies to Hugging Face directory outputs, not {resolved}", key=True)
                except UsageError as exc:
                    self.add(p + ("path",), "output", str(exc))
        if "shard_size" in section:
            try:
                size = parse_size(section["shard_size"])
            except ValueError as exc:
                self.add(p + ("shard_size",), "output", f"shard_size: {exc}")
        return OutputConfig(path, fmt, size, self.doc.loc(p + ("path",)) if path else None)

    def section(self, data: dict, name: str, keys: tuple[str, ...]) -> dict:
        if name not in data or data[name] is None:
            return {}
        section = data[name]
        if not isinstance(section, dict):
            self.add((name,), name, f"expected a mapping with keys {', '.join(keys)}, got {_kind(section)}")
            return {}
        self.unknown_keys(section, (name,), keys, name)
        return section


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"
