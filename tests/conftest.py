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

    While the session runs, `os.environ` holds `workflows.cluster.env_for(cluster)`
    (RAY_ADDRESS, RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH, ...), applied with
    `workflows.cluster.apply_env`, so `ray.init(address=...)`, `ray.init()` and `ray job submit`
    in tests or their subprocesses reach it; the previous values come back afterwards and the
    cluster is stopped (only its own processes).

    Yields:
        The `workflows.cluster.LocalCluster`.
    """
    from workflows import cluster

    root = tmp_path_factory.mktemp("ray-cluster")
    local = cluster.up(root, num_cpus=1, add_node=True, node_cpus=1)
    # apply_env, not os.environ.update: test modules imported ray at collection, and Ray
    # caches its auth mode and token at import, so ray.init(address=...) would go unauthenticated.
    previous = cluster.apply_env(cluster.env_for(local))
    try:
        yield local
    finally:
        cluster.apply_env(previous)
        cluster.down(root, purge=True)
