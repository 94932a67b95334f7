"""Shared fixtures: `ray_cluster`, one real local Ray cluster on 127.0.0.1 per test session."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

# Ray reads this once, when first imported, and otherwise resolves 127.0.0.1 to the machine's
# routable address, where the test cluster does not listen (a connect would then hang). Test
# modules import ray at collection, after this file, so set it here rather than in the fixture.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def pytest_collection_modifyitems(items):
    """Marks every test that uses `ray_cluster` with `ray`, so `-m "not ray"` skips them all."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A two-node local Ray cluster (1 CPU each) with token auth, all on 127.0.0.1.

    While the session runs, `os.environ` holds `workflows.local_cluster.env_for(cluster)`
    (RAY_ADDRESS, RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH, ...), applied with
    `workflows.connect.apply_env`, so `ray.init(address=...)`, `ray.init()` and `ray job submit`
    in tests or their subprocesses reach it; the previous values come back afterwards and the
    cluster is stopped (only its own processes).

    Yields:
        The `workflows.local_cluster.LocalCluster`.
    """
    from workflows import connect, local_cluster

    root = tmp_path_factory.mktemp("ray-cluster")
    local = local_cluster.up(root, num_cpus=1, add_node=True, node_cpus=1)
    # apply_env, not os.environ.update: test modules imported ray at collection, and Ray
    # caches its auth mode and token at import, so ray.init(address=...) would go unauthenticated.
    previous = connect.apply_env(local_cluster.env_for(local))
    try:
        yield local
    finally:
        connect.apply_env(previous)
        local_cluster.down(root, purge=True)


S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's ThreadedMotoServer) on 127.0.0.1, as Ray's own storage
    tests use, reached by pyarrow through AWS_ENDPOINT_URL.

    Yields:
        The environment a client (this process, a Ray cluster's nodes) needs: endpoint and test
        credentials. They are also set in `os.environ` while the session runs.
    """
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A new, empty bucket on the `s3_server`; returns its `s3://` URI."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + "-bkt"
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return f"s3://{name}"


def reserved_placement_groups(cluster, wait_s: float = 30.0) -> list[dict]:
    """Placement groups still reserving resources on `cluster` (not removed, not detached), after
    up to `wait_s` for Ray's asynchronous removals; each as the state API's detailed record."""
    from workflows import local_cluster

    deadline = time.monotonic() + wait_s
    while True:
        groups = local_cluster.query_state(cluster, "placement_groups")
        held = [g for g in groups or [] if g["state"] != "REMOVED" and not g.get("is_detached")]
        if groups is not None and not held or time.monotonic() > deadline:
            return held
        time.sleep(1.0)


def check_nothing_reserved(cluster) -> None:
    """Fails the test that left placement groups reserving the cluster's resources, after
    removing them (from a driver of its own: this process may hold another connection, or none)
    so the tests after it still find the cluster whole."""
    from workflows import local_cluster

    held = reserved_placement_groups(cluster)
    if not held:
        return
    code = (
        "import sys, ray\nfrom ray.util.placement_group import remove_placement_group\n"
        "from workflows.ray_internals import placement_group\n"
        "ray.init(address=sys.argv[1], log_to_driver=False)\n"
        "for h in sys.argv[2:]:\n    remove_placement_group(placement_group(h))\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, cluster.address, *(g["placement_group_id"] for g in held)],
        env={**os.environ, **local_cluster.env_for(cluster)},
        capture_output=True,
        timeout=120,
        check=False,
    )
    pytest.fail(
        f"{len(held)} placement group(s) still reserve the cluster's resources after the test "
        "(removed now): "
        + "; ".join(
            f"{g['placement_group_id'][:8]} of job {g['creator_job_id']}, {g['state']}, "
            f"{[b.get('unit_resources') for b in g.get('bundles') or []]}"
            for g in held
        )
    )


@pytest.fixture(autouse=True)
def _ray_cluster_left_unreserved(request):
    """After each test on `ray_cluster`: nothing of it may still hold the cluster's CPUs (a run
    waiting for resources that a finished test keeps reserved would wait forever)."""
    yield
    if "ray_cluster" in request.fixturenames:
        check_nothing_reserved(request.getfixturevalue("ray_cluster"))
