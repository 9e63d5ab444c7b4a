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
