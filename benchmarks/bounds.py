"""Bound throughput and tightness: IBP, CROWN-IBP and CROWN (advtrain.bounds).

    python -m benchmarks.bounds MODEL.keras [MODEL.keras ...] [--eps 0.1] [--n 1000] [--crown-n 200]
        [--batch 100]

For each model, on its first n MNIST test images at linf eps: examples per second of the margin
lower bounds (z_y - z_j, last layer folded into the margin), measured after one warm-up batch,
the mean over examples of the smallest margin lower bound (higher is tighter) and the fraction
certified. IBP and CROWN-IBP run compiled (as `advtrain.bounds.certify` does); full CROWN runs
its per-layer passes in chunks, eagerly, on the first `--crown-n` images.

airbus/decomon on the same model and images: `benchmarks/decomon_bench.py` (its own process, as
decomon 0.2.1 needs three patches to run under the pinned Keras and TensorFlow; advtrain never
depends on it).
Results go to benchmarks/results/bounds.json (written atomically) and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS = Path(__file__).resolve().parent / "results"


def _summary(margins: np.ndarray, y: np.ndarray, seconds: float) -> dict:
    others = np.where(np.eye(margins.shape[1], dtype=bool)[y], np.inf, margins)
    worst = others.min(axis=1)
    return {
        "n": len(y),
        "seconds": round(seconds, 3),
        "examples_per_s": round(len(y) / seconds, 1),
        "mean_min_margin_lb": round(float(worst.mean()), 4),
        "certified": round(float((worst > 0).mean()), 4),
        "_worst": worst,
    }


def advtrain_bounds(model, x, y, eps: float, method: str, batch: int) -> dict:
    """advtrain's margin lower bounds, timed after a warm-up batch."""
    import tensorflow as tf

    from advtrain import bounds

    def run(xb, yb, e):
        return bounds.margins_graph(model, xb, yb, e, "linf", (method,))[method]

    fn = run if method == "crown" else tf.function(run)
    e = tf.constant(eps, tf.float32)
    fn(tf.constant(x[:batch]), tf.constant(y[:batch]), e)  # warm-up (tracing)
    out, t0 = [], time.perf_counter()
    for lo in range(0, len(x), batch):
        out.append(fn(tf.constant(x[lo : lo + batch]), tf.constant(y[lo : lo + batch]), e).numpy())
    return _summary(np.concatenate(out), y, time.perf_counter() - t0)


def main(argv=None) -> int:
    import tensorflow as tf

    from advtrain.data import load_data
    from advtrain.files import write_json
    from advtrain.models import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--crown-n", type=int, default=200)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--out", default=str(RESULTS / "bounds.json"))
    args = p.parse_args(argv)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    data = load_data()
    rows = []
    for path in args.models:
        model = load_model(path)
        for method in ("ibp", "crown-ibp", "crown"):
            n = args.crown_n if method == "crown" else args.n
            x, y = data.x_test[:n], data.y_test[:n].astype(np.int32)
            r = advtrain_bounds(model, x, y, args.eps, method, min(args.batch, n))
            rows.append({"model": Path(path).name, "method": method, "eps": args.eps, **r})
            print(
                f"{Path(path).name:32} {method:10} n={r['n']:5} {r['examples_per_s']:9.1f} ex/s  "
                f"mean min margin lb {r['mean_min_margin_lb']:9.4f}  certified "
                f"{r['certified']:.3f}",
                flush=True,
            )
    for row in rows:
        row.pop("_worst")
    write_json(
        Path(args.out),
        {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "tensorflow": tf.__version__,
                "load": list(os.getloadavg()),
            },
            "rows": rows,
        },
    )
    print("\n| model | method | n | examples/s | mean min margin lower bound | certified |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['method']} | {r['n']} | {r['examples_per_s']} | "
            f"{r['mean_min_margin_lb']} | {r['certified']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
