"""The `search` section of a run file (`SearchSpec`): what a Ray Tune search samples and how it
schedules trials, validated before any trial runs.

Kept apart from `workflows.tune` so that reading, checking and documenting a run file
(`advtrain config`) imports no Ray; `workflows.tune` re-exports every name here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from advtrain.config import (
    CERTIFIED_METHODS,
    TrainConfig,
    check_choice,
    check_fields,
    check_keys,
    did_you_mean,
    field_names,
    option,
)

__all__ = [
    "CALLBACKS",
    "DEFAULT_SPACE",
    "DISTRIBUTIONS",
    "METRIC",
    "METRICS",
    "MODE",
    "NOT_SEARCHABLE",
    "SCHEDULERS",
    "SEARCHERS",
    "SearchSpec",
]

METRIC, MODE = "val_robust_acc", "max"
# What a search may rank on: the PGD probe (an upper bound) or the certified probe (a lower
# bound, reported when the model's layers are all boundable: `advtrain.bounds`).
METRICS = ("val_robust_acc", "val_certified_acc")
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "sha", "fifo")
SEARCHERS = ("random", "optuna", "optuna-multi")
# Ray Tune's own logger callbacks (`search.callbacks`): the module each needs, and the extra
# that installs it.
CALLBACKS = {
    "tensorboard": ("tensorboardX", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}
# Searching these would change what trials are judged on, or leak the held-out data choice.
NOT_SEARCHABLE = ("data", "val_size", "probe_size", "probe_steps", "train_size")
DEFAULT_SPACE = {
    "eps": {"choice": [0.1, 0.2, 0.3]},
    "steps": {"choice": [3, 5, 10]},
    "mix": {"uniform": [0.5, 1.0]},
}


def _validate_space(
    space: Mapping[str, Any], base: Mapping[str, Any]
) -> dict[str, dict[str, list]]:
    """Checks every key and every candidate value against TrainConfig before any trial runs."""
    if not isinstance(space, Mapping) or not space:
        raise ValueError(f"`search.space` must be a non-empty mapping. Received: space={space!r}")
    searchable = [f for f in field_names(TrainConfig) if f not in NOT_SEARCHABLE]
    out = {}
    for key, dist in space.items():
        if key not in searchable:
            close = did_you_mean(key, searchable)
            hint = f"; did you mean `{close}`?" if close else "."
            raise ValueError(
                f"Unknown or unsearchable key {key!r} in `search.space`. Searchable: "
                f"{', '.join(searchable)}{hint}"
            )
        if not isinstance(dist, Mapping) or len(dist) != 1:
            raise ValueError(
                f"`search.space.{key}` must be one distribution such as {{choice: [...]}} "
                f"({', '.join(DISTRIBUTIONS)}). Received: {key}={dist!r}"
            )
        ((kind, values),) = dist.items()
        check_choice(f"search.space.{key} distribution", kind, DISTRIBUTIONS)
        if not isinstance(values, list) or not values:
            raise ValueError(
                f"`search.space.{key}.{kind}` must be a non-empty list. Received: {key}={values!r}"
            )
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not values[0] < values[1]:
                raise ValueError(
                    f"`search.space.{key}.{kind}` must be [low, high] with low < high. Received: "
                    f"{key}={values!r}"
                )
            if kind == "loguniform" and values[0] <= 0:
                raise ValueError(
                    f"`search.space.{key}.loguniform` needs low > 0. Received: {key}={values!r}"
                )
        for v in values:
            try:
                TrainConfig.from_dict({**base, key: v})
            except (TypeError, ValueError) as e:
                raise ValueError(f"search.space.{key}: {e}") from None
        out[key] = {kind: list(values)}
    return out


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """What a Ray Tune search samples and how it schedules trials (the `search` section of a run
    file).

    Each field's type, default, range and meaning is its `option` (docs/config.md).
    """

    space: Mapping[str, Any] = option(
        default_factory=lambda: dict(DEFAULT_SPACE),
        type="mapping",
        allowed=f"`train` key (not {', '.join(f'`{k}`' for k in NOT_SEARCHABLE)}) -> one "
        "distribution: " + ", ".join(f"`{{{d}: [...]}}`" for d in DISTRIBUTIONS),
        schema={
            "type": "object",
            "minProperties": 1,
            "propertyNames": {
                "enum": [k for k in field_names(TrainConfig) if k not in NOT_SEARCHABLE]
            },
            "additionalProperties": {
                "type": "object",
                "minProperties": 1,
                "maxProperties": 1,
                "propertyNames": {"enum": list(DISTRIBUTIONS)},
                "additionalProperties": {"type": "array", "minItems": 1},
            },
        },
        help="the training keys searched, each with one distribution; `uniform`, `loguniform` and "
        "`randint` take `[low, high]` (randint inclusive); every candidate is checked as a "
        "`train` value first",
    )
    samples: int = option(
        4,
        low=1,
        high=10000,
        help="trials (times the size of the grid, if any); `--samples` overrides",
    )
    scheduler: str = option(
        "asha",
        choices=SCHEDULERS,
        help="`asha` (asynchronous early stopping), `sha` (synchronous successive halving: every "
        "trial waits at each rung, fewer trial-epochs on small searches; with `searcher: random`) "
        "or `fifo` (no stopping)",
    )
    searcher: str = option(
        "random",
        choices=SEARCHERS,
        help="`random`, `optuna` (TPE) or `optuna-multi` (clean and robust accuracy both "
        "maximised; with `scheduler: fifo`)",
    )
    grace_period: int = option(1, low=1, help="epochs before ASHA or SHA may stop a trial")
    reduction_factor: int = option(2, low=2, help="ASHA's and SHA's halving rate")
    max_concurrent: int | None = option(
        None,
        low=1,
        help="trials at once; null derives it from the cluster's capacity and each trial's workers",
    )
    seed: int = option(0, low=0, help="seed of the searcher")
    metric: str = option(
        METRIC,
        choices=METRICS,
        help="what schedulers, searchers and the ranked table judge trials on: `val_robust_acc` "
        "(the PGD probe) or `val_certified_acc` (the certified probe, for `method: ibp` or "
        "`crown-ibp` searches)",
    )
    callbacks: tuple[str, ...] = option(
        (),
        type="list of strings",
        allowed=", ".join(f"`{c}`" for c in CALLBACKS),
        schema={"type": "array", "items": {"enum": list(CALLBACKS)}},
        help="Ray Tune logger callbacks: `tensorboard` (event files in each trial folder), "
        "`mlflow` (one MLflow run per trial in the experiment named as the search: params, "
        "per-epoch metrics and the final test figures) and `wandb` (project `$WANDB_PROJECT` or "
        "`advtrain`, grouped by the search's name); each needs its extra installed",
    )
    mlflow_uri: str | None = option(
        None,
        allowed="a tracking URI",
        help="the MLflow tracking URI (implies `mlflow`); null for MLflow's default "
        "(`$MLFLOW_TRACKING_URI`, else `mlflow.db` in the run folder); "
        "`--mlflow-uri` overrides",
    )

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        base: Mapping[str, Any] | None = None,
        samples: int | None = None,
        mlflow_uri: str | None = None,
    ) -> SearchSpec:
        data = dict(data or {})
        check_keys(data, field_names(cls), "Unknown key(s) in `search`")
        if samples is not None:
            data["samples"] = samples
        if mlflow_uri is not None:  # `advtrain tune --mlflow-uri`
            data["mlflow_uri"] = mlflow_uri
        spec = cls(**data)
        _check_callback_packages(spec.callbacks)
        object.__setattr__(spec, "space", _validate_space(spec.space, base or {}))
        if spec.metric == "val_certified_acc":
            # Only certified training reports the certified probe (`advtrain.training`).
            methods = (
                next(iter(spec.space["method"].values()))
                if "method" in spec.space
                else [(base or {}).get("method", TrainConfig.method)]
            )
            if not set(methods) <= set(CERTIFIED_METHODS):
                raise ValueError(
                    "`search.metric: val_certified_acc` ranks on the certified probe, which only "
                    "certified training reports: every trial's method must be one of "
                    f"{', '.join(map(repr, CERTIFIED_METHODS))}. Received: "
                    f"method={', '.join(methods)}"
                )
        return spec

    def __post_init__(self) -> None:
        check_fields(
            self,
            "samples",
            "scheduler",
            "searcher",
            "grace_period",
            "reduction_factor",
            "max_concurrent",
            "seed",
            "metric",
        )
        callbacks = self.callbacks
        if isinstance(callbacks, str) or not isinstance(callbacks, (list, tuple)):
            raise ValueError(
                f"`search.callbacks` must be a list of {', '.join(CALLBACKS)}. Received: "
                f"callbacks={callbacks!r}"
            )
        callbacks = [check_choice("search.callbacks", c, tuple(CALLBACKS)) for c in callbacks]
        if self.mlflow_uri is not None:
            if not isinstance(self.mlflow_uri, str) or not self.mlflow_uri:
                raise ValueError(
                    f"`mlflow_uri` must be a tracking URI. Received: mlflow_uri={self.mlflow_uri!r}"
                )
            callbacks.append("mlflow")
        object.__setattr__(self, "callbacks", tuple(dict.fromkeys(callbacks)))
        if self.searcher == "optuna-multi" and self.scheduler == "asha":
            raise ValueError(
                "`searcher: optuna-multi` ranks on two metrics; ASHA needs one. Use `scheduler: "
                "fifo`. Received: searcher='optuna-multi', scheduler='asha'"
            )
        if self.scheduler == "sha" and self.searcher != "random":
            raise ValueError(
                "`scheduler: sha` draws every trial before its first rung closes, so a "
                "model-based searcher would learn nothing. Use `searcher: random`. Received: "
                f"searcher={self.searcher!r}, scheduler='sha'"
            )

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
            raise ValueError(
                f"`search.callbacks: {name}` needs the {module} package: pip install "
                f"'advtrain[{extra}]'"
            )
