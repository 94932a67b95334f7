"""Ray Train overhead: epoch time of one plain process, 1 Ray worker and 2 Ray workers.

    python -m benchmarks.ray_overhead [--train-size 16384] [--epochs 2]

cnn, PGD-10 training at linf eps 0.3, the same global batch everywhere (256: 1 x 256 or 2 x 128),
plus 2 workers x 256 (global 512) to show what a larger per-worker batch buys. The epoch time is
taken from the workers' own per-epoch metrics (training steps only; the probe and Ray's start-up
are excluded and reported separately as wall time). Ray runs on an embedded local instance with
1 CPU per worker; the single process is pinned to the same thread counts. Results:
benchmarks/results/ray_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-size", type=int, default=16384)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from advtrain.config import TrainConfig

    base = dict(model="cnn", method="pgd", eps=0.3, steps=10, epochs=args.epochs, train_size=args.train_size,
                probe_size=64, schedule="constant", guard=False)
    rows = []

    # 1. One plain process, TF pinned to 2 threads (the machine's 2 CPUs, as 2 workers get).
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    from advtrain.training import fit

    t0 = time.perf_counter()
    _, history, _ = fit(TrainConfig(batch_size=256, **base))
    rows.append({"setup": "1 process, batch 256", "workers": 0, "per_worker_batch": 256, "global_batch": 256,
                 "epoch_seconds": [h["epoch_seconds"] for h in history], "wall_seconds": time.perf_counter() - t0})

    # 2. Ray Train on an embedded local Ray.
    from workflows import cluster
    from workflows.train import fit_distributed, read_final

    cluster.connect(None, num_cpus=2)
    for workers, batch in ((1, 256), (2, 128), (2, 256)):
        with tempfile.TemporaryDirectory() as storage:
            t0 = time.perf_counter()
            result = fit_distributed(TrainConfig(batch_size=batch, **base), workers=workers, gpu=False,
                                     cpus_per_worker=2 // workers, storage_path=storage,
                                     name=f"bench_{workers}x{batch}", max_failures=0)
            wall = time.perf_counter() - t0
            _, history, _ = read_final(result)
        rows.append({"setup": f"Ray Train {workers} worker(s) x batch {batch}", "workers": workers,
                     "per_worker_batch": batch, "global_batch": workers * batch,
                     "epoch_seconds": [h["epoch_seconds"] for h in history], "wall_seconds": wall})

    base_epoch = min(rows[0]["epoch_seconds"])
    for r in rows:
        best = min(r["epoch_seconds"])
        r["best_epoch_seconds"] = best
        r["examples_per_second"] = (args.train_size // r["global_batch"]) * r["global_batch"] / best
        r["overhead_vs_process"] = best / base_epoch - 1.0
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / ".ray_overhead.json.tmp"
    tmp.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    tmp.replace(RESULTS / "ray_overhead.json")
    print("| setup | global batch | best epoch s | examples/s | vs 1 process | wall s (incl. start-up) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['global_batch']} | {r['best_epoch_seconds']:.1f} | {r['examples_per_second']:.0f} | "
              f"{r['overhead_vs_process']:+.0%} | {r['wall_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
