"""Synchronous successive halving for Ray Tune: every trial waits at each rung.

ASHA (Ray's `ASHAScheduler`) promotes a trial at a rung as soon as it beats the trials that
reached that rung before it, so the first arrivals always go on. Over the dozen trials of a small
search that costs: on the 12-config benchmark grid ASHA spent 0.37 of the grid's trial-epochs, the
synchronous schedule below 0.30, both finding the grid's best (BENCHMARKS.md). The price is wall
time: trials wait at each rung, and each resumption starts a Ray Train run again.

Synchronous successive halving (Jamieson & Talwalkar, 2016; the most aggressive bracket of
HyperBand) pauses each trial at a rung until every trial has reported there, then continues the
best 1/reduction_factor and stops the rest. A paused trial gives back its Ray Train workers and
later resumes from its Train checkpoint. Ray ships no single-bracket form: `HyperBandScheduler`
spreads trials over brackets, and the first it fills runs its trials to `max_t` unstopped. This
is that scheduler held to one bracket holding every trial, with
`workflows.concurrency.RunningLimit` releasing new trials only while fewer than `max_running` run:
Tune's `max_concurrent_trials` counts paused trials too, so a rung would close on the first few
trials alone.
"""

from __future__ import annotations

import math

from ray.tune.experiment import Trial
from ray.tune.schedulers import HyperBandScheduler, TrialScheduler
from ray.tune.schedulers.hyperband import _Bracket

__all__ = ["SuccessiveHalving", "rungs"]


def rungs(max_t: int, grace_period: int, reduction_factor: int) -> list[int]:
    """Times at which trials are compared: grace_period * reduction_factor**k below max_t."""
    out, r = [], grace_period
    while r < max_t:
        out.append(r)
        r *= reduction_factor
    return out


class SuccessiveHalving(HyperBandScheduler):
    """One successive-halving bracket over `num_trials` trials.

    Args:
        time_attr: reported, increasing progress measure (here the epoch).
        max_t: the trials' full length in `time_attr` units; survivors of the last rung run to
            their natural end (their final report, after max_t, must reach Tune).
        grace_period: first rung.
        reduction_factor: keep the best ceil(n / reduction_factor) at each rung.
        num_trials: every trial of the search; no rung closes before all have been added.
        max_running: trials running at once (paused ones do not count); pair the scheduler with
            `RunningLimit` so new trials keep to it too.
    """

    def __init__(
        self,
        *,
        time_attr: str,
        max_t: int,
        grace_period: int,
        reduction_factor: int,
        num_trials: int,
        max_running: int,
        metric: str | None = None,
        mode: str | None = None,
    ):
        super().__init__(
            time_attr=time_attr,
            metric=metric,
            mode=mode,
            max_t=max_t,
            reduction_factor=reduction_factor,
            stop_last_trials=False,
        )
        self._grace_period = grace_period
        self._num_trials = num_trials
        self.max_running = max_running
        self._seen: list[Trial] = []
        self._resumed = False
        self._halvings = len(rungs(max_t, grace_period, reduction_factor))
        # HyperBand makes s_max + 1 brackets per band; one band of one bracket is plain halving.
        self._s_max_1 = 1
        self._get_r0 = lambda s: grace_period

    def _create_bracket(self, s: int) -> _Bracket:
        return _Bracket(
            time_attr=self._time_attr,
            max_trials=self._num_trials,
            init_t_attr=self._grace_period,
            max_t_attr=self._max_t_attr,
            eta=self._eta,
            s=self._halvings,
            stop_last_trials=False,
        )

    def running(self) -> int:
        """Trials running or about to start: not paused, not ended."""
        return sum(t.status in (Trial.PENDING, Trial.RUNNING) for t in self._seen)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._seen.append(trial)
        # A resumed search hands a fresh scheduler every trial, those with results first. The
        # rung decisions made before the interruption are not rebuilt: the unfinished trials
        # train to their end, which costs compute but stops no trial on a partial rung.
        if math.isfinite(trial.run_metadata.last_result_time) or trial.status in (
            Trial.TERMINATED,
            Trial.ERROR,
        ):
            self._resumed = True
        if not self._resumed:
            super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        if trial not in self._trial_info:
            return TrialScheduler.CONTINUE
        # Decisions reach a trial late: it trains on while Tune pauses or stops it, and a report
        # can arrive after its rung stopped it.
        if trial not in self._trial_info[trial][0]._live_trials:
            return TrialScheduler.STOP
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        if trial in self._trial_info:
            super().on_trial_remove(tune_controller, trial)

    def _process_bracket(self, tune_controller, bracket: _Bracket) -> str:
        # Trials arrive as RunningLimit releases them: when every trial added so far is paused at
        # the first rung, the next ones have not reached Tune yet, and must before it closes.
        if len(bracket._all_trials) < self._num_trials:
            return TrialScheduler.PAUSE
        return super()._process_bracket(tune_controller, bracket)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        # The survivors of a rung resume here, no more of them at once than max_running.
        if self.running() >= self.max_running:
            return None
        if self._resumed:
            return next((t for t in self._seen if t.status == Trial.PENDING), None)
        return super().choose_trial_to_run(tune_controller)
