"""Trials started while fewer than a limit run, counted by the scheduler, resumed trials too.

Tune caps a search's concurrency where trials are created (a searcher's `max_concurrent`), so a
resumed search restarts every trial it brings back (interrupted ones, and errored ones with
`resume_errored`) and the searcher adds new ones beside them up to its cap. On a cluster that
holds one streamed trial's workers and its Ray Data reads, two such trials each hold a worker
CPU and neither reads a row. A scheduler sees every trial, the restored ones included (Tune adds
them to it on resume), so `RunningLimit` asks it before releasing a new one.
"""

from __future__ import annotations

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

__all__ = ["CountsRunning", "LimitedASHA", "LimitedFIFO", "RunningLimit"]


class CountsRunning:
    """A Tune scheduler mixin: counts the trials it was given that run or are about to."""

    def __init__(self, *args, max_running: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_running = max_running
        self._seen: list[Trial] = []

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._seen.append(trial)
        super().on_trial_add(tune_controller, trial)

    def running(self) -> int:
        """Trials running or about to start: not paused, not ended."""
        return sum(t.status in (Trial.PENDING, Trial.RUNNING) for t in self._seen)


class LimitedFIFO(CountsRunning, FIFOScheduler):
    """Tune's FIFO scheduler, counting for `RunningLimit`."""


class LimitedASHA(CountsRunning, ASHAScheduler):
    """Ray's ASHA, counting for `RunningLimit`."""


class RunningLimit(BasicVariantGenerator):
    """Grid and random trials, released while fewer than the scheduler's `max_running` run
    (`running()`: a `CountsRunning` scheduler, or `workflows.halving.SuccessiveHalving`)."""

    def __init__(self, scheduler, **kwargs):
        super().__init__(max_concurrent=0, **kwargs)
        self._scheduler = scheduler

    def next_trial(self):
        if self._scheduler.running() >= self._scheduler.max_running:
            return None
        return super().next_trial()

    def get_state(self):
        # Tune saves the generator's state on its own; the scheduler is rebuilt with the Tuner.
        state = super().get_state()
        if state:
            state.pop("_scheduler", None)
        return state

    def set_state(self, state) -> None:
        scheduler = self._scheduler
        super().set_state(state)
        self._scheduler = scheduler
