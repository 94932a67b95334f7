"""Synchronous successive halving (`workflows.halving`) driven without a cluster: the scheduler's
decisions for a fake controller, and the search-spec rules that come with it."""

from __future__ import annotations

import math
import types

import pytest
from ray.tune.experiment import Trial

from workflows import tune
from workflows.halving import SuccessiveHalving, rungs
from workflows.spec import load_spec


class _Trial:
    def __init__(self, i, status=Trial.RUNNING, last_result_time=-math.inf):
        self.trial_id, self.status, self.is_saving = f"t{i}", status, False
        self.run_metadata = types.SimpleNamespace(last_result_time=last_result_time)

    def __repr__(self):
        return self.trial_id


class _Controller:
    """What the scheduler calls back: stopping a paused trial removes it, as Tune's does."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def stop_trial(self, trial):
        trial.status = Trial.TERMINATED
        self.scheduler.on_trial_remove(self, trial)


def _report(sched, ctl, trial, epoch, acc):
    action = sched.on_trial_result(ctl, trial, {"epoch": epoch, "val_robust_acc": acc})
    if action == "PAUSE":
        trial.status = Trial.PAUSED
    elif action == "STOP":
        trial.status = Trial.TERMINATED
    return action


@pytest.mark.parametrize(
    "max_t, grace, rf, expected",
    [
        (9, 1, 3, [1, 3]),
        (10, 1, 3, [1, 3, 9]),
        (9, 1, 4, [1, 4]),
        (9, 2, 2, [2, 4, 8]),
        (2, 1, 3, [1]),
        (3, 3, 2, []),
    ],
)
def test_rungs_lie_below_max_t(max_t, grace, rf, expected):
    assert rungs(max_t, grace, rf) == expected


def test_every_trial_waits_at_the_rung_and_only_the_best_third_goes_on():
    sched = SuccessiveHalving(
        time_attr="epoch",
        max_t=9,
        grace_period=1,
        reduction_factor=3,
        num_trials=9,
        max_running=9,
        metric="val_robust_acc",
        mode="max",
    )
    ctl = _Controller(sched)
    trials = [_Trial(i) for i in range(9)]
    for t in trials:
        sched.on_trial_add(ctl, t)
    acc = {t: 0.1 * i for i, t in enumerate(trials)}  # t8 best, t6 to t8 go on
    actions = [_report(sched, ctl, t, 1, acc[t]) for t in trials]
    # The first eight wait; the last arrival closes the rung and, being the best, trains on.
    assert actions == ["PAUSE"] * 8 + ["CONTINUE"]
    assert [t.status for t in trials[:6]] == [Trial.TERMINATED] * 6
    assert [t.status for t in trials[6:8]] == [Trial.PAUSED] * 2
    resumed = []
    while (t := sched.choose_trial_to_run(ctl)) is not None:
        t.status = Trial.RUNNING
        resumed.append(t)
    assert set(resumed) == set(trials[6:8])

    # Rung 3: ceil(3 / 3) = 1 survivor, which then runs to its end unpaused.
    for t in trials[6:]:
        for epoch in (2, 3):
            action = _report(sched, ctl, t, epoch, acc[t])
        assert action == ("CONTINUE" if t is trials[8] else "PAUSE")
    assert trials[6].status == Trial.TERMINATED and trials[7].status == Trial.TERMINATED
    assert _report(sched, ctl, trials[7], 4, 0.7) == "STOP"  # a report that crossed its stop
    assert all(_report(sched, ctl, trials[8], e, 0.9) == "CONTINUE" for e in range(4, 10))
    assert _report(sched, ctl, trials[8], 9, 0.9) == "CONTINUE"  # the final, post-training report


def test_a_rung_waits_for_trials_not_yet_released_and_survivors_resume_within_max_running():
    sched = SuccessiveHalving(
        time_attr="epoch",
        max_t=4,
        grace_period=1,
        reduction_factor=2,
        num_trials=4,
        max_running=1,
        metric="val_robust_acc",
        mode="max",
    )
    ctl = _Controller(sched)
    trials = [_Trial(i) for i in range(4)]
    for t in trials[:2]:
        sched.on_trial_add(ctl, t)
    # Every trial added so far has reached the rung, but two more are still to come: wait.
    assert [_report(sched, ctl, t, 1, 0.5) for t in trials[:2]] == ["PAUSE", "PAUSE"]
    assert sched.running() == 0
    for t in trials[2:]:
        sched.on_trial_add(ctl, t)
    assert _report(sched, ctl, trials[2], 1, 0.9) == "PAUSE"
    assert (
        _report(sched, ctl, trials[3], 1, 0.1) == "STOP"
    )  # closes the rung: best two are t2 and one 0.5
    survivors = [t for t in trials if t.status == Trial.PAUSED]
    assert trials[2] in survivors and len(survivors) == 2
    first = sched.choose_trial_to_run(ctl)
    first.status = Trial.PENDING
    assert sched.running() == 1 and sched.choose_trial_to_run(ctl) is None  # max_running=1


def test_a_resumed_search_trains_its_unfinished_trials_to_the_end():
    sched = SuccessiveHalving(
        time_attr="epoch",
        max_t=9,
        grace_period=1,
        reduction_factor=3,
        num_trials=4,
        max_running=1,
        metric="val_robust_acc",
        mode="max",
    )
    ctl = _Controller(sched)
    # As Tune re-adds them, most recent result first: the rung-1 survivor, a stopped trial, and
    # two trials that had not started.
    survivor = _Trial(0, Trial.PENDING, last_result_time=1e9 + 60)
    trials = [
        survivor,
        _Trial(1, Trial.TERMINATED, last_result_time=1e9),
        _Trial(2, Trial.PENDING),
        _Trial(3, Trial.PENDING),
    ]
    for t in trials:
        sched.on_trial_add(ctl, t)
    assert sched.running() == 3 and sched.choose_trial_to_run(ctl) is None  # above max_running
    assert all(_report(sched, ctl, survivor, e, 0.8) == "CONTINUE" for e in range(3, 10))
    survivor.status = Trial.TERMINATED
    sched.on_trial_complete(ctl, survivor, {})
    assert _report(sched, ctl, trials[2], 1, 0.1) == "CONTINUE"  # no rung after a resume


def test_sha_search_spec_counts_trials_and_refuses_model_based_searchers():
    base = load_spec(None).train.to_dict()
    search = tune.SearchSpec.from_dict(
        {
            "scheduler": "sha",
            "samples": 2,
            "space": {
                "eps": {"grid": [0.1, 0.2, 0.3]},
                "steps": {"grid": [1, 3]},
                "mix": {"uniform": [0.5, 1.0]},
            },
        },
        base=base,
    )
    assert search.num_trials == 12
    with pytest.raises(ValueError, match=r"scheduler: sha.*searcher: random.*searcher='optuna'"):
        tune.SearchSpec.from_dict({"scheduler": "sha", "searcher": "optuna"}, base=base)


def test_a_new_tune_trial_does_not_look_resumed():
    # Tune fills `last_result` with defaults before any report, so the scheduler dates results
    # instead.
    from ray import tune as ray_tune

    ray_tune.register_trainable("advtrain_noop", lambda config: None)
    sched = SuccessiveHalving(
        time_attr="epoch",
        max_t=9,
        grace_period=1,
        reduction_factor=3,
        num_trials=2,
        max_running=1,
        metric="val_robust_acc",
        mode="max",
    )
    trial = Trial("advtrain_noop", config={})
    assert trial.last_result  # never empty
    sched.on_trial_add(_Controller(sched), trial)
    assert not sched._resumed and trial in sched._trial_info
