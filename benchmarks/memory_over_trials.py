"""Head and driver memory over a long search: does it grow with the number of trials?

    python -m benchmarks.memory_over_trials [--samples 24] [--interval 2] [--out DIR]
    python -m benchmarks.memory_over_trials --quick      # 4 trials, written to the temp folder

What runs. One local Ray cluster on 127.0.0.1 (2 CPUs, token authentication:
`workflows.local_cluster.up`), started once and warm; then `advtrain tune --address <it>` of a
small search (`SEARCH`: mlp on 512 MNIST images, 2 epochs, FIFO, `--samples` random trials of
one worker each, two at a time), the command a user runs. Every `--interval` seconds a sampler
reads the proportional set size (PSS: shared pages split among the processes that map them, so
the parts add up) of every process of the cluster and of the driver, grouped by what it is:

    gcs        gcs_server                      raylet     raylet
    dashboard  the dashboard and its agents    ray other  log monitor, autoscaler monitor, ...
    driver     the `advtrain tune` process     trial      Tune trial actors (run_trial)
    controller Train controllers               cleaner    Train's PlacementGroupCleaner actors
    worker     Train workers                   idle       Ray's idle and starting workers

and the count of finished trials (Tune's result files). The standing part is what lives for the
whole search (gcs, raylet, dashboard, ray other, driver); controllers and cleaners come and go
with the trials they run, trial actors and Train workers are the trials' own compute.

What it reports. `memory_over_trials.json` (every sample) and `.png` (the curve) in `--out`
(default benchmarks/results), and two tables: each group's PSS at the first sample after the
k-th trial finished, and each group's least-squares slope in MB per finished trial over every
sample of the second half of the search (the first trials also load code and caches once).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SEARCH = """
train: {model: mlp, method: pgd, eps: 0.1, steps: 2, epochs: 2, batch_size: 128, train_size: 512,
        probe_size: 64, probe_steps: 5}
eval: {norm: linf, eps: [0.1], suite: fgsm, n: 50, batch_size: 50}
search:
  scheduler: fifo
  searcher: random
  space: {eps: {uniform: [0.05, 0.15]}, mix: {uniform: [0.5, 1.0]}}
scaling: {workers: 1, cpus_per_worker: 1}
"""
GROUPS = (
    "gcs",
    "raylet",
    "dashboard",
    "ray other",
    "driver",
    "controller",
    "cleaner",
    "trial",
    "worker",
    "idle",
)
STANDING = ("gcs", "raylet", "dashboard", "ray other", "driver")


def group_of(proc: psutil.Process, driver_pid: int) -> str | None:
    """What a process is, from its command line (Ray names actor processes `ray::<Class>`)."""
    if proc.pid == driver_pid:
        return "driver"
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return None
    for marker, group in (
        ("gcs_server", "gcs"),
        ("raylet", "raylet"),
        ("ray::TrainController", "controller"),
        ("ray::PlacementGroupCleaner", "cleaner"),
        ("ray::RayTrainWorker", "worker"),
        ("ray::ImplicitFunc", "trial"),
        ("ray::run_trial", "trial"),
        ("ray::IDLE", "idle"),
        ("default_worker.py", "idle"),  # a worker process before it takes a task's title
        ("dashboard", "dashboard"),
        ("runtime_env/agent", "dashboard"),
        ("ray::", "ray other"),
        ("ray/_private", "ray other"),
        ("ray/autoscaler", "ray other"),
    ):
        if marker in cmd:
            return group
    return None


def _pss_mb(proc: psutil.Process) -> float:
    try:
        info = proc.memory_full_info()
    except psutil.Error:
        return 0.0
    return getattr(info, "pss", info.rss) / 2**20


def sample(driver_pid: int) -> dict[str, float]:
    """PSS in MB per group, summed over the group's processes, and the process count."""
    out = dict.fromkeys(GROUPS, 0.0)
    counts = dict.fromkeys(GROUPS, 0)
    for proc in psutil.process_iter():
        group = group_of(proc, driver_pid)
        if group is not None:
            out[group] += _pss_mb(proc)
            counts[group] += 1
    return {**out, **{f"n {g}": counts[g] for g in GROUPS}}


def finished_trials(exp: Path) -> int:
    n = 0
    for rj in (exp / "tune").glob("*/result.json"):
        try:
            n += any(json.loads(line).get("evaluated") for line in rj.read_text().splitlines())
        except (OSError, ValueError):
            continue
    return n


class Sampler(threading.Thread):
    def __init__(self, driver_pid: int, exp: Path, interval: float):
        super().__init__(daemon=True)
        self.driver_pid, self.exp, self.interval = driver_pid, exp, interval
        self.rows: list[dict] = []
        self.done = threading.Event()
        self.t0 = time.monotonic()

    def run(self):
        while not self.done.is_set():
            row = sample(self.driver_pid)
            row["t"] = time.monotonic() - self.t0
            row["finished"] = finished_trials(self.exp)
            row["machine used"] = psutil.virtual_memory().used / 2**20
            self.rows.append(row)
            self.done.wait(self.interval)


def _standing(row: dict) -> float:
    return sum(row[g] for g in STANDING)


def _slope(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 2:
        return None
    xs, ys = zip(*points)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else None


def summarize(rows: list[dict], samples: int) -> dict:
    """Each group's PSS at the first sample after the k-th trial finished; each group's slope
    (MB per finished trial) over the samples of the second half."""
    at: dict[int, dict] = {}
    for row in rows:
        at.setdefault(row["finished"], row)
    late = [r for r in rows if r["finished"] >= samples // 2]
    slopes = {
        g: _slope([(r["finished"], r[g] if g != "standing" else _standing(r)) for r in late])
        for g in (*GROUPS, "standing", "machine used")
    }
    return {
        "at_finished": {k: {g: round(at[k][g], 1) for g in (*GROUPS, "machine used")} for k in at},
        "mb_per_trial": {g: None if v is None else round(v, 2) for g, v in slopes.items()},
        "standing_first_mb": round(_standing(rows[0]), 1),
        "standing_last_mb": round(_standing(rows[-1]), 1),
        "max_controllers": max(r["n controller"] for r in rows),
        "max_cleaners": max(r["n cleaner"] for r in rows),
        "machine_used_peak_mb": round(max(r["machine used"] for r in rows), 1),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in rows]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    bottom = [0.0] * len(rows)
    for g in GROUPS:
        ys = [r[g] for r in rows]
        ax.fill_between(t, bottom, [b + y for b, y in zip(bottom, ys)], label=g, step="post")
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set_ylabel("PSS (MB)")
    ax.legend(loc="upper left", fontsize=7, ncol=5)
    ax.set_title("Cluster and driver memory over a search")
    ax2.plot(t, [r["finished"] for r in rows], drawstyle="steps-post")
    ax2.set_ylabel("trials finished")
    ax2.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    from workflows import local_cluster

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--quick", action="store_true", help="4 trials, results in the temp folder")
    args = ap.parse_args(argv)
    if args.samples < 1:
        ap.error(f"--samples must be at least 1. Received: {args.samples}")
    if args.quick:
        args.samples, args.out = 4, Path(tempfile.mkdtemp(prefix="memory-"))
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="memory-run-"))
    cluster = local_cluster.up(work / "ray", num_cpus=2)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(local_cluster.env_for(cluster))
        (work / "search.yaml").write_text(SEARCH)
        exp = work / "exp"
        cmd = [sys.executable, "-m", "workflows.cli", "tune", "--config", str(work / "search.yaml")]
        cmd += ["--samples", str(args.samples), "--out", str(exp), "--address", cluster.address]
        t0 = time.monotonic()
        with open(work / "advtrain.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            sampler = Sampler(proc.pid, exp, args.interval)
            sampler.start()
            rc = proc.wait()
            time.sleep(3 * args.interval)  # the cluster after the driver has gone
            sampler.done.set()
            sampler.join()
        wall = time.monotonic() - t0
    finally:
        local_cluster.down(work / "ray", purge=True)
    summary = summarize(sampler.rows, args.samples)
    result = {"samples": args.samples, "rc": rc, "wall_s": round(wall, 1), **summary}
    (args.out / "memory_over_trials.json").write_text(
        json.dumps({**result, "rows": sampler.rows}, indent=1)
    )
    plot(sampler.rows, args.out / "memory_over_trials.png")
    print(f"advtrain tune, {args.samples} trials: rc {rc}, {wall:.0f} s; log {work}/advtrain.log")
    print("| finished | " + " | ".join(GROUPS) + " | standing | machine used |")
    print("|---" * (len(GROUPS) + 3) + "|")
    for k, row in sorted(summary["at_finished"].items()):
        cells = " | ".join(f"{row[g]:.0f}" for g in GROUPS)
        print(f"| {k} | {cells} | {_standing(row):.0f} | {row['machine used']:.0f} |")
    slopes = summary["mb_per_trial"]
    print("MB per finished trial over the second half (least squares over every sample):")
    print(" | ".join(f"{g} {v:+.2f}" if v is not None else f"{g} n/a" for g, v in slopes.items()))
    print(
        f"standing part {summary['standing_first_mb']:.0f} MB at the start, "
        f"{summary['standing_last_mb']:.0f} MB after the driver exited; machine peak "
        f"{summary['machine_used_peak_mb']:.0f} MB; at most {summary['max_controllers']} Train "
        f"controller(s) and {summary['max_cleaners']} cleaner(s) alive at once"
    )
    print(f"written: {args.out / 'memory_over_trials.json'}, {args.out / 'memory_over_trials.png'}")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
