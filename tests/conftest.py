"""Shared fixtures: `ray_cluster`, one real local Ray cluster on 127.0.0.1 per test session."""

from __future__ import annotations

import os

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


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                  "AWS_DEFAULT_REGION": "us-east-1"}


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
