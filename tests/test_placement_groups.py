"""What a driver leaves reserved is released when it is done: `workflows.placement_groups`."""

from __future__ import annotations

import time

import pytest

from workflows import placement_groups


@pytest.mark.timeout(300)
def test_release_own_frees_the_jobs_groups_and_keeps_detached_ones(ray_cluster):
    import ray
    from ray.util import state
    from ray.util.placement_group import placement_group, remove_placement_group

    ray.init(address=ray_cluster.address, log_to_driver=False)
    try:
        # What an interrupted trial's worker group leaves: a group of this job, created and idle.
        left = placement_group([{"CPU": 1}])
        kept = placement_group([{"CPU": 1}], lifetime="detached")
        ray.get([left.ready(), kept.ready()], timeout=60)
        assert ray.available_resources().get("CPU", 0) == 0

        released = placement_groups.release_own()

        assert released == [f"{left.id.hex()[:8]} {{CPU: 1}}"]
        assert placement_groups.held(ray.get_runtime_context().get_job_id()) == []
        # A detached group outlives its job by design: not this job's to release.
        assert state.get_placement_group(kept.id.hex()).state == "CREATED"
        remove_placement_group(kept)
        assert placement_groups.release_own() == []
    finally:
        ray.shutdown()


@pytest.mark.timeout(300)
def test_release_orphans_frees_only_groups_whose_creator_actor_died(ray_cluster):
    import ray
    from ray.util import state
    from ray.util.placement_group import placement_group, remove_placement_group

    @ray.remote(num_cpus=0)
    class TrainController:
        """Stands in for a trial's Train controller (the class name is what is checked): an actor
        of the job that creates a group."""

        def reserve(self, resources=None):
            group = placement_group([resources or {"CPU": 1}])
            ray.get(group.ready(), timeout=60)
            return group.id.hex()

    @ray.remote(num_cpus=0)
    class Other:
        """Any other actor that creates a group: its group stays after it dies."""

        def reserve(self, resources):
            group = placement_group([resources])
            ray.get(group.ready(), timeout=60)
            return group.id.hex()

    ray.init(address=ray_cluster.address, log_to_driver=False)
    try:
        ended, running, other = TrainController.remote(), TrainController.remote(), Other.remote()
        ended_group = ray.get(ended.reserve.remote(), timeout=90)
        running_group = ray.get(running.reserve.remote(), timeout=90)
        other_group = ray.get(other.reserve.remote({"memory": 1024}), timeout=90)
        ray.kill(other)
        # The driver's own group (as Tune's trial groups are) and a detached one, both 0-CPU so
        # the cluster's 2 CPUs stay the two controllers'.
        driver_group = placement_group([{"memory": 1024}])
        detached = placement_group([{"memory": 1024}], lifetime="detached")
        ray.get([driver_group.ready(), detached.ready()], timeout=60)
        # Every creator alive: nothing goes; the two controllers' groups are counted as live.
        assert placement_groups.release_orphans() == ([], 2)
        ray.kill(ended)

        deadline = time.monotonic() + 30
        released = []
        while not released and time.monotonic() < deadline:
            released, alive = placement_groups.release_orphans()
            time.sleep(0.5)

        assert released == [f"{ended_group[:8]} {{CPU: 1}}"] and alive == 1
        assert state.get_placement_group(ended_group).state == "REMOVED"
        for kept in (running_group, driver_group.id.hex(), detached.id.hex(), other_group):
            assert state.get_placement_group(kept).state == "CREATED"
        ray.kill(running)
        remove_placement_group(detached)
        from workflows.ray_internals import placement_group as by_id

        remove_placement_group(by_id(other_group))
    finally:
        ray.shutdown()
