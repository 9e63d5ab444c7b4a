"""Transform options are declared once, in their spec dataclass; the commands and the plan schema agree with it.

Each spec field is ``name: type = option(default, "help")`` (growcli.transforms.registry). The
CLI keeps its own copy of the flag's help and default, because reading them from the spec would
import torch at ``--help`` time; these tests are what keeps the copy true. For every command ↔
transform pair they compare the command's click parameters (``typer.main.get_command``) with the
spec's fields: same set of options (apart from the explicit tables of execution options and
renames below), same defaults, same types, and the command's help is the spec's help, word for
word, optionally followed by a remark for the command line (e.g. "Repeat --layer for a list.").
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
import typing

import pytest
import typer
import yaml

from growcli.cli.app import get_app
from growcli.run.plan import parse_plan
from growcli.transforms.catalog import all_transforms
from growcli.transforms.registry import option_help

COMMANDS = typer.main.get_command(get_app()).commands

# Options that say how a command runs, not what a transform does (the same on every command that grows).
EXECUTION = {"model", "output", "format", "arch", "arch_kwargs", "trust_pickle", "input_shape", "inputs", "seed", "batches",
             "seq_len", "dtype", "device", "atol", "rtol", "allow_mismatch", "overwrite", "json_out", "quiet"}
# Options only a command has (they choose how a step is executed, not what it does).
CLI_ONLY = {"widen": {"streaming", "shard_size"}, "deepen": {"streaming", "shard_size"}, "stack": {"streaming", "shard_size"}, "branch": set(), "column": set(),
            "prune": set(), "vocab": set(), "upcycle": {"streaming", "shard_size"},
            "nest": {"val", "epochs", "lr", "prune_steps", "min_accuracy"}}
# (command, transform) → {spec field: command parameter} where the command spells a field differently
# (widen's --heads, --hidden and --pair-noise drive the heads and hidden transforms; stack's identity init
# on post-LN blocks is allowed by --allow-mismatch).
RENAMES = {
    ("widen", "widen"): {},
    ("widen", "heads"): {"to": "heads"},
    ("widen", "hidden"): {"to": "hidden", "factor": "hidden", "heads": "heads", "noise": "pair_noise"},
    ("deepen", "deepen"): {},
    ("branch", "branch"): {},
    ("stack", "stack"): {"allow_inexact": "allow_mismatch"},
    ("upcycle", "upcycle"): {},
    ("prune", "prune"): {},
    ("column", "column"): {},
    ("vocab", "vocab"): {"tokens": "add_tokens"},
    ("nest", "mask"): {}, ("nest", "grow_connections"): {}, ("nest", "grow_neurons"): {}, ("nest", "magnitude_prune"): {},
}
# Spec fields a command does not offer (a plan and the Python API do).
NOT_ON_COMMAND_LINE = {("widen", "heads"): {"by", "factor"}, ("widen", "hidden"): {"start"}}
PAIRS = list(RENAMES)


def params(command: str) -> dict[str, typing.Any]:
    return {p.name: p for p in COMMANDS[command].params}


def spec_fields(transform: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(all_transforms()[transform].spec)}


def field_params(pair: tuple[str, str]) -> dict[str, str]:
    """Spec field → the command parameter that sets it, for every field the command offers."""
    skip = NOT_ON_COMMAND_LINE.get(pair, set())
    return {f: RENAMES[pair].get(f, f) for f in spec_fields(pair[1]) if f not in skip}


def kinds(tp: typing.Any) -> set[str]:
    """A type reduced to what a flag can hold: int, float, bool, str (Literal and Path too) and list."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(kinds(a) for a in typing.get_args(tp)))
    if tp is type(None):
        return set()
    if origin is typing.Literal:
        return {type(a).__name__ for a in typing.get_args(tp)}
    if origin in (list, tuple):
        return {"list"}
    if isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
        return {"str"}
    return {tp.__name__}


def test_every_transform_with_a_command_is_covered():
    assert {t for _, t in PAIRS} == set(all_transforms())
    assert {c for c, _ in PAIRS} <= set(COMMANDS)


@pytest.mark.parametrize("pair", PAIRS, ids="-".join)
def test_command_offers_every_spec_field(pair):
    offered = params(pair[0])
    flag = lambda param: "--" + param.replace("_", "-")  # noqa: E731  (plans and flags share the spelling)
    missing = {f: flag(p) for f, p in field_params(pair).items() if p not in offered or flag(p) not in offered[p].opts}
    assert missing == {}, f"{pair[0]} has no flag for {pair[1]}'s fields: {missing}"


@pytest.mark.parametrize("command", sorted(CLI_ONLY))
def test_command_has_only_spec_execution_and_listed_options(command):
    from_specs = {p for pair in PAIRS if pair[0] == command for p in field_params(pair).values()}
    stray = set(params(command)) - from_specs - EXECUTION - CLI_ONLY[command]
    assert stray == set(), f"{command} has options no spec declares: {sorted(stray)} (add the field, or list it here)"


@pytest.mark.parametrize("pair", PAIRS, ids="-".join)
def test_defaults_agree(pair):
    fields, offered = spec_fields(pair[1]), params(pair[0])
    wrong = {}
    for name, param in field_params(pair).items():
        f, p = fields[name], offered[param]
        if f.default is dataclasses.MISSING:  # required by the spec: required here, or checked by the command
            ok = p.required or p.default is None
        else:
            ok = p.default == f.default and type(p.default) is type(f.default)
        if not ok:
            wrong[f"--{param.replace('_', '-')}"] = (p.default, f.default)
    assert wrong == {}, f"{pair[0]}: (command default, {pair[1]} spec default) differ: {wrong}"


@pytest.mark.parametrize("pair", [p for p in PAIRS if p[0] == p[1]], ids="-".join)
def test_help_and_type_agree(pair):
    """A flag named like its field has the field's help (and may add a remark) and a type the field accepts."""
    spec = all_transforms()[pair[1]].spec
    hints = typing.get_type_hints(spec)
    offered = params(pair[0])
    for name, param in field_params(pair).items():
        if name != param:
            continue
        p = offered[param]
        want, got = " ".join(option_help(spec, name).split()), " ".join((p.help or "").split())
        assert want and got.startswith(want), f"{pair[0]} --{param.replace('_', '-')}: help {got!r}, spec says {want!r}"
        assert got == want or got[len(want)] == " ", f"{pair[0]} --{param}: the remark must follow the spec's text"
        assert kinds(p.type_descriptor.annotation) <= kinds(hints[name]), \
            f"{pair[0]} --{param} takes {p.type_descriptor.annotation}, {spec.__name__}.{name} is {hints[name]}"


def test_renamed_flags_reach_the_named_fields():
    """The renames are real: --heads/--hidden/--pair-noise become heads and hidden steps' options."""
    from growcli.cli.commands.widen import _transformer_steps

    steps = _transformer_steps(heads=8, hidden="2x", pair_noise=0.01, split="uniform")
    assert [(s.transform, s.options) for s in steps] == [
        ("hidden", {"factor": 2.0, "noise": 0.01, "split": "uniform", "heads": 8})]
    steps = _transformer_steps(heads=8, hidden=None, pair_noise=0.0, split="asymmetric")
    assert [(s.transform, s.options) for s in steps] == [("heads", {"to": 8, "split": "asymmetric"})]
    for pair, renames in RENAMES.items():
        assert set(renames) <= set(spec_fields(pair[1])), f"{pair}: renamed fields the spec does not have"


# --------------------------------------------------------------------------- the plan schema
def _sample(tp: typing.Any) -> typing.Any:
    """A value of type ``tp`` (the first alternative of a union that is not None)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _sample(next(a for a in typing.get_args(tp) if a is not type(None)))
    if origin is typing.Literal:
        return typing.get_args(tp)[0]
    if origin in (list, tuple):
        return [_sample(typing.get_args(tp)[0])]
    return {int: 3, float: 2.0, bool: True, str: "fc1"}[tp]


FIELDS = [(name, f.name) for name, t in sorted(all_transforms().items()) for f in dataclasses.fields(t.spec)]


@pytest.mark.parametrize("name,field", FIELDS, ids=[f"{n}.{f}" for n, f in FIELDS])
def test_every_spec_field_is_accepted_in_a_version_1_plan(name, field):
    spec = all_transforms()[name].spec
    hints = typing.get_type_hints(spec)
    f = next(x for x in dataclasses.fields(spec) if x.name == field)
    value = _sample(hints[field]) if f.default in (None, dataclasses.MISSING) else f.default
    required = {x.name: _sample(hints[x.name]) for x in dataclasses.fields(spec) if x.default is dataclasses.MISSING}
    options = {**required, field: value}
    plan, problems = parse_plan(yaml.safe_dump({"version": 1, "steps": [{name: options}]}))
    assert plan.steps[0].transform == name and plan.steps[0].options == options
    # Field values may still conflict with each other (the spec says so), but the schema knows every field and type.
    assert [p.message for p in problems if "unknown" in p.message or "expects" in p.message] == []


@pytest.mark.parametrize("name,field", FIELDS, ids=[f"{n}.{f}" for n, f in FIELDS])
def test_an_unknown_option_is_refused_with_a_did_you_mean(name, field):
    typo = field + field[-1]
    text = f"version: 1\nsteps:\n  - {name}:\n      {typo}: 1\n"
    _, problems = parse_plan(text, "p.yaml")
    [problem] = [p for p in problems if p.option == typo]
    assert problem.message == f"unknown option {typo!r} for {name}; did you mean {field!r}?"
    assert (problem.loc.line, problem.loc.column) == (4, 7) and problem.where == f"step 1 ({name})"


def test_a_flag_spelling_is_not_a_plan_option():
    _, problems = parse_plan("version: 1\nsteps:\n  - widen: {layer: fc1, by: 2, data-batches: 2}\n")
    assert [p.message for p in problems] == ["unknown option 'data-batches' for widen; did you mean 'data_batches'?"]
