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
import tempfile
from pathlib import Path
from typing import Any, Mapping

from ray import tune

from advtrain.config import CERTIFIED_METHODS, TrainConfig, check_choice, check_number
from workflows import quiet, storage
from workflows.spec import RunSpec
from workflows.storage import RunFolder

__all__ = ["CALLBACKS", "METRIC", "METRICS", "MODE", "SPEC_FILE", "SearchSpec", "build_callbacks",
           "build_param_space", "per_worker", "read_spec", "run_search",
           "run_trial", "schedule_warning", "write_spec"]

log = logging.getLogger(__name__)

METRIC, MODE = "val_robust_acc", "max"
# What a search may rank on: the PGD probe (an upper bound) or the certified probe (a lower
# bound, reported when the model's layers are all boundable: `advtrain.bounds`).
METRICS = ("val_robust_acc", "val_certified_acc")
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "sha", "fifo")
SEARCHERS = ("random", "optuna", "optuna-multi")
# Ray Tune's own logger callbacks (`search.callbacks`): the module each needs, and the extra
# that installs it.
CALLBACKS = {"tensorboard": ("tensorboardX", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
             "wandb": ("wandb", "wandb")}
# Searching these would change what trials are judged on, or leak the held-out data choice.
NOT_SEARCHABLE = ("data", "val_size", "probe_size", "probe_steps", "train_size")
DEFAULT_SPACE = {
    "eps": {"choice": [0.1, 0.2, 0.3]},
    "steps": {"choice": [3, 5, 10]},
    "mix": {"uniform": [0.5, 1.0]},
}


def _validate_space(space: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, dict[str, list]]:
    """Checks every key and every candidate value against TrainConfig before any trial runs."""
    if not isinstance(space, Mapping) or not space:
        raise ValueError(f"`search.space` must be a non-empty mapping. Received: space={space!r}")
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    searchable = [f for f in fields if f not in NOT_SEARCHABLE]
    out = {}
    for key, dist in space.items():
        if key not in searchable:
            raise ValueError(f"Unknown or unsearchable key {key!r} in `search.space`. Searchable: {', '.join(searchable)}.")
        if not isinstance(dist, Mapping) or len(dist) != 1:
            raise ValueError(
                f"`search.space.{key}` must be one distribution such as {{choice: [...]}} "
                f"({', '.join(DISTRIBUTIONS)}). Received: {key}={dist!r}"
            )
        (kind, values), = dist.items()
        check_choice(f"search.space.{key} distribution", kind, DISTRIBUTIONS)
        if not isinstance(values, list) or not values:
            raise ValueError(f"`search.space.{key}.{kind}` must be a non-empty list. Received: {key}={values!r}")
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not values[0] < values[1]:
                raise ValueError(f"`search.space.{key}.{kind}` must be [low, high] with low < high. Received: {key}={values!r}")
            if kind == "loguniform" and values[0] <= 0:
                raise ValueError(f"`search.space.{key}.loguniform` needs low > 0. Received: {key}={values!r}")
        for v in values:
            try:
                TrainConfig.from_dict({**base, key: v})
            except (TypeError, ValueError) as e:
                raise ValueError(f"search.space.{key}: {e}") from None
        out[key] = {kind: list(values)}
    return out


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """The `search` section: what to sample and how to schedule it.

    Args:
        space: TrainConfig key -> one distribution (`choice`, `grid`, `uniform`, `loguniform`,
            `randint` with inclusive bounds). Defaults to eps, steps and mix.
        samples: trials (times the grid, if any), >= 1. Defaults to `4`.
        scheduler: `"asha"` (asynchronous early stopping), `"sha"` (synchronous successive
            halving: every trial waits at each rung, fewer trial-epochs on small searches; runs
            with `searcher: random`) or `"fifo"`. Defaults to `"asha"`.
        searcher: `"random"`, `"optuna"` (TPE) or `"optuna-multi"` (clean and robust accuracy
            both maximised; runs with `fifo`). Defaults to `"random"`.
        grace_period: epochs before ASHA or SHA may stop a trial, >= 1. Defaults to `1`.
        reduction_factor: their halving rate, >= 2. Defaults to `2`.
        max_concurrent: trials at once, or `None` to derive from the cluster. Defaults to `None`.
        seed: seed of the searcher. Defaults to `0`.
        metric: what schedulers, searchers and the ranked table judge trials on:
            `"val_robust_acc"` (the PGD probe) or `"val_certified_acc"` (the certified probe,
            for `method: ibp` or `crown-ibp` searches). Defaults to `"val_robust_acc"`.
        callbacks: Ray Tune logger callbacks, any of `"tensorboard"` (event files in each
            trial folder, which Tune also writes by default), `"mlflow"` (one MLflow run per
            trial in the experiment named as the search: params, per-epoch metrics, and the
            final test figures, `workflows.tracking`) and `"wandb"` (project `$WANDB_PROJECT`
            or `advtrain`, grouped by the search's name). Defaults to `()`.
        mlflow_uri: the MLflow tracking URI (implies `"mlflow"`), or `None` for MLflow's default
            (`$MLFLOW_TRACKING_URI`, else `mlflow.db` in the run folder). Defaults to `None`.
    """

    space: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(DEFAULT_SPACE))
    samples: int = 4
    scheduler: str = "asha"
    searcher: str = "random"
    grace_period: int = 1
    reduction_factor: int = 2
    max_concurrent: int | None = None
    seed: int = 0
    metric: str = METRIC
    callbacks: tuple[str, ...] = ()
    mlflow_uri: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base: Mapping[str, Any] | None = None,
                  samples: int | None = None, mlflow_uri: str | None = None) -> "SearchSpec":
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown key(s) in `search`: {', '.join(unknown)}. Known keys: {', '.join(sorted(known))}.")
        if samples is not None:
            data["samples"] = samples
        if mlflow_uri is not None:  # `advtrain tune --mlflow-uri`
            data["mlflow_uri"] = mlflow_uri
        spec = cls(**data)
        _check_callback_packages(spec.callbacks)
        object.__setattr__(spec, "space", _validate_space(spec.space, base or {}))
        if spec.metric == "val_certified_acc":
            # Only certified training reports the certified probe (`advtrain.training`).
            methods = (next(iter(spec.space["method"].values())) if "method" in spec.space
                       else [(base or {}).get("method", TrainConfig.method)])
            if not set(methods) <= set(CERTIFIED_METHODS):
                raise ValueError("`search.metric: val_certified_acc` ranks on the certified probe, which only "
                                 f"certified training reports: every trial's method must be one of "
                                 f"{', '.join(map(repr, CERTIFIED_METHODS))}. Received: method={', '.join(methods)}")
        return spec

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", check_number("samples", self.samples, low=1, high=10000, integer=True))
        object.__setattr__(self, "scheduler", check_choice("scheduler", self.scheduler, SCHEDULERS))
        object.__setattr__(self, "searcher", check_choice("searcher", self.searcher, SEARCHERS))
        object.__setattr__(self, "grace_period", check_number("grace_period", self.grace_period, low=1, integer=True))
        object.__setattr__(self, "reduction_factor",
                           check_number("reduction_factor", self.reduction_factor, low=2, integer=True))
        if self.max_concurrent is not None:
            object.__setattr__(self, "max_concurrent",
                               check_number("max_concurrent", self.max_concurrent, low=1, integer=True))
        object.__setattr__(self, "seed", check_number("seed", self.seed, low=0, integer=True))
        object.__setattr__(self, "metric", check_choice("metric", self.metric, METRICS))
        callbacks = self.callbacks
        if isinstance(callbacks, str) or not isinstance(callbacks, (list, tuple)):
            raise ValueError(f"`search.callbacks` must be a list of {', '.join(CALLBACKS)}. Received: "
                             f"callbacks={callbacks!r}")
        callbacks = [check_choice("search.callbacks", c, tuple(CALLBACKS)) for c in callbacks]
        if self.mlflow_uri is not None:
            if not isinstance(self.mlflow_uri, str) or not self.mlflow_uri:
                raise ValueError(f"`mlflow_uri` must be a tracking URI. Received: mlflow_uri={self.mlflow_uri!r}")
            callbacks.append("mlflow")
        object.__setattr__(self, "callbacks", tuple(dict.fromkeys(callbacks)))
        if self.searcher == "optuna-multi" and self.scheduler == "asha":
            raise ValueError("`searcher: optuna-multi` ranks on two metrics; ASHA needs one. Use `scheduler: fifo`. "
                             "Received: searcher='optuna-multi', scheduler='asha'")
        if self.scheduler == "sha" and self.searcher != "random":
            raise ValueError("`scheduler: sha` draws every trial before its first rung closes, so a model-based "
                             f"searcher would learn nothing. Use `searcher: random`. Received: searcher={self.searcher!r}, "
                             "scheduler='sha'")

    @property
    def num_trials(self) -> int:
        """Trials the search runs: `samples` times the size of the grid, if any."""
        return self.samples * math.prod(len(v["grid"]) for v in self.space.values() if "grid" in v)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "space": dict(self.space)}


def _check_callback_packages(callbacks) -> None:
    """Each chosen callback's package is installed, or one line says which extra installs it."""
    import importlib.util

    for name in callbacks:
        module, extra = CALLBACKS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"`search.callbacks: {name}` needs the {module} package: pip install 'advtrain[{extra}]'")


def build_callbacks(search: SearchSpec, name: str) -> list:
    """Ray Tune's logger callbacks for `search.callbacks`; `name` is the search's name (the MLflow
    experiment, the W&B group)."""
    out = []
    if "tensorboard" in search.callbacks:
        from ray.tune.logger import TBXLoggerCallback

        out.append(TBXLoggerCallback())
    if "mlflow" in search.callbacks:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"
        # Runs on the driver: a file or SQLite tracking URI is the driver's.
        out.append(MLflowLoggerCallback(tracking_uri=search.mlflow_uri, experiment_name=name))
    if "wandb" in search.callbacks:
        from ray.air.integrations.wandb import WandbLoggerCallback

        out.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT") or "advtrain", group=name))
    return out


def build_param_space(search: SearchSpec) -> dict[str, Any]:
    """Tune distributions from the validated space."""
    out = {}
    for key, dist in search.space.items():
        (kind, v), = dist.items()
        out[key] = {
            "choice": lambda: tune.choice(v),
            "grid": lambda: tune.grid_search(v),
            "uniform": lambda: tune.uniform(v[0], v[1]),
            "loguniform": lambda: tune.loguniform(v[0], v[1]),
            "randint": lambda: tune.randint(int(v[0]), int(v[1]) + 1),
        }[kind]()
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
    from workflows.train import build_trainer, read_final

    cfg = TrainConfig.from_dict({**base["train"], **_round_params(params)})
    spec = load_spec(None, train=cfg.to_dict(), eval=base["eval"], scaling=base["scaling"])
    scaling = spec.scaling
    trial_id = tune.get_context().get_trial_id()
    trainer = build_trainer(
        cfg, workers=scaling.workers, gpu=scaling.gpu, cpus_per_worker=scaling.cpus_per_worker,
        storage_path=base["train_storage"], name=f"train_{trial_id}", max_failures=scaling.max_failures,
        callbacks=[TuneReportCallback()], threat_model=spec.threat_model,
        placement_strategy=scaling.placement_strategy, origin=base["origin"],
    )
    result = trainer.fit()
    if is_import_path(cfg.model):  # registers the user's custom Keras objects before loading
        import_model_module(cfg.model, [base["origin"]])
    model_path, history, summary = read_final(result)
    model = load_model(model_path)
    # The delivered model is the restored epoch's when the overfitting guard fired.
    delivered = history[summary["restored_epoch"] - 1] if summary.get("restored_epoch") else history[-1]
    with tempfile.TemporaryDirectory() as tmp:
        test = evaluate_trial(model, spec, eval_data(spec), Path(tmp))
        final = {**delivered, "epoch": history[-1]["epoch"],
                 **{k: summary[k] for k in ("stopped_early", "stop_reason", "epochs_run")},
                 **test, "evaluated": True, "config": cfg.to_dict()}
        save_model(model, Path(tmp, "model.keras"))
        write_json(Path(tmp, "history.json"), history)
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(tmp))


def per_worker(spec: RunSpec) -> dict[str, float]:
    """The resources of one Ray Train worker of this spec's runs."""
    s = spec.scaling
    return {"CPU": float(s.cpus_per_worker), **({"GPU": 1.0} if s.gpu else {})}


def _max_concurrent(spec: RunSpec, search: SearchSpec) -> int:
    from workflows import capacity

    if search.max_concurrent is not None:
        return search.max_concurrent
    from advtrain.data import is_file_dataset

    return capacity.max_concurrent(capacity.read(), spec.scaling.workers, per_worker(spec), trials=search.num_trials,
                                   streamed=is_file_dataset(spec.train.data))


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
    return (f"{search.scheduler.upper()} compares trials first after grace_period={search.grace_period} epoch(s), "
            f"inside the one-cycle warm-up ({warmup:g} of {spec.train.epochs} epochs): early rungs rank barely-trained "
            f"models. Use `schedule: cosine`, or grace_period >= {math.ceil(warmup)}.")


def _tuner(spec: RunSpec, search: SearchSpec, folder: RunFolder, *, restore: bool, origin: str):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from workflows.halving import RunningLimit, SuccessiveHalving

    # Tune's experiment and the trials' Train runs live beside the results: under the run
    # folder, or under {storage}/{run name} (every node reaches it, and it outlives the cluster).
    tune_storage = folder.ray_location
    sha = search.scheduler == "sha"
    base = {**spec.to_dict(), "train_storage": storage.join(tune_storage, "train"), "origin": origin}
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base),
                                    {"cpu": 0, "memory": 256 * 1024 * 1024})
    if restore:
        return tune.Tuner.restore(storage.join(tune_storage, "tune"), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    multi = search.searcher == "optuna-multi"
    concurrent = _max_concurrent(spec, search)
    if sha:
        # Not max_concurrent: it counts paused trials, and successive halving pauses every trial
        # at a rung until the last has reached it.
        scheduler = SuccessiveHalving(time_attr="epoch", max_t=spec.train.epochs, grace_period=search.grace_period,
                                      reduction_factor=search.reduction_factor, num_trials=search.num_trials,
                                      max_running=concurrent)
        searcher = RunningLimit(scheduler, random_state=search.seed)
        # A trial's final report repeats its last epoch, which HyperBand logs as a restore.
        logging.getLogger("ray.tune.schedulers.hyperband").setLevel(logging.WARNING)
    else:
        # ASHA's max_t is one past the last epoch: a trial reaching max_t is stopped at once,
        # before the test-split evaluation it reports after training.
        scheduler = (ASHAScheduler(time_attr="epoch", max_t=spec.train.epochs + 1, grace_period=search.grace_period,
                                   reduction_factor=search.reduction_factor)
                     if search.scheduler == "asha" else FIFOScheduler())
        if search.searcher == "random":
            from ray.tune.search.basic_variant import BasicVariantGenerator

            # Tune ignores max_concurrent_trials for a search algorithm passed in: set it here,
            # or every trial starts at once and their Train workers time out waiting for CPUs.
            searcher = BasicVariantGenerator(random_state=search.seed, max_concurrent=concurrent)
        else:
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch(metric=["val_clean_acc", search.metric] if multi else search.metric,
                                    mode=["max", "max"] if multi else MODE, seed=search.seed)
    return tune.Tuner(
        trainable,
        param_space=build_param_space(search),
        tune_config=tune.TuneConfig(
            metric=None if multi else search.metric, mode=None if multi else MODE, num_samples=search.samples,
            scheduler=scheduler, search_alg=searcher,
            max_concurrent_trials=None if search.searcher == "random" else concurrent,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=tune_storage, verbose=0 if quiet.is_quiet() else None,
                                  callbacks=build_callbacks(search, folder.name)),
    )


def run_search(spec: RunSpec, search: SearchSpec, folder: RunFolder, *, restore: bool = False,
               origin: str | None = None):
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


def write_spec(folder: RunFolder, spec: RunSpec, search: SearchSpec, storage_base: str | None) -> None:
    """spec.json: what `--resume` and `report` read back (the run spec, the search, where it lives)."""
    from advtrain.files import write_json

    write_json(folder.local / SPEC_FILE, {"spec": spec.to_dict(), "search": search.to_dict(), "storage": storage_base,
                                          "name": folder.name, "origin": os.getcwd()})


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
