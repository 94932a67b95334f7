"""Ray Tune: search training eps, PGD steps and the clean/adversarial mix; rank by robustness.

Each trial is one Ray Train run (`workflows.train.build_trainer`) reporting per epoch, through
`TuneReportCallback`, its PGD accuracy on the validation split under the search's one fixed
threat model (`val_robust_acc`). ASHA (or synchronous successive halving, `workflows.halving`)
stops weak trials on that metric. A trial that finishes
training ends with the evaluation suite on the test split, reported as `test_*` metrics with a
checkpoint holding its model and report. The test split never steers the search.

A search's folder (`--out`, or `{storage}/{run name}` with `--storage`, see `workflows.storage`):
    spec.json                 the run spec, search spec, storage and name (what `--resume` reads)
    tune/                     Ray Tune's experiment (trial folders, state for Tuner.restore)
    train/                    Ray Train runs, one per trial
    trials.json, results.*    written by `workflows.results` when the search ends
The command bodies (`advtrain tune`, `--resume`, `report`) are in `workflows.commands`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from ray import tune

from advtrain.config import TrainConfig
from advtrain.formats import data_error_in
from workflows import outages, placement_groups, quiet, storage

# The search section's spec lives in a Ray-free module (`advtrain config` reads it); its names
# stay here too.
from workflows.search import (
    CALLBACKS,
    METRIC,
    METRICS,
    MODE,
    SearchSpec,
)
from workflows.spec import RunSpec
from workflows.storage import RunFolder

__all__ = [
    "CALLBACKS",
    "METRIC",
    "METRICS",
    "MODE",
    "SPEC_FILE",
    "SearchSpec",
    "build_callbacks",
    "build_param_space",
    "per_worker",
    "read_spec",
    "run_search",
    "run_trial",
    "schedule_warning",
    "write_spec",
]

log = logging.getLogger(__name__)


def build_callbacks(search: SearchSpec, name: str) -> list:
    """Ray Tune's logger callbacks for `search.callbacks`; `name` is the search's name (the MLflow
    experiment, the W&B group)."""
    out = []
    if "tensorboard" in search.callbacks:
        from ray.tune.logger import TBXLoggerCallback

        out.append(TBXLoggerCallback())
    if "mlflow" in search.callbacks:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        logging.getLogger("mlflow.store.db.utils").setLevel(
            logging.WARNING
        )  # "Creating initial MLflow database tables"
        # Runs on the driver: a file or SQLite tracking URI is the driver's.
        out.append(MLflowLoggerCallback(tracking_uri=search.mlflow_uri, experiment_name=name))
    if "wandb" in search.callbacks:
        from ray.air.integrations.wandb import WandbLoggerCallback

        out.append(
            WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT") or "advtrain", group=name)
        )
    return out


def build_param_space(search: SearchSpec) -> dict[str, Any]:
    """Tune distributions from the validated space."""
    out = {}
    for key, dist in search.space.items():
        ((kind, v),) = dist.items()
        match kind:
            case "choice":
                out[key] = tune.choice(v)
            case "grid":
                out[key] = tune.grid_search(v)
            case "uniform":
                out[key] = tune.uniform(v[0], v[1])
            case "loguniform":
                out[key] = tune.loguniform(v[0], v[1])
            case "randint":
                out[key] = tune.randint(int(v[0]), int(v[1]) + 1)
    return out


def _round_params(params: dict[str, Any]) -> dict[str, Any]:
    # Continuous samples are rounded to 4 digits so configs read well in tables and YAML.
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in params.items()}


def run_trial(params: dict[str, Any], base: dict[str, Any]) -> None:
    """One Tune trial: a Ray Train run, then the test-split evaluation of its final model."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from advtrain.files import write_json
    from advtrain.models import import_model_module, is_import_path, load_model, save_model
    from workflows.results import evaluate_trial
    from workflows.spec import eval_data, load_spec
    from workflows.train import build_trainer, fit_and_read

    cfg = TrainConfig.from_dict({**base["train"], **_round_params(params)})
    spec = load_spec(None, train=cfg.to_dict(), eval=base["eval"], scaling=base["scaling"])
    scaling = spec.scaling
    trial_id = tune.get_context().get_trial_id()

    def trainer():
        return build_trainer(
            cfg,
            workers=scaling.workers,
            gpu=scaling.gpu,
            cpus_per_worker=scaling.cpus_per_worker,
            storage_path=base["train_path"],
            name=f"train_{trial_id}",
            max_failures=scaling.max_failures,
            callbacks=[TuneReportCallback()],
            threat_model=spec.threat_model,
            placement_strategy=scaling.placement_strategy,
            origin=base["origin"],
        )

    # A DataError fails the trial as one line (`StopOnFatalError` reads it).
    model_path, history, summary = fit_and_read(
        trainer, location=base["train_path"], wait_s=scaling.storage_wait_s, say=print
    )
    if is_import_path(cfg.model):  # registers the user's custom Keras objects before loading
        import_model_module(cfg.model, [base["origin"]])
    model = load_model(model_path)
    # The delivered model is the restored epoch's when the overfitting guard fired.
    delivered = (
        history[summary["restored_epoch"] - 1] if summary.get("restored_epoch") else history[-1]
    )
    with tempfile.TemporaryDirectory() as tmp:
        test = evaluate_trial(model, spec, eval_data(spec), Path(tmp))
        final = {
            **delivered,
            "epoch": history[-1]["epoch"],
            **{k: summary[k] for k in ("stopped_early", "stop_reason", "epochs_run")},
            **test,
            "evaluated": True,
            "config": cfg.to_dict(),
        }
        save_model(model, Path(tmp, "model.keras"))
        write_json(Path(tmp, "history.json"), history)
        checkpoint = tune.Checkpoint.from_directory(tmp)
        outages.ride_out(
            lambda: tune.report(final, checkpoint=checkpoint),
            base["train_path"],
            wait_s=scaling.storage_wait_s,
            say=print,
        )


class StopOnFatalError(tune.Callback):
    """Ends the search as Ctrl-C does (trials stopped, state saved, `--resume` continues it) once
    a trial failed on what every other trial would fail on too (`fatal_error_in`): a bad data
    file in the split they all read, or a storage unreachable for longer than the run waits. Not
    a Tune stopper: Tune marks a stopped search's searcher finished, and the resumed search would
    start none of the trials not yet begun."""

    def __init__(self):
        self.error: str | None = None

    def __getstate__(self):
        # Saved with the search's state: a resumed search (the file fixed) starts clean.
        return {**self.__dict__, "error": None}

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.error is not None or (found := _trial_fatal_error(trial)) is None:
            return
        self.error = str(found)
        if threading.current_thread() is threading.main_thread():
            os.kill(os.getpid(), signal.SIGINT)  # Tune's own handler: the graceful stop


def fatal_error_in(error: BaseException) -> Exception | None:
    """The error behind a trial's failure that ends the search: a `DataError`, or
    `StorageUnreachable` (an outage longer than `scaling.storage_wait_s`); else `None`."""
    return data_error_in(error) or outages.outage_behind(error)


def _trial_fatal_error(trial):
    """The search-ending error behind a trial's failure, from the error Tune pickled beside it."""
    import cloudpickle

    path = trial.pickled_error_file
    if not path or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return fatal_error_in(cloudpickle.load(f))


def per_worker(spec: RunSpec) -> dict[str, float]:
    """The resources of one Ray Train worker of this spec's runs."""
    s = spec.scaling
    return {"CPU": float(s.cpus_per_worker), **({"GPU": 1.0} if s.gpu else {})}


def _max_concurrent(spec: RunSpec, search: SearchSpec) -> int:
    from workflows import capacity

    if search.max_concurrent is not None:
        return search.max_concurrent
    from advtrain.file_dataset import is_file_dataset

    return capacity.max_concurrent(
        capacity.read(),
        spec.scaling.workers,
        per_worker(spec),
        trials=search.num_trials,
        streamed=is_file_dataset(spec.train.data),
    )


def schedule_warning(spec: RunSpec, search: SearchSpec) -> str | None:
    """Says why ASHA or SHA would rank barely-trained models, or `None` when it will not.

    Both first compare trials after `grace_period` epochs; one-cycle spends the first
    `ONECYCLE_WARMUP` of the run raising the learning rate from zero, so a rung inside the warm-up
    compares models that have hardly trained and stops good configs on noise (measured in
    BENCHMARKS.md, "ASHA against the full grid").
    """
    from advtrain.training import ONECYCLE_WARMUP

    if search.scheduler not in ("asha", "sha") or spec.train.schedule != "onecycle":
        return None
    warmup = ONECYCLE_WARMUP * spec.train.epochs
    if search.grace_period >= warmup:
        return None
    return (
        f"{search.scheduler.upper()} compares trials first after "
        f"grace_period={search.grace_period} epoch(s), inside the one-cycle warm-up ({warmup:g} of "
        f"{spec.train.epochs} epochs): early rungs rank barely-trained models. Use `schedule: "
        f"cosine`, or grace_period >= {math.ceil(warmup)}."
    )


def _scheduler_and_searcher(spec: RunSpec, search: SearchSpec, concurrent: int):
    """The search's Tune scheduler and search algorithm, both bounded by `concurrent`."""
    from workflows.concurrency import LimitedASHA, LimitedFIFO, RunningLimit
    from workflows.halving import SuccessiveHalving

    multi = search.searcher == "optuna-multi"
    if search.scheduler == "sha":
        # Not max_concurrent: it counts paused trials, and successive halving pauses every trial
        # at a rung until the last has reached it.
        scheduler = SuccessiveHalving(
            time_attr="epoch",
            max_t=spec.train.epochs,
            grace_period=search.grace_period,
            reduction_factor=search.reduction_factor,
            num_trials=search.num_trials,
            max_running=concurrent,
        )
        searcher = RunningLimit(scheduler, random_state=search.seed)
        # A trial's final report repeats its last epoch, which HyperBand logs as a restore.
        logging.getLogger("ray.tune.schedulers.hyperband").setLevel(logging.WARNING)
    else:
        # ASHA's max_t is one past the last epoch: a trial reaching max_t is stopped at once,
        # before the test-split evaluation it reports after training.
        scheduler = (
            LimitedASHA(
                max_running=concurrent,
                time_attr="epoch",
                max_t=spec.train.epochs + 1,
                grace_period=search.grace_period,
                reduction_factor=search.reduction_factor,
            )
            if search.scheduler == "asha"
            else LimitedFIFO(max_running=concurrent)
        )
        if search.searcher == "random":
            # Tune ignores max_concurrent_trials for a search algorithm passed in: the limit is
            # here, or every trial starts at once and their Train workers time out waiting for
            # CPUs; counted by the scheduler, so a resumed search keeps to it too.
            searcher = RunningLimit(scheduler, random_state=search.seed)
        else:
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch(
                metric=["val_clean_acc", search.metric] if multi else search.metric,
                mode=["max", "max"] if multi else MODE,
                seed=search.seed,
            )
    return scheduler, searcher


def _tuner(spec: RunSpec, search: SearchSpec, folder: RunFolder, *, restore: bool, origin: str):
    # Tune's experiment and the trials' Train runs live beside the results: under the run
    # folder, or under {storage}/{run name} (every node reaches it, and it outlives the cluster).
    location = folder.location
    base = {
        **spec.to_dict(),
        "train_path": storage.join(location, "train"),
        "origin": origin,
    }
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base), {"cpu": 0, "memory": 256 * 1024 * 1024}
    )
    if restore:
        return tune.Tuner.restore(
            storage.join(location, "tune"),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
        )
    multi = search.searcher == "optuna-multi"
    concurrent = _max_concurrent(spec, search)
    scheduler, searcher = _scheduler_and_searcher(spec, search, concurrent)
    return tune.Tuner(
        trainable,
        param_space=build_param_space(search),
        tune_config=tune.TuneConfig(
            metric=None if multi else search.metric,
            mode=None if multi else MODE,
            num_samples=search.samples,
            scheduler=scheduler,
            search_alg=searcher,
            max_concurrent_trials=None if search.searcher == "random" else concurrent,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=location,
            verbose=0 if quiet.is_quiet() else None,
            # Each trial's Train placement group goes when its trial ends, not when the search does.
            callbacks=[
                *build_callbacks(search, folder.name),
                placement_groups.ReleaseEndedTrials(),
                StopOnFatalError(),
            ],
        ),
    )


def run_search(
    spec: RunSpec,
    search: SearchSpec,
    folder: RunFolder,
    *,
    restore: bool = False,
    origin: str | None = None,
):
    """Runs (or resumes) the search on the connected Ray cluster.

    `origin` is the folder the search was started from (imported models are found there);
    defaults to the working folder.

    Returns:
        (ResultGrid, interrupted): Tune ends gracefully on Ctrl-C, saving its state, and returns
        a partial grid; `interrupted` says so.

    The caller checks first that the cluster can hold one trial's workers
    (`workflows.capacity.check`).
    """
    import os
    import signal
    import threading

    tuner = _tuner(spec, search, folder, restore=restore, origin=origin or os.getcwd())
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit(), False

    def sentinel(signum, frame):
        raise KeyboardInterrupt

    def on_term(signum, frame):
        # `ray job stop`, a pod deletion, a preempted head: stop as on Ctrl-C, so Tune saves the
        # search's state to storage and `--resume` continues it.
        os.kill(os.getpid(), signal.SIGINT)

    # Tune swaps in its own SIGINT handler and puts the previous one back only when a SIGINT
    # arrives: finding our sentinel installed afterwards means the search was interrupted.
    previous = signal.signal(signal.SIGINT, sentinel)
    previous_term = signal.signal(signal.SIGTERM, on_term)
    try:
        grid = tuner.fit()
    finally:
        interrupted = signal.getsignal(signal.SIGINT) is sentinel
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
    return grid, interrupted


SPEC_FILE = "spec.json"


def write_spec(folder: RunFolder, spec: RunSpec, search: SearchSpec) -> None:
    """spec.json: what `--resume` reads back (the run spec, the search, and `location`: the
    run's place in storage, `folder.remote`, or null when the local folder is the run)."""
    from advtrain.files import write_json

    write_json(
        folder.local / SPEC_FILE,
        {
            "spec": spec.to_dict(),
            "search": search.to_dict(),
            "location": folder.remote,
            "origin": os.getcwd(),
        },
    )


def read_spec(local_dir: Path) -> tuple[RunSpec, SearchSpec, dict[str, Any]]:
    """Reads spec.json back: (run spec, search spec, the whole file).

    Raises:
        ValueError: `local_dir` holds no spec.json.
    """
    from workflows.spec import load_spec

    path = Path(local_dir) / SPEC_FILE
    if not path.is_file():
        raise ValueError(f"{str(local_dir)!r} is not an advtrain tune folder (no {SPEC_FILE})")
    d = json.loads(path.read_text())
    s = d["spec"]
    spec = load_spec(None, train=s["train"], eval=s["eval"], scaling=s["scaling"])
    spec = dataclasses.replace(spec, search=s["search"])
    return spec, SearchSpec.from_dict(d["search"], base=s["train"]), d
