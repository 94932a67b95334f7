"""In memory or streamed: training throughput and worker memory of the two data paths.

    python -m benchmarks.data_path [--throughput] [--memory] [--repeats 2] \
        [--sizes-gb 0.25,0.5,1,2] [--out benchmarks/results/data_path.json]

Throughput. MNIST (the bundled copy) trained by Ray Train with 1 worker x 256 and 2 workers x 128,
through both paths on the same images: `memory` = `data: bundled` (each worker loads the whole
set and keeps its shard by index), `stream` = the same splits written once as a Parquet file
dataset (`advtrain.file_dataset.write_file_dataset`, 8,192 rows per file) and streamed by Ray Data
(`ray.train.get_dataset_shard`, per-epoch file order, a local shuffle buffer). Two methods: PGD-3
(what a search trains; the data path is a small part of each step) and clean training (one
forward-backward per example: the data path's cost shows). cnn, `--train-size` examples,
`--epochs` epochs; the first epoch (tracing) is left out and a run's examples/s is the median of
the others as the workers report them (`examples_per_second`, rank 0, all workers' examples).
Cells run `--repeats` times, interleaved (every cell once per round, the order reversed every
other round).

Memory. Generated uint8 images, 32x32x3, 10 classes, written as Parquet file datasets of
`--sizes-gb` (train split; val and test 2,048 rows each), each trained one epoch by 2 workers (mlp,
clean, batch 512) through the stream path, and the smaller ones also as an .npz through the
in-memory path. While a run trains, the driver samples every 0.2 s the resident memory (VmRSS)
of each Ray Train worker process (cmdline `RayTrainWorker`) from /proc/PID/status, and its parts:
RssAnon (the worker's own heap: TensorFlow, the model, batches, the shuffle buffer, and in memory
the whole loaded set), RssShmem (pages of Ray's shared-memory object store the worker has mapped
while reading blocks: shared with every process on the node, bounded by the object store's size,
not the worker's) and RssFile (libraries). Reported per worker: each part's peak.

`--object-store-mb` caps Ray's object store for the memory runs (Ray's default is 30% of RAM):
the object store pages a streaming worker maps are bounded by it.

Ray is started once per run with `--cpus` CPUs (default 3 on this 2-core machine: two 1-CPU
Train workers, and one CPU for Ray Data's read tasks, which run outside the workers' placement
group; with 2, the read tasks would wait for the workers forever).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SETUPS = {"1x256": (1, 256), "2x128": (2, 128)}
METHODS = {"pgd3": {"method": "pgd", "steps": 3, "eps": 0.1}, "clean": {"method": "clean"}}


def _worker_pids() -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        if b"RayTrainWorker" in cmd:
            pids.append(int(d))
    return pids


RSS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def _rss_mb(pid: int) -> dict[str, float] | None:
    """VmRSS and its parts: RssAnon (the process's own heap), RssFile (mapped files: libraries),
    RssShmem (shared memory: the pages of Ray's object store the worker has mapped)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        key = line.split(":", 1)[0]
        if key in RSS_FIELDS:
            out[key] = int(line.split()[1]) / 1024
    return out if len(out) == len(RSS_FIELDS) else None


class RssSampler:
    """Samples the RSS (and its parts) of every Ray Train worker process every `period` seconds;
    keeps each part's peak per process."""

    def __init__(self, period: float = 0.2):
        self.period, self.peak, self.samples = period, {}, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for pid in _worker_pids():
                rss = _rss_mb(pid)
                if rss is not None:
                    peak = self.peak.setdefault(pid, dict.fromkeys(RSS_FIELDS, 0.0))
                    for k, v in rss.items():
                        peak[k] = max(peak[k], v)
            self.samples += 1
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _train(
    cfg_dict: dict, workers: int, storage: str, name: str, sampler: RssSampler | None = None
) -> dict:
    from advtrain.config import TrainConfig
    from workflows.train import build_trainer, read_final

    cfg = TrainConfig.from_dict(cfg_dict)
    trainer = build_trainer(
        cfg, workers=workers, cpus_per_worker=1, storage_path=storage, name=name, max_failures=0
    )
    t0 = time.perf_counter()
    if sampler is None:
        result = trainer.fit()
    else:
        with sampler:
            result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.error is not None:
        raise RuntimeError(f"{name} failed: {result.error}")
    _model, history, _summary = read_final(result)
    return {"wall_s": wall, "history": history}


def _export_mnist(root: Path) -> Path:
    from advtrain.data import load_data
    from advtrain.file_dataset import write_file_dataset

    data = load_data("bundled")
    u8 = {
        s: (np.round(data.split(s)[0] * 255).astype(np.uint8), data.split(s)[1])
        for s in ("train", "val", "test")
    }
    return write_file_dataset(root / "mnist-parquet", u8, fmt="parquet", rows_per_file=8192)


def throughput(args, work: Path) -> list[dict]:
    import ray

    parquet = _export_mnist(work)
    cells = [
        (setup, method, path)
        for method in args.methods
        for setup in SETUPS
        for path in ("memory", "stream")
    ]
    runs = []
    for r in range(args.repeats):
        order = cells if r % 2 == 0 else cells[::-1]
        for setup, method, path in order:
            workers, batch = SETUPS[setup]
            cfg = {
                "model": "cnn",
                "epochs": args.epochs,
                "batch_size": batch,
                "train_size": args.train_size,
                "probe_size": 256,
                "schedule": "constant",
                "learning_rate": 0.001,
                "guard": False,
                "data": "bundled" if path == "memory" else str(parquet),
                **METHODS[method],
            }
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
            try:
                out = _train(cfg, workers, str(work / "ray"), f"{setup}-{method}-{path}-{r}")
            finally:
                ray.shutdown()
            steady = [h["examples_per_second"] for h in out["history"][1:]]
            row = {
                "setup": setup,
                "method": method,
                "path": path,
                "round": r,
                "examples_per_second": statistics.median(steady),
                "epochs": [h["examples_per_second"] for h in out["history"]],
                "wall_s": out["wall_s"],
                "load1": os.getloadavg()[0],
            }
            print(json.dumps(row), file=sys.stderr, flush=True)
            runs.append(row)
    return runs


def _generated(root: Path, gb: float, fmt: str) -> tuple[str, int]:
    from advtrain.file_dataset import write_file_dataset

    rng = np.random.default_rng(0)
    n = int(gb * 2**30 // (32 * 32 * 3))
    shape = (32, 32, 3)
    small = {
        s: (rng.integers(0, 256, (2048, *shape), dtype=np.uint8), rng.integers(0, 10, 2048))
        for s in ("val", "test")
    }
    if fmt == "npz":
        path = root / f"gen-{gb:g}gb.npz"
        x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        np.savez(
            path,
            x_train=x,
            y_train=rng.integers(0, 10, n),
            x_val=small["val"][0],
            y_val=small["val"][1],
            x_test=small["test"][0],
            y_test=small["test"][1],
        )
        return str(path), n
    out = root / f"gen-{gb:g}gb"

    def train_chunks(rows: int = 8192):
        # One file's rows at a time: the generator never holds the whole split.
        for lo in range(0, n, rows):
            m = min(rows, n - lo)
            yield rng.integers(0, 256, (m, *shape), dtype=np.uint8), rng.integers(0, 10, m)

    write_file_dataset(out, {"train": train_chunks(), **small}, fmt="parquet", rows_per_file=8192)
    return str(out), n


def memory(args, work: Path) -> list[dict]:
    import ray

    runs = []
    for gb in args.sizes_gb:
        for path in ("stream", "memory"):
            if path == "memory" and gb > args.memory_max_gb:
                continue
            source, n = _generated(work, gb, "parquet" if path == "stream" else "npz")
            cfg = {
                "model": "mlp",
                "method": "clean",
                "epochs": 1,
                "batch_size": 512,
                "probe_size": 256,
                "schedule": "constant",
                "guard": False,
                "data": source,
            }
            store = (
                {"object_store_memory": args.object_store_mb * 2**20}
                if args.object_store_mb
                else {}
            )
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, **store)
            try:
                sampler = RssSampler()
                out = _train(cfg, 2, str(work / "ray"), f"mem-{gb:g}-{path}", sampler)
            finally:
                ray.shutdown()
            row = {
                "dataset_gb": gb,
                "rows": n,
                "path": path,
                "workers": 2,
                "object_store_mb": args.object_store_mb,
                "peak_rss_mb": sorted(round(v["VmRSS"], 1) for v in sampler.peak.values()),
                "peak_mb": [{k: round(v, 1) for k, v in p.items()} for p in sampler.peak.values()],
                "share_per_worker_mb": round(gb * 1024 / 2, 1),
                "samples": sampler.samples,
                "examples_per_second": out["history"][-1]["examples_per_second"],
                "wall_s": out["wall_s"],
            }
            print(json.dumps(row), file=sys.stderr, flush=True)
            runs.append(row)
            if path == "stream":
                import shutil

                shutil.rmtree(source, ignore_errors=True)
            else:
                os.unlink(source)
    return runs


def _table(doc: dict) -> str:
    lines = []
    if doc.get("throughput"):
        lines += [
            "| method | setup | in memory ex/s | streamed ex/s | streamed / in memory |",
            "|---|---|---|---|---|",
        ]
        by = {}
        for r in doc["throughput"]:
            by.setdefault((r["method"], r["setup"], r["path"]), []).append(r["examples_per_second"])
        for method in dict.fromkeys(r["method"] for r in doc["throughput"]):
            for setup in SETUPS:
                mem, st = by.get((method, setup, "memory")), by.get((method, setup, "stream"))
                if not mem or not st:
                    continue
                fmt = lambda v: f"{statistics.median(v):,.0f} [{min(v):,.0f}-{max(v):,.0f}]"
                lines.append(
                    f"| {method} | {setup} | {fmt(mem)} | {fmt(st)} | "
                    f"{statistics.median(st) / statistics.median(mem):.2f} |"
                )
    if doc.get("memory"):
        lines += [
            "",
            (
                "| dataset | rows | path | peak RSS per worker (MB) | of it: own heap (RssAnon) | "
                "object store pages (RssShmem) | dataset share per worker (MB) | ex/s |"
            ),
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in doc["memory"]:
            part = lambda k, r=r: ", ".join(f"{p[k]:,.0f}" for p in r["peak_mb"])
            store = f", store {r['object_store_mb']} MB" if r.get("object_store_mb") else ""
            lines.append(
                f"| {r['dataset_gb']:g} GB | {r['rows']:,} | {r['path']}{store} | {part('VmRSS')} "
                f"| {part('RssAnon')} | {part('RssShmem')} | {r['share_per_worker_mb']:,.0f} | "
                f"{r['examples_per_second']:,.0f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--throughput", action="store_true")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=16384)
    p.add_argument("--methods", default="pgd3,clean")
    p.add_argument("--sizes-gb", default="0.25,0.5,1,2")
    p.add_argument(
        "--memory-max-gb", type=float, default=0.5, help="largest dataset also run in memory"
    )
    p.add_argument("--cpus", type=int, default=3)
    p.add_argument(
        "--object-store-mb",
        type=int,
        default=0,
        help="memory runs: Ray's object store size (default 0: Ray's own, 30%% of RAM)",
    )
    p.add_argument("--work", help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "data_path.json"))
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.sizes_gb = [float(v) for v in args.sizes_gb.split(",") if v]
    if not (args.throughput or args.memory):
        args.throughput = args.memory = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from advtrain.files import write_json

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        doc = {
            "command": " ".join(["python -m benchmarks.data_path", *(argv or sys.argv[1:])]),
            "cpus": args.cpus,
            "machine_cpus": os.cpu_count(),
        }
        if args.throughput:
            doc["throughput"] = throughput(args, work)
            write_json(args.out, doc)
        elif Path(args.out).is_file():  # a memory-only rerun keeps the file's throughput runs
            doc["throughput"] = json.loads(Path(args.out).read_text()).get("throughput")
        if args.memory:
            doc["memory"] = memory(args, work)
        write_json(args.out, doc)
    print(_table(doc))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
