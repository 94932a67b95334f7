"""The resource pre-check and trial concurrency, on fixed-size and autoscaling clusters: fail at
once only when the request can never be placed, wait for the autoscaler otherwise."""

from __future__ import annotations

import math

import pytest

from workflows import capacity
from workflows.capacity import Capacity, NodeType

HEAD0 = {"CPU": 0.0, "memory": 8e9, "node:127.0.0.1": 1.0}
GPU_TYPE = NodeType("gpu_worker", {"CPU": 2.0, "GPU": 2.0}, 2)
GPU1 = {"CPU": 1.0, "GPU": 1.0}


def test_fixed_cluster_that_fits_needs_no_wait():
    cap = Capacity(nodes=({"CPU": 2.0, "memory": 1e9},))
    assert capacity.check(cap, 2, {"CPU": 1.0}) is None
    assert capacity.max_concurrent(cap, 1, {"CPU": 1.0}, trials=8) == 2


def test_fixed_cluster_too_small_fails_with_the_numbers():
    cap = Capacity(nodes=({"CPU": 1.0}, {"CPU": 1.0}))
    with pytest.raises(
        ValueError,
        match=r"3 worker\(s\) x \{CPU: 1\} \(in all \{CPU: 3\}\) do not fit the cluster's "
        r"nodes \(\{CPU: 2\}.*Received: workers=3",
    ):
        capacity.check(cap, 3, {"CPU": 1.0})


def test_a_worker_must_fit_on_one_node():
    # Two 1-CPU nodes hold two 1-CPU workers but not one 2-CPU worker.
    cap = Capacity(nodes=({"CPU": 1.0}, {"CPU": 1.0}))
    with pytest.raises(ValueError, match="each worker must fit on one node"):
        capacity.check(cap, 1, {"CPU": 2.0})


def test_autoscaling_cluster_from_zero_waits_instead_of_failing():
    cap = Capacity(nodes=(HEAD0,), node_types=(GPU_TYPE,))
    line = capacity.check(cap, 2, GPU1)
    assert (
        line == "waiting for the autoscaler: 2 worker(s) x {CPU: 1, GPU: 1}, node type gpu_worker, "
        "up to 2 nodes"
    )
    # Concurrency from what the cluster scales to (2 nodes x 2 GPUs), not from what is up now (0).
    assert capacity.max_concurrent(cap, 2, GPU1, trials=8) == 2
    assert capacity.max_concurrent(cap, 2, GPU1, trials=1) == 1


def test_autoscaling_counts_nodes_already_up():
    up = {"CPU": 2.0, "GPU": 2.0, "memory": 4e9, "node:127.0.0.1": 1.0}
    cap = Capacity(nodes=(HEAD0, up), node_types=(GPU_TYPE,))
    assert capacity.check(cap, 2, GPU1) is None
    assert cap.slots_max(GPU1) == 4  # the live node and one more of the type


def test_no_node_type_can_hold_a_worker_fails_at_once():
    cap = Capacity(nodes=(HEAD0,), node_types=(NodeType("cpu_worker", {"CPU": 4.0}, 3),))
    with pytest.raises(
        ValueError,
        match=r"no node type can hold one worker of \{CPU: 1, GPU: 1\} "
        r"\(node types: cpu_worker \{CPU: 4\}\)",
    ):
        capacity.check(cap, 1, GPU1)


def test_request_beyond_max_workers_fails_at_once():
    cap = Capacity(nodes=(HEAD0,), node_types=(GPU_TYPE,))
    with pytest.raises(
        ValueError,
        match=r"5 worker\(s\) x \{CPU: 1, GPU: 1\} exceed what the cluster can scale to: "
        r"4 worker\(s\) \(gpu_worker x 2 at most\)",
    ):
        capacity.check(cap, 5, GPU1)


def test_unlimited_node_type():
    cap = Capacity(nodes=(HEAD0,), node_types=(NodeType("gpu", {"CPU": 4.0, "GPU": 1.0}, -1),))
    assert math.isinf(cap.slots_max(GPU1))
    assert capacity.max_concurrent(cap, 2, GPU1, trials=6) == 6
    assert "any number of nodes" in capacity.check(cap, 64, GPU1)


def test_cluster_config_of_cluster_yaml_holds_its_gpu_node_type():
    # What `python -m workflows.capacity publish` reports for the shipped cluster.yaml.
    from pathlib import Path

    import yaml

    from workflows.ray_internals import new_cluster_config

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())
    parsed = new_cluster_config()
    parsed.ParseFromString(capacity.cluster_config(config))
    (group,) = parsed.node_group_configs
    assert (group.name, dict(group.resources), group.min_count, group.max_count) == (
        "gpu_worker",
        {"CPU": 4, "GPU": 1},
        0,
        4,
    )
