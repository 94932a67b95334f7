"""The documented cluster path, for real: docs/cluster.md's `ray job submit` of `advtrain tune
--address auto --gpu --storage s3://...` on a local autoscaling Ray cluster, with every result in
a real S3-compatible bucket.

The cluster is Ray's fake multi-node provider (what `ray.cluster_utils.AutoscalingCluster` starts
for Ray's own autoscaler tests), through `workflows.local_cluster.up(node_types=...)`: a head with
0 CPUs, like cluster.yaml's, and a `gpu_worker` node type of {CPU: 2, GPU: 2} (logical GPUs: Ray
assigns them and sets CUDA_VISIBLE_DEVICES; TensorFlow finds no device behind them and runs on the
CPU) with min_workers 0 and max_workers 2, token authentication on, every address on 127.0.0.1.
The bucket is moto's S3 server on 127.0.0.1 (`s3_server` in conftest), reached by the job, the
Tune driver and every Train worker through AWS_ENDPOINT_URL in the nodes' environment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from workflows import local_cluster, storage

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CONFIG = "tests/data/cluster_smoke.yaml"  # relative to the repository root, the job's working dir
NODE_TYPES = {"gpu_worker": {"resources": {"CPU": 2, "GPU": 2}, "min_workers": 0, "max_workers": 2}}
WORKER_LINE = re.compile(
    r"advtrain worker (\d+)/(\d+) of (\S+) from epoch (\d+): node (\w+), GPU ids \[([^\]]*)\], "
    r"CUDA_VISIBLE_DEVICES='([^']*)'"
)


@pytest.fixture(scope="module")
def autoscaling_cluster(s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("autoscaling")
    cluster = local_cluster.up(
        root,
        num_cpus=0,
        node_types=NODE_TYPES,
        idle_timeout_minutes=0.25,
        extra_env={**s3_server, "RAY_JOB_STOP_WAIT_TIME_S": "60"},
    )
    try:
        yield cluster
    finally:
        local_cluster.down(root, purge=True)


@pytest.fixture(autouse=True)
def _cluster_left_unreserved(autoscaling_cluster):
    """A stopped or failed job's placement group left behind would hold a node that the next
    test's trial needs (the autoscaler counts it toward max_workers)."""
    yield
    from conftest import check_nothing_reserved

    check_nothing_reserved(autoscaling_cluster)


class NodeCount(threading.Thread):
    """Live node count of the cluster, sampled every second while a job runs."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.cluster, self.samples, self.done = cluster, [], threading.Event()

    def run(self):
        while not self.done.is_set():
            nodes = local_cluster.status(self.cluster.root)["nodes"]
            if nodes is not None:
                self.samples.append((time.monotonic(), nodes))
            self.done.wait(1.0)

    def counts(self):
        return [n for _, n in self.samples]


def _env(cluster):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")
    }
    env.update(local_cluster.env_for(cluster))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _ray(env, args, timeout, **kw):
    return subprocess.run(
        [str(Path(sys.executable).with_name("ray")), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def _submit_cmd(env, bucket, *extra, config=CONFIG):
    """docs/cluster.md's submission, with the test's small config and a 2-worker trial."""
    return [
        "job",
        "submit",
        "--address",
        env["RAY_API_SERVER_ADDRESS"],
        "--working-dir",
        ".",
        *extra,
        "--",
        "advtrain",
        "tune",
        "--config",
        config,
        "--address",
        "auto",
        "--gpu",
        "--workers",
        "2",
        "--storage",
        f"{bucket}/advtrain",
    ]


def _run_name(bucket):
    runs = sorted({k.split("/", 1)[0] for k in storage.list_files(f"{bucket}/advtrain")})
    assert len(runs) == 1, runs
    return runs[0]


def _wait_nodes(cluster, count, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if local_cluster.status(cluster.root)["nodes"] == count:
            return True
        time.sleep(1.0)
    return False


def test_documented_submit_scales_from_zero_gives_each_worker_its_gpu_and_stores_everything(
    autoscaling_cluster, s3_bucket, tmp_path
):
    env = _env(autoscaling_cluster)
    assert _wait_nodes(autoscaling_cluster, 1, 60), "the cluster should start with its head alone"
    counter = NodeCount(autoscaling_cluster)
    counter.start()
    proc = _ray(env, _submit_cmd(env, s3_bucket), timeout=900)
    counter.done.set()
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "succeeded" in log
    assert (
        "waiting for the autoscaler: 2 worker(s) x {CPU: 1, GPU: 1}, node type gpu_worker, up "
        "to 2 nodes" in log
    )

    # From zero worker nodes up: the head alone, then the autoscaler's nodes.
    counts = counter.counts()
    assert counts[0] == 1 and max(counts) >= 2, counts

    # Each Train worker of a 2-worker trial holds its own GPU: one id, named alone in its
    # CUDA_VISIBLE_DEVICES, and distinct (node, GPU id) pairs within the trial.
    workers = [m.groups() for m in WORKER_LINE.finditer(log)]
    assert workers, log[-4000:]
    by_run: dict[str, set] = {}
    for rank, world, run, _epoch, node, ids, visible in workers:
        assert world == "2" and len(ids.split(",")) == 1 and visible == ids, (rank, ids, visible)
        by_run.setdefault(run, set()).add((node, ids))
    assert all(len(pairs) == 2 for pairs in by_run.values()), by_run

    # Every result is in the bucket, under {storage}/{run name}.
    name = _run_name(s3_bucket)
    run = f"{s3_bucket}/advtrain/{name}"
    keys = storage.list_files(run)
    for key in (
        "spec.json",
        "trials.json",
        "results.csv",
        "results.md",
        "report.md",
        "report.html",
        "pareto.png",
        "best_model.keras",
    ):
        assert key in keys, keys
    assert any(k.startswith("tune/") for k in keys) and any(k.startswith("train/") for k in keys)
    assert any(re.fullmatch(r"trials/[^/]+/report\.json", k) for k in keys)

    # The head's local run folder goes; the bucket alone rebuilds the report.
    staged = re.search(r"\(staged in (\S+)\)", log).group(1)
    shutil.rmtree(staged, ignore_errors=True)
    _delete(run, "report.md")
    report = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "report", run],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert "report.md" in storage.list_files(run)

    # And back down: idle worker nodes are removed.
    assert _wait_nodes(autoscaling_cluster, 1, 120), local_cluster.status(autoscaling_cluster.root)
    changes = [n for i, n in enumerate(counts) if i == 0 or n != counts[i - 1]]
    print(f"live nodes over the job (changes): {changes}, then back to 1 after it")
    print(
        "workers: "
        f"{sorted((run, node[-5:], ids) for run, pairs in by_run.items() for node, ids in pairs)}"
    )
    print("bucket after the job:\n  " + "\n  ".join(keys))


def _delete(run, key):
    fs, root = storage.filesystem(run)
    fs.delete_file(f"{root}/{key}")


def _logs(env, job):
    return _ray(
        env, ["job", "logs", "--address", env["RAY_API_SERVER_ADDRESS"], job], timeout=60
    ).stdout


def _job_status(env, job):
    """The job's status, from `ray job status` (which words it differently per status)."""
    done = _ray(env, ["job", "status", "--address", env["RAY_API_SERVER_ADDRESS"], job], timeout=60)
    out = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)
    for word, status in (
        ("' succeeded", "SUCCEEDED"),
        ("' was stopped", "STOPPED"),
        ("' failed", "FAILED"),
    ):
        if f"Job '{job}{word}" in out:
            return status
    m = re.search(r"Status for job '[^']+': (?:JobStatus\.)?(\w+)", out)
    return m.group(1) if m else out


def test_interrupted_search_resumes_from_the_bucket_without_rerunning_finished_trials(
    autoscaling_cluster, s3_bucket
):
    env = _env(autoscaling_cluster)
    proc = _ray(env, _submit_cmd(env, s3_bucket, "--no-wait") + ["--samples", "3"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = re.search(r"raysubmit_\w+", proc.stdout + proc.stderr).group(0)
    finished: list[str] = []
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and not finished:
        time.sleep(5)
        finished = re.findall(r"Trial run_trial_(\w+) completed after", _logs(env, job))
        assert _job_status(env, job) in ("PENDING", "RUNNING"), _logs(env, job)[-4000:]
    assert finished, "no trial finished in time"
    stop = _ray(env, ["job", "stop", "--address", env["RAY_API_SERVER_ADDRESS"], job], timeout=180)
    assert stop.returncode == 0, stop.stderr[-2000:]
    first = _logs(env, job)
    assert (
        "search interrupted (state saved); continue with: advtrain tune --resume s3://" in first
    ), first[-4000:]
    finished = re.findall(r"Trial run_trial_(\w+) completed after", first)
    name = _run_name(s3_bucket)
    run = f"{s3_bucket}/advtrain/{name}"

    resume = _ray(
        env,
        [
            "job",
            "submit",
            "--address",
            env["RAY_API_SERVER_ADDRESS"],
            "--working-dir",
            ".",
            "--",
            "advtrain",
            "tune",
            "--resume",
            run,
            "--address",
            "auto",
        ],
        timeout=900,
    )
    log = resume.stdout + resume.stderr
    assert resume.returncode == 0, log[-6000:]
    rerun = {m.group(3) for m in WORKER_LINE.finditer(log)}
    assert not rerun & {f"train_{t}" for t in finished}, (finished, rerun)
    print(
        f"finished before the stop: {finished}; trained after --resume: {sorted(rerun)}; "
        f"finished trials run again: {len(rerun & {f'train_{t}' for t in finished})}"
    )
    trials = json.loads(storage.RunFolder.open(run).local.joinpath("trials.json").read_text())[
        "trials"
    ]
    assert len(trials) == 3 and all(t["test_robust_acc"] is not None for t in trials), trials


def _kill_node(cluster, node_id):
    """Kills one fake worker node: its raylet and every process under it (its workers, agents)."""
    import psutil

    for p in local_cluster.find_processes(cluster.root):
        try:
            if (
                p.name() == "raylet"
                and p.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id
            ):
                procs = [p, *p.children(recursive=True)]
                for q in procs:
                    q.kill()
                psutil.wait_procs(procs, timeout=10)
                return len(procs)
        except psutil.Error:
            continue
    raise AssertionError(f"no raylet of node {node_id}")


def test_a_node_failure_mid_trial_resumes_from_the_last_checkpoint_on_another_node(
    autoscaling_cluster, s3_bucket
):
    env = _env(autoscaling_cluster)
    proc = _ray(
        env,
        _submit_cmd(env, s3_bucket, "--no-wait", config="tests/data/cluster_smoke_long.yaml"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = re.search(r"raysubmit_\w+", proc.stdout + proc.stderr).group(0)
    # Wait for the trial's first checkpoint in the bucket, then take its node down.
    deadline, node = time.monotonic() + 900, None
    while time.monotonic() < deadline:
        time.sleep(2)
        assert _job_status(env, job) in ("PENDING", "RUNNING"), _logs(env, job)[-4000:]
        keys = (
            storage.list_files(f"{s3_bucket}/advtrain")
            if storage.exists(f"{s3_bucket}/advtrain")
            else []
        )
        if any(re.search(r"/train/train_\w+/checkpoint_[^/]+/model\.keras$", k) for k in keys):
            node = WORKER_LINE.search(_logs(env, job)).group(5)
            break
    assert node, "the trial wrote no checkpoint in time"
    assert _kill_node(autoscaling_cluster, node) >= 1
    deadline = time.monotonic() + 900
    while _job_status(env, job) in ("PENDING", "RUNNING") and time.monotonic() < deadline:
        time.sleep(5)
    log = _logs(env, job)
    assert _job_status(env, job) == "SUCCEEDED", log[-6000:]
    starts = [(m.group(5), int(m.group(4))) for m in WORKER_LINE.finditer(log)]
    resumed = [(n, epoch) for n, epoch in starts if epoch > 0]
    assert resumed and all(n != node for n, _ in resumed), starts
    run = f"{s3_bucket}/advtrain/{_run_name(s3_bucket)}"
    trials = json.loads(storage.RunFolder.open(run).local.joinpath("trials.json").read_text())[
        "trials"
    ]
    assert trials[0]["epochs_run"] == 4 and trials[0]["stopped"] == "no", trials
    print(f"node-failure trial resumed from epoch {resumed[0][1]} on node {resumed[0][0]}")
