"""What the connected Ray cluster can hold: now, and once its autoscaler has added nodes.

`check` is the pre-check every `train` and `tune` runs before asking Ray for workers: it fails at
once, in one line, when no node could ever hold one worker or the request exceeds what the
cluster can reach; on an autoscaling cluster whose nodes are not up yet it returns what the run
is waiting for instead of failing (the trials' resource requests bring the nodes up).
`max_concurrent` is how many trials fit at once, counted on what the cluster can scale to.

Per-node counting matters: a worker's bundle ({CPU: c, GPU: 1}) must fit on one node, so a
cluster of two 1-GPU nodes holds two workers, not one worker with two GPUs.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

__all__ = ["Capacity", "NodeType", "check", "cluster_config", "max_concurrent", "publish", "read"]


@dataclasses.dataclass(frozen=True)
class NodeType:
    """One node type the autoscaler may start.

    Args:
        name: the node type's name in the cluster config.
        resources: logical resources of one node of this type.
        max_count: most nodes of this type; -1 for no limit.
    """

    name: str
    resources: Mapping[str, float]
    max_count: int


@dataclasses.dataclass(frozen=True)
class Capacity:
    """The cluster's live nodes' total resources, and the node types its autoscaler can add.

    Args:
        nodes: total resources of each live node.
        node_types: the autoscaler's worker node types; empty on a fixed-size cluster.
    """

    nodes: tuple[Mapping[str, float], ...]
    node_types: tuple[NodeType, ...] = ()

    @property
    def autoscaling(self) -> bool:
        """The autoscaler can add nodes of a published node type."""
        return any(t.max_count != 0 for t in self.node_types)

    def slots_now(self, per_worker: Mapping[str, float]) -> int:
        """Workers the live nodes hold (all idle)."""
        return sum(_fits(node, per_worker) for node in self.nodes)

    def slots_max(self, per_worker: Mapping[str, float]) -> int | float:
        """Workers the cluster holds at its largest: the live nodes, plus each node type's
        nodes not up yet; `math.inf` when a type that holds a worker has no limit."""
        total = self.slots_now(per_worker)
        for t in self.node_types:
            slots = _fits(t.resources, per_worker)
            if slots == 0:
                continue
            if t.max_count < 0:
                return math.inf
            live = sum(_is_of_type(node, t) for node in self.nodes)
            total += slots * max(0, t.max_count - live)
        return total


def _is_of_type(node: Mapping[str, float], node_type: NodeType) -> bool:
    # Live nodes carry extra resources (memory, node:<ip>); a node of a type has its resources.
    return all(node.get(k, 0.0) == v for k, v in node_type.resources.items())


def _fits(node: Mapping[str, float], per_worker: Mapping[str, float]) -> int:
    """Workers of `per_worker` one node with `node`'s resources holds."""
    counts = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in per_worker.items() if v > 0]
    return min(counts) if counts else 0


def _describe(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items() if v) + "}"


def read() -> Capacity:
    """The connected cluster's capacity (`ray.init` must have run)."""
    import ray

    nodes = tuple(
        {k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")
    )
    return Capacity(nodes=nodes, node_types=_node_types())


def _node_types() -> tuple[NodeType, ...]:
    # The node groups in the GCS's cluster config (autoscaler.proto's ClusterConfig), read with
    # the same developer-level accessor Ray Train's own pre-check uses (WorkerGroup's
    # insufficient-resources check); Ray has no public API for it. Ray 2.60's autoscaler does not
    # report it itself: `publish` below does, from the autoscaling config.
    from workflows.ray_internals import cluster_config as gcs_cluster_config

    try:
        config = gcs_cluster_config()
    except Exception:  # noqa: BLE001 - a GCS without the key: no node types known
        return ()
    if config is None:
        return ()
    return tuple(
        NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
        for g in config.node_group_configs
        if g.max_count != 0
    )


def cluster_config(autoscaling_config: Mapping) -> bytes:
    """The GCS's ClusterConfig (serialized) for a cluster launcher / autoscaler config: one node
    group per worker node type, with its resources and min/max workers."""
    from workflows.ray_internals import new_cluster_config

    out = new_cluster_config()
    head = autoscaling_config.get("head_node_type")
    for name, spec in autoscaling_config.get("available_node_types", {}).items():
        if name == head:
            continue
        group = out.node_group_configs.add()
        group.name = name
        group.min_count = int(spec.get("min_workers", 0))
        group.max_count = int(spec.get("max_workers", autoscaling_config.get("max_workers", 0)))
        for k, v in (spec.get("resources") or {}).items():
            group.resources[k] = int(v)
    return out.SerializeToString()


def publish(autoscaling_config: Mapping, address: str) -> int:
    """Reports the worker node types of `autoscaling_config` to the GCS at `address`, where
    `read` (and Ray Train's own check) find them; returns how many node types it reported."""
    from workflows.ray_internals import report_cluster_config

    report_cluster_config(address, cluster_config(autoscaling_config))
    return len(
        [
            n
            for n in autoscaling_config.get("available_node_types", {})
            if n != autoscaling_config.get("head_node_type")
        ]
    )


def check(capacity: Capacity, workers: int, per_worker: Mapping[str, float]) -> str | None:
    """Fails when `workers` workers of `per_worker` can never be placed; says what the run waits
    for when the autoscaler must add nodes first.

    Returns:
        `None` when the live nodes hold the workers now; else the one line to print while the
        autoscaler brings nodes up.

    Raises:
        ValueError: no live node and no node type holds one worker, or the request exceeds
            what the cluster can reach (every node type at its maximum).
    """
    need = _describe({k: v * workers for k, v in per_worker.items()})
    one = _describe(per_worker)
    if capacity.slots_now(per_worker) >= workers:
        return None
    if not capacity.autoscaling:
        have = _describe(_total(capacity.nodes))
        # `ray start --head` runs Ray's autoscaler monitor on every cluster, so its presence says
        # nothing; node types the autoscaler can add are known only when published.
        raise ValueError(
            f"{workers} worker(s) x {one} (in all {need}) do not fit the cluster's nodes ({have}; "
            "each worker must fit on one node; an autoscaling cluster must publish its node "
            f"types: python -m workflows.capacity publish CONFIG). Received: workers={workers}"
        )
    holding = [t for t in capacity.node_types if _fits(t.resources, per_worker) > 0]
    if not holding and capacity.slots_now(per_worker) == 0:
        kinds = ", ".join(f"{t.name} {_describe(t.resources)}" for t in capacity.node_types)
        raise ValueError(
            f"no node type can hold one worker of {one} (node types: {kinds}). Received: "
            f"workers={workers}"
        )
    reach = capacity.slots_max(per_worker)
    if reach < workers:
        limits = ", ".join(f"{t.name} x {t.max_count}" for t in holding)
        raise ValueError(
            f"{workers} worker(s) x {one} exceed what the cluster can scale to: {reach:g} "
            f"worker(s) ({limits} at most). Received: workers={workers}"
        )
    types = ", ".join(
        f"node type {t.name}, up to {'any number of' if t.max_count < 0 else t.max_count} nodes"
        for t in holding
    )
    return f"waiting for the autoscaler: {workers} worker(s) x {one}, {types}"


# CPUs a streamed run's Ray Data tasks need beside its Train workers (see `check_stream`).
STREAM_CPUS = 1.0


def _total(nodes) -> dict[str, float]:
    return {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}


def max_concurrent(
    capacity: Capacity,
    workers: int,
    per_worker: Mapping[str, float],
    *,
    trials: int,
    streamed: bool = False,
) -> int:
    """Trials that fit at once on what the cluster can scale to (at least 1, at most `trials`).

    A streamed trial also needs `STREAM_CPUS` for its Ray Data tasks; on a fixed-size cluster
    that bounds the trials at once by the CPUs."""
    reach = capacity.slots_max(per_worker)
    if math.isinf(reach):
        return trials
    fit = int(reach // workers)
    if streamed and not capacity.autoscaling:
        fit = min(
            fit,
            int(
                _total(capacity.nodes)["CPU"]
                // (workers * per_worker.get("CPU", 0.0) + STREAM_CPUS)
            ),
        )
    return max(1, min(trials, fit))


def check_stream(capacity: Capacity, workers: int, per_worker: Mapping[str, float]) -> None:
    """Fails when a streamed run's Ray Data tasks could never get a CPU beside its workers.

    Ray Data reads outside the Train workers' placement group, and its tasks (and the Parquet
    reader's per-epoch file listing) each take a whole CPU: on a cluster whose workers hold
    every CPU nothing is ever read and the run hangs. An autoscaling cluster adds nodes, so only
    a fixed-size one is judged.

    Raises:
        ValueError: fewer than `STREAM_CPUS` CPUs left beside the workers, naming the numbers.
    """
    if capacity.autoscaling:
        return
    total = _total(capacity.nodes)["CPU"]
    used = workers * per_worker.get("CPU", 0.0)
    if total - used < STREAM_CPUS:
        raise ValueError(
            f"a file dataset streams through Ray Data, whose tasks need {STREAM_CPUS:g} CPU beside "
            f"the Train workers: {workers} worker(s) x {_describe(per_worker)} leave "
            f"{total - used:g} of the cluster's {total:g} CPUs. Use fewer workers, or in-memory "
            f"data (an .npz). Received: workers={workers}"
        )


def main(argv=None) -> int:
    """`python -m workflows.capacity publish CONFIG [--address ADDR]`: run on the head after
    `ray start` (cluster.yaml's head_start_ray_commands), so that drivers and Ray Train see the
    node types the autoscaler can add."""
    import argparse

    import yaml

    p = argparse.ArgumentParser(prog="python -m workflows.capacity")
    p.add_argument("action", choices=("publish",))
    p.add_argument(
        "config", help="the autoscaling config (cluster.yaml, ~/ray_bootstrap_config.yaml)"
    )
    p.add_argument(
        "--address", default="auto", help="GCS address; default: the cluster on this machine"
    )
    args = p.parse_args(argv)
    with open(os.path.expanduser(args.config)) as f:
        config = yaml.safe_load(f)
    address = args.address
    if address == "auto":
        from workflows.ray_internals import resolve_address

        address = resolve_address("auto")
    count = publish(config, address)
    print(f"published {count} worker node type(s) to the GCS at {address}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
