"""Experiment trackers after a search: the final test figures into each trial's MLflow run.

During the search Ray Tune's `MLflowLoggerCallback` (`search.callbacks: [mlflow]`, or
`advtrain tune --mlflow-uri`) opens one MLflow run per trial, tagged `trial_name`, in the
experiment named as the search, and logs the trial's params and every report (the per-epoch
validation metrics). The test split is evaluated for some trials only after the search, by the
driver (`workflows.results.collect`, for trials a scheduler stopped); `log_final` adds those
figures, for every trial, to its run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

__all__ = ["FINAL_METRICS", "log_final"]

# Each trial's final test-split figures, as `workflows.results.collect` rows hold them.
FINAL_METRICS = ("test_clean_acc", "test_robust_acc", "test_certified_acc")


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def log_final(rows: Iterable[dict[str, Any]], search, run_name: str) -> str | None:
    """Logs each row's final test figures to its trial's MLflow run (found by the `trial_name`
    tag, which ends in the trial id; the newest such run when a resumed trial has several).

    `test_flags_failed` (the sanity checks the model failed: its robust accuracy is then an
    upper bound) is logged as a metric, their count (0: none failed), and as a tag, their names.

    Returns:
        One line saying what was logged where, or `None` when the search has no MLflow callback.
        A tracking server that cannot be reached is said in that line: the results are already
        written, so it does not fail the command.
    """
    if "mlflow" not in search.callbacks:
        return None
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client = MlflowClient(tracking_uri=search.mlflow_uri)
    where = f"experiment {run_name!r} at {client.tracking_uri}"
    try:
        experiment = client.get_experiment_by_name(run_name)
        if experiment is None:
            return (
                f"MLflow: no experiment {run_name!r} at {client.tracking_uri}: final test "
                "figures not logged"
            )
        logged, missing = 0, []
        for row in rows:
            trial_id = row["trial_id"]
            runs = client.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.trial_name LIKE '%{trial_id}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if not runs:
                missing.append(trial_id)
                continue
            run = runs[0]
            # At the run's last step; a figure the trial's own last report logged is not repeated.
            logged_before = run.data.metrics
            now, step = int(time.time() * 1000), int(logged_before.get("training_iteration") or 0)
            metrics = {k: _number(row.get(k)) for k in FINAL_METRICS}
            flags = list(row.get("test_flags_failed") or [])
            metrics["test_flags_failed"] = float(len(flags))
            client.log_batch(
                run.info.run_id,
                metrics=[
                    Metric(k, v, now, step)
                    for k, v in metrics.items()
                    if v is not None and logged_before.get(k) != v
                ],
                tags=[
                    RunTag("test_flags_failed", ",".join(flags) or "none"),
                    RunTag("stopped", str(row.get("stopped"))),
                ],
            )
            logged += 1
    except Exception as e:  # noqa: BLE001 - a tracking server's failure must not fail a finished search
        first = (str(e).splitlines() or [""])[0][:200]
        return f"MLflow: final test figures not logged to {where}: {type(e).__name__}: {first}"
    gone = f"; no run for trial(s) {', '.join(missing)}" if missing else ""
    return f"MLflow: final test figures of {logged} trial(s) logged to {where}{gone}"
