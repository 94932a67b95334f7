"""Placement groups a search's ended trials leave reserved, released as it goes and when it ends.

A Ray Train V2 run inside a Tune trial reserves its workers' CPUs/GPUs in a placement group that
its Train controller (an actor of the driver's job) creates. Ray frees a non-detached group only
when both its creator actor and its job are dead (ray#65881); Train's own cleaner (ray#58515),
one actor per run polling the state API, removes it some seconds after the controller died, or
not at all when the trial was stopped while its group was being set up. Measured (2026-12-04):
the group of the last trial ASHA stopped was still reserved when the search ended. Tune v1
removed the groups of the trials it stopped (ray#54305); here
`ReleaseEndedTrials`, a Tune callback on the driver, removes every group of this job whose
creator actor is dead, a few seconds after the trial ended, and `release_own` removes what is left
when the driver is done, as a last resort.
"""

from __future__ import annotations

import logging
import time

from ray import tune

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


def release_orphans() -> tuple[list[str], int]:
    """Removes the groups of this process's job whose creator actor is dead and was a Train
    controller (the Train run of a trial that ended). Safe while the search runs: a pending or
    running trial's group has a live creator, Tune's own trial groups are the driver's (no
    creator actor), a group any other actor created is kept (its class is checked, and kept when
    the state API no longer knows it), and detached groups are never touched.

    Returns:
        (one `"<id prefix> {resources}"` per group removed, how many groups of live actors remain).
    """
    import ray
    from ray.util.placement_group import remove_placement_group

    from workflows.ray_internals import actor_placement_groups, placement_group

    released, alive = [], 0
    job = ray.get_runtime_context().get_job_id()
    for hex_id, bundles, dead, creator in actor_placement_groups(job):
        if not dead:
            alive += 1
            continue
        if _class_of(creator) != "TrainController":
            continue  # only a Train run's group: never one Tune or the user's code holds
        try:
            remove_placement_group(placement_group(hex_id))
        except Exception as e:  # noqa: BLE001 - removed meanwhile, or the GCS refused: the rest still go
            logger.warning("could not remove placement group %s: %s", hex_id, e)
            continue
        released.append(f"{hex_id[:8]} {_resources(bundles)}")
    return released, alive


def _class_of(actor_hex: str) -> str | None:
    """The class of an actor, from the state API; `None` when it no longer knows it."""
    from ray.util.state import get_actor

    try:
        actor = get_actor(actor_hex)
    except Exception:  # noqa: BLE001 - the state API unreachable: treat as unknown, keep the group
        return None
    # A class defined in a function is named with its qualified name (`f.<locals>.Cls`).
    return None if actor is None else actor.class_name.rsplit(".", 1)[-1]


class ReleaseEndedTrials(tune.Callback):
    """Runs `release_orphans` on the driver every `every_s` seconds of the search, and at its end
    until every trial's controller is gone (at most `settle_s`): a Train controller dies with its
    trial actor a moment after Tune stops, pauses or fails the trial, so a sweep on a clock, not
    one at the trial's end, finds its group."""

    def __init__(self, every_s: float = 2.0, settle_s: float = 20.0):
        self.every_s, self.settle_s = every_s, settle_s
        self._due = 0.0

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now >= self._due:
            self._due = now + self.every_s
            self._sweep()

    def on_experiment_end(self, trials, **info):
        deadline = time.monotonic() + self.settle_s
        while self._sweep() and time.monotonic() < deadline:
            time.sleep(0.5)

    def _sweep(self) -> int:
        try:
            freed, alive = release_orphans()
        except Exception as e:  # noqa: BLE001 - the GCS did not answer: the next sweep tries again
            logger.warning("could not list this search's placement groups (%s)", e)
            return 0
        for line in freed:
            logger.info("released the placement group of an ended trial: %s", line)
        return alive


def _resources(bundles: list[dict] | None) -> str:
    total: dict[str, float] = {}
    for bundle in bundles or []:
        for name, amount in (bundle.get("unit_resources") or {}).items():
            if name != "memory" and not name.startswith(("node:", "bundle_group")):
                total[name] = total.get(name, 0) + amount
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(total.items())) + "}"
