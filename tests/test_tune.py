"""Ray Tune on the real local cluster: a search completes, is interrupted (SIGINT, then SIGKILL)
while a killer SIGKILLs its Train workers, resumes without rerunning finished trials or restarting
a checkpointed run from epoch 0, and its table, Pareto front and report match the trials' own
results."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from workflows import tune
from workflows.spec import load_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SEARCH = """
train: {model: mlp, method: pgd, eps: 0.1, steps: 2, epochs: 2, batch_size: 128, \
train_size: 4096, probe_size: 64,
        learning_rate: 0.003}
eval: {norm: linf, eps: [0.05, 0.1], suite: quick, n: 100, batch_size: 100}
scaling: {max_failures: 4}
search:
  samples: 1
  scheduler: fifo
  space: {eps: {grid: [0.0, 0.05, 0.1]}, mix: {choice: [1.0]}}
"""


# TensorFlow 2.21's native start-up lines (absl, oneDNN, the CUDA probe of a CPU-only machine).
TF_NOISE = ("absl::InitializeLog", "oneDNN custom operations", "cuda drivers", "cuInit")


def _advtrain(args, env, log: Path, **kw):
    # Output to a file, not a pipe: an unread pipe fills up and blocks the driver.
    with open(log, "a") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "workflows.cli", *args],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
            **kw,
        )


def _finished_trials(exp: Path) -> dict[str, float]:
    """trial id -> time of its evaluated report, from Tune's own result files."""
    out = {}
    for rj in (exp / "tune").glob("*/result.json"):
        for line in rj.read_text().splitlines():
            m = json.loads(line)
            if m.get("evaluated"):
                out[m["trial_id"]] = m["timestamp"]
    return out


def _tune_to_the_end(
    search_yaml: str, tmp_path: Path, address: str, *, timeout: int, extra=()
) -> Path:
    """`advtrain tune --config search.yaml --out exp [extra...]`, run to its end; returns exp."""
    cfg, exp, log = tmp_path / "search.yaml", tmp_path / "exp", tmp_path / "advtrain.log"
    cfg.write_text(search_yaml)
    proc = _advtrain(
        ["tune", "--config", str(cfg), "--out", str(exp), "--address", address, *extra],
        {**os.environ, "PYTHONUNBUFFERED": "1"},
        log,
    )
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]
    noise = [line for line in log.read_text().splitlines() if any(n in line for n in TF_NOISE)]
    assert not noise, noise[
        :4
    ]  # driver and Ray workers alike: TensorFlow's C++ start-up lines stay off
    text = log.read_text()
    assert text.count("Token authentication is enabled") <= 1, text[
        :3000
    ]  # Ray's notice, at most once
    # Each ended trial's Train placement group went while the search ran: the driver's last-resort
    # release at the end (workflows.placement_groups.release_own) found nothing to say.
    assert "placement group(s) Ray left reserved" not in text, text[-3000:]
    assert re.search(r"^Tune: \d+ trial\(s\), \w+ scheduler, \w+ searcher", text, re.MULTILINE), (
        text[:3000]
    )
    assert re.search(
        r"^Each trial judged at linf eps [\d.]+ by the \w+ suite \(", text, re.MULTILINE
    ), text[:3000]
    return exp


def _wait(predicate, timeout, what, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"advtrain exited ({proc.returncode}) before {what}")
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}")


WORKER_START = re.compile(
    r"\(RayTrainWorker pid=(\d+)\).* advtrain worker \d+/\d+ of (train_\w+) from epoch (\d+)"
)


class WorkerKiller(threading.Thread):
    """SIGKILLs a random Train worker of the search every ~20 s, at most `limit` times: only a
    worker whose run has a registered checkpoint (Train's snapshot in the run folder), so its
    restart must resume from one. Ray's own `WorkerKillerActor` (its private test utilities) kills
    through a Ray task, which waits for a CPU the trials hold here. Every process is this
    machine's: the test cluster listens on 127.0.0.1 only."""

    def __init__(self, log: Path, exp: Path, *, interval_s: float = 20.0, limit: int = 3):
        super().__init__(daemon=True)
        self.log, self.exp, self.interval_s, self.limit = log, exp, interval_s, limit
        self.kills: list[dict] = []  # trial, pid, where the log stood
        self.done = threading.Event()

    def _candidates(self) -> list[tuple[int, str]]:
        import psutil

        text = self.log.read_text() if self.log.exists() else ""
        workers = {int(pid): run for pid, run, _ in WORKER_START.findall(text)}
        out = []
        for pid, run in workers.items():
            if not (self.exp / "train" / run / "checkpoint_manager_snapshot.json").is_file():
                continue
            try:
                if "RayTrainWorker" in " ".join(psutil.Process(pid).cmdline()):
                    out.append((pid, run))
            except psutil.Error:
                continue  # gone already
        return out

    def run(self):
        import random

        rng = random.Random(0)
        not_before = 0.0  # ~20 s after the last kill; until then, and between polls, 1 s steps
        while len(self.kills) < self.limit and not self.done.wait(1.0):
            if time.monotonic() < not_before or not (found := self._candidates()):
                continue
            pid, run = rng.choice(found)
            offset = self.log.stat().st_size
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills.append({"run": run, "pid": pid, "offset": offset})
            not_before = time.monotonic() + rng.uniform(0.75, 1.25) * self.interval_s


@pytest.fixture
def worker_killer(tmp_path):
    """A `WorkerKiller` of the search in tmp_path/exp, logging to tmp_path/advtrain.log; stopped
    when the test ends, however it ends."""
    killer = WorkerKiller(tmp_path / "advtrain.log", tmp_path / "exp")
    killer.start()
    yield killer
    killer.done.set()
    killer.join()


def test_search_under_a_worker_killer_interrupted_twice_resumes_without_rerun_and_reports_match(
    ray_cluster, tmp_path, worker_killer
):
    """Several faults in one search: a killer SIGKILLs a Train worker every ~20 s throughout,
    while the driver is stopped with Ctrl-C, resumed, SIGKILLed, and resumed to the end."""
    cfg = tmp_path / "search.yaml"
    cfg.write_text(SEARCH)
    exp = tmp_path / "exp"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = ["tune", "--config", str(cfg), "--out", str(exp), "--address", ray_cluster.address]
    log = tmp_path / "advtrain.log"

    # 1. Start, let one trial finish, then Ctrl-C the driver.
    proc = _advtrain(args, env, log, start_new_session=True)
    _wait(lambda: len(_finished_trials(exp)) >= 1, 400, "a first finished trial", proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "continue with: advtrain tune --resume" in text
    assert (
        "Tuner.restore" not in text
    )  # Ray's own hint, which would restore without advtrain's spec
    done_before = _finished_trials(exp)
    assert done_before

    # 2. Resume, then SIGKILL the driver once another trial has finished.
    proc = _advtrain(
        ["tune", "--resume", str(exp), "--address", ray_cluster.address],
        env,
        log,
        start_new_session=True,
    )
    _wait(
        lambda: len(_finished_trials(exp)) > len(done_before), 400, "another finished trial", proc
    )
    time.sleep(2)  # the experiment state is saved after results arrive
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    done_mid = _finished_trials(exp)

    # 3. Resume to the end.
    proc = _advtrain(["tune", "--resume", str(exp), "--address", ray_cluster.address], env, log)
    proc.wait(timeout=600)
    worker_killer.done.set()
    worker_killer.join()
    assert proc.returncode == 0, log.read_text()[-3000:]
    done_after = _finished_trials(exp)
    assert len(done_after) == 3
    for trial_id, stamp in done_mid.items():
        assert done_after[trial_id] == stamp, f"finished trial {trial_id} was run again"
    _check_killed_runs_resumed(worker_killer, log.read_text(), exp, epochs=2)

    # The table, Pareto front and report match the trials' own results.
    data = json.loads((exp / "trials.json").read_text())
    rows = {r["trial_id"]: r for r in data["trials"]}
    assert len(rows) == 3
    for rj in (exp / "tune").glob("*/result.json"):
        last = [json.loads(line) for line in rj.read_text().splitlines()][-1]
        row = rows[last["trial_id"]]
        assert row["test_robust_acc"] == pytest.approx(last["test_robust_acc"])
        assert row["val_robust_acc"] == pytest.approx(last["val_robust_acc"])
        assert row["stopped"] == "no"
        assert row["epochs_run"] == 2 and row["test_robust_acc"] is not None
    with open(exp / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["trial_id"] for r in table] == [r["trial_id"] for r in data["trials"]]
    assert [int(r["rank"]) for r in table] == [1, 2, 3]
    vals = [r["val_robust_acc"] for r in data["trials"]]
    assert vals == sorted(vals, reverse=True)
    from advtrain.report import pareto_front

    points = [
        {"label": r["trial_id"], "clean": r["test_clean_acc"], "robust": r["test_robust_acc"]}
        for r in data["trials"]
    ]
    front = {p["label"] for p in pareto_front(points)}
    report_md = (exp / "report.md").read_text()
    for label in front:
        assert f"- {label}: clean" in report_md
    for name in (
        "pareto.png",
        "accuracy_vs_eps.png",
        "report.html",
        "results.md",
        "best_model.keras",
    ):
        assert (exp / name).stat().st_size > 0, name
    # eps 0 is clean training: it must not be the most robust at eps 0.1.
    zero = next(r for r in data["trials"] if r["config"]["eps"] == 0.0)
    assert zero["rank"] == 3

    # `advtrain report` rebuilds the same table from the folder alone.
    before = (exp / "results.md").read_text()
    (exp / "results.md").unlink()
    proc = _advtrain(["report", str(exp)], env, log)
    proc.wait(timeout=120)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert (exp / "results.md").read_text() == before


def _check_killed_runs_resumed(killer: WorkerKiller, text: str, exp: Path, *, epochs: int):
    """Each killed worker's run came back from its checkpoint, not from epoch 0; prints the
    counts: kills, restarts, epochs trained twice."""
    assert killer.kills, "the killer found no worker past its first checkpoint to kill"
    for kill in killer.kills:
        after = WORKER_START.findall(text[kill["offset"] :])
        later = [int(e) for _, run, e in after if run == kill["run"]]
        assert later and later[0] >= 1, (kill, later)
    starts = set(WORKER_START.findall(text))  # (pid, run, epoch): Ray may print a line twice
    runs = {run for _, run, _ in starts}
    rerun = 0
    for rj in (exp / "tune").glob("*/result.json"):
        trained = [json.loads(line) for line in rj.read_text().splitlines()]
        rerun += sum(1 for m in trained if not m.get("evaluated")) - epochs
    print(
        f"chaos: {len(killer.kills)} worker(s) killed, {len(starts) - len(runs)} worker "
        f"restart(s) (kills and driver resumes), {epochs * len(runs)} epochs planned, "
        f"{rerun} epoch report(s) repeated"
    )


def test_search_spec_defaults_validate_and_build_param_space():
    spec = load_spec(None)
    search = tune.SearchSpec.from_dict({}, base=spec.train.to_dict())
    space = tune.build_param_space(search)
    assert set(space) == {"eps", "steps", "mix"}
    assert search.scheduler == "asha" and search.samples == 4


@pytest.mark.parametrize(
    "search, match",
    [
        (
            {"metric": "val_certified_acc"},
            r"every trial's method must be one of 'ibp', 'crown-ibp'. Received: method=pgd",
        ),
        (
            {"metric": "val_certified_acc", "space": {"method": {"choice": ["ibp", "trades"]}}},
            r"Received: method=ibp, trades",
        ),
        (
            {"metric": "val_pgd_acc"},
            (
                r"`metric` must be one of 'val_robust_acc', 'val_certified_acc'. "
                r"Received: metric='val_pgd_acc'"
            ),
        ),
    ],
)
def test_search_spec_bad_metric_raises(search, match):
    base = load_spec(None, train={"eps_ramp_epochs": 1}).train.to_dict()
    with pytest.raises(ValueError, match=match):
        tune.SearchSpec.from_dict(search, base=base)


CERTIFIED_SEARCH = """
train: {model: mlp, method: ibp, eps: 0.1, eps_ramp_epochs: 2, epochs: 2, batch_size: 128, \
train_size: 4096,
        probe_size: 128, learning_rate: 0.003}
eval: {norm: linf, eps: [0.1], suite: quick, n: 100, batch_size: 100, certify: [ibp, crown-ibp]}
search:
  samples: 1
  scheduler: fifo
  metric: val_certified_acc
  space: {kappa_end: {grid: [1.0, 0.5]}}
  callbacks: [tensorboard]
"""


def test_certified_search_ranks_on_the_certified_probe_and_brackets_every_trial(
    ray_cluster, tmp_path
):
    # Also the trackers (`search.callbacks`, `--mlflow-uri`), on this two-trial search.
    mlflow_uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = _tune_to_the_end(
        CERTIFIED_SEARCH,
        tmp_path,
        ray_cluster.address,
        timeout=600,
        extra=["--mlflow-uri", mlflow_uri],
    )
    data = json.loads((exp / "trials.json").read_text())
    assert data["metric"] == data["objective"]["metric"] == "val_certified_acc"
    trials = data["trials"]
    assert [r["val_certified_acc"] for r in trials] == sorted(
        (r["val_certified_acc"] for r in trials), reverse=True
    )
    # kappa_end 1.0 never weighs the bound loss (natural training under a ramp): it certifies less.
    assert trials[0]["config"]["kappa_end"] == 0.5, trials
    for r in trials:
        assert r["test_certified_acc"] <= r["test_robust_acc"] <= r["test_clean_acc"], r
    report_md = (exp / "report.md").read_text()
    assert "`val_certified_acc`" in report_md
    assert (
        f"- {trials[0]['trial_id']}: certified {trials[0]['test_certified_acc']:.3f}" in report_md
    )
    _check_trackers(exp, mlflow_uri, trials)


def _check_trackers(exp: Path, mlflow_uri: str, trials: list[dict]) -> None:
    """Each trial's TensorBoard events, and its MLflow run (read back from the SQLite store):
    params, per-epoch metric history, final test figures."""
    from mlflow import MlflowClient

    assert len(list((exp / "tune").glob("*/events.out.tfevents.*"))) == len(trials)
    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("exp")  # named as the search (its folder)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == len(trials) == 2
    for row in trials:
        (run,) = [r for r in runs if r.data.tags["trial_name"].endswith(row["trial_id"])]
        assert float(run.data.params["kappa_end"]) == row["config"]["kappa_end"]
        history = client.get_metric_history(run.info.run_id, "val_certified_acc")
        assert {m.step for m in history} >= {1, 2}, history  # one report per epoch
        for key in ("test_clean_acc", "test_robust_acc", "test_certified_acc"):
            assert run.data.metrics[key] == pytest.approx(row[key]), key
        assert run.data.metrics["test_flags_failed"] == len(row["test_flags_failed"])
        assert run.data.tags["test_flags_failed"] == (",".join(row["test_flags_failed"]) or "none")


@pytest.mark.parametrize(
    "train, search, warns",
    [
        ({"schedule": "onecycle", "epochs": 9}, {"scheduler": "asha", "grace_period": 1}, True),
        ({"schedule": "onecycle", "epochs": 9}, {"scheduler": "asha", "grace_period": 4}, False),
        ({"schedule": "onecycle", "epochs": 2}, {"scheduler": "asha", "grace_period": 1}, False),
        ({"schedule": "cosine", "epochs": 9}, {"scheduler": "asha", "grace_period": 1}, False),
        ({"schedule": "onecycle", "epochs": 9}, {"scheduler": "fifo"}, False),
        ({"schedule": "onecycle", "epochs": 9}, {"scheduler": "sha", "grace_period": 1}, True),
    ],
)
def test_schedule_warning_flags_asha_rungs_inside_the_onecycle_warmup(train, search, warns):
    spec = load_spec(None, train=train)
    warning = tune.schedule_warning(
        spec, tune.SearchSpec.from_dict(search, base=spec.train.to_dict())
    )
    assert (warning is not None) == warns
    if warns:
        assert (
            "grace_period=1" in warning
            and "3.6 of 9 epochs" in warning
            and "grace_period >= 4" in warning
        )


SHA_SEARCH = """
train: {model: mlp, method: pgd, eps: 0.1, steps: 2, epochs: 4, batch_size: 128, \
train_size: 4096, probe_size: 1024,
        learning_rate: 0.003, schedule: cosine}
eval: {norm: linf, eps: [0.1], suite: quick, n: 100, batch_size: 100}
search:
  samples: 1
  scheduler: sha
  grace_period: 1
  reduction_factor: 3
  space: {eps: {grid: [0.1, 0.05, 0.0]}, mix: {choice: [1.0]}}
"""


def test_successive_halving_pauses_at_the_rung_and_resumes_only_the_best(ray_cluster, tmp_path):
    exp = _tune_to_the_end(SHA_SEARCH, tmp_path, ray_cluster.address, timeout=900)

    reports = {}
    for rj in (exp / "tune").glob("*/result.json"):
        lines = [json.loads(line) for line in rj.read_text().splitlines()]
        reports[lines[0]["trial_id"]] = lines
    assert len(reports) == 3
    at_rung = {
        t: next(m for m in lines if m["epoch"] == 1)["val_robust_acc"]
        for t, lines in reports.items()
    }
    rows = {r["trial_id"]: r for r in json.loads((exp / "trials.json").read_text())["trials"]}
    # Three trials, reduction factor 3: only the best at epoch 1 trains on, the rest stop.
    survivor = max(at_rung, key=at_rung.get)
    assert rows[survivor]["epochs_run"] == 4 and rows[survivor]["stopped"] == "no"
    for t in set(rows) - {survivor}:
        # A pause reaches a trial while it trains on, so it may report an epoch past the rung.
        assert rows[t]["epochs_run"] < 4 and rows[t]["stopped"] == "sha", rows[t]
        assert rows[t]["test_robust_acc"] is not None  # evaluated by the driver from its checkpoint
    # Two trials run at a time, so eps 0.0 (clean training, the least robust) reaches the rung
    # last: the survivor is one of the two that waited there, paused, and it continued from its
    # Train checkpoint, not from scratch.
    clean = next(t for t, r in rows.items() if r["config"]["eps"] == 0.0)
    assert survivor != clean
    assert any(m.get("resumed_from_epoch", 0) >= 1 for m in reports[survivor]), reports[survivor]


ASHA_ONE_TRIAL_AT_A_TIME = """
train: {model: mlp, method: pgd, eps: 0.1, steps: 2, epochs: 3, batch_size: 128, \
train_size: 2048, probe_size: 256,
        learning_rate: 0.003, schedule: cosine}
eval: {norm: linf, eps: [0.1], suite: quick, n: 50, batch_size: 50}
scaling: {workers: 2}
search:
  samples: 1
  scheduler: asha
  grace_period: 1
  reduction_factor: 2
  space: {eps: {grid: [0.1, 0.0, 0.05]}, mix: {choice: [1.0]}}
"""


def test_asha_stops_trials_on_a_cluster_that_holds_one_trial_and_nothing_stays_reserved(
    ray_cluster, tmp_path
):
    # One trial's two workers take both of the cluster's CPUs, so each trial after the first
    # starts only once the trial before it gave its Train placement group back.
    exp = _tune_to_the_end(ASHA_ONE_TRIAL_AT_A_TIME, tmp_path, ray_cluster.address, timeout=600)

    rows = json.loads((exp / "trials.json").read_text())["trials"]
    assert sorted(r["config"]["eps"] for r in rows) == [0.0, 0.05, 0.1]
    # Clean training (eps 0.0) trails eps 0.1's PGD accuracy at the first rung and is stopped
    # there; a trial after it still ran.
    stopped = [r for r in rows if r["stopped"] == "asha"]
    assert stopped and all(r["epochs_run"] < 3 for r in stopped), rows
    assert next(r for r in rows if r["config"]["eps"] == 0.0)["stopped"] == "asha", rows
    assert all(r["test_robust_acc"] is not None for r in rows), rows
