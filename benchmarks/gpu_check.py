"""GPU check, for a machine with an NVIDIA GPU (the `device` machine, when a session is lent one).

    python -m benchmarks.gpu_check [--out benchmarks/results/gpu_check.json] [--skip-target]

1. `advtrain train --workers 1 --gpu` on a small slice (cnn, PGD-3, 2 epochs, 8,192 images): Ray
   Train gives its worker one GPU; the worker logs the GPU ids Ray assigned it, its
   CUDA_VISIBLE_DEVICES, the GPUs TensorFlow sees and the device holding the model's weights
   (where the compiled train step runs). The check passes when the weights live on a GPU and
   TensorFlow sees exactly the assigned GPU.
2. Target (a) of `benchmarks.time_to_robust` (linf eps 0.1: >= 96% robust, >= 99% clean, within
   3 minutes) in one process on the GPU, with its throughput against the gradient bound.

Exit status 0 when both ran and the placement check passed, 1 when the placement check failed,
2 when TensorFlow sees no GPU (nothing checked: say so, never report a CPU number as a GPU one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from advtrain.files import write_json

RESULTS = Path(__file__).parent / "results"
LINE = re.compile(
    r"advtrain worker 0/1 of \S+ from epoch \d+: node (\w+), GPU ids \[([^\]]*)\], "
    r"CUDA_VISIBLE_DEVICES='([^']*)', weights on (\S+) \(([^)]*)\)"
)


def _gpus() -> list[str]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    return (
        int(out.stdout.strip().splitlines()[-1])
        if out.returncode == 0 and out.stdout.strip()
        else 0
    )


def placement(out_dir: Path) -> dict:
    """Step 1: one Ray Train worker with --gpu; what it reports about its device."""
    cmd = [
        sys.executable,
        "-m",
        "workflows.cli",
        "train",
        "--workers",
        "1",
        "--gpu",
        "--model",
        "cnn",
        "--method",
        "pgd",
        "--eps",
        "0.1",
        "--steps",
        "3",
        "--epochs",
        "2",
        "--train-size",
        "8192",
        "--out",
        str(out_dir),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    m = LINE.search(log)
    found = (
        dict(
            zip(
                ("node", "gpu_ids", "cuda_visible_devices", "weights_device", "device_name"),
                m.groups(),
            )
        )
        if m
        else {}
    )
    metrics = (
        json.loads((out_dir / "metrics.json").read_text())
        if (out_dir / "metrics.json").is_file()
        else {}
    )
    ok = (
        proc.returncode == 0
        and bool(found)
        and found["weights_device"].startswith("GPU")
        and len(found["gpu_ids"].split(",")) == 1
        and found["cuda_visible_devices"] == found["gpu_ids"]
    )
    return {
        "command": " ".join(cmd[2:]).replace("workflows.cli", "advtrain"),
        "exit": proc.returncode,
        "wall_s": wall,
        "worker": found,
        "passed": ok,
        "epochs": [
            {k: e.get(k) for k in ("epoch", "examples_per_second", "epoch_seconds")}
            for e in (metrics.get("epochs") or [])
        ],
        "log_tail": None if ok else log[-4000:],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    p.add_argument("--skip-target", action="store_true", help="only the placement check")
    args = p.parse_args(argv)
    gpus = _gpus()
    if gpus == 0:
        print(
            "gpu_check: TensorFlow sees no GPU on this machine; nothing was checked.",
            file=sys.stderr,
        )
        return 2
    result = {"tensorflow_gpus": gpus}
    with tempfile.TemporaryDirectory() as tmp:
        result["placement"] = placement(Path(tmp) / "run")
    w = result["placement"]["worker"]
    print(
        f"placement: {'PASS' if result['placement']['passed'] else 'FAIL'}: weights on "
        f"{w.get('weights_device')} ({w.get('device_name')}), Ray GPU ids [{w.get('gpu_ids')}], "
        f"CUDA_VISIBLE_DEVICES={w.get('cuda_visible_devices')!r}",
        file=sys.stderr,
    )
    if not args.skip_target:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.time_to_robust", "--target", "a"],
            capture_output=True,
            text=True,
        )
        result["time_to_robust_a"] = {
            "exit": proc.returncode,
            "wall_s": time.perf_counter() - t0,
            "output_tail": (proc.stdout + proc.stderr)[-3000:],
        }
        ttr = RESULTS / "time_to_robust_a.json"
        if proc.returncode == 0 and ttr.is_file():
            result["time_to_robust_a"]["result"] = json.loads(ttr.read_text())
    write_json(args.out, result)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if result["placement"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
