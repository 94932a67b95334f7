"""`ray job submit` to the real local cluster with token auth: a submission without the token is
refused. The documented submission of a search, with its results in a bucket, is
tests/test_autoscaling.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _ray_cli():
    return str(Path(sys.executable).with_name("ray"))


def _submit(env, args, timeout):
    return subprocess.run(
        [_ray_cli(), "job", "submit", "--address", env["RAY_API_SERVER_ADDRESS"], *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_job_submit_without_token_is_refused(ray_cluster, tmp_path):
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")
    }
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    proc = _submit(env, ["--", "echo", "hello"], timeout=120)
    assert proc.returncode != 0
    text = (proc.stdout + proc.stderr).lower()
    assert "hello" not in proc.stdout
    assert "401" in text or "unauth" in text or "token" in text, text[-2000:]
