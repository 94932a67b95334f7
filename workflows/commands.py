"""What each `advtrain` command does, top to bottom: train, tune (and --resume), report,
evaluate, attack, cluster. `workflows.cli` parses the arguments and turns errors into exit
statuses; these functions take validated input and return the exit status.

Every command that writes results writes a `workflows.storage.RunFolder`: the local folder
(`--out`), or `{storage}/{run name}` with `--storage`, staged locally and published through
`pyarrow.fs` as each stage ends.

`advtrain certify` writes `report.json` (schema `advtrain.certify_report/1`: per eps and bound
method, the certified accuracy and the per-example mask) into `--out` or `certify-<model>/`.

The run folder of `advtrain train`:
    config.json   the validated run spec (train, eval, scaling)
    metrics.json  per-epoch metrics and the summary (epochs run, early stop, restored epoch)
    model.keras   the trained model (best epoch restored if the overfitting guard fired)
    report.json / report.md / accuracy_vs_eps.png / examples.png   the final evaluation
    tensorboard/  per-epoch scalars (TensorBoard event files), with --local
    ray/          Ray Train's run (checkpoints), unless trained with --local
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from advtrain.config import AttackConfig, EvalConfig, check_number
from advtrain.formats import DataError
from advtrain.keras_file import check_keras_file, input_shape, output_classes, shape_text
from workflows import outages, quiet, storage
from workflows.spec import RunSpec, Scaling
from workflows.storage import RunFolder

__all__ = [
    "attack",
    "certify",
    "cluster",
    "evaluate",
    "report",
    "resume",
    "train",
    "tune",
    "write_evaluation",
]


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _epoch_line(m: dict) -> str:
    # Certified training's probe: the proven share of the probe batch, beside the attacked one at
    # the same (threat-model) eps. val PGD is at the training eps, which may exceed it.
    certified = (
        f"val certified {m['val_certified_acc']:.3f} <= robust {m['val_robust_acc']:.3f}  "
        if "val_certified_acc" in m
        else ""
    )
    return (
        f"epoch {m['epoch']}: loss {m['train_loss']:.3f}  train adv acc {m['train_adv_acc']:.3f}  "
        f"val clean {m['val_clean_acc']:.3f}  val FGSM {m['val_fgsm_acc']:.3f}  val PGD "
        f"{m['val_pgd_acc']:.3f}  {certified}eps {m['eps']:.3f}  {m['examples_per_second']:.0f} "
        f"ex/s  {m['epoch_seconds']:.1f}s"
    )


class _AttackProgress:
    """One tqdm bar per attack on stderr: the attack, examples done of those left to attack
    (the still-robust ones), and the elapsed time."""

    def __init__(self) -> None:
        self.bar = None
        self.label = None

    def __call__(self, label: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if label != self.label:
            self.close()
            self.label = label
            self.bar = tqdm(
                total=total,
                desc=label,
                unit="ex",
                leave=False,
                file=sys.stderr,
                disable=quiet.is_quiet(),
            )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = self.label = None


def write_evaluation(model, cfg: EvalConfig, out: Path, data) -> dict:
    """Evaluates `model` under `cfg` on its split of `data` and writes report.json/.md and plots
    into `out`."""
    from advtrain import attacks, evaluation, report

    progress = _AttackProgress()
    try:
        rep = evaluation.evaluate_split(model, cfg, data, progress=progress)
    finally:
        progress.close()
    rep.write(out)
    d = rep.to_dict()
    report.plot_accuracy_vs_eps(d, out / "accuracy_vs_eps.png")
    x, y = data.split(cfg.split)
    k = min(16, len(x), cfg.n or len(x))
    x_adv = attacks.run_attack(
        "pgd", model, x[:k], y[:k], eps=cfg.threat_model.eps, norm=cfg.norm, steps=40, batch_size=k
    )
    report.plot_adversarial_grid(
        x[:k],
        x_adv,
        y[:k],
        np.argmax(model(x[:k]), -1),
        np.argmax(model(x_adv), -1),
        out / "examples.png",
        n=k,
    )
    return d


def _print_report_summary(d: dict) -> None:
    from advtrain.robustness_report import summary_lines

    for line in summary_lines(d):
        _say(line)


def _published(folder: RunFolder, wait_s: float = Scaling().storage_wait_s) -> None:
    copied = outages.ride_out(folder.publish, folder.location, wait_s=wait_s, say=_say)
    if folder.remote:
        _say(f"Stored {len(copied)} file(s) in {folder.remote}")


def check_run(spec: RunSpec, *, include_train: bool, certified: bool = False):
    """Before any training: the data loads, every eps fits its image space and the model takes
    its images and outputs one logit per class; for certified training (or when `certified`:
    a search that samples it), every layer of the model is one the bounds cover.
    Returns the loaded `advtrain.data.ImageData` (without a streamed file dataset's training
    split unless `include_train`).

    Raises:
        advtrain.data.DataError, advtrain.models.ModelError, ValueError: one line each.
    """
    from advtrain.config import CERTIFIED_METHODS, MODELS, check_eps_fits
    from workflows.spec import eval_data

    t = spec.train
    keras_config = check_keras_file(t.model) if t.model.endswith(".keras") else None
    data = eval_data(spec, include_train=include_train)
    if keras_config is not None:
        _check_fits(t.model, keras_config, data)
    shape = data.input_shape
    check_eps_fits("eps", t.eps, t.norm, shape)
    for eps in spec.eval.eps:
        check_eps_fits("eval.eps", eps, spec.eval.norm, shape)
    certified = certified or t.method in CERTIFIED_METHODS
    if t.model not in MODELS or certified:
        from advtrain.models import make_model

        model, notes = make_model(t.model, input_shape=shape, num_classes=data.num_classes)
        for note in notes:  # e.g. the final softmax removed: said once, by the driver
            _say(f"model {t.model}: {note}")
        if certified:
            from advtrain.bounds import check_supported

            check_supported(model)
    return data


def _connect_and_check(spec: RunSpec, address: str | None) -> None:
    """Joins (or starts) Ray, then fails at once if the cluster can never hold one run's workers;
    on an autoscaling cluster whose nodes are not up yet, says what the run waits for."""
    from advtrain.file_dataset import is_file_dataset
    from workflows import capacity
    from workflows.connect import connect
    from workflows.tune import per_worker

    # Every worker process (remote nodes' too, which do not inherit this environment) keeps
    # TensorFlow's start-up lines off the driver's terminal unless -v; Ray's own INFO lines
    # ("Connecting to existing Ray cluster at ...") likewise.
    verbose = os.environ.get(quiet.VERBOSE_ENV, "0")
    connect(
        address,
        logging_level=logging.INFO if verbose == "1" else logging.WARNING,
        runtime_env={
            "worker_process_setup_hook": "workflows.quiet.worker_setup",
            "env_vars": {quiet.VERBOSE_ENV: verbose},
        },
    )
    cap = capacity.read()
    waiting = capacity.check(cap, spec.scaling.workers, per_worker(spec))
    if is_file_dataset(spec.train.data):
        capacity.check_stream(cap, spec.scaling.workers, per_worker(spec))
    if waiting:
        _say(f"advtrain: {waiting}")


def _release_placement_groups() -> None:
    """Frees what Ray left reserved for this driver's stopped trials (see
    `workflows.placement_groups`), saying so: the run's trials and trainers have all ended."""
    from workflows import placement_groups

    released = placement_groups.release_own()
    if released:
        _say(
            f"advtrain: released {len(released)} placement group(s) Ray left reserved after the "
            f"run's trials ended: {'; '.join(released)}"
        )


# --------------------------------------------------------------------------- train


def train(spec: RunSpec, folder: RunFolder, *, local: bool, address: str | None) -> int:
    """`advtrain train`: trains (locally or on Ray Train), saves the run folder, evaluates."""
    # Before TensorFlow loads: a data error is one clean line.
    data = check_run(spec, include_train=local)
    from advtrain.training import save_run

    t0 = time.perf_counter()
    if local:
        model, history, summary = _train_here(spec, folder)
    else:
        model, history, summary = _train_on_ray(spec, folder, address)
    summary = {
        **summary,
        "train_seconds": time.perf_counter() - t0,
        "mode": "local" if local else "ray",
        "workers": 1 if local else spec.scaling.workers,
    }
    save_run(folder.local, model, spec, history, summary)
    if summary.get("stopped_early"):
        _say(
            f"WARNING: {summary['stop_reason']}: stopped after epoch {summary['epochs_run']}, "
            f"restored epoch {summary['restored_epoch']}"
        )
    _say(_evaluate_plan(spec.eval, flags=False)(data))
    d = write_evaluation(model, spec.eval, folder.local, data)
    _print_report_summary(d)
    _published(folder)
    _say(f"Run folder: {folder}")
    return 0


def _train_here(spec: RunSpec, folder: RunFolder):
    """`train --local`: `fit` in this process, a progress bar per epoch, an epoch line and
    TensorBoard scalars (`tensorboard --logdir <run folder>`) after each."""
    from tqdm import tqdm

    from advtrain.summaries import EpochSummaries
    from advtrain.training import fit

    bars: dict[int, tqdm] = {}

    def progress(epoch: int, step: int) -> None:
        bar = bars.get(epoch)
        if bar is None:
            bar = bars[epoch] = tqdm(
                total=None,
                desc=f"epoch {epoch + 1}/{spec.train.epochs}",
                unit="step",
                leave=False,
                file=sys.stderr,
                disable=quiet.is_quiet(),
            )
        bar.update(1)

    summaries = EpochSummaries(folder.local / "tensorboard")

    def on_epoch(m: dict) -> None:
        bar = bars.pop(m["epoch"] - 1, None)
        if bar is not None:
            bar.close()
        _say(_epoch_line(m))
        summaries(m)

    try:
        return fit(spec.train, on_epoch=on_epoch, progress=progress, threat_model=spec.threat_model)
    finally:
        summaries.close()


def _train_on_ray(spec: RunSpec, folder: RunFolder, address: str | None):
    """`train` on Ray Train: the run's Train folder under the run's location, the final
    checkpoint's model loaded back, the epoch lines printed after."""
    from advtrain.models import load_model
    from workflows.train import build_trainer, fit_and_read

    _connect_and_check(spec, address)
    s = spec.scaling
    ray_path = storage.join(folder.location, "ray")
    _say(f"Ray Train: {s.workers} worker(s), gpu={s.gpu}, storage {ray_path}")

    def trainer():
        return build_trainer(
            spec.train,
            workers=s.workers,
            gpu=s.gpu,
            cpus_per_worker=s.cpus_per_worker,
            max_failures=s.max_failures,
            storage_path=ray_path,
            name=folder.name,
            threat_model=spec.threat_model,
            placement_strategy=s.placement_strategy,
        )

    try:
        model_path, history, summary = fit_and_read(
            trainer, location=ray_path, wait_s=s.storage_wait_s, say=_say
        )
    finally:
        _release_placement_groups()
    for m in history:
        _say(_epoch_line(m))
    return load_model(model_path), history, summary


# --------------------------------------------------------------------------- tune


def tune(spec: RunSpec, search, folder: RunFolder, *, address: str | None) -> int:
    """`advtrain tune --config FILE`: writes spec.json, runs the search, writes the results."""
    from workflows.tune import schedule_warning, write_spec

    if warning := schedule_warning(spec, search):
        _say(f"warning: {warning}")
    from advtrain.config import CERTIFIED_METHODS

    methods = next(iter(search.space["method"].values())) if "method" in search.space else []
    data = check_run(
        spec, include_train=False, certified=any(m in CERTIFIED_METHODS for m in methods)
    )
    _check_search_eps(spec, search, data.input_shape)
    _connect_and_check(spec, address)
    folder.local.mkdir(parents=True, exist_ok=True)
    write_spec(folder, spec, search)
    folder.publish()
    for line in _tune_plan(spec, search, folder, data):
        _say(line)
    return _search_and_finish(spec, search, folder, restore=False)


def _tune_plan(spec: RunSpec, search, folder: RunFolder, data) -> list[str]:
    """What the search will do before it spends minutes, and which of it is a default the
    config did not choose."""
    from advtrain.config import load_yaml
    from advtrain.suites import describe_suite

    given = set(load_yaml(spec.source)) if spec.source != "<defaults>" else set()
    e = spec.eval
    n = e.n if e.n is not None else len(data.split(e.split)[1])
    staged = f" (staged in {folder.local})" if folder.remote else ""
    lines = [
        (
            f"Tune: {search.num_trials} trial(s), {search.scheduler} scheduler, {search.searcher} "
            f"searcher, {spec.train.epochs} epoch(s) each; folder {folder}{staged}"
        ),
        (
            f"Each trial judged at {e.norm} eps {spec.threat_model.eps:g} by the {e.suite} suite "
            f"({describe_suite(e.suite)}) on {n} {e.split} images; reported at eps "
            f"{', '.join(f'{v:g}' for v in e.eps)}"
        ),
    ]
    defaults = [name for name in ("search", "eval") if name not in given]
    if defaults:
        lines.append(
            f"note: {' and '.join(f'`{d}`' for d in defaults)} not in {spec.source}: using the "
            "defaults (`advtrain config --show` prints them; set eval.suite quick and eval.n 1000 "
            "for a quicker judge)"
        )
    return lines


def resume(location: str, *, address: str | None, storage: str | None) -> int:
    """`advtrain tune --resume DIR|URI`: Tuner.restore; finished trials are not run again.

    A URI is the search's own location in storage: its spec is read from there, and Tune
    restores from there, so the folder the search started in (on a head node that may be gone)
    is not needed. A local folder names its location in its spec.json (`location`), written
    when the search started; `storage` (--storage) may only repeat it.

    Raises:
        ValueError: `storage` puts the search somewhere other than where it was started.
    """
    from workflows.storage import is_uri
    from workflows.storage import join as storage_join
    from workflows.tune import read_spec

    if is_uri(location):
        folder = RunFolder.open(location)
        spec, search, saved = read_spec(folder.local)
    else:
        spec, search, saved = read_spec(Path(location))
        folder = RunFolder(Path(location), saved.get("location"))
    if storage is not None and storage_join(storage, folder.name) != folder.location:
        raise ValueError(
            f"--storage {storage!r} puts the search at {storage_join(storage, folder.name)!r}, "
            f"but it was started at {folder.location!r}; drop --storage (or unset "
            "ADVTRAIN_STORAGE) to resume it where it is"
        )
    _connect_and_check(spec, address)
    return _search_and_finish(spec, search, folder, restore=True, origin=saved.get("origin"))


def _check_search_eps(spec: RunSpec, search, input_shape) -> None:
    """Every eps the search may sample fits the data's images (an l2 radius beyond their
    diameter would fail only inside its trial): the listed values, or a range's bounds."""
    from advtrain.config import check_eps_fits

    if "eps" not in search.space:
        return
    ((_kind, values),) = search.space["eps"].items()
    norms = (
        next(iter(search.space["norm"].values())) if "norm" in search.space else [spec.train.norm]
    )
    for norm in norms:
        for eps in values:
            check_eps_fits("search.space.eps", eps, norm, input_shape)


def _search_and_finish(
    spec: RunSpec, search, folder: RunFolder, *, restore: bool, origin: str | None = None
) -> int:
    from workflows import results  # noqa: F401 - imported before the chdir below
    from workflows.spec import eval_data
    from workflows.tune import run_search

    origin = origin or os.getcwd()
    # Inside `ray job submit --working-dir`, the driver's working directory is Ray's unpacked
    # package, which Ray may garbage-collect while a long search runs (seen with Ray 2.60: Tune
    # then fails in os.getcwd()). Everything after this point uses absolute paths, the modules
    # the results stage needs are imported above, and the driver works from the run folder.
    folder = dataclasses.replace(folder, local=folder.local.resolve())
    os.chdir(folder.local)
    eval_data(spec)  # parsed once per process: the results stage reuses it
    grid = None
    try:
        grid, interrupted = run_search(spec, search, folder, restore=restore, origin=origin)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        _release_placement_groups()
    # A trial's bad data file, or its storage gone longer than it waits, ends the search as an
    # interrupt does (`workflows.tune.StopOnFatalError`).
    if grid is not None and (fatal := _trials_fatal_error(grid)) is not None:
        if isinstance(fatal, DataError):
            folder.publish()
            raise DataError(
                f"{fatal}; the search stopped (state saved): fix the file, then continue with: "
                f"advtrain tune --resume {folder}"
            )
        raise outages.StorageUnreachable(
            f"{fatal}; the search stopped: once the storage answers, continue with: advtrain "
            f"tune --resume {folder} (trials that ended after its last saved state run again)"
        )
    if interrupted:
        folder.publish()
        _say(
            "advtrain: search interrupted (state saved); continue with: advtrain tune --resume "
            f"{folder}"
        )
        return 130
    return _finish(spec, grid, folder, search)


def _trials_fatal_error(grid):
    """The error a trial of the search failed on that ends it (`workflows.tune.fatal_error_in`),
    or `None`."""
    from workflows.tune import fatal_error_in

    return next((d for e in grid.errors if (d := fatal_error_in(e)) is not None), None)


def _finish(spec: RunSpec, grid, folder: RunFolder, search=None) -> int:
    from workflows import results

    filesystem, _ = storage.filesystem(folder.location)
    rows = results.collect(grid, folder.local, spec, filesystem=filesystem)
    if search is not None:
        from workflows import tracking

        if line := tracking.log_final(
            rows, search, folder.name
        ):  # the test figures, in each trial's MLflow run
            _say(line)
    lines = results.write_all(folder.local)
    for line in lines:
        _say(line)
    _published(folder, spec.scaling.storage_wait_s)
    failed = [r for r in rows if r["stopped"] == "error"]
    if failed:
        _say(
            f"advtrain: {len(failed)} of {len(rows)} trial(s) failed; first: "
            f"{failed[0]['trial_id']}: {failed[0]['error']}"
        )
        return 1
    return 0


def report(location: str) -> int:
    """`advtrain report DIR|URI`: rebuilds tables, plots and the report from the folder alone."""
    folder = RunFolder.open(location)
    if not (
        folder.local / "trials.json"
    ).is_file():  # before Ray and TensorFlow load: one quick line
        raise ValueError(f"{location!r} holds no trials.json: not a finished advtrain tune folder")
    from workflows import render  # the folder alone: no Ray

    for line in render.write_all(folder.local):
        _say(line)
    _published(folder)
    return 0


# --------------------------------------------------------------------------- evaluate, attack


def evaluate(
    model_location: str,
    cfg: EvalConfig,
    out: str | None,
    data_source: str = "bundled",
    *,
    overwrite: bool = False,
) -> int:
    """`advtrain evaluate MODEL`: loads with safe_mode, evaluates, writes the report folder.

    `MODEL` and `--out` may be local paths or storage URIs; without `--out` the report goes
    beside the model (`eval-<model name>`). `data_source` is any `advtrain.data.load_data`
    source; the model must take its images and output one logit per class. An earlier report
    in the folder is kept unless `overwrite`."""
    name, model_path = _model_file(model_location)
    folder = _folder_beside(model_location, model_path, out, "eval")
    earlier = storage.join(str(folder), "report.json")
    if not overwrite and storage.exists(earlier):
        raise ValueError(
            f"{earlier} exists (an earlier evaluation): pass --overwrite to replace it, or another "
            "--out"
        )
    data, model = _load_model_and_data(
        name, model_path, cfg, data_source, announce=_evaluate_plan(cfg)
    )
    d = write_evaluation(model, cfg, folder.local, data)
    _print_report_summary(d)
    _published(folder)
    _say(f"Report: {storage.join(str(folder), 'report.md')}")
    return 0


def _evaluate_plan(cfg: EvalConfig, *, flags: bool = True):
    """What an evaluation is about to spend its minutes on, and (with `flags`, for `evaluate`)
    the flags that spend fewer."""
    from advtrain.suites import describe_suite

    def plan(data) -> str:
        n = len(data.split(cfg.split)[1]) if cfg.n is None else cfg.n
        eps = ", ".join(f"{e:g}" for e in cfg.eps)
        bounds = f"; certify {', '.join(cfg.certify)}" if cfg.certify else ""
        quicker = []
        if flags and cfg.suite == "standard":
            quicker.append("--suite quick (PGD-20)")
        if flags and n > 1000:
            quicker.append("--n 1000")
        hint = f" (quicker: {' or '.join(quicker)})" if quicker else ""
        attacks = describe_suite(cfg.suite)
        attacks = f" ({attacks})" if attacks != cfg.suite else ""
        return (
            f"Evaluating: {cfg.suite} suite{attacks} at {cfg.norm} eps {eps}, on {n} "
            f"{cfg.split} images{bounds}{hint}"
        )

    return plan


def _model_file(model_location: str) -> tuple[str, Path]:
    """The model's file name and a local path to it (fetched from storage for a URI), checked
    to be a Keras archive before TensorFlow loads."""
    name = storage.basename(model_location)
    if not name.endswith(".keras"):
        raise ValueError(f"model must be a .keras file. Received: {model_location!r}")
    if storage.is_uri(model_location):
        model_path = storage.fetch_file(
            model_location, Path(tempfile.mkdtemp(prefix="advtrain-model-"))
        )
    else:
        model_path = Path(model_location)
    check_keras_file(model_path)
    return name, model_path


def _folder_beside(
    model_location: str, model_path: Path, out: str | None, prefix: str
) -> RunFolder:
    """`--out`, or `<prefix>-<model name>` beside the model; staged locally for a URI."""
    stem = storage.basename(model_location)[: -len(".keras")]
    target = out or (
        storage.join(storage.parent(model_location), f"{prefix}-{stem}")
        if storage.is_uri(model_location)
        else str(model_path.parent / f"{prefix}-{stem}")
    )
    return (
        RunFolder(Path(tempfile.mkdtemp(prefix=f"advtrain-{prefix}-")), target)
        if storage.is_uri(target)
        else RunFolder(Path(target))
    )


def _load_model_and_data(
    name: str, model_path: Path, cfg: EvalConfig, data_source: str, *, announce=None
):
    """The data (every eps checked against its images) and the model (which must take them and
    output one logit per class: read from the file's config before TensorFlow loads, and from
    the loaded model where the config does not say). `announce(data)`, when given, is said once
    every check has passed."""
    from advtrain.config import check_eps_fits
    from advtrain.data import load_data

    data = load_data(data_source, val_size=None, include_train=False)
    for eps in cfg.eps:
        check_eps_fits("eps", eps, cfg.norm, data.input_shape)
    _check_fits(name, check_keras_file(model_path), data)
    from advtrain.models import check_input, load_model  # TensorFlow loads here

    model = load_model(model_path)
    check_input(model, name, data.input_shape)
    try:
        width = model.output_shape[-1]
    except (AttributeError, ValueError, TypeError):  # a subclassed model: no static output shape
        width = None
    _check_classes(name, width, data)
    if announce is not None:  # every check passed: what the minutes ahead are spent on
        _say(announce(data))
    return data, model


def _check_fits(name: str, config: dict, data) -> None:
    """The model's input and output, as its `.keras` config states them, against the data's
    images and classes: before TensorFlow loads (the loaded model is checked again after)."""
    want = input_shape(config)
    shape = tuple(data.input_shape)
    if want is not None and (
        len(want) != len(shape) or any(w is not None and w != d for w, d in zip(want, shape))
    ):
        raise ValueError(
            f"model {name!r} expects inputs {shape_text(want)} but the data's images are "
            f"{shape_text(shape)}"
        )
    _check_classes(name, output_classes(config), data)


def _check_classes(name: str, width: int | None, data) -> None:
    if width is not None and width != data.num_classes:
        raise ValueError(
            f"model {name!r} outputs {width} logits but the data ({data.source}) has "
            f"{data.num_classes} classes: expected one logit per class"
        )


def _attacked_reports(model_location: str):
    """`advtrain evaluate` reports beside the model, as (location, dict): in its run folder
    (`report.json`, as `advtrain train` leaves it) and in evaluate's default folder
    (`eval-<model name>/`)."""
    import json

    stem = storage.basename(model_location)[: -len(".keras")]
    if storage.is_uri(model_location):
        base = storage.parent(model_location)
        places = [
            storage.join(base, "report.json"),
            storage.join(base, f"eval-{stem}", "report.json"),
        ]
    else:
        base = Path(model_location).parent
        places = [str(base / "report.json"), str(base / f"eval-{stem}" / "report.json")]
    for location in places:
        if not storage.exists(location):
            continue
        local = (
            storage.fetch_file(location, Path(tempfile.mkdtemp(prefix="advtrain-report-")))
            if storage.is_uri(location)
            else Path(location)
        )
        try:
            yield location, json.loads(local.read_text())
        except (OSError, ValueError):
            continue  # not a report: no attacked figure from it


def _check_not_overwriting(path: Path) -> None:
    """Refuses to replace a report.json that `advtrain certify` did not write (an evaluation's)."""
    import json

    from advtrain.certification import CERTIFY_SCHEMA

    if not path.is_file():
        return
    try:
        schema = json.loads(path.read_text()).get("schema")
    except (OSError, ValueError, AttributeError):
        schema = None
    if schema != CERTIFY_SCHEMA:
        raise ValueError(
            f"{path} is not a certify report (schema {schema!r}) and would be "
            "replaced: choose another --out"
        )


def certify(
    model_location: str,
    cfg: EvalConfig,
    out: str | None,
    data_source: str = "bundled",
    *,
    batch_size: int = 256,
) -> int:
    """`advtrain certify MODEL`: certified accuracy per eps and bound method (`cfg.certify`) on
    the first `cfg.n` examples of `cfg.split`, written to `report.json` (per-example masks).

    `MODEL` and `--out` may be local paths or storage URIs; without `--out` the report goes
    beside the model (`certify-<model name>`), as `evaluate`'s goes to `eval-<model name>`. A
    model with a layer the bounds cannot cover is refused in one line naming it, before anything
    is written. When an `advtrain evaluate` report of the same threat model and examples is
    beside the model, its attacked figure is shown as the upper bound.

    Raises:
        ValueError: a usage error (one line): an unsupported layer, a bad model file, data or eps.
        CertificationError: the certified accuracy exceeds the attacked one of that report.
    """
    name, model_path = _model_file(model_location)
    folder = _folder_beside(model_location, model_path, out, "certify")
    _check_not_overwriting(folder.local / "report.json")
    from advtrain import bounds, certification  # TensorFlow loads here, after the cheap checks
    from advtrain.checks import check_model
    from advtrain.files import write_json

    data, model = _load_model_and_data(name, model_path, cfg, data_source)
    x, y = data.split(cfg.split)
    if cfg.n is not None:
        if cfg.n > len(x):
            raise ValueError(
                f"`n` asks for more examples than the {cfg.split} split holds. Received: "
                f"n={cfg.n}, len({cfg.split})={len(x)}"
            )
        x, y = x[: cfg.n], y[: cfg.n]
    m = min(len(x), 64)
    model, notes, _grads = check_model(
        model, x[:m], y[:m].astype(np.int32)
    )  # logits; a final softmax removed
    try:
        d = certification.certify_report(
            model,
            x,
            y,
            eps=cfg.eps,
            norm=cfg.norm,
            methods=cfg.certify,
            split=cfg.split,
            data=data.describe(),
            batch_size=batch_size,
        )
    except bounds.UnsupportedLayerError as e:
        raise ValueError(f"{name}: {e}") from None
    d["model"], d["notes"] = model_location, notes
    reports = list(_attacked_reports(model_location))
    for r in d["per_eps"]:
        for location, report in reports:
            entry = certification.attacked_figure(
                report, eps=r["eps"], norm=cfg.norm, n=len(y), split=cfg.split, data=d["data"]
            )
            if entry is not None:
                break
        else:
            continue
        r["robust_acc"], r["robust_report"] = entry["robust_acc"], location
        r["robust_flags_failed"] = entry.get("robust_flags_failed") or []
        if r["certified_acc"] > entry["robust_acc"] + 1e-9:
            raise certification.CertificationError(
                f"certified {r['certified_acc']:.4f} > robust {entry['robust_acc']:.4f} at "
                f"{cfg.norm} eps {r['eps']:g} on the same {len(y)} examples ({location}): the "
                "bound or the attack is wrong, or that report is of another model"
            )
    write_json(folder.local / "report.json", d)
    for line in certification.certify_lines(d):
        _say(line)
    _published(folder)
    _say(f"Report: {storage.join(str(folder), 'report.json')}")
    return 0


def attack(
    model_path: Path,
    cfg: AttackConfig,
    input_path: str | None,
    n: int,
    split: str,
    out: Path,
    data_source: str = "bundled",
) -> int:
    """`advtrain attack`: adversarial examples for given images, saved atomically as .npz."""
    from advtrain.config import check_eps_fits
    from advtrain.data import DataError, check_arrays, load_data

    name, model_path = _model_file(str(model_path))
    if input_path is None:
        check_number("n", n, low=1, integer=True)
        data = load_data(data_source, val_size=None, include_train=False)
        x, y = data.split(split)
        x, y = x[:n], y[:n]
        _check_fits(name, check_keras_file(model_path), data)
    else:
        try:
            with np.load(input_path, allow_pickle=False) as f:
                if "x" not in f.files or "y" not in f.files:
                    raise DataError(
                        f"{input_path}: needs arrays 'x' and 'y' (found: "
                        f"{', '.join(f.files) or 'none'})"
                    )
                x, y = check_arrays(f["x"], f["y"], input_path, "input")
        except OSError as e:
            raise DataError(f"{input_path}: cannot be read as .npz ({e})") from None
    check_eps_fits("eps", cfg.eps, cfg.norm, x.shape[1:])
    from advtrain import attacks  # TensorFlow loads here, after the cheap checks
    from advtrain.files import write_atomic
    from advtrain.models import check_input, load_model

    model = load_model(model_path)
    check_input(model, name, x.shape[1:])
    kw = {"eps": cfg.eps, "norm": cfg.norm, "seed": cfg.seed}
    if cfg.name == "square":
        kw.update(queries=cfg.steps)
    else:
        kw.update(loss=cfg.loss)
    if cfg.name in ("pgd", "apgd"):
        kw.update(steps=cfg.steps, restarts=cfg.restarts)
    if cfg.name == "pgd":
        kw.update(step_size=cfg.step_size)
    x_adv = attacks.run_attack(cfg.name, model, x, y, batch_size=min(256, len(x)), **kw)
    pred = np.argmax(model.predict(x, verbose=0), -1)
    pred_adv = np.argmax(model.predict(x_adv, verbose=0), -1)
    write_atomic(
        out,
        lambda tmp: np.savez_compressed(
            tmp, x=x, y=y, x_adv=x_adv, pred=pred, pred_adv=pred_adv, attack=str(cfg)
        ),
    )
    _say(
        f"{cfg.name} {cfg.norm} eps={cfg.eps}: accuracy {np.mean(pred == y):.3f} -> "
        f"{np.mean(pred_adv == y):.3f} on {len(x)} images; wrote {out}"
    )
    return 0


# --------------------------------------------------------------------------- cluster


def cluster(action: str, root: str, *, num_cpus: int | None, add_node: bool) -> int:
    """`advtrain cluster up|down|status --local`: the local development cluster.

    Returns:
        0 on success (`status`: the cluster is alive); 1 when it is not running.
    """
    import shlex

    from workflows import local_cluster

    if action == "up":
        c = local_cluster.up(root, num_cpus=num_cpus, add_node=add_node)
        info = local_cluster.status(c.root)
        print(
            f"cluster up at {c.address}: {info['nodes']} node(s), {info['cpus'] or 0:g} CPU(s), "
            f"dashboard {c.dashboard_url}"
        )
        print(f"token file: {c.token_path}")
        for key, value in local_cluster.env_for(c).items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    if action == "down":
        print(f"cluster down: stopped {local_cluster.down(root)} process(es)")
        return 0
    info = local_cluster.status(root)
    if info["address"] is None:
        print(f"no cluster in {info['root']}")
        return 1
    state = "alive" if info["alive"] else "not alive"
    detail = (
        f", {info['nodes']} node(s), {info['cpus']:g} CPU(s), {info['gpus']:g} GPU(s)"
        if info["nodes"] is not None
        else ""
    )
    print(f"cluster at {info['address']}: {state}{detail}")
    return 0 if info["alive"] else 1
