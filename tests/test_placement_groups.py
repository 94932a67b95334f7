"""What a driver leaves reserved is released when it is done: `workflows.placement_groups`."""

from __future__ import annotations

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
