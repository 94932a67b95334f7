"""Static checks of the deployment files: cluster.yaml (Ray cluster launcher, AWS) and
deploy/rayjob.yaml (KubeRay RayJob).

Fast and offline: no cloud, no network, no Ray cluster. cluster.yaml is validated against Ray's own
cluster-config JSON schema, read from the installed ray package (ray/autoscaler/ray-schema.json),
and passed through the same prepare/validate steps `ray up` runs before it contacts AWS. The
other tests pin the security properties in DESIGN.md section 7: token auth on every node, a head
that runs no training, a dashboard reachable only through port forwarding, and no ingress rule
open to the whole internet.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAYJOB_YAML = ROOT / "deploy" / "rayjob.yaml"

WORLD_CIDRS = {"0.0.0.0/0", "::/0"}
TUNE_FLAGS = ("--config", "--address", "--samples", "--workers", "--gpu", "--storage", "--resume")


# ---------------------------------------------------------------------------------------------
# helpers


def _ray_schema_path() -> Path:
    """Ray's cluster-config schema, located without importing ray."""
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.origin, "the ray package is not installed"
    return Path(spec.origin).parent / "autoscaler" / "ray-schema.json"


def _start_commands(config: dict) -> dict[str, list[str]]:
    return {
        "head_start_ray_commands": config.get("head_start_ray_commands", []),
        "worker_start_ray_commands": config.get("worker_start_ray_commands", []),
    }


def _ray_start_lines(config: dict) -> list[tuple[str, str]]:
    """(section, command) for every command that runs `ray start`."""
    return [
        (section, command)
        for section, commands in _start_commands(config).items()
        for command in commands
        if "ray start" in command
    ]


def _docker_env(config: dict) -> dict[str, str]:
    """Environment set by `--env NAME=VALUE` (or `-e`) in the docker run options."""
    options = list(config.get("docker", {}).get("run_options", []))
    for node_type in config["available_node_types"].values():
        options += node_type.get("docker", {}).get("worker_run_options", [])
    env = {}
    for option in options:
        words = shlex.split(option)
        for flag, value in zip(words, words[1:]):
            if flag in ("--env", "-e") and "=" in value:
                name, _, val = value.partition("=")
                env[name] = val
    return env


def _ingress_rule_sets(config: dict) -> dict[str, list[dict]]:
    """Every list of EC2 IpPermissions the file states, by where it is stated."""
    rule_sets = {}
    provider_sg = config["provider"].get("security_group")
    if provider_sg is not None:
        rule_sets["provider.security_group"] = provider_sg.get("IpPermissions", [])
    recorded = config.get("metadata", {}).get("advtrain_security_group")
    if recorded is not None:
        rule_sets["metadata.advtrain_security_group"] = recorded.get("IpPermissions", [])
    return rule_sets


def _rule_cidrs(rule: dict) -> list[str]:
    return [r.get("CidrIp", "") for r in rule.get("IpRanges", [])] + [
        r.get("CidrIpv6", "") for r in rule.get("Ipv6Ranges", [])
    ]


def _all_strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in _all_strings(value)]
    if isinstance(node, list):
        return [s for item in node for s in _all_strings(item)]
    return []


def _rayjob_pod_templates(rayjob: dict) -> dict[str, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster.get("workerGroupSpecs", []):
        templates[f"worker group {group['groupName']}"] = group["template"]
    if "submitterPodTemplate" in rayjob["spec"]:
        templates["submitter"] = rayjob["spec"]["submitterPodTemplate"]
    return templates


def _mirror_tune_parser() -> argparse.ArgumentParser:
    """The `advtrain tune` flags the CLI promises, mirrored here for the checks that can run now."""
    parser = argparse.ArgumentParser(prog="advtrain", add_help=False)
    commands = parser.add_subparsers(dest="command", required=True)
    tune = commands.add_parser("tune", add_help=False)
    tune.add_argument("--config")
    tune.add_argument("--address")
    tune.add_argument("--samples", type=int)
    tune.add_argument("--workers", type=int)
    tune.add_argument("--gpu", action="store_true")
    tune.add_argument("--storage")
    tune.add_argument("--resume")
    return parser


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def cluster() -> dict:
    with open(CLUSTER_YAML) as f:
        config = yaml.safe_load(f)
    assert isinstance(config, dict), f"{CLUSTER_YAML} does not hold a YAML mapping"
    return config


@pytest.fixture(scope="module")
def head_type(cluster) -> dict:
    name = cluster.get("head_node_type")
    assert name in cluster.get("available_node_types", {}), (
        f"head_node_type {name!r} is not one of available_node_types"
    )
    return cluster["available_node_types"][name]


@pytest.fixture(scope="module")
def rayjob() -> dict:
    with open(RAYJOB_YAML) as f:
        documents = [d for d in yaml.safe_load_all(f) if d is not None]
    assert len(documents) == 1, f"{RAYJOB_YAML} should hold exactly one object, got {len(documents)}"
    return documents[0]


@pytest.fixture(scope="module")
def entrypoint_argv(rayjob) -> list[str]:
    entrypoint = rayjob["spec"].get("entrypoint", "")
    argv = shlex.split(entrypoint)
    assert argv, "the RayJob has an empty entrypoint"
    return argv


# ---------------------------------------------------------------------------------------------
# cluster.yaml: validity


def test_cluster_yaml_ray_schema_validates(cluster):
    schema_path = _ray_schema_path()
    assert schema_path.is_file(), f"Ray's cluster-config schema is missing at {schema_path}"
    schema = json.loads(schema_path.read_text())
    try:
        jsonschema.validate(cluster, schema)
    except jsonschema.ValidationError as error:
        path = "/".join(str(p) for p in error.absolute_path) or "<root>"
        pytest.fail(f"cluster.yaml does not validate against {schema_path} at {path}: {error.message}")


def test_cluster_yaml_prepared_like_ray_up_passes_validate_config(cluster):
    # `ray up` merges the provider defaults, then validates; both steps run offline.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    try:
        validate_config(prepared)
    except Exception as error:  # jsonschema.ValidationError, ValueError, RuntimeError
        pytest.fail(f"Ray's validate_config rejects cluster.yaml after prepare_config: {error}")
    assert prepared["cluster_name"] == "advtrain", (
        f"cluster_name is {prepared['cluster_name']!r}, expected 'advtrain'"
    )
    assert prepared["provider"]["type"] == "aws", "cluster.yaml should use the AWS provider"


# ---------------------------------------------------------------------------------------------
# cluster.yaml: node types


def test_cluster_gpu_node_type_min_workers_zero(cluster):
    gpu_types = {
        name: node_type
        for name, node_type in cluster["available_node_types"].items()
        if node_type.get("resources", {}).get("GPU", 0) >= 1
    }
    assert gpu_types, "no node type in cluster.yaml declares GPU resources"
    for name, node_type in gpu_types.items():
        assert name != cluster["head_node_type"], f"GPU node type {name!r} is the head node type"
        assert node_type.get("min_workers", 0) == 0, (
            f"GPU node type {name!r} has min_workers {node_type.get('min_workers')}: "
            "it must scale from 0 so idle GPUs are not billed"
        )
        assert node_type.get("max_workers", 0) >= 1, (
            f"GPU node type {name!r} has max_workers {node_type.get('max_workers')}: "
            "the autoscaler could never start one"
        )
        assert node_type["max_workers"] <= cluster["max_workers"], (
            f"GPU node type {name!r} allows {node_type['max_workers']} workers, more than the "
            f"cluster-wide max_workers {cluster['max_workers']}"
        )


def test_cluster_head_node_type_cpu_resource_zero(cluster, head_type):
    resources = head_type.get("resources", {})
    assert "CPU" in resources, (
        "the head node type must set resources.CPU explicitly (to 0), or Ray advertises the "
        "instance's vCPUs and schedules Train workers there"
    )
    assert resources["CPU"] == 0, f"head node type advertises CPU {resources['CPU']}, expected 0"
    assert resources.get("GPU", 0) == 0, f"head node type advertises GPU {resources.get('GPU')}"
    head_starts = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    assert head_starts, "head_start_ray_commands has no `ray start` command"
    for command in head_starts:
        assert "--num-cpus=0" in command, (
            f"the head's `ray start` should also pass --num-cpus=0: {command!r}"
        )


# ---------------------------------------------------------------------------------------------
# cluster.yaml: token auth


def test_cluster_ray_start_commands_token_auth_set(cluster):
    starts = _ray_start_lines(cluster)
    sections = {section for section, _ in starts}
    assert sections == {"head_start_ray_commands", "worker_start_ray_commands"}, (
        f"expected a `ray start` in both head and worker start commands, found in {sorted(sections)}"
    )
    for section, command in starts:
        assert "RAY_AUTH_MODE=token" in command, (
            f"{section}: `ray start` runs without RAY_AUTH_MODE=token: {command!r}"
        )
        assert "RAY_AUTH_TOKEN_PATH=" in command, (
            f"{section}: `ray start` runs without RAY_AUTH_TOKEN_PATH: {command!r}"
        )


def test_cluster_container_env_token_auth_on_every_node(cluster):
    env = _docker_env(cluster)
    assert env.get("RAY_AUTH_MODE") == "token", (
        "docker run_options must set --env RAY_AUTH_MODE=token so every process on every node "
        f"(setup commands, driver, Train workers) has token auth on; got {env.get('RAY_AUTH_MODE')!r}"
    )
    token_path = env.get("RAY_AUTH_TOKEN_PATH", "")
    assert token_path.startswith("/"), (
        f"RAY_AUTH_TOKEN_PATH in docker run_options should be an absolute path, got {token_path!r}"
    )
    docker_cfg = cluster.get("docker", {})
    for key in ("head_run_options", "worker_run_options"):
        for option in docker_cfg.get(key, []):
            assert "RAY_AUTH_MODE=disabled" not in option, f"docker {key} turns token auth off"
    setup = cluster.get("setup_commands", [])
    assert any("RAY_AUTH_TOKEN_PATH" in command for command in setup), (
        "setup_commands should check that the token file arrived on the node"
    )


def test_cluster_token_file_mount_outside_repository(cluster):
    env = _docker_env(cluster)
    token_path = env.get("RAY_AUTH_TOKEN_PATH", "")
    home = "/home/ray/"
    assert token_path.startswith(home), (
        f"RAY_AUTH_TOKEN_PATH {token_path!r} should sit under the container home {home}"
    )
    remote_dir = "~/" + str(Path(token_path[len(home):]).parent)
    mounts = cluster.get("file_mounts", {})
    assert remote_dir in mounts, (
        f"the token directory {remote_dir} is not a file_mounts target, so the token never "
        f"reaches the nodes; file_mounts: {sorted(mounts)}"
    )
    local = mounts[remote_dir]
    assert local.startswith("~/") or Path(local).is_absolute(), (
        f"the token's local source {local!r} should be a home or absolute path"
    )
    assert not Path(local).expanduser().resolve().is_relative_to(ROOT), (
        f"the token's local source {local!r} is inside the repository: it would be committed or "
        "uploaded with --working-dir"
    )


# ---------------------------------------------------------------------------------------------
# cluster.yaml: network exposure


def test_cluster_head_dashboard_bound_to_loopback(cluster):
    head_starts = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    assert head_starts, "head_start_ray_commands has no `ray start` command"
    for command in head_starts:
        assert "--dashboard-host=127.0.0.1" in command, (
            "the head's `ray start` must bind the dashboard to 127.0.0.1 (reach it with "
            f"`ray dashboard cluster.yaml`): {command!r}"
        )
    for section, commands in _start_commands(cluster).items():
        for command in commands:
            assert "0.0.0.0" not in command, f"{section} binds something to 0.0.0.0: {command!r}"


def test_cluster_docker_ports_none_published(cluster):
    docker_cfg = cluster.get("docker", {})
    options = [
        option
        for key in ("run_options", "head_run_options", "worker_run_options")
        for option in docker_cfg.get(key, [])
    ]
    for node_type in cluster["available_node_types"].values():
        options += node_type.get("docker", {}).get("worker_run_options", [])
    for option in options:
        words = shlex.split(option)
        assert not any(w in ("-p", "--publish", "-P", "--publish-all") for w in words), (
            f"docker run option publishes ports: {option!r}"
        )


def test_cluster_security_groups_precreated_ray_default_rules_unused(cluster):
    # When Ray creates the group itself it always adds SSH from 0.0.0.0/0
    # (ray/autoscaler/_private/aws/config.py: _create_default_ssh_inbound_rules), whatever
    # provider.security_group says. Only node types that name their groups escape that.
    for name, node_type in cluster["available_node_types"].items():
        groups = node_type["node_config"].get("SecurityGroupIds")
        assert groups, (
            f"node type {name!r} sets no node_config.SecurityGroupIds, so Ray would create a "
            "security group with SSH open to 0.0.0.0/0"
        )


def test_cluster_ingress_rules_world_cidr_absent(cluster):
    rule_sets = _ingress_rule_sets(cluster)
    assert rule_sets, (
        "cluster.yaml states no ingress rules (provider.security_group or "
        "metadata.advtrain_security_group)"
    )
    for where, rules in rule_sets.items():
        assert rules, f"{where} lists no IpPermissions"
        for rule in rules:
            open_to_world = WORLD_CIDRS.intersection(_rule_cidrs(rule))
            assert not open_to_world, f"{where}: rule {rule} is open to {sorted(open_to_world)}"
    for value in _all_strings(cluster):
        assert value.strip() not in WORLD_CIDRS, f"cluster.yaml contains the world CIDR {value!r}"


def test_cluster_ingress_rules_only_ssh_from_cidr(cluster):
    for where, rules in _ingress_rule_sets(cluster).items():
        ssh_rules = 0
        for rule in rules:
            if _rule_cidrs(rule):
                ports = (rule.get("IpProtocol"), rule.get("FromPort"), rule.get("ToPort"))
                assert ports == ("tcp", 22, 22), (
                    f"{where}: a rule with CIDR sources may open only tcp/22, this one opens "
                    f"{ports}: {rule}"
                )
                ssh_rules += 1
            else:
                assert rule.get("UserIdGroupPairs"), (
                    f"{where}: a rule without CIDR sources should allow the cluster's own "
                    f"security group, got {rule}"
                )
        assert ssh_rules >= 1, f"{where}: no SSH rule, `ray up` could not reach the head"


def test_cluster_storage_s3_uri_set(cluster):
    storage = _docker_env(cluster).get("ADVTRAIN_STORAGE", "")
    assert storage.startswith("s3://"), (
        f"ADVTRAIN_STORAGE should be an s3:// URI (shared by all nodes), got {storage!r}"
    )


# ---------------------------------------------------------------------------------------------
# deploy/rayjob.yaml


def test_rayjob_yaml_kind_rayjob(rayjob):
    assert rayjob.get("apiVersion") == "ray.io/v1", (
        f"apiVersion is {rayjob.get('apiVersion')!r}, expected 'ray.io/v1'"
    )
    assert rayjob.get("kind") == "RayJob", f"kind is {rayjob.get('kind')!r}, expected 'RayJob'"
    assert "rayClusterSpec" in rayjob.get("spec", {}), "the RayJob has no spec.rayClusterSpec"


def test_rayjob_after_finish_cluster_shut_down(rayjob):
    spec = rayjob["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True, (
        "spec.shutdownAfterJobFinishes must be true so the GPU cluster is deleted after the job"
    )
    ttl = spec.get("ttlSecondsAfterFinished")
    assert isinstance(ttl, int) and ttl >= 0, (
        f"spec.ttlSecondsAfterFinished should be a non-negative integer, got {ttl!r}"
    )


def test_rayjob_worker_group_gpu_requested(rayjob):
    groups = rayjob["spec"]["rayClusterSpec"].get("workerGroupSpecs", [])
    gpu_groups = []
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            limits = container.get("resources", {}).get("limits", {})
            if int(limits.get("nvidia.com/gpu", 0)) >= 1:
                gpu_groups.append(group["groupName"])
    assert gpu_groups, "no worker group requests nvidia.com/gpu in its container limits"


def test_rayjob_head_group_zero_cpus_no_gpu(rayjob):
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    num_cpus = head.get("rayStartParams", {}).get("num-cpus")
    assert num_cpus == "0", f"head rayStartParams num-cpus is {num_cpus!r}, expected the string '0'"
    for container in head["template"]["spec"]["containers"]:
        resources = container.get("resources", {})
        for kind in ("limits", "requests"):
            assert "nvidia.com/gpu" not in resources.get(kind, {}), (
                f"head container {container['name']!r} asks for a GPU in {kind}"
            )


def test_rayjob_token_auth_on_all_ray_containers(rayjob):
    auth = rayjob["spec"]["rayClusterSpec"].get("authOptions", {})
    assert auth.get("mode") == "token", (
        f"rayClusterSpec.authOptions.mode is {auth.get('mode')!r}: the operator needs it to read "
        "the job status from a token-protected dashboard"
    )
    templates = _rayjob_pod_templates(rayjob)
    assert "submitter" in templates, (
        "spec.submitterPodTemplate is missing: the submitter must present the token as well"
    )
    for where, template in templates.items():
        spec = template["spec"]
        secret_volumes = {
            v["name"]: v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v
        }
        container = spec["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE") == "token", (
            f"{where}: container {container['name']!r} lacks RAY_AUTH_MODE=token"
        )
        token_path = env.get("RAY_AUTH_TOKEN_PATH") or ""
        assert token_path, f"{where}: container {container['name']!r} lacks RAY_AUTH_TOKEN_PATH"
        mounts = [
            m
            for m in container.get("volumeMounts", [])
            if token_path.startswith(m["mountPath"].rstrip("/") + "/")
        ]
        assert mounts and mounts[0]["name"] in secret_volumes, (
            f"{where}: RAY_AUTH_TOKEN_PATH {token_path!r} is not inside a mounted Secret volume"
        )
        if auth.get("secretName"):
            assert secret_volumes[mounts[0]["name"]] == auth["secretName"], (
                f"{where}: the token file comes from Secret {secret_volumes[mounts[0]['name']]!r}, "
                f"but authOptions.secretName is {auth['secretName']!r}"
            )


def test_rayjob_entrypoint_tune_known_flags_only(entrypoint_argv):
    assert entrypoint_argv[:2] == ["advtrain", "tune"], (
        f"the entrypoint should start with `advtrain tune`, got {entrypoint_argv[:2]}"
    )
    flags = [word.split("=", 1)[0] for word in entrypoint_argv[2:] if word.startswith("-")]
    unknown = sorted(set(flags) - set(TUNE_FLAGS))
    assert not unknown, f"the entrypoint uses flags `advtrain tune` does not have: {unknown}"
    assert "--gpu" in flags, "the entrypoint should pass --gpu (the worker group has GPUs)"
    try:
        _mirror_tune_parser().parse_args(entrypoint_argv[1:])
    except SystemExit:
        pytest.fail(f"the entrypoint does not parse as `advtrain tune`: {entrypoint_argv}")


def test_rayjob_entrypoint_storage_on_s3(rayjob, entrypoint_argv):
    args = _mirror_tune_parser().parse_args(entrypoint_argv[1:])
    assert (args.storage or "").startswith("s3://"), (
        f"--storage should be an s3:// URI (Train V2 refuses head-local storage on a multi-node "
        f"cluster), got {args.storage!r}"
    )
    for where, template in _rayjob_pod_templates(rayjob).items():
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0].get("env", [])}
        if "ADVTRAIN_STORAGE" in env:
            assert env["ADVTRAIN_STORAGE"] == args.storage, (
                f"{where}: ADVTRAIN_STORAGE {env['ADVTRAIN_STORAGE']!r} differs from the "
                f"entrypoint's --storage {args.storage!r}"
            )


def test_rayjob_entrypoint_real_cli_parser_accepts(entrypoint_argv):
    # The real CLI: workflows.cli.build_parser() returns the `advtrain` ArgumentParser.
    from workflows.cli import build_parser

    parser = build_parser()
    assert isinstance(parser, argparse.ArgumentParser), (
        f"workflows.cli.build_parser() returned {type(parser).__name__}, not an ArgumentParser"
    )
    try:
        parser.parse_args(entrypoint_argv[1:])
    except SystemExit as error:
        pytest.fail(
            f"`advtrain` rejects the RayJob entrypoint {entrypoint_argv} (exit {error.code})"
        )
