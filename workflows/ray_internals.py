"""Every Ray internal advtrain touches, in one place, for the Ray version pinned in pyproject.toml.

Ray has no public API for these; each has a reason below. Nothing else in advtrain imports
`ray._private`, `ray._raylet`, `ray.autoscaler._private` or `ray.core.generated`, and
tests/test_ray_internals.py checks every entry of `SURFACE` against the installed Ray (and that no
other module reaches past this one), so a Ray upgrade that moves one fails there, by name, before
it fails a run.
"""

from __future__ import annotations

import sys
from typing import Any

# (dotted module, attribute path within it, why advtrain needs it). Imported lazily by the
# accessors below: the CLI checks its input before Ray loads.
SURFACE: tuple[tuple[str, str, str], ...] = (
    (
        "ray._private.state",
        "state.get_cluster_config",
        "node types the autoscaler may add (Ray Train's own resource pre-check reads the same)",
    ),
    ("ray._raylet", "GcsClient", "a client of the GCS at an address"),
    (
        "ray._raylet",
        "InnerGcsClient.report_cluster_config",
        "publish node types for a fake autoscaler (GcsClient forwards its methods here)",
    ),
    (
        "ray._private.services",
        "canonicalize_bootstrap_address_or_die",
        "resolve `--address auto` the way `ray start` does",
    ),
    (
        "ray._private.ray_constants",
        "ENABLE_RAY_CLUSTER",
        (
            "keep 127.0.0.1 from being rewritten once Ray was imported (and lift the guard for "
            "`ray start`)"
        ),
    ),
    ("ray.scripts.scripts", "ray_constants", "the `ray start` entry point reads the guard here"),
    ("ray.scripts.scripts", "main", "the `ray start` entry point, run with the guard lifted"),
    ("ray._raylet", "Config.initialize", "re-read RAY_AUTH_MODE after Ray was imported"),
    (
        "ray._raylet",
        "AuthenticationTokenLoader.instance",
        "re-read the auth token after Ray was imported (as Ray's own _enable_token_auth does)",
    ),
    (
        "ray._raylet",
        "PlacementGroupID.from_hex",
        "remove a placement group listed by the state API",
    ),
    (
        "ray._private.state",
        "state._connect_and_get_accessor",
        "the GCS's placement group table, which alone says whether a group's creator is dead",
    ),
    (
        "ray.core.generated.gcs_pb2",
        "PlacementGroupTableData",
        "a placement group record as the GCS stores it (fields in `MESSAGE_FIELDS`)",
    ),
    (
        "ray.core.generated.autoscaler_pb2",
        "ClusterConfig",
        "the GCS's node-group message, built from cluster.yaml for the fake autoscaler",
    ),
    (
        "ray._private.authentication.authentication_token_setup",
        "logger",
        "its token notice, shown once per process instead of once per connection",
    ),
    (
        "ray.autoscaler._private.util",
        "prepare_config",
        "tests: cluster.yaml checked the way `ray up` fills and validates it",
    ),
    ("ray.autoscaler._private.util", "validate_config", "tests: as above"),
)

# Fields read from the messages above: protobuf classes carry them in their descriptor, not as
# attributes, so `missing` checks them by name.
MESSAGE_FIELDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "ray.core.generated.gcs_pb2",
        "PlacementGroupTableData",
        (
            "placement_group_id",
            "bundles",
            "state",
            "creator_job_id",
            "creator_actor_id",
            "creator_actor_dead",
            "is_detached",
        ),
    ),
)

AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"

# `ray start --address` refuses to add a node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (a guard
# meant for macOS and Windows), yet that same setting is what keeps 127.0.0.1 from being
# rewritten. This launcher lifts only the guard, through a copy of ray_constants that the `ray
# start` command alone sees; address resolution (ray._private.services) still reads the real
# module and stays on loopback.
NODE_LAUNCHER = """\
import sys, types
import ray._private.ray_constants as rc
import ray.scripts.scripts as scripts
if not hasattr(rc, "ENABLE_RAY_CLUSTER") or scripts.ray_constants is not rc:
    sys.exit("advtrain: this Ray version has no ENABLE_RAY_CLUSTER guard to lift")
guard = types.ModuleType(rc.__name__)
guard.__dict__.update(vars(rc))
guard.ENABLE_RAY_CLUSTER = True
scripts.ray_constants = guard
sys.argv[0] = "ray"
scripts.main()
"""


def cluster_config() -> Any:
    """The GCS's ClusterConfig (autoscaler.proto), or `None` when none was reported."""
    from ray._private.state import state

    return state.get_cluster_config()


def new_cluster_config() -> Any:
    """An empty ClusterConfig message to fill."""
    from ray.core.generated import autoscaler_pb2

    return autoscaler_pb2.ClusterConfig()


def report_cluster_config(address: str, data: bytes) -> None:
    """Stores a serialized ClusterConfig in the GCS at `address`."""
    from ray._raylet import GcsClient

    GcsClient(address=address).report_cluster_config(data)


def resolve_address(address: str) -> str:
    """`auto` (or an address) as `ray start` resolves it; exits when no cluster is found."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    return canonicalize_bootstrap_address_or_die(address)


def pin_loopback_in_imported_ray() -> bool:
    """Turns Ray's ENABLE_RAY_CLUSTER off in an already-imported Ray (it read the environment
    at import and reads this attribute on each address resolution); True if it was on."""
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is None or not getattr(constants, "ENABLE_RAY_CLUSTER", False):
        return False
    constants.ENABLE_RAY_CLUSTER = False
    return True


def refresh_auth_in_imported_ray() -> None:
    """Makes an imported (not initialized) Ray read its auth mode and token again."""
    raylet = sys.modules.get("ray._raylet")
    if raylet is None:
        return  # Ray reads the environment when it is imported
    raylet.Config.initialize("")
    raylet.AuthenticationTokenLoader.instance().reset_cache()


def placement_group(hex_id: str) -> Any:
    """The `PlacementGroup` handle for an id as the state API lists it."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(PlacementGroupID.from_hex(hex_id))


def actor_placement_groups(job_id: str) -> list[tuple[str, list[dict], bool, str]]:
    """The placement groups of job `job_id` (hex) that an actor of it created and that still
    reserve resources (not removed, not detached). Ray frees such a group only when both its
    creator actor and its job are dead; the state API does not say whether the creator is.

    Returns:
        (placement group id in hex, its bundles as the state API lists them, `unit_resources`
        each, creator actor dead, creator actor id in hex) per group.
    """
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData

    nil_actor = b"\xff" * 16  # a group the driver itself created has no creator actor
    out = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        g = PlacementGroupTableData.FromString(raw)
        if (
            g.creator_job_id.hex() != job_id
            or g.state == PlacementGroupTableData.REMOVED
            or g.is_detached
            or g.creator_actor_id == nil_actor
        ):
            continue
        bundles = [{"unit_resources": dict(b.unit_resources)} for b in g.bundles]
        out.append(
            (g.placement_group_id.hex(), bundles, g.creator_actor_dead, g.creator_actor_id.hex())
        )
    return out


def prepare_cluster_config(config: dict) -> dict:
    """A cluster launcher config with the provider's defaults merged, as `ray up` does."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(config)


def validate_cluster_config(config: dict) -> None:
    """Validates a prepared cluster launcher config as `ray up` does; raises when it is not."""
    from ray.autoscaler._private.util import validate_config

    validate_config(config)


def missing() -> list[str]:
    """Entries of `SURFACE` the installed Ray lacks, each as `module:attribute (why)`."""
    import importlib

    out = []
    for module, path, why in SURFACE:
        try:
            obj: Any = importlib.import_module(module)
            for part in path.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            out.append(f"{module}:{path} ({why}): {type(e).__name__}: {e}")
    for module, message, fields in MESSAGE_FIELDS:
        try:
            known = getattr(importlib.import_module(module), message).DESCRIPTOR.fields_by_name
        except (ImportError, AttributeError):
            continue  # named above, with its reason
        out += [
            f"{module}:{message}.{f} (a field advtrain reads)" for f in fields if f not in known
        ]
    return out
