"""Ray Train overhead: epoch time of one plain process against Ray Train with 1 and 2 workers.

    python -m benchmarks.ray_overhead [--train-size 8192] [--epochs 3] [--repeats 3] \
        [--models cnn,madry] [--setups process,1x256,2x128,2x256] [--steps-per-call 1,8] \
        [--strategy auto,mwms] [--communication auto,ring] [--bytes-per-pack 0] \
        [--inter-op-threads 0] [--input plain,autotune,distributed]
    python -m benchmarks.ray_overhead --quick      # smoke run, written to the temp folder

What runs. PGD-10 training at linf eps 0.3 (Adam, constant learning rate) of each `--models`
model in these setups, on the machine's CPUs (`--cpus`, default all; the issue's machine has 2):

    process    one plain process (no Ray running), batch 256, TF pinned to all CPUs
    1x256      Ray Train, 1 worker with all CPUs, batch 256
    2x128      Ray Train, 2 workers with half the CPUs each, batch 128 each (global 256)
    2x256      Ray Train, 2 workers x 256 (global 512: what a larger per-worker batch buys)
    tf-2x128   (opt-in) 2 plain processes under MultiWorkerMirroredStrategy on loopback, no Ray:
    tf-2x256   separates what Ray costs from what MWMS and the 1-thread split cost

crossed with the candidate options (each a comma-separated list; a cell is one combination,
options that do not apply to a setup are left out of it): `--steps-per-call` (optimizer steps
per compiled call: a `tf.while_loop` in the graph), `--strategy` (1 worker: `auto` = the default
strategy, `mwms` = MultiWorkerMirroredStrategy as before), `--communication`/`--bytes-per-pack`
(MWMS CommunicationOptions), `--inter-op-threads` (workers of 2-worker setups; 0 =
`configure_tensorflow`'s choice), `--input` (the training pipeline: `plain` = a per-worker
tf.data pipeline with autotuning off, what training now runs; `autotune` = the same with
autotuning on, what the plain process ran before; `distributed` =
`distribute_datasets_from_function` with autotuning on, what MWMS workers ran before). Every
worker and the plain process run the
same code: `workflows.train`'s `configure_tensorflow`, `make_strategy`, `shard_datasets`, then
`advtrain.training.AdversarialTraining.train_epoch` (the probe, reports and checkpoints of a real
run are left out: they are not per-epoch training time). Plain processes are freshly spawned for
each run; each round starts an embedded Ray for its Ray cells and shuts it down after, so the
plain processes never share the cores with Ray's daemons.

Honest measurement. Every cell runs `--repeats` times, interleaved: round r runs every cell once,
the order rotated each round (plain-process cells before the Ray cells in even rounds, after them
in odd ones). The first epoch of each run is tracing and warm-up and is excluded; a run's epoch
time is the median of its other epochs (rank 0; MWMS keeps ranks in lockstep). Per cell: median
and min-max over runs, and the ratio of medians to the plain process with the same steps per
call and input (`distributed` is compared with the process's `autotune`). The 1-minute load
average is read before and after each run. Per steady epoch each worker records its own CPU
seconds (`time.process_time`, all threads) and rank 0 the machine's busy CPU seconds (psutil);
"other CPU" = busy - the workers' own: what Ray's daemons (and anything else) took from the cores
during the epoch. On a busy machine compare cells by own CPU per step and by the paired breakdown
below, not by wall time.

Step breakdown. After its epochs each worker (or process) runs `--breakdown-rounds` rounds (3,
after one for tracing); a round takes fresh iterators, draws one batch from each untimed (a
pipeline's start is a per-epoch cost), then times back to back, under the run's strategy and
options:
    step/call    `--loop-steps` (2) training steps, one compiled call each (`train_steps(it, 1)`)
    step looped  as many steps in one compiled call (`train_steps(it, n)`, the graph loop)
    compute      `AdversarialTraining.replica_gradients` on one per-worker batch under
                 `strategy.run`: PGD-10 and the loss gradients, no collective, no update
    all-reduce   `ReplicaContext.all_reduce(SUM)` of zero tensors shaped like the gradients: the
                 collective alone (ranks call it in lockstep, so it includes waiting for the
                 slower rank's dispatch); ~0 with the default strategy
    data         pulling one batch from the training pipeline in a compiled loop (not additive:
                 training prefetches in the background)
Reported per step, medians over rounds (wall, and CPU beside it), with two differences taken
inside each round: `dispatch` = step/call - step looped (what one Python call per step costs) and
`rest` = step looped - compute - all-reduce (the optimizer update, metrics, the iterator, and
waiting for the other rank). For 2 workers compute is the slower rank's (it bounds the step),
the other parts the mean over ranks. `epoch step` = steady epoch time / steps per epoch, and
`epoch overhead` = steady epoch time - steps x step/call (step looped when steps per call > 1):
the per-epoch cost outside the steps (iterator set-up and deletion, metric results).
Results: benchmarks/results/ray_overhead.json, rewritten atomically after every run.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import multiprocessing
import os
import platform
import queue as queue_module
import socket
import statistics
import subprocess
import tempfile
import time
import traceback
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# name: (runner, workers, per-worker batch)
SETUPS = {
    "process": ("process", 1, 256),
    "1x256": ("ray", 1, 256),
    "2x128": ("ray", 2, 128),
    "2x256": ("ray", 2, 256),
    "tf-2x128": ("tf", 2, 128),
    "tf-2x256": ("tf", 2, 256),
}
DEFAULT_SETUPS = ("process", "1x256", "2x128", "2x256")
MODELS = ("cnn", "madry")
# --input: (autotune, distributed) for workflows.train.shard_datasets. "plain" is what training
# runs; "autotune" and "distributed" are the paths before issue 13 (see the module docstring).
INPUTS = {"plain": (False, None), "autotune": (True, None), "distributed": (True, True)}
PARTS = ("step_per_call", "step_looped", "compute", "allreduce", "data")
CHILD_TIMEOUT_S = 3600


def _busy_cpu_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one call; CPU is this process's, all threads."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _breakdown(run, strategy, dataset_for, x, y, steps: int, rounds: int, loop_steps: int) -> dict:
    """Per-step seconds of the step's parts, paired (module docstring, "Step breakdown").

    Every round takes three fresh iterators, draws one batch from each untimed, then times back
    to back: `loop_steps` steps as one call each, the same number in one call, one gradient
    computation, one all-reduce, the same number of batches pulled. The parts
    of a round share the machine's load at that moment, so their differences are meaningful even
    on a busy machine; the first round (tracing) is dropped and the medians over the others are
    returned, with each part's CPU seconds beside its wall seconds (wall - CPU: time waited).
    """
    import tensorflow as tf

    xb, yb = tf.constant(x[: run.cfg.batch_size]), tf.constant(y[: run.cfg.batch_size])
    variables = run.model.trainable_variables

    def gradient_sum():
        grads = run.replica_gradients(xb, yb)[0]
        return tf.add_n([tf.reduce_sum(g) for g in grads])

    def all_reduce():
        zeros = [tf.zeros(v.shape, v.dtype) for v in variables]
        reduced = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, zeros)
        return tf.add_n([tf.reduce_sum(r) for r in reduced])

    compute_fn = tf.function(
        lambda: strategy.experimental_local_results(strategy.run(gradient_sum))
    )
    reduce_fn = tf.function(lambda: strategy.experimental_local_results(strategy.run(all_reduce)))

    @tf.function
    def pull(iterator, n):
        def body(i, acc):
            part = strategy.run(lambda bx, by: tf.reduce_sum(bx), args=next(iterator))
            return i + 1, acc + strategy.experimental_local_results(part)[0]

        return tf.while_loop(
            lambda i, _: i < n, body, (tf.constant(0), tf.constant(0.0)), parallel_iterations=1
        )[1]

    n = max(1, min(loop_steps, steps - 1))
    samples: dict[str, list] = {name: [] for name in PARTS}
    for r in range(rounds + 1):
        its = [iter(dataset_for(r)) for _ in range(3)]  # fresh batches for each timed part
        if steps > n:
            # Each iterator's first batch untimed: a fresh pipeline's start (shuffle buffer,
            # threads) is a per-epoch cost, reported as `epoch overhead`, not a per-step one.
            run.train_steps(its[0], 1)
            run.train_steps(its[1], 1)
            pull(its[2], tf.constant(1))

        def per_call(it=its[0]):
            for _ in range(n):
                run.train_steps(it, 1)

        parts = {
            "step_per_call": _timed(per_call),
            "step_looped": _timed(lambda it=its[1]: run.train_steps(it, n)),
            "compute": _timed(compute_fn),
            "allreduce": _timed(reduce_fn),
            "data": _timed(lambda it=its[2]: pull(it, tf.constant(n)).numpy()),
        }
        # Iterators are deleted here, outside the timed parts (a distributed one sits in a
        # reference cycle, so only a collection frees it).
        del per_call, its
        gc.collect()
        if r == 0:
            continue  # tracing
        for name, (wall, cpu) in parts.items():
            per = n if name in ("step_per_call", "step_looped", "data") else 1
            samples[name].append((wall / per, cpu / per))
    out = {"loop_steps": n}
    for name, values in samples.items():
        out[name] = statistics.median(v[0] for v in values)
        out[f"{name}_cpu"] = statistics.median(v[1] for v in values)
    # Paired: what one call per step costs over a graph loop, per step, in the same rounds.
    out["dispatch"] = statistics.median(
        a[0] - b[0] for a, b in zip(samples["step_per_call"], samples["step_looped"])
    )
    return out


def measure(spec: dict, rank: int = 0, world: int = 1) -> dict:
    """Trains `spec["train"]["epochs"]` epochs in this process (a Ray worker or a plain process)
    and times them and the step's parts; returns this rank's raw numbers."""
    from workflows.train import configure_tensorflow, make_strategy, shard_datasets

    tf = configure_tensorflow(spec["cpus"], inter_op_threads=spec["inter_op_threads"] or None)
    tf.get_logger().setLevel("ERROR")
    from advtrain.config import TrainConfig
    from advtrain.training import AdversarialTraining

    cfg = TrainConfig.from_dict(spec["train"])
    strategy = make_strategy(
        world,
        strategy=spec["strategy"],
        communication=spec["communication"],
        bytes_per_pack=spec["bytes_per_pack"],
    )
    autotune, distributed = INPUTS[spec["input"]]
    idx, dataset_for, steps, data = shard_datasets(
        cfg, strategy, rank, world, autotune=autotune, distributed=distributed
    )
    run = AdversarialTraining(
        cfg,
        steps_per_epoch=steps,
        strategy=strategy,
        rank=rank,
        steps_per_call=spec["steps_per_call"],
    )
    epochs = []
    for epoch in range(cfg.epochs):
        t0, c0, b0 = time.perf_counter(), time.process_time(), _busy_cpu_seconds()
        run.train_epoch(dataset_for(epoch))  # as run_epochs times it: dataset, steps, metrics
        epochs.append(
            {
                "seconds": time.perf_counter() - t0,
                "own_cpu": time.process_time() - c0,
                "busy_cpu": _busy_cpu_seconds() - b0,
            }
        )
    x, y = data.x_train[idx], data.y_train[idx]  # idx indexes the train_size-cut prefix
    parts = _breakdown(
        run, strategy, dataset_for, x, y, steps, spec["breakdown_rounds"], spec["loop_steps"]
    )
    return {
        "rank": rank,
        "world": world,
        "steps": steps,
        "steps_per_call": run.steps_per_call,
        "strategy": type(strategy).__name__,
        "epochs": epochs,
        "breakdown": parts,
    }


def _ray_worker(config: dict) -> None:
    import ray.train

    from advtrain.files import write_json

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    out = measure(config["spec"], rank, ctx.get_world_size())
    write_json(Path(config["out_dir"], f"rank{rank}.json"), out)


def _child(spec: dict, rank: int, world: int, env: dict, queue) -> None:
    os.environ.update(env)
    try:
        queue.put((rank, measure(spec, rank, world)))
    except BaseException:
        queue.put((rank, {"error": traceback.format_exc()}))
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_plain(spec: dict, workers: int) -> list[dict]:
    """Fresh spawned processes: one plain process, or `workers` under MWMS over loopback."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    hosts = [f"127.0.0.1:{_free_port()}" for _ in range(workers)]
    procs = []
    for rank in range(workers):
        env = {
            "TF_CONFIG": json.dumps(
                {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": rank}}
            )
        }
        procs.append(
            ctx.Process(
                target=_child, args=(spec, rank, workers, env if workers > 1 else {}, queue)
            )
        )
    for proc in procs:
        proc.start()
    results: dict[int, dict] = {}
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    try:
        while len(results) < workers:
            try:
                rank, out = queue.get(timeout=5)
                results[rank] = out
            except queue_module.Empty:
                # A child that died before reporting (killed, crashed in C++) never will.
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead and not queue.empty():
                    continue  # a failing child's error report is still in the pipe
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"a benchmark process ended without a result (exit codes {dead})"
                    ) from None
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    errors = [r["error"] for r in results.values() if "error" in r]
    if errors:
        raise RuntimeError("a benchmark process failed:\n" + errors[0])
    return [results[r] for r in range(workers)]


def _run_ray(spec: dict, workers: int, storage: str, name: str) -> list[dict]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    with tempfile.TemporaryDirectory() as out_dir:
        trainer = TensorflowTrainer(
            _ray_worker,
            train_loop_config={"spec": spec, "out_dir": out_dir},
            scaling_config=ScalingConfig(
                num_workers=workers, resources_per_worker={"CPU": spec["cpus"]}
            ),
            run_config=RunConfig(
                name=name, storage_path=storage, failure_config=FailureConfig(max_failures=0)
            ),
        )
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"{name} failed: {result.error!r}")
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(workers)]


def _cells(args) -> list[dict]:
    """Every (setup, option combination) to run, options that do not apply left out."""
    cells = []
    for setup in args.setups:
        runner, workers, batch = SETUPS[setup]
        strategies = (
            ["auto"] if runner == "process" else (args.strategy if workers == 1 else ["mwms"])
        )
        for k, strategy in itertools.product(args.steps_per_call, dict.fromkeys(strategies)):
            mwms = workers > 1 or strategy == "mwms"
            comms = (
                list(dict.fromkeys(itertools.product(args.communication, args.bytes_per_pack)))
                if mwms
                else [("auto", 0)]
            )
            inter = args.inter_op_threads if workers > 1 else [0]
            # "distributed" differs from "autotune" only where the strategy distributes.
            inputs = [i for i in args.input if mwms or i != "distributed"] or ["autotune"]
            for (comm, pack), threads, source in itertools.product(
                comms, dict.fromkeys(inter), dict.fromkeys(inputs)
            ):
                cells.append(
                    {
                        "setup": setup,
                        "runner": runner,
                        "workers": workers,
                        "batch": batch,
                        "steps_per_call": k,
                        "strategy": "mwms" if mwms else "default",
                        "communication": comm if mwms else "-",
                        "bytes_per_pack": pack,
                        "inter_op_threads": threads,
                        "input": source,
                    }
                )
    return cells


def _cell_key(cell: dict) -> str:
    key = f"{cell['setup']} k={cell['steps_per_call']} {cell['strategy']}"
    if cell["strategy"] == "mwms":
        key += f" {cell['communication']}" + (
            f" pack={cell['bytes_per_pack']}" if cell["bytes_per_pack"] else ""
        )
    if cell["inter_op_threads"]:
        key += f" inter={cell['inter_op_threads']}"
    if cell["input"] != "plain":
        key += f" input={cell['input']}"
    return key


def _summarise_run(ranks: list[dict]) -> dict:
    steady = slice(1, None)
    steps = ranks[0]["steps"]
    epoch_s = statistics.median(e["seconds"] for e in ranks[0]["epochs"][steady])
    own = sum(statistics.median(e["own_cpu"] for e in r["epochs"][steady]) for r in ranks)
    busy = statistics.median(e["busy_cpu"] for e in ranks[0]["epochs"][steady])
    parts = {k: statistics.mean(r["breakdown"][k] for r in ranks) for k in ranks[0]["breakdown"]}
    parts["compute"] = max(r["breakdown"]["compute"] for r in ranks)
    step = parts["step_per_call"] if ranks[0]["steps_per_call"] == 1 else parts["step_looped"]
    out = {
        "epoch_seconds": epoch_s,
        "epoch_step_seconds": epoch_s / steps,
        "steps": steps,
        "own_cpu_per_step": own / steps,
        "other_cpu_per_epoch": busy - own,
        "rest": parts["step_looped"] - parts["compute"] - parts["allreduce"],
        "epoch_overhead": epoch_s - steps * step,
    }
    out.update({k: v for k, v in parts.items() if k != "loop_steps"})
    return out


SUMMARY_KEYS = (
    "epoch_step_seconds",
    *PARTS,
    "dispatch",
    "rest",
    "epoch_overhead",
    "own_cpu_per_step",
    "other_cpu_per_epoch",
    "step_looped_cpu",
    "compute_cpu",
)


def _summarise(runs: list[dict]) -> list[dict]:
    rows = []

    def key(r):
        return r["model"], r["key"]

    for (model, cell_key), group in itertools.groupby(sorted(runs, key=key), key=key):
        group = list(group)
        epochs = [g["summary"]["epoch_seconds"] for g in group]
        row = {
            "model": model,
            "cell": cell_key,
            **group[0]["cell"],
            "runs": len(group),
            "steps": group[0]["summary"]["steps"],
            "epoch_seconds_median": statistics.median(epochs),
            "epoch_seconds_min": min(epochs),
            "epoch_seconds_max": max(epochs),
            "load_min": min(min(g["load_before"], g["load_after"]) for g in group),
            "load_max": max(max(g["load_before"], g["load_after"]) for g in group),
        }
        row.update(
            {f"{k}_median": statistics.median(g["summary"][k] for g in group) for k in SUMMARY_KEYS}
        )
        rows.append(row)
    for row in rows:
        base = [r for r in rows if r["model"] == row["model"] and r["runner"] == "process"]
        source = "autotune" if row["input"] == "distributed" else row["input"]
        same = (
            [
                r
                for r in base
                if (r["steps_per_call"], r["input"]) == (row["steps_per_call"], source)
            ]
            or [r for r in base if r["steps_per_call"] == row["steps_per_call"]]
            or base
        )
        if same:
            ref = same[0]["epoch_seconds_median"]
            row["vs_process"] = row["epoch_seconds_median"] / ref - 1.0
            row["vs_process_min_max"] = [
                row["epoch_seconds_min"] / ref - 1.0,
                row["epoch_seconds_max"] / ref - 1.0,
            ]
    return rows


def _print_table(rows: list[dict]) -> None:
    print("Seconds per step unless marked; breakdown medians (module docstring).")
    print(
        "| model | cell | runs | epoch s median [min-max] | vs process | epoch step | step/call | "
        "step looped | compute | all-reduce | dispatch | rest | epoch overhead s | own CPU/step | "
        "other CPU/epoch | load 1 min |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['vs_process']:+.0%}" if "vs_process" in r else "-"
        print(
            f"| {r['model']} | {r['cell']} | {r['runs']} | {r['epoch_seconds_median']:.2f} "
            f"[{r['epoch_seconds_min']:.2f}-{r['epoch_seconds_max']:.2f}] | {vs} | "
            f"{r['epoch_step_seconds_median']:.3f} | {r['step_per_call_median']:.3f} | "
            f"{r['step_looped_median']:.3f} | {r['compute_median']:.3f} | "
            f"{r['allreduce_median']:.4f} | {r['dispatch_median']:.4f} | {r['rest_median']:.3f} | "
            f"{r['epoch_overhead_median']:.2f} | {r['own_cpu_per_step_median']:.3f} | "
            f"{r['other_cpu_per_epoch_median']:.2f} | {r['load_min']:.1f}-{r['load_max']:.1f} |"
        )


def _machine() -> dict:
    from importlib.metadata import version

    here = Path(__file__).parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False, cwd=here
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"],
                capture_output=True,
                text=True,
                check=False,
                cwd=here,
            ).stdout.strip()
        )
    except OSError:
        commit, dirty = "", False
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": version("tensorflow"),
        "ray": version("ray"),
        "commit": commit,
        "dirty": dirty,
    }


def _csv(kind):
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def _parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--train-size", type=int, default=None, help="default 8192 (--quick: 2048)")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="per run, >= 2; the first is excluded (tracing); default 3 (--quick: 2)",
    )
    p.add_argument("--repeats", type=int, default=None, help="default 3 (--quick: 1)")
    p.add_argument(
        "--models", type=_csv(str), default=None, help="default cnn,madry (--quick: cnn)"
    )
    p.add_argument(
        "--setups",
        type=_csv(str),
        default=list(DEFAULT_SETUPS),
        help=f"some of {','.join(SETUPS)}; default {','.join(DEFAULT_SETUPS)}",
    )
    p.add_argument("--steps-per-call", type=_csv(int), default=[1])
    p.add_argument(
        "--strategy",
        type=_csv(str),
        default=["auto"],
        help="1 worker: auto (default strategy), mwms",
    )
    p.add_argument("--communication", type=_csv(str), default=["auto"], help="MWMS: auto, ring")
    p.add_argument("--bytes-per-pack", type=_csv(int), default=[0])
    p.add_argument(
        "--inter-op-threads", type=_csv(int), default=[0], help="2-worker setups; 0 = the default"
    )
    p.add_argument("--input", type=_csv(str), default=["plain"], help=f"some of {','.join(INPUTS)}")
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument(
        "--breakdown-rounds", type=int, default=3, help="timed rounds, after one for tracing"
    )
    p.add_argument("--loop-steps", type=int, default=2, help="steps per breakdown round and part")
    p.add_argument(
        "--quick", action="store_true", help="smaller defaults (above); written to the temp folder"
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    defaults = {
        "train_size": (8192, 2048),
        "epochs": (3, 2),
        "repeats": (3, 1),
        "models": (list(MODELS), ["cnn"]),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.out is None:
        args.out = (
            Path(tempfile.gettempdir()) / "ray_overhead_quick.json"
            if args.quick
            else RESULTS / "ray_overhead.json"
        )
    for name, values, allowed in (
        ("models", args.models, MODELS),
        ("setups", args.setups, tuple(SETUPS)),
        ("strategy", args.strategy, ("auto", "mwms")),
        ("communication", args.communication, ("auto", "ring")),
        ("input", args.input, tuple(INPUTS)),
    ):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"--{name}: unknown {', '.join(bad)}; expected some of {', '.join(allowed)}")
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first is excluded)")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import ray

    from advtrain.files import write_json
    from workflows.connect import connect
    from workflows.train import WORKER_ENV

    cells = _cells(args)
    base = {
        "method": "pgd",
        "eps": 0.3,
        "steps": 10,
        "epochs": args.epochs,
        "train_size": args.train_size,
        "schedule": "constant",
        "guard": False,
    }
    doc = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": _machine(),
        "runs": [],
        "rows": [],
    }
    total = len(args.models) * args.repeats * len(cells)
    print(
        f"{total} runs: {len(cells)} cells x {len(args.models)} model(s) x {args.repeats} repeats",
        flush=True,
    )
    done = 0
    with tempfile.TemporaryDirectory() as storage:
        for model, rnd in itertools.product(args.models, range(args.repeats)):
            shift = rnd % len(cells)
            order = cells[shift:] + cells[:shift]
            plain = [c for c in order if c["runner"] != "ray"]
            on_ray = [c for c in order if c["runner"] == "ray"]
            for group in [plain, on_ray] if rnd % 2 == 0 else [on_ray, plain]:
                if not group:
                    continue
                use_ray = group[0]["runner"] == "ray"
                if use_ray:
                    connect(
                        None,
                        num_cpus=args.cpus,
                        runtime_env={"env_vars": WORKER_ENV},
                        logging_level="ERROR",
                        log_to_driver=False,
                    )
                try:
                    for cell in group:
                        spec = {
                            "train": {**base, "model": model, "batch_size": cell["batch"]},
                            "cpus": args.cpus / cell["workers"],
                            "steps_per_call": cell["steps_per_call"],
                            "strategy": "mwms" if cell["strategy"] == "mwms" else "auto",
                            "communication": cell["communication"]
                            if cell["strategy"] == "mwms"
                            else "auto",
                            "bytes_per_pack": cell["bytes_per_pack"],
                            "inter_op_threads": cell["inter_op_threads"],
                            "input": cell["input"],
                            "breakdown_rounds": args.breakdown_rounds,
                            "loop_steps": args.loop_steps,
                        }
                        load_before = os.getloadavg()[0]
                        t0 = time.perf_counter()
                        if use_ray:
                            ranks = _run_ray(spec, cell["workers"], storage, f"bench_{done}")
                        else:
                            ranks = _run_plain(spec, cell["workers"])
                        wall = time.perf_counter() - t0
                        record = {
                            "model": model,
                            "round": rnd,
                            "key": _cell_key(cell),
                            "cell": cell,
                            "load_before": load_before,
                            "load_after": os.getloadavg()[0],
                            "wall_seconds": wall,
                            "ranks": ranks,
                            "summary": _summarise_run(ranks),
                        }
                        doc["runs"].append(record)
                        done += 1
                        s = record["summary"]
                        print(
                            f"[{done}/{total}] {model} {record['key']}: epoch "
                            f"{s['epoch_seconds']:.2f} s, per step: epoch "
                            f"{s['epoch_step_seconds']:.3f}, 1/call {s['step_per_call']:.3f}, "
                            f"looped {s['step_looped']:.3f} = compute {s['compute']:.3f} + "
                            f"all-reduce {s['allreduce']:.4f} + rest {s['rest']:.3f}; epoch "
                            f"overhead {s['epoch_overhead']:.2f} s; own CPU "
                            f"{s['own_cpu_per_step']:.3f}; other CPU "
                            f"{s['other_cpu_per_epoch']:.2f} s/epoch; load {load_before:.1f} -> "
                            f"{record['load_after']:.1f}; wall {wall:.0f} s",
                            flush=True,
                        )
                        doc["rows"] = _summarise(doc["runs"])
                        write_json(args.out, doc)
                finally:
                    if use_ray:
                        ray.shutdown()
    _print_table(doc["rows"])
    print(f"Results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
