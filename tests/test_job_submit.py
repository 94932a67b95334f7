"""`ray job submit` to the real local cluster with token auth: the documented submission of an
advtrain search succeeds, its results land in the storage path, logs show progress, and a
submission without the token is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TINY_SEARCH = """
train: {model: mlp, method: pgd, eps: 0.1, steps: 2, epochs: 1, batch_size: 128, train_size: 2048, probe_size: 64}
eval: {norm: linf, eps: [0.1], suite: quick, n: 100, batch_size: 100}
search: {samples: 1, scheduler: fifo, space: {mix: {grid: [1.0]}}}
"""


def _ray_cli():
    return str(Path(sys.executable).with_name("ray"))


def _submit(env, args, timeout):
    return subprocess.run([_ray_cli(), "job", "submit", "--address", env["RAY_API_SERVER_ADDRESS"], *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_job_submit_with_token_runs_search_and_stores_results(ray_cluster, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_SEARCH)
    out = tmp_path / "exp"
    env = dict(os.environ)
    # The documented command, with `python -m workflows.cli` standing for the `advtrain` script
    # (the job's PATH need not hold the venv's bin folder).
    proc = _submit(env, ["--submission-id", "advtrain-test-job", "--working-dir", str(REPO),
                         "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "runs", "benchmarks/results"]}),
                         "--", "python", "-m", "workflows.cli", "tune", "--config", str(config),
                         "--address", "auto", "--out", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    data = json.loads((out / "trials.json").read_text())
    assert len(data["trials"]) == 1 and data["trials"][0]["test_robust_acc"] is not None
    assert (out / "report.md").is_file() and (out / "best_model.keras").is_file()
    logs = subprocess.run([_ray_cli(), "job", "logs", "--address", env["RAY_API_SERVER_ADDRESS"], "advtrain-test-job"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert logs.returncode == 0
    assert "Trial status" in logs.stdout and "Pareto front" in logs.stdout


def test_job_submit_without_token_is_refused(ray_cluster, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    proc = _submit(env, ["--", "echo", "hello"], timeout=120)
    assert proc.returncode != 0
    text = (proc.stdout + proc.stderr).lower()
    assert "hello" not in proc.stdout
    assert "401" in text or "unauth" in text or "token" in text, text[-2000:]
