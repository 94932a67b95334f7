"""A run file (YAML) in one validated object: training, threat model, search and scaling.

```yaml
train:   {model: cnn, method: pgd, eps: 0.1, steps: 3, epochs: 2, ...}   # advtrain TrainConfig
eval:    {norm: linf, eps: [0.1], suite: quick, n: 500}                   # the fixed threat model
search:  {samples: 3, scheduler: asha, space: {eps: {choice: [...]}, ...}}  # Ray Tune
scaling: {workers: 1, gpu: false, cpus_per_worker: 1}                     # Ray Train
```
Every section is optional; unknown keys anywhere are an error naming them (and the closest
known key).
Every key's type, default, range and meaning: docs/config.md, generated from the config classes
(`advtrain config --markdown`); `advtrain config --show` prints a file's effective config.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from advtrain.config import (
    MODELS,
    EvalConfig,
    ThreatModel,
    TrainConfig,
    check_fields,
    check_keys,
    field_names,
    load_yaml,
    option,
)
from workflows.storage import is_uri

__all__ = ["RunSpec", "Scaling", "eval_data", "load_spec", "locate", "with_absolute_paths"]

SECTIONS = ("train", "eval", "search", "scaling")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclasses.dataclass(frozen=True)
class Scaling:
    """Ray Train scaling: workers per run, GPUs, CPUs per worker, tolerated worker failures and
    storage outages, and how workers are placed on nodes (the `scaling` section of a run
    file)."""

    workers: int = option(
        1,
        low=1,
        high=1024,
        help="Ray Train workers per run (each trains on its own shard of "
        "the data; `--workers` overrides)",
    )
    gpu: bool = option(False, help="one GPU per worker (`--gpu` overrides)")
    cpus_per_worker: int = option(1, low=1, high=256, help="CPUs reserved for each worker")
    max_failures: int = option(
        1,
        low=0,
        high=100,
        help="worker-group restarts tolerated before the run fails, from "
        "its latest checkpoint (`--max-failures` overrides)",
    )
    storage_wait_s: float = option(
        600.0,
        low=0,
        high=86400,
        help="seconds a run waits for its storage (S3, GCS, NFS) when it stops answering; the "
        "run then continues from its latest checkpoint, or the search stops (state saved) for "
        "`--resume` if the outage lasts longer",
    )
    placement_strategy: str = option(
        "PACK",
        choices=PLACEMENT_STRATEGIES,
        help="how the workers of one run are placed on nodes (a Ray placement group strategy): "
        "`PACK` on as few nodes as possible, `SPREAD` across nodes; `STRICT_PACK` and "
        "`STRICT_SPREAD` the same, strictly",
    )

    def __post_init__(self) -> None:
        check_fields(self, "workers", "gpu", "cpus_per_worker", "max_failures", "storage_wait_s")
        strategies = PLACEMENT_STRATEGIES  # upper-case and exact, so not `check_choice`
        if self.placement_strategy not in strategies:
            raise ValueError(
                f"`placement_strategy` must be one of {', '.join(strategies)}. "
                f"Received: placement_strategy={self.placement_strategy!r}"
            )


@dataclasses.dataclass(frozen=True)
class RunSpec:
    train: TrainConfig
    eval: EvalConfig
    scaling: Scaling
    search: Mapping[str, Any]
    source: str = "<defaults>"

    @property
    def threat_model(self) -> ThreatModel:
        """The fixed threat model runs are judged under (`EvalConfig.threat_model`)."""
        return self.eval.threat_model

    def to_dict(self) -> dict[str, Any]:
        return {
            "train": self.train.to_dict(),
            "eval": self.eval.to_dict(),
            "scaling": dataclasses.asdict(self.scaling),
            "search": dict(self.search),
        }


def _section(data: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"Section `{name}` must be a mapping. Received: {name}={value!r}")
    return dict(value)


def _build(cls, values: dict[str, Any], section: str):
    check_keys(values, field_names(cls), f"Unknown key(s) in `{section}`")
    return cls(**values)


def load_spec(
    path: str | Path | None = None,
    *,
    train: Mapping[str, Any] | None = None,
    eval: Mapping[str, Any] | None = None,
    scaling: Mapping[str, Any] | None = None,
) -> RunSpec:
    """Reads a run file and applies overrides (CLI flags) on top of it, validating everything.

    Raises:
        ValueError / TypeError: an unreadable file, an unknown section or key, or a value out of
            range; the message names the key, the value and the allowed range.
    """
    data = load_yaml(path) if path is not None else {}
    check_keys(
        data,
        SECTIONS,
        f"Unknown section(s) in {str(path)!r}",
        known_label="Known sections",
        sort=False,
    )
    t = {**_section(data, "train"), **dict(train or {})}
    e = {**_section(data, "eval"), **dict(eval or {})}
    s = {**_section(data, "scaling"), **dict(scaling or {})}
    if isinstance(e.get("eps"), list):
        e["eps"] = tuple(e["eps"])
    return RunSpec(
        train=_build(TrainConfig, t, "train"),
        eval=_build(EvalConfig, e, "eval"),
        scaling=_build(Scaling, s, "scaling"),
        search=_section(data, "search"),
        source=str(path) if path is not None else "<defaults>",
    )


def _is_local_path(value: str) -> bool:
    # Built-in names, keras:NAME datasets, import paths and URIs are not files on this machine.
    return not is_uri(value) and ":" not in value and value not in ("bundled", *MODELS)


def with_absolute_paths(spec: RunSpec) -> RunSpec:
    """The spec with its data and model files made absolute, when they exist from here.

    The driver of a search works from its run folder and a local Ray's workers from Ray's own
    folders, so a path relative to where the user typed the command must be fixed first."""
    changes = {}
    for key in ("data", "model"):
        value = getattr(spec.train, key)
        if (
            _is_local_path(value)
            and not os.path.isabs(value)
            and os.path.exists(os.path.expanduser(value))
        ):
            changes[key] = os.path.abspath(os.path.expanduser(value))
    return dataclasses.replace(spec, train=spec.train.replace(**changes)) if changes else spec


def locate(value: str, origin: str | None) -> str:
    """`value` as a worker finds it: unchanged if it exists here (or is no file), else the same
    path relative to the driver's folder `origin`, rebased on this process's working folder (a
    job's working_dir is unpacked under a different root on each node)."""
    if not _is_local_path(value) or os.path.exists(value) or not origin:
        return value
    try:
        rel = os.path.relpath(value, origin)
    except ValueError:
        return value
    if rel.startswith(".."):
        return value
    moved = os.path.join(os.getcwd(), rel)
    return moved if os.path.exists(moved) else value


def eval_data(spec: RunSpec, *, include_train: bool = False):
    """The run's data (`advtrain.data.ImageData`) split as its training splits it (same
    val_size and seed); a file dataset's training split is read only with `include_train`
    (a streamed run leaves it to Ray Data)."""
    from advtrain.data import load_data

    t = spec.train
    return load_data(t.data, val_size=t.val_size, seed=t.seed, include_train=include_train)
