"""Static checks of the deployment files: cluster.yaml (Ray cluster launcher, AWS),
deploy/rayjob.yaml (KubeRay RayJob) and deploy/Dockerfile (the images the RayJob runs).

Fast and offline: no cloud, no network, no Ray cluster. cluster.yaml is validated against Ray's own
cluster-config JSON schema, read from the installed ray package (ray/autoscaler/ray-schema.json),
and passed through the same prepare/validate steps `ray up` runs before it contacts AWS. The
other tests pin the security properties in DESIGN.md section 7: token auth on every node, a head
that runs no training, a dashboard reachable only through port forwarding, and no ingress rule
open to the whole internet. For the RayJob: token auth through authOptions (the operator sets the
token variables, so the file must not), code pinned to one commit through images built from
deploy/Dockerfile, and CUDA TensorFlow on the GPU workers only.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAYJOB_YAML = ROOT / "deploy" / "rayjob.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PYPROJECT = ROOT / "pyproject.toml"

WORLD_CIDRS = {"0.0.0.0/0", "::/0"}
TUNE_FLAGS = ("--config", "--address", "--samples", "--workers", "--gpu", "--storage", "--resume")
# Variables KubeRay (>= 1.6) sets on every Ray container and on the submitter when
# rayClusterSpec.authOptions.mode is token. A value set in the pod template would win over the
# operator's (it only adds a variable the container does not already have).
OPERATOR_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# An advtrain image tag: the COMMIT placeholder or a full commit SHA, "-gpu" for the GPU variant.
COMMIT_TAG = re.compile(r"^(COMMIT|[0-9a-f]{40})(-gpu)?$")


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
        for flag, value in itertools.pairwise(words):
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


def _containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec.get("containers", [])


def _image_tag(image: str) -> tuple[str, str]:
    """(repository, tag) of an image reference; tag '' when it has none."""
    name = image.split("@", 1)[0]
    repository, colon, tag = name.rpartition(":")
    if not colon or "/" in tag:
        return name, ""
    return repository, tag


def _pyproject_pin(package: str) -> str:
    """The exact version pyproject.toml pins `package` to (`package[extras]==X`)."""
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    for requirement in dependencies:
        match = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==([\w.]+)", requirement.strip())
        if match:
            return match.group(2)
    raise AssertionError(f"pyproject.toml does not pin {package}==X; dependencies: {dependencies}")


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, with line continuations joined and comments dropped."""
    instructions, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment and empty lines, inside a continuation as well
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, arguments = current.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    assert not current, f"the Dockerfile ends inside a line continuation: {current!r}"
    return instructions


def _dockerfile_build(
    instructions: list[tuple[str, str]], build_args: dict[str, str]
) -> tuple[str, list]:
    """What `docker build --build-arg ...` builds: (the external base image, the instructions
    of the final stage and of the stages it derives from, base first)."""
    global_args: dict[str, str] = {}
    stages: list[dict] = []
    for keyword, arguments in instructions:
        if keyword == "FROM":
            words = [w for w in arguments.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append({"image": words[0], "name": name, "steps": []})
        elif stages:
            stages[-1]["steps"].append((keyword, arguments))
        elif keyword == "ARG":
            name, _, default = arguments.partition("=")
            global_args[name.strip()] = default.strip().strip("\"'")
    assert stages, "the Dockerfile has no FROM"
    values = {**global_args, **build_args}

    def expand(image: str) -> str:
        return re.sub(
            r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), ""), image
        )

    by_name = {stage["name"]: stage for stage in stages if stage["name"]}
    stage, steps, seen = stages[-1], [], set()
    while True:
        steps = stage["steps"] + steps
        image = expand(stage["image"])
        if image not in by_name:
            return image, steps
        assert image not in seen, f"the Dockerfile's stages derive from each other at {image!r}"
        seen.add(image)
        stage = by_name[image]


def _copies(steps: list) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY/ADD, flags (--chown=...) dropped."""
    copies = []
    for keyword, arguments in steps:
        if keyword in ("COPY", "ADD"):
            words = [w for w in shlex.split(arguments) if not w.startswith("--")]
            copies.append((words[:-1], words[-1]))
    return copies


def _repo_file_for_image_path(steps: list, path: str) -> Path | None:
    """The repository file a COPY puts at `path` in the image, or None."""
    for sources, destination in reversed(_copies(steps)):
        for source in sources:
            local = ROOT / source
            if local.is_dir():
                prefix = destination.rstrip("/") + "/"
                if path.startswith(prefix) and (local / path[len(prefix) :]).is_file():
                    return local / path[len(prefix) :]
            elif local.is_file():
                target = destination + local.name if destination.endswith("/") else destination
                if path == target:
                    return local
    return None


def _documented_docker_builds(text: str) -> dict[str, dict[str, str]]:
    """The `docker build` commands in a file's comments: {image tag: build args}, with
    $(git rev-parse HEAD) read as the COMMIT placeholder."""
    lines = [
        line.lstrip("#").strip() for line in text.splitlines() if line.lstrip().startswith("#")
    ]
    commands, current = [], ""
    for line in lines:
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.startswith("docker build"):
            commands.append(current)
        current = ""
    builds = {}
    for command in commands:
        words = shlex.split(command.replace("$(git rev-parse HEAD)", "COMMIT"))
        tags, build_args = [], {}
        for flag, value in itertools.pairwise(words):
            if flag in ("-t", "--tag"):
                tags.append(value)
            elif flag == "--build-arg":
                name, _, val = value.partition("=")
                build_args[name] = val
        for tag in tags:
            builds[tag] = build_args
    return builds


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
    assert len(documents) == 1, (
        f"{RAYJOB_YAML} should hold exactly one object, got {len(documents)}"
    )
    return documents[0]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing: rayjob.yaml runs images built from it"
    instructions = _dockerfile_instructions(DOCKERFILE.read_text())
    assert instructions, f"{DOCKERFILE} holds no instructions"
    return instructions


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
        pytest.fail(
            f"cluster.yaml does not validate against {schema_path} at {path}: {error.message}"
        )


def test_cluster_yaml_prepared_like_ray_up_passes_validate_config(cluster):
    # `ray up` merges the provider defaults, then validates; both steps run offline.
    from workflows.ray_internals import prepare_cluster_config, validate_cluster_config

    prepared = prepare_cluster_config(copy.deepcopy(cluster))
    try:
        validate_cluster_config(prepared)
    except Exception as error:  # noqa: BLE001 - jsonschema.ValidationError, ValueError, RuntimeError
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
        "expected a `ray start` in both head and worker start commands, found in "
        f"{sorted(sections)}"
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
        "(setup commands, driver, Train workers) has token auth on; got "
        f"{env.get('RAY_AUTH_MODE')!r}"
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
    remote_dir = "~/" + str(Path(token_path[len(home) :]).parent)
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
# deploy/Dockerfile


def test_dockerfile_base_images_pinned_ray_version(dockerfile):
    ray_version = _pyproject_pin("ray")
    pinned = re.compile(rf"rayproject/ray:{re.escape(ray_version)}-py3\d+(-gpu)?")
    stage_names = set()
    for keyword, arguments in dockerfile:
        if keyword != "FROM":
            continue
        words = [w for w in arguments.split() if not w.startswith("--")]
        if "$" not in words[0] and words[0] not in stage_names:
            assert pinned.fullmatch(words[0]), (
                f"Dockerfile base image {words[0]!r} is not "
                f"rayproject/ray:{ray_version}-py3XX[-gpu] "
                "(the Ray version pyproject.toml pins)"
            )
        if len(words) == 3:
            stage_names.add(words[2])
    for variant in ("cpu", "gpu"):
        base, _ = _dockerfile_build(dockerfile, {"VARIANT": variant})
        assert pinned.fullmatch(base), (
            f"VARIANT={variant} builds on {base!r}, not rayproject/ray:{ray_version}-py3XX[-gpu]"
        )
        assert base.endswith("-gpu") == (variant == "gpu"), (
            f"VARIANT={variant} builds on {base!r}: the GPU variant alone should use the -gpu image"
        )
    default_base, _ = _dockerfile_build(dockerfile, {})
    assert not default_base.endswith("-gpu"), (
        f"a build without --build-arg uses {default_base!r}: the default should be the CPU variant"
    )


def test_dockerfile_gpu_variant_alone_installs_tensorflow_cuda(dockerfile):
    requirement = f"tensorflow[and-cuda]=={_pyproject_pin('tensorflow')}"
    _, gpu_steps = _dockerfile_build(dockerfile, {"VARIANT": "gpu"})
    assert any(k == "RUN" and "pip install" in a and requirement in a for k, a in gpu_steps), (
        f"the GPU variant does not pip install {requirement!r} (TensorFlow's CUDA libraries)"
    )
    _, cpu_steps = _dockerfile_build(dockerfile, {"VARIANT": "cpu"})
    for keyword, arguments in cpu_steps:
        assert "and-cuda" not in arguments, (
            f"the CPU variant (the head's image) installs CUDA TensorFlow: {keyword} {arguments}"
        )


def test_dockerfile_installs_advtrain_from_build_context(dockerfile):
    setuptools = tomllib.loads(PYPROJECT.read_text()).get("tool", {}).get("setuptools", {})
    packages = {p.split(".")[0] for p in setuptools.get("packages", [])}
    needed = {"pyproject.toml", "README.md"} | packages
    for variant in ("cpu", "gpu"):
        _, steps = _dockerfile_build(dockerfile, {"VARIANT": variant})
        copied = {
            source.rstrip("/"): destination
            for sources, destination in _copies(steps)
            for source in sources
        }
        missing = sorted(needed - set(copied))
        assert not missing, (
            f"VARIANT={variant}: the image lacks {missing} (COPY sources: {sorted(copied)})"
        )
        for source in copied:
            assert (ROOT / source).exists(), (
                f"VARIANT={variant}: COPY source {source!r} is not in the repository"
            )
        source_dir = copied["pyproject.toml"].rstrip("/")
        installs = [
            a
            for k, a in steps
            if k == "RUN"
            and re.search(
                rf"cd {re.escape(source_dir)}/?\s.*pip install[^&;|]*\s\.(\s|$)"
                rf"|pip install[^&;|]*\s{re.escape(source_dir)}/?(\s|$)",
                a,
            )
        ]
        assert installs, (
            f"VARIANT={variant}: no RUN pip-installs the copied source in {source_dir} "
            "(`cd DIR && pip install .` or `pip install DIR`)"
        )
        assert not any("-e" in shlex.split(a) or "--editable" in a for a in installs), (
            f"VARIANT={variant}: advtrain should be a regular install, not an editable one"
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


def test_rayjob_ray_version_matches_pinned_ray(rayjob):
    ray_version = _pyproject_pin("ray")
    declared = rayjob["spec"]["rayClusterSpec"].get("rayVersion")
    assert declared == ray_version, (
        f"rayClusterSpec.rayVersion is {declared!r}, but the images carry Ray {ray_version} "
        "(KubeRay also needs it, >= 2.52.0, to accept authOptions.mode: token)"
    )


def test_rayjob_auth_options_token_with_secret(rayjob):
    auth = rayjob["spec"]["rayClusterSpec"].get("authOptions") or {}
    assert auth.get("mode") == "token", (
        f"rayClusterSpec.authOptions.mode is {auth.get('mode')!r}, expected 'token': without it "
        "the cluster runs without token auth and the operator cannot poll a protected dashboard"
    )
    secret = auth.get("secretName")
    assert isinstance(secret, str) and secret, (
        f"rayClusterSpec.authOptions.secretName is {secret!r}: name the Secret that holds the "
        "token, or KubeRay generates a new token per cluster that the user never sees"
    )
    assert not auth.get("enableK8sTokenAuth"), (
        "authOptions.enableK8sTokenAuth is unsupported for RayJob and excludes secretName"
    )
    text = RAYJOB_YAML.read_text()
    command = (
        rf"kubectl create secret generic {re.escape(secret)}\s*\\?\s*#?\s*--from-file=auth_token="
    )
    assert re.search(command, text), (
        f"the header should show `kubectl create secret generic {secret} "
        "--from-file=auth_token=...` (KubeRay reads the key auth_token)"
    )


def test_rayjob_token_env_left_to_operator(rayjob):
    secret = (rayjob["spec"]["rayClusterSpec"].get("authOptions") or {}).get("secretName")
    for where, template in _rayjob_pod_templates(rayjob).items():
        for container in _containers(template):
            names = {e["name"]: e.get("value") for e in container.get("env", [])}
            for name in OPERATOR_AUTH_ENV:
                assert name not in names, (
                    f"{where}: container {container['name']!r} sets {name}={names[name]!r}; with "
                    "authOptions KubeRay sets the token variables itself, and this overrides it"
                )
        if secret:
            assert secret not in _all_strings(template["spec"]), (
                f"{where}: the pod template references the token Secret {secret!r} (a volume, "
                "secretKeyRef or envFrom); KubeRay already passes the token as RAY_AUTH_TOKEN"
            )


def test_rayjob_images_pinned_to_one_commit(rayjob):
    images = {
        f"{where}: {container['name']}": container.get("image", "")
        for where, template in _rayjob_pod_templates(rayjob).items()
        for container in _containers(template)
    }
    assert images, "the RayJob names no container images"
    repositories = set()
    commits = set()
    for where, image in images.items():
        repository, tag = _image_tag(image)
        assert tag and tag != "latest", f"{where}: image {image!r} is unpinned (no tag, :latest)"
        assert repository.rsplit("/", 1)[-1] == "advtrain", (
            f"{where}: image {image!r} is not an advtrain image built from deploy/Dockerfile"
        )
        match = COMMIT_TAG.fullmatch(tag)
        assert match, (
            f"{where}: image tag {tag!r} should be the commit SHA (40 hex digits, or the COMMIT "
            "placeholder), with -gpu for the GPU variant"
        )
        repositories.add(repository)
        commits.add(match.group(1))
    assert len(repositories) == 1, (
        f"the containers use different image repositories: {sorted(repositories)}"
    )
    assert len(commits) == 1, f"the containers run code from different commits: {sorted(commits)}"
    for value in _all_strings(rayjob):
        assert "refs/heads/" not in value, f"the RayJob fetches a moving branch: {value!r}"


def test_rayjob_code_not_installed_at_job_start(rayjob):
    runtime_env = yaml.safe_load(rayjob["spec"].get("runtimeEnvYAML") or "{}") or {}
    fetched = sorted({"working_dir", "py_modules", "pip", "uv", "conda"} & set(runtime_env))
    assert not fetched, (
        f"runtimeEnvYAML sets {fetched}: the code and its dependencies should come from the "
        "images, not be fetched or installed (on every node, the head included) at job start"
    )


def test_rayjob_head_no_cuda_tensorflow(rayjob):
    spec = rayjob["spec"]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]
    head_images = [c["image"] for c in _containers(head)]
    submitter = spec.get("submitterPodTemplate", {"spec": {}})
    submitter_images = [c["image"] for c in _containers(submitter)]
    for image in head_images + submitter_images:
        assert not _image_tag(image)[1].endswith("-gpu"), (
            f"the head or the submitter runs the GPU image {image!r} (CUDA TensorFlow on CPUs)"
        )
    head_side = [
        head,
        spec.get("submitterPodTemplate", {}),
        spec.get("entrypoint", ""),
        spec.get("runtimeEnvYAML", ""),
    ]
    for value in _all_strings(head_side):
        assert "and-cuda" not in value, f"the head installs CUDA TensorFlow: {value!r}"


def test_rayjob_documented_builds_match_images(rayjob, dockerfile):
    # The header's `docker build` commands, read with $(git rev-parse HEAD) as COMMIT; the images
    # compared by tag, with a real SHA read as COMMIT too, so that the check survives the user
    # filling in the placeholders.
    builds = {
        _image_tag(image)[1]: build_args
        for image, build_args in _documented_docker_builds(RAYJOB_YAML.read_text()).items()
    }
    cluster = rayjob["spec"]["rayClusterSpec"]
    head_image = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    worker_images = {
        c["image"]
        for group in cluster.get("workerGroupSpecs", [])
        for c in group["template"]["spec"]["containers"]
    }
    for image in {head_image} | worker_images:
        tag = re.sub(r"^[0-9a-f]{40}", "COMMIT", _image_tag(image)[1])
        assert tag in builds, (
            f"no `docker build -t ...` in the header of {RAYJOB_YAML.name} builds the tag of "
            f"{image!r}; it builds the tags {sorted(builds)}"
        )
        base, _ = _dockerfile_build(dockerfile, builds[tag])
        wants_gpu = image in worker_images
        needs = "GPU workers need the -gpu variant" if wants_gpu else "the head needs the CPU one"
        assert base.endswith("-gpu") == wants_gpu, (
            f"the header builds {image!r} with {builds[tag] or 'no build args'} on {base!r}: "
            f"{needs}"
        )


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


def test_rayjob_workers_one_gpu_gpu_image(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    head_image = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    groups = cluster.get("workerGroupSpecs", [])
    assert groups, "the RayJob has no worker group"
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        resources = container.get("resources", {})
        for kind in ("limits", "requests"):
            if kind == "requests" and "requests" not in resources:
                continue  # Kubernetes copies the limits
            gpus = resources.get(kind, {}).get("nvidia.com/gpu")
            assert gpus is not None and int(gpus) == 1, (
                f"worker group {group['groupName']!r}: {kind} nvidia.com/gpu is {gpus!r}, "
                "expected 1 (one Train worker per GPU)"
            )
        assert container["image"] == head_image + "-gpu", (
            f"worker group {group['groupName']!r} runs {container['image']!r}; expected the GPU "
            f"variant of the head's image, {head_image + '-gpu'!r}"
        )


def test_rayjob_entrypoint_tune_known_flags_only(entrypoint_argv):
    assert entrypoint_argv[:2] == ["advtrain", "tune"], (
        f"the entrypoint should start with `advtrain tune`, got {entrypoint_argv[:2]}"
    )
    flags = [word.split("=", 1)[0] for word in entrypoint_argv[2:] if word.startswith("-")]
    unknown = sorted(set(flags) - set(TUNE_FLAGS))
    assert not unknown, f"the entrypoint uses flags `advtrain tune` does not have: {unknown}"
    try:
        args = _mirror_tune_parser().parse_args(entrypoint_argv[1:])
    except SystemExit:
        pytest.fail(f"the entrypoint does not parse as `advtrain tune`: {entrypoint_argv}")
    assert args.gpu, "the entrypoint should pass --gpu (the worker group has GPUs)"
    assert args.address == "auto", (
        f"the entrypoint should join the job's cluster with --address auto, got {args.address!r}"
    )


def test_rayjob_entrypoint_config_inside_image(rayjob, entrypoint_argv, dockerfile):
    args = _mirror_tune_parser().parse_args(entrypoint_argv[1:])
    assert args.config, "the entrypoint passes no --config"
    assert args.config.startswith("/"), (
        f"--config {args.config!r} is relative: the job driver's working directory is not "
        "guaranteed, so name the file's absolute path in the image"
    )
    _, steps = _dockerfile_build(dockerfile, {"VARIANT": "cpu"})
    source = _repo_file_for_image_path(steps, args.config)
    assert source is not None, (
        f"--config {args.config!r} is not a file deploy/Dockerfile copies into the head's image; "
        f"it copies {_copies(steps)}"
    )


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
        args = parser.parse_args(entrypoint_argv[1:])
    except SystemExit as error:
        pytest.fail(
            f"`advtrain` rejects the RayJob entrypoint {entrypoint_argv} (exit {error.code})"
        )
    assert args.command == "tune" and args.gpu and (args.storage or "").startswith("s3://"), (
        f"`advtrain` reads the entrypoint as command {args.command!r}, gpu {args.gpu!r}, "
        f"storage {args.storage!r}"
    )
