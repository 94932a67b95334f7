"""Tests of workflows.connect and workflows.local_cluster on real local Ray clusters: loopback,
token auth, up/down, the `advtrain cluster` command."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from workflows import connect, local_cluster
from workflows.cli import main

ray = pytest.importorskip("ray")  # also puts Ray's bundled psutil on sys.path
psutil = pytest.importorskip("psutil")

# A client in its own process, so the test process never joins a cluster.
_CONNECT = """
import json, sys, time
from workflows import connect
start = time.monotonic()
try:
    connect.connect(sys.argv[1], timeout_s=float(sys.argv[2]), log_to_driver=False)
except connect.ClusterError as e:
    print(f"REFUSED after {time.monotonic() - start:.1f} s: {e}")
    sys.exit(3)
import ray
print("RESOURCES " + json.dumps(ray.cluster_resources()))
"""
_RAW_INIT = """
import json, os, ray
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
print("RESOURCES " + json.dumps(ray.cluster_resources()))
"""


def _client_env(extra=None, drop=()):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", *drop)}
    env.update(extra or {})
    return env


def _python(args, env=None, timeout=60):
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _listen_addresses(procs):
    """(ip, port) of every TCP listener of `procs`, IPv4-mapped IPv6 shown as IPv4."""
    found = set()
    for p in procs:
        try:
            conns = p.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                ip = ipaddress.ip_address(c.laddr.ip)
                found.add((str(getattr(ip, "ipv4_mapped", None) or ip), c.laddr.port))
    return found


def _mentioning(path):
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(str(path) in arg for arg in p.info["cmdline"] or []):
            out.append(p.info["pid"])
    return out


# ------------------------------------------------------------------ a cluster of its own
# First in the file, so it starts before the session cluster loads the 2 CPUs.


@pytest.mark.ray
def test_up_down_single_node_leaves_no_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("own-cluster")
    local = local_cluster.up(root, num_cpus=1)
    try:
        assert local_cluster.status(root)["nodes"] == 1
        listening = _listen_addresses(local_cluster.find_processes(root))
        assert listening and {ip for ip, _ in listening} == {"127.0.0.1"}, sorted(listening)
        with pytest.raises(connect.ClusterError, match="already runs in"):
            local_cluster.up(root, num_cpus=1)
    finally:
        stopped = local_cluster.down(root)
    assert stopped > 0
    assert _mentioning(local.temp_dir) == []
    assert local_cluster.find_processes(root) == []
    assert not local.cluster_file.exists()
    info = local_cluster.status(root)
    assert (info["alive"], info["address"]) == (False, None)
    assert local_cluster.down(root, purge=True) == 0


# ------------------------------------------------------------------ the session cluster


@pytest.mark.ray
def test_cluster_up_status_reports_two_live_nodes(ray_cluster):
    info = local_cluster.status(ray_cluster.root)
    assert info["alive"] is True
    assert (info["nodes"], info["cpus"], info["gpus"]) == (2, 2.0, 0.0)
    assert info["address"] == ray_cluster.address
    assert ray_cluster.address.startswith("127.0.0.1:")
    assert oct(ray_cluster.token_path.stat().st_mode & 0o777) == "0o600"
    saved = json.loads(ray_cluster.cluster_file.read_text())
    assert local_cluster.LocalCluster.from_dict(saved) == ray_cluster


@pytest.mark.ray
def test_cluster_every_listener_is_loopback(ray_cluster):
    listening = _listen_addresses(local_cluster.find_processes(ray_cluster.root))
    assert listening, "found no listening sockets of the cluster"
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, sorted(listening)
    ports = {port for _, port in listening}
    head, node = ray_cluster.nodes
    assert {
        head.ports["gcs"],
        head.ports["dashboard"],
        head.ports["node_manager"],
        node.ports["node_manager"],
    } <= ports


@pytest.mark.ray
def test_connect_with_token_sees_cluster_resources(ray_cluster):
    result = _python(["-c", _RAW_INIT], env=_client_env(local_cluster.env_for(ray_cluster)))
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("RESOURCES "))
    assert json.loads(line.split(" ", 1)[1])["CPU"] == 2.0


@pytest.mark.ray
def test_in_process_ray_init_after_fixture_connects(ray_cluster):
    # This module imported ray before the fixture set RAY_AUTH_MODE: the fixture must still work.
    ray.init(address=ray_cluster.address, log_to_driver=False, logging_level="ERROR")
    try:
        assert ray.cluster_resources()["CPU"] == 2.0
    finally:
        ray.shutdown()


@pytest.mark.ray
@pytest.mark.parametrize("client, timeout_s", [("wrong_token", 10.0), ("no_token", 4.0)])
def test_connect_without_right_token_is_refused(ray_cluster, tmp_path, client, timeout_s):
    env = _client_env(local_cluster.env_for(ray_cluster), drop=("RAY_AUTH_TOKEN_PATH",))
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    if client == "wrong_token":
        wrong = tmp_path / "wrong_token"
        wrong.write_text("0" * 64)
        wrong.chmod(0o600)
        env["RAY_AUTH_TOKEN_PATH"] = str(wrong)
    else:
        env["RAY_AUTH_MODE"] = "disabled"  # the client sends no token at all
    result = _python(["-c", _CONNECT, ray_cluster.address, str(timeout_s)], env=env, timeout=40)
    assert result.returncode == 3, (result.stdout + result.stderr)[-2000:]
    assert "refused the connection: auth token missing or wrong" in result.stdout
    seconds = float(result.stdout.split("REFUSED after ", 1)[1].split(" s")[0])
    assert seconds < timeout_s + 5


@pytest.mark.ray
def test_cli_status_of_running_cluster_exits_0(ray_cluster):
    result = _python(
        ["-m", "workflows.cli", "cluster", "status", "--local", "--root", str(ray_cluster.root)]
    )
    assert result.returncode == 0, result.stderr
    assert f"cluster at {ray_cluster.address}: alive, 2 node(s), 2 CPU(s)" in result.stdout


# ------------------------------------------------------------------ no cluster needed


def test_status_never_started_is_not_alive(tmp_path):
    info = local_cluster.status(tmp_path / "none")
    assert info["alive"] is False and info["nodes"] is None


def test_connect_nothing_listening_fails_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(connect.ClusterError, match=f"No Ray cluster answers at 127.0.0.1:{port}"):
        connect.connect(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 5


def test_connect_auto_without_ray_address_raises(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(connect.ClusterError, match="address 'auto' needs RAY_ADDRESS"):
        connect.connect("auto")


def test_connect_malformed_address_raises():
    with pytest.raises(ValueError, match="Received: address='nowhere'"):
        connect.connect("nowhere")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_cpus": -1}, "Received: num_cpus=-1"),
        ({"node_cpus": -1}, "Received: node_cpus=-1"),
        ({"port": 80}, "Received: port=80"),
    ],
)
def test_up_bad_argument_raises_before_starting(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        local_cluster.up(tmp_path / "c", **kwargs)
    assert not (tmp_path / "c").exists()


def test_up_port_in_use_raises_without_starting(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(connect.ClusterError, match=f"Port {port} on 127.0.0.1 is in use"):
            local_cluster.up(tmp_path / "c", port=port)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["up"], "--local is required"),
        (
            ["up", "--local", "--num-cpus", "0"],
            "advtrain cluster: error: `--num-cpus` must be in [1, inf]. Received: --num-cpus='0'",
        ),
        (
            ["start", "--local"],
            (
                "`action` must be one of 'up', 'down', 'status' (did you mean 'status'?). "
                "Received: action='start'"
            ),
        ),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, message):
    result = _python(["-m", "workflows.cli", "cluster", *argv], timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert result.stdout == ""


def test_cluster_bad_input_under_main_exits_2_with_one_line(capsys):
    assert main(["cluster", "up", "--local", "--num-cpus", "many"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "advtrain cluster: error: `--num-cpus` must be an integer. Received: --num-cpus='many'"
    ], err


def test_cli_status_never_started_exits_1(tmp_path):
    result = _python(
        ["-m", "workflows.cli", "cluster", "status", "--local", "--root", str(tmp_path)], timeout=30
    )
    assert result.returncode == 1
    assert "no cluster in" in result.stdout
