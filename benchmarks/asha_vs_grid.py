"""ASHA against the full grid of the same search space.

    python -m benchmarks.asha_vs_grid [--searches grid,asha3,asha4,sha3] [--epochs 9] \
        [--train-size 2048]

The space is eps {0.05, 0.1, 0.15} x steps {1, 3} x mix {0.5, 1.0} (12 configs), cnn on a slice
of MNIST, judged under linf eps 0.1. The grid runs every config for every epoch (FIFO); ASHA runs
the same 12 configs (grace 1 epoch, reduction factor 3 as `asha3`, 4 as `asha4`: Ray's default)
and stops weak ones; `sha3` is synchronous successive halving with ASHA's rungs and factor 3
(`workflows.halving`: every trial waits at each rung). Trials are seeded, so a config trains
identically in every search; a run of a subset (`--searches asha4`) keeps the other entries of
an earlier results file with the same --epochs and --train-size and compares against its grid.
Reported: the best
validation robust accuracy each finds (the search objective), the test robust accuracy of that
trial, and the compute spent (trial-epochs and wall seconds). Every search runs on an embedded
local Ray.
Results: benchmarks/results/asha_vs_grid.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from advtrain.files import write_json

RESULTS = Path(__file__).parent / "results"
SEARCHES = {
    "grid": {"scheduler": "fifo"},
    "asha3": {"scheduler": "asha", "reduction_factor": 3},
    "asha4": {"scheduler": "asha", "reduction_factor": 4},
    "sha3": {"scheduler": "sha", "reduction_factor": 3},
}
SPACE = {"eps": {"grid": [0.05, 0.1, 0.15]}, "steps": {"grid": [1, 3]}, "mix": {"grid": [0.5, 1.0]}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--searches", default=",".join(SEARCHES), help=f"comma-separated subset of {list(SEARCHES)}"
    )
    # 9 epochs puts ASHA's rungs at 1, 3 and 9 (reduction factor 3) or 1 and 4 (factor 4): a trial
    # that ends below the last rung has been stopped. Fewer epochs leave ASHA little to save.
    p.add_argument("--epochs", type=int, default=9)
    p.add_argument("--train-size", type=int, default=2048)
    args = p.parse_args(argv)
    names = args.searches.split(",")
    if unknown := sorted(set(names) - set(SEARCHES)):
        p.error(f"unknown --searches {unknown}; known: {list(SEARCHES)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from workflows import results, tune
    from workflows.connect import connect
    from workflows.spec import load_spec
    from workflows.storage import RunFolder

    # Cosine, not one-cycle: ASHA judges every trial after its first epoch, which one-cycle spends
    # raising the learning rate from zero, so the first rung would rank near-untrained models
    # (tune.schedule_warning). probe_size 1000: the objective's sampling noise (about 1 point)
    # must be below the 1-point goal.
    spec = load_spec(
        None,
        train=dict(
            model="cnn",
            method="pgd",
            eps=0.1,
            steps=3,
            epochs=args.epochs,
            batch_size=128,
            learning_rate=0.003,
            schedule="cosine",
            train_size=args.train_size,
            probe_size=1000,
        ),
        eval=dict(norm="linf", eps=(0.1,), suite="quick", n=500),
    )
    path = RESULTS / "asha_vs_grid.json"
    setup = {"epochs": args.epochs, "train_size": args.train_size}
    out = {"setup": setup, "searches": {}}
    if path.is_file():
        earlier = json.loads(path.read_text())
        if earlier.get("setup") == setup:
            out["searches"] = {
                k: v for k, v in earlier.get("searches", {}).items() if k not in names
            }
    connect(None)
    for name in names:
        search = tune.SearchSpec.from_dict(
            {"space": SPACE, "samples": 1, **SEARCHES[name]}, base=spec.train.to_dict()
        )
        run_dir = Path(tempfile.mkdtemp(prefix=f"advtrain-{name}-"))
        folder = RunFolder(run_dir)
        tune.write_spec(folder, spec, search, None)
        load_start, t0 = os.getloadavg(), time.perf_counter()
        grid, _ = tune.run_search(spec, search, folder)
        wall = time.perf_counter() - t0
        rows = results.collect(grid, run_dir, spec)
        best = rows[0]
        out["searches"][name] = {
            "trials": len(rows),
            "trial_epochs": sum(r["epochs_run"] or 0 for r in rows),
            "wall_s": wall,
            "best_config": best["config"],
            "best_val_robust_acc": best["val_robust_acc"],
            "best_test_robust_acc": best["test_robust_acc"],
            "best_test_clean_acc": best["test_clean_acc"],
            "epochs_per_trial": {
                json.dumps(r["config"], sort_keys=True): r["epochs_run"] for r in rows
            },
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_start": load_start,
            "load_end": os.getloadavg(),
            "folder": str(run_dir),
        }
        print(name, json.dumps(out["searches"][name]), flush=True)
    write_json(path, out)
    print(
        "| search | trials | trial-epochs | wall s | best val robust | its test robust | its test "
        "clean | best config |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in out["searches"].items():
        print(
            f"| {name} | {r['trials']} | {r['trial_epochs']} | {r['wall_s']:.0f} | "
            f"{r['best_val_robust_acc']:.4f} | {r['best_test_robust_acc']:.4f} | "
            f"{r['best_test_clean_acc']:.4f} | {r['best_config']} |"
        )
    g = out["searches"].get("grid")
    for name, r in out["searches"].items():
        if g and name != "grid":
            print(
                f"{name}: {r['trial_epochs'] / g['trial_epochs']:.2f} of the grid's trial-epochs, "
                f"{r['wall_s'] / g['wall_s']:.2f} of its wall time, "
                f"{100 * (g['best_val_robust_acc'] - r['best_val_robust_acc']):+.2f} points below "
                "its best validation robust accuracy"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
