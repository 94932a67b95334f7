"""ASHA against the full grid of the same search space.

    python -m benchmarks.asha_vs_grid [--epochs 9] [--train-size 2048]

The space is eps {0.05, 0.1, 0.15} x steps {1, 3} x mix {0.5, 1.0} (12 configs), cnn on a slice
of MNIST, judged under linf eps 0.1. The grid runs every config for every epoch (FIFO); ASHA runs
the same 12 configs (grace 1 epoch, reduction factor 3) and stops weak ones. Reported: the best
validation robust accuracy each finds (the search objective), the test robust accuracy of that
trial, and the compute spent (trial-epochs and wall seconds). Both run on an embedded local Ray.
Results: benchmarks/results/asha_vs_grid.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SPACE = {"eps": {"grid": [0.05, 0.1, 0.15]}, "steps": {"grid": [1, 3]}, "mix": {"grid": [0.5, 1.0]}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 9 epochs puts ASHA's rungs (reduction factor 3) at 1, 3 and 9: a trial that ends at a rung
    # below the last has been stopped. Fewer epochs leave no room for it to save compute.
    p.add_argument("--epochs", type=int, default=9)
    p.add_argument("--train-size", type=int, default=2048)
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from workflows import cluster, results, tune
    from workflows.spec import load_spec

    # Cosine, not one-cycle: ASHA judges every trial after its first epoch, which one-cycle spends
    # raising the learning rate from zero, so the first rung would rank near-untrained models
    # (tune.schedule_warning). probe_size 1000: the objective's sampling noise (about 1 point)
    # must be below the 1-point goal.
    spec = load_spec(None, train=dict(model="cnn", method="pgd", eps=0.1, steps=3, epochs=args.epochs,
                                      batch_size=128, learning_rate=0.003, schedule="cosine",
                                      train_size=args.train_size, probe_size=1000),
                     eval=dict(norm="linf", eps=(0.1,), suite="quick", n=500))
    cluster.connect(None)
    out = {"load_start": os.getloadavg()}
    for name, extra in (("grid", {"scheduler": "fifo"}), ("asha", {"scheduler": "asha", "reduction_factor": 3})):
        search = tune.SearchSpec.from_dict({"space": SPACE, "samples": 1, **extra}, base=spec.train.to_dict())
        run_dir = Path(tempfile.mkdtemp(prefix=f"advtrain-{name}-"))
        tune._write_spec(run_dir, spec, search, None)
        t0 = time.perf_counter()
        grid, _ = tune.run_search(spec, search, run_dir)
        wall = time.perf_counter() - t0
        rows = results.collect(grid, run_dir, spec)
        best = rows[0]
        out[name] = {"trials": len(rows), "trial_epochs": sum(r["epochs_run"] or 0 for r in rows), "wall_s": wall,
                     "best_config": best["config"], "best_val_robust_acc": best["val_robust_acc"],
                     "best_test_robust_acc": best["test_robust_acc"], "best_test_clean_acc": best["test_clean_acc"],
                     "folder": str(run_dir)}
        print(name, json.dumps(out[name]), flush=True)
    g, a = out["grid"], out["asha"]
    out["asha_compute_fraction"] = a["trial_epochs"] / g["trial_epochs"]
    out["asha_wall_fraction"] = a["wall_s"] / g["wall_s"]
    out["val_robust_gap_points"] = 100 * (g["best_val_robust_acc"] - a["best_val_robust_acc"])
    out["load_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / ".asha_vs_grid.json.tmp"
    tmp.write_text(json.dumps({"args": vars(args), **out}, indent=2) + "\n")
    tmp.replace(RESULTS / "asha_vs_grid.json")
    print("| search | trials | trial-epochs | wall s | best val robust | its test robust | its test clean | best config |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("grid", "asha"):
        r = out[name]
        print(f"| {name} | {r['trials']} | {r['trial_epochs']} | {r['wall_s']:.0f} | {r['best_val_robust_acc']:.4f} | "
              f"{r['best_test_robust_acc']:.4f} | {r['best_test_clean_acc']:.4f} | {r['best_config']} |")
    print(f"ASHA: {out['asha_compute_fraction']:.2f} of the grid's trial-epochs, {out['asha_wall_fraction']:.2f} of its "
          f"wall time, {out['val_robust_gap_points']:+.2f} points from its best validation robust accuracy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
