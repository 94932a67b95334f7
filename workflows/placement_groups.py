"""Placement groups a driver leaves reserved, released when it is done.

A Ray Train V2 run inside a Tune trial reserves its workers' CPUs/GPUs in a placement group. When
the trial is stopped while that group is being set up (a search interrupted by Ctrl-C or `ray
job stop`), Ray 2.60 can leave the group CREATED after the driver and its job are gone: Train's
own cleaner (ray#58515) had not removed it minutes later, and the group's 1 CPU stayed reserved
on a 2-CPU cluster, so the next 2-worker run waited for resources forever. Tune v1 removed the
groups of the trials it stopped (ray#54305); advtrain's drivers do the same for their own job on
the way out, whatever the search's outcome. Everything is read through Ray's state API (the
dashboard); without it nothing is released and the reason is logged.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def held(job_id: str) -> list:
    """The placement groups `job_id` (hex, as `ray.get_runtime_context().get_job_id()`) created
    that still reserve resources: state not REMOVED, not detached; read through Ray's state API.

    Returns:
        `ray.util.state.common.PlacementGroupState` records.
    """
    from ray.util import state

    groups = state.list_placement_groups(
        filters=[("creator_job_id", "=", job_id)],
        detail=True,
        timeout=10,
        raise_on_missing_output=False,
    )
    return [g for g in groups if g.state != "REMOVED" and not g.is_detached]


def release_own() -> list[str]:
    """Removes every placement group this process's job still holds; call when the job's
    trials and trainers have all ended (nothing of the job may need a group afterwards).

    Returns:
        One `"<id prefix> {resources}"` per group removed; empty when none was left, or when
        Ray's state API does not answer (logged).
    """
    import ray
    from ray.util.placement_group import remove_placement_group

    from workflows.ray_internals import placement_group

    try:
        groups = held(ray.get_runtime_context().get_job_id())
    except Exception as e:  # noqa: BLE001 - no dashboard on this cluster, or it did not answer in time
        logger.warning(
            "could not list this run's placement groups (%s); any Ray left reserved stay so", e
        )
        return []
    released = []
    for g in groups:
        try:
            remove_placement_group(placement_group(g.placement_group_id))
        except Exception as e:  # noqa: BLE001 - removed meanwhile, or the GCS refused: the rest still go
            logger.warning("could not remove placement group %s: %s", g.placement_group_id, e)
            continue
        released.append(f"{g.placement_group_id[:8]} {_resources(g.bundles)}")
    return released


def _resources(bundles: list[dict] | None) -> str:
    total: dict[str, float] = {}
    for bundle in bundles or []:
        for name, amount in (bundle.get("unit_resources") or {}).items():
            if name != "memory" and not name.startswith(("node:", "bundle_group")):
                total[name] = total.get(name, 0) + amount
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(total.items())) + "}"
