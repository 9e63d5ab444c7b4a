"""Growth schedules: fixed steps and fractions, plateaus on synthetic loss curves, score triggers, budget."""

from __future__ import annotations

import pytest

from growcli.core.errors import UsageError
from growcli.train.schedule import (AtSteps, Plateau, Rule, Schedule, ScoreAbove, TrainingState,
                                    schedule_from_dict)

STACK = [{"transform": "stack", "options": {"init": "identity"}}]


def fired_steps(schedule: Schedule, total: int, losses=None, params=lambda step: 0) -> list[int]:
    out = []
    for step in range(1, total + 1):
        loss = losses[step - 1] if losses is not None else None
        if schedule.due(TrainingState(step, total, loss, params(step))):
            out.append(step)
    return out


def test_fractions_fire_once_each_at_the_right_step():
    s = Schedule([Rule(AtSteps((0.25, 0.5)), STACK)])
    assert fired_steps(s, 100) == [25, 50]


def test_fixed_steps_and_fractions_mix():
    s = Schedule([Rule(AtSteps((10, 0.5)), STACK)])
    assert fired_steps(s, 40) == [10, 20]


def test_fraction_without_total_is_a_usage_error():
    s = Schedule([Rule(AtSteps((0.5,)), STACK)])
    with pytest.raises(UsageError, match="total number of steps is unknown"):
        s.due(TrainingState(1, None))


@pytest.mark.parametrize("bad", [0, 1.0, -3, 1.5, True])
def test_bad_points_are_refused(bad):
    with pytest.raises(UsageError, match="neither a step"):
        AtSteps((bad,))


def test_plateau_fires_after_patience_flat_evaluations():
    # improves for 5 evaluations, then flat (within min_delta) from evaluation 6 on
    losses = [5.0, 4.0, 3.0, 2.5, 2.2] + [2.2 - 1e-4 * i for i in range(1, 11)]
    s = Schedule([Rule(Plateau(patience=3, min_delta=1e-3), STACK, times=1)])
    assert fired_steps(s, len(losses), losses) == [8]


def test_plateau_cooldown_waits_before_counting_again():
    losses = [1.0] * 20
    s = Schedule([Rule(Plateau(patience=2, cooldown=3), STACK)])
    # evals 1 (best), 2, 3 (two without improvement) → fires at 3; evals 4–6 are the cooldown
    # (they only record the loss, as Keras' ReduceLROnPlateau does); 7, 8 without improvement → 8, …
    assert fired_steps(s, 20, losses) == [3, 8, 13, 18]


def test_plateau_ignores_steps_without_evaluation():
    losses = [None, 1.0, None, 1.0, None, 1.0, None, 1.0]
    s = Schedule([Rule(Plateau(patience=2), STACK)])
    assert fired_steps(s, len(losses), losses) == [6]


def test_score_trigger_targets_the_best_layer():
    scores = iter([{"fc1": 0.1, "fc2": 0.2}, {"fc1": 0.3, "fc2": 2.0}])
    s = Schedule([Rule(ScoreAbove(1.0, scores=lambda: next(scores)), [{"transform": "widen", "options": {"by": 4}}])])
    assert s.due(TrainingState(1, 10)) == []
    (event,) = s.due(TrainingState(2, 10))
    assert event.steps == [{"transform": "widen", "options": {"by": 4, "layer": "fc2"}}]
    assert "fc2 scores 2 > 1.0" in event.reason


def test_budget_stops_growth():
    s = Schedule([Rule(AtSteps((1, 2, 3, 4)), STACK)], budget_params=1000)
    sizes = {1: 100, 2: 400, 3: 1600, 4: 1600}
    assert fired_steps(s, 4, params=sizes.get) == [1, 2]
    assert s.over_budget(1600) and not s.over_budget(1000)


def test_state_dict_round_trip_resumes_where_it_stopped():
    a = Schedule([Rule(AtSteps((0.25, 0.5, 0.75)), STACK)])
    assert fired_steps(a, 40)[:1] == [10]
    b = Schedule([Rule(AtSteps((0.25, 0.5, 0.75)), STACK)])
    b.load_state_dict(a.state_dict())
    assert all(not b.due(TrainingState(step, 40)) for step in range(1, 41))  # all three already fired in a
    c = Schedule([Rule(AtSteps((0.25, 0.5, 0.75)), STACK)])
    with pytest.raises(UsageError, match="schedule state has 2 rules, this schedule 1"):
        c.load_state_dict({"memory": [{}, {}]})


def test_from_dict():
    s = schedule_from_dict({"budget_params": 10**6, "grow": [
        {"at": [0.25, 0.5], "steps": STACK},
        {"plateau": {"patience": 2}, "times": 1, "steps": [{"transform": "widen", "options": {"layer": "fc1", "by": 2}}]},
    ]})
    assert [type(r.trigger).__name__ for r in s.rules] == ["AtSteps", "Plateau"]
    assert s.budget_params == 10**6 and s.rules[1].times == 1


@pytest.mark.parametrize("data,message", [
    ({"grow": [{"steps": STACK}]}, "exactly one trigger"),
    ({"grow": [{"at": [1], "plateau": {"patience": 1}, "steps": STACK}]}, "exactly one trigger"),
    ({"grow": [{"at": [1]}]}, "non-empty 'steps'"),
    ({"grow": []}, "lists no rules"),
    ({"grow": [{"at": [1], "steps": STACK}], "when": 3}, "unknown key"),
])
def test_from_dict_errors(data, message):
    with pytest.raises(UsageError, match=message):
        schedule_from_dict(data)


# --------------------------------------------------------------------------- GradMax singular-value trigger
def _trained(hidden: int):
    import torch

    from growcli import zoo

    torch.manual_seed(0)
    model = zoo.MLP(hidden=hidden, hidden2=24)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    y = x[:, :4].argmax(1)  # needs more than 2 hidden units
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, x, y


def test_singular_value_trigger_fires_on_the_bottleneck_and_grows_it():
    from growcli.train.loop import Grower
    from growcli.train.triggers import gradmax_scores

    model, opt, x, y = _trained(hidden=2)  # fc1 is a 2-unit bottleneck
    scores = gradmax_scores(model, x, y)
    first = scores()
    assert first["fc1"] > 0.1 > first["fc2"] * 10  # the bottleneck asks for units, the wide layer does not
    rule = Rule(ScoreAbove(0.1, scores=scores), [{"transform": "widen", "options": {"by": 4}}], times=1)
    grower = Grower(model, opt, Schedule([rule]), x)
    (report,) = grower.step(1)
    assert model.fc1.out_features == 6 and grower.history[0]["steps"][0]["options"]["layer"] == "fc1"
    assert report.steps[0]["exact"] and report.steps[0]["verification"]["passed"]


def test_singular_value_trigger_stays_quiet_on_a_wide_model():
    from growcli.train.triggers import gradmax_scores

    model, _, x, y = _trained(hidden=32)
    s = Schedule([Rule(ScoreAbove(0.1, scores=gradmax_scores(model, x, y)), STACK)])
    assert s.due(TrainingState(1, 10)) == []


def test_load_schedule_from_yaml(tmp_path):
    from growcli.train.schedule import load_schedule

    f = tmp_path / "schedule.yaml"
    f.write_text("schedule:\n  budget_params: 5000\n  grow:\n    - at: [0.5]\n      steps:\n"
                 "        - {transform: widen, options: {layer: fc1, by: 4}}\n")
    s = load_schedule(f)
    assert s.budget_params == 5000 and fired_steps(s, 10) == [5]
    bad = tmp_path / "bad.yaml"
    bad.write_text("grow:\n  - at: [0.5]\n    steps: []\n")
    with pytest.raises(UsageError, match=r"bad.yaml: schedule.grow\[0\]: needs a non-empty 'steps' list"):
        load_schedule(bad)
    evil = tmp_path / "evil.yaml"
    evil.write_text("grow: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(UsageError, match="evil.yaml"):
        load_schedule(evil)
