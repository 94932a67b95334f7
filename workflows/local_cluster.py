"""A real local Ray cluster on 127.0.0.1 with token auth, for development and tests.

`up` starts one with `ray start` in its own folder, optionally with an autoscaler (Ray's fake
multi-node provider: worker nodes of the given types start on this machine when trials ask for
them and stop when idle, as on a cloud cluster); `down` stops exactly its processes (never
`ray stop`, which stops every Ray process on the machine); `status` reports without starting
anything; `env_for` gives the environment a client needs (`workflows.connect.apply_env`).

Layout of a cluster folder (default `~/.advtrain/cluster`):

    auth_token        the token (mode 0600), shared by every node and client
    temp/             Ray's --temp-dir (session logs, sockets); /tmp/advtrain-<hash>/temp when
                      the folder path is long, because Ray's unix socket paths must fit 107 bytes
    autoscaling.json  the autoscaler's cluster config, when started with node types
    cluster.json      address, ports, process sessions and pids, token path (written atomically)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from advtrain.config import check_number
from advtrain.files import write_json
from workflows.connect import LOOPBACK, LOOPBACK_ENV, ClusterError, ensure_token, tcp_open
from workflows.ray_internals import NODE_LAUNCHER

__all__ = [
    "DEFAULT_ROOT",
    "LocalCluster",
    "NodeRecord",
    "autoscaling_config",
    "down",
    "env_for",
    "find_processes",
    "status",
    "up",
]

logger = logging.getLogger(__name__)

DEFAULT_ROOT = Path("~/.advtrain/cluster")


_CLUSTER_FILE = "cluster.json"


# Ray puts sockets at <temp>/session_<date>_<pid>/sockets/plasma_store: ~63 bytes after <temp>,
# and sun_path holds 107, so a longer temp dir makes the raylet fail to bind its socket.
_MAX_TEMP_DIR_LEN = 40


_WORKER_PORTS = 256  # per node: one per worker process or actor; ample on a dev machine


@dataclasses.dataclass(frozen=True)
class NodeRecord:
    """One `ray start` of a local cluster.

    Args:
        role: `"head"` or `"worker"`.
        session_id: Session (and process group) id the node's processes run in.
        num_cpus: CPUs the node offers, or `None` for Ray's autodetection.
        ports: Listener name (`gcs`, `node_manager`, ...) to port.
        pids: Processes of the node when it had started.
    """

    role: str
    session_id: int
    num_cpus: int | None
    ports: Mapping[str, int]
    pids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class LocalCluster:
    """A local Ray cluster rooted in its own folder, as recorded in `cluster.json`.

    Args:
        root: The cluster folder.
        temp_dir: Ray's `--temp-dir` for every node.
        token_path: The auth token file.
        address: GCS address, `"127.0.0.1:PORT"`.
        dashboard_url: Dashboard and job API, `"http://127.0.0.1:PORT"`.
        started_at: Unix time `up` began; processes older than this are never ours.
        nodes: The head first, then any added node.
    """

    root: Path
    temp_dir: Path
    token_path: Path
    address: str
    dashboard_url: str
    started_at: float
    nodes: tuple[NodeRecord, ...]

    @property
    def cluster_file(self) -> Path:
        """Path of this cluster's `cluster.json`."""
        return self.root / _CLUSTER_FILE

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-ready dict; `from_dict` reads it back."""
        out = dataclasses.asdict(self)
        out.update(
            root=str(self.root), temp_dir=str(self.temp_dir), token_path=str(self.token_path)
        )
        out["nodes"] = [dict(n, ports=dict(n["ports"]), pids=list(n["pids"])) for n in out["nodes"]]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LocalCluster:
        """Builds a `LocalCluster` from `to_dict` output.

        Raises:
            ValueError: If keys are missing or unknown.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise ValueError(
                f"`cluster.json` must have exactly the keys {sorted(names)}. "
                f"Received: keys={sorted(data)}"
            )
        nodes = tuple(NodeRecord(**dict(n, pids=tuple(n["pids"]))) for n in data["nodes"])
        return cls(
            **dict(
                data,
                root=Path(data["root"]),
                temp_dir=Path(data["temp_dir"]),
                token_path=Path(data["token_path"]),
                nodes=nodes,
            )
        )


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root if root is not None else DEFAULT_ROOT).expanduser().resolve()


def _temp_dir(root: Path) -> Path:
    temp = root / "temp"
    if len(str(temp)) <= _MAX_TEMP_DIR_LEN:
        return temp
    # Ray makes its temp dir world-writable (mode 0777); the 0700 folder above it, owned by us
    # and checked in `_make_private_dir`, keeps other local users out of it.
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return Path("/tmp") / f"advtrain-{digest}" / "temp"  # short, for the socket paths


def _make_private_dir(path: Path) -> None:
    """Creates `path` with mode 0700, refusing a symlink or a folder another user owns."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = os.lstat(path)
    if os.path.islink(path) or info.st_uid != os.getuid():
        raise ClusterError(f"{path} is a symlink or belongs to another user; remove it first.")
    if info.st_mode & 0o077:
        path.chmod(0o700)


def _load(root: Path) -> LocalCluster | None:
    try:
        return LocalCluster.from_dict(json.loads((root / _CLUSTER_FILE).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise ClusterError(
            f"Unreadable {root / _CLUSTER_FILE} ({e}); run `down` to clear it."
        ) from e


def _free_ports(count: int) -> list[int]:
    # Hold every socket until all are chosen, so the kernel never hands out one port twice.
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _free_port_block(size: int, avoid: set[int]) -> int:
    # Below the kernel's ephemeral range (32768+), where _free_ports draws from.
    for _ in range(100):
        start = 10002 + secrets.randbelow(32768 - 10002 - size)
        block = range(start, start + size)
        if not avoid.intersection(block) and all(_port_free(p) for p in block):
            return start
    raise ClusterError(f"No {size} consecutive free ports found in [10002, 32768).")


def _psutil():
    try:
        import psutil
    except ImportError:
        # ray[default] ships psutil inside ray/thirdparty_files, which only `import ray` puts on
        # sys.path; add that folder without importing ray (slow, and it reads env at import).
        spec = importlib.util.find_spec("ray")
        if spec is None or not spec.submodule_search_locations:
            raise
        sys.path.append(os.path.join(spec.submodule_search_locations[0], "thirdparty_files"))
        import psutil
    return psutil


def _mentions(cmdline: list[str], path: Path) -> bool:
    pattern = re.compile(re.escape(str(path)) + r"(?=$|[/\s'\",])")
    return any(pattern.search(arg) for arg in cmdline)


def _ray_dir() -> str | None:
    spec = importlib.util.find_spec("ray")
    return spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None


def _scan(temp_dir: Path, sessions: Mapping[int, float]) -> list:
    """Ray processes under `temp_dir`, their sessions' processes, and younger ones of `sessions`.

    Only Ray's own programs count as naming the temp dir (a `tail -f` on a log is left alone),
    and only a raylet's or gcs_server's session is taken whole: a Ray process run from a
    terminal must not bring the terminal's session down with it.
    """
    psutil = _psutil()
    ray_dir = _ray_dir()
    spared = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    own_session = os.getsid(0)
    found, daemon_sessions = {}, set()
    procs = [
        p
        for p in psutil.process_iter(["pid", "name", "cmdline", "create_time"])
        if p.info["pid"] not in spared
    ]
    for p in procs:
        cmdline = p.info["cmdline"] or []
        is_ray = p.info["name"] in ("gcs_server", "raylet") or (
            ray_dir is not None and any(ray_dir in arg for arg in cmdline)
        )
        if is_ray and _mentions(cmdline, temp_dir):
            found[p.info["pid"]] = p
            if p.info["name"] in ("gcs_server", "raylet"):
                with contextlib.suppress(OSError):  # it exited meanwhile
                    daemon_sessions.add(os.getsid(p.info["pid"]))
    # Renamed processes (ray::DashboardAgent, ray::IDLE workers) no longer show the temp dir;
    # they share the session of the raylet that started them.
    daemon_sessions.discard(own_session)
    for p in procs:
        try:
            sid = os.getsid(p.info["pid"])
        except OSError:
            continue
        if sid == own_session:
            continue
        recorded = sid in sessions and (p.info["create_time"] or 0) >= sessions[sid] - 1.0
        if recorded or sid in daemon_sessions:
            found[p.info["pid"]] = p
    return list(found.values())


def find_processes(root: str | os.PathLike | None = None) -> list:
    """Lists the live processes of the cluster in `root`.

    A process belongs to the cluster when it is a Ray program whose command line names the
    cluster's temp dir, runs in the session of such a raylet or gcs_server, or runs in a session
    recorded in `cluster.json` and is younger than the cluster. Never the calling process, its
    ancestors, or its session.

    Args:
        root: The cluster folder. Defaults to `~/.advtrain/cluster`.

    Returns:
        `psutil.Process` objects, possibly empty.
    """
    root = _root(root)
    cluster = _load(root)
    if cluster is None:
        return _scan(_temp_dir(root), {})
    return _scan(cluster.temp_dir, {n.session_id: cluster.started_at for n in cluster.nodes})


def _terminate(procs: list, timeout_s: float) -> None:
    psutil = _psutil()
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        logger.info(
            "Process %d (%s) ignored SIGTERM for %.0f s; killing it.", p.pid, _name(p), timeout_s
        )
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def _name(p) -> str:
    try:
        return p.name()
    except _psutil().Error:  # gone, or not ours to read
        return "?"


def _stop(temp_dir: Path, sessions: Mapping[int, float], timeout_s: float) -> int:
    procs = _scan(temp_dir, sessions)
    # Stopping gcs_server together with its clients left it (and the autoscaler monitor) hanging
    # past 15 s; stopped after them, it exits in ~2 s.
    gcs = [p for p in procs if _name(p) == "gcs_server"]
    _terminate([p for p in procs if p not in gcs], timeout_s)
    _terminate(gcs, timeout_s)
    return len(procs)


def _start_node(
    cmd: list[str],
    env: Mapping[str, str],
    log_path: Path,
    timeout_s: float,
    sessions: dict[int, float],
) -> int:
    """Runs one `ray start` in a new session, recorded in `sessions`; returns the session id."""
    started = time.time()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    sessions[proc.pid] = started  # before waiting: a failed start must still be cleaned up
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise ClusterError(
            f"`ray start` did not finish in {timeout_s:.0f} s; see {log_path}"
        ) from None
    if code != 0:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else "no output"
        raise ClusterError(f"`ray start` failed (exit {code}): {last} (log: {log_path})")
    return proc.pid


# Head listeners that `ray start` has no flag for: Ray reads these variables, else takes fixed
# ports 44217/44227, which a second cluster on the machine would then fail to bind.
_ENV_PORTS = {
    "autoscaler_metric": "AUTOSCALER_METRIC_PORT",
    "dashboard_metric": "DASHBOARD_METRIC_PORT",
}


def _flags(ports: Mapping[str, int]) -> list[str]:
    return [
        f"--{name.replace('_', '-')}-port={port}"
        for name, port in ports.items()
        if name not in ("gcs", "min_worker", "max_worker", *_ENV_PORTS)
    ] + [f"--min-worker-port={ports['min_worker']}", f"--max-worker-port={ports['max_worker']}"]


def _node_ports(names: tuple[str, ...], taken: set[int]) -> dict[str, int]:
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    while taken.intersection(ports.values()):  # only a port the caller fixed can collide
        ports = dict(zip(names, _free_ports(len(names)), strict=True))
    start = _free_port_block(_WORKER_PORTS, taken | set(ports.values()))
    ports.update(min_worker=start, max_worker=start + _WORKER_PORTS - 1)
    taken.update(ports.values(), range(start, start + _WORKER_PORTS))
    return ports


_NODE_LISTENERS = (
    "node_manager",
    "object_manager",
    "dashboard_agent_listen",
    "dashboard_agent_grpc",
    "metrics_export",
    "runtime_env_agent",
)


def up(
    root: str | os.PathLike | None = None,
    num_cpus: int | None = None,
    port: int | None = None,
    add_node: bool = False,
    node_cpus: int = 1,
    *,
    node_types: Mapping[str, Mapping[str, Any]] | None = None,
    idle_timeout_minutes: float = 0.5,
    extra_env: Mapping[str, str] | None = None,
    timeout_s: float = 120.0,
) -> LocalCluster:
    """Starts a local Ray cluster on 127.0.0.1 with token auth and waits until it answers.

    The head runs `ray start --head --node-ip-address=127.0.0.1` with an explicit free port for
    every listener Ray lets us set, with `RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN_PATH` and
    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, in a session of its own.

    What binds where (measured with Ray 2.60 on Linux, `ss -ltnp` and psutil): every TCP
    listener of every node is on 127.0.0.1 (the gRPC servers show as `::ffff:127.0.0.1`, IPv4
    on a dual-stack socket): GCS, raylet node and object managers, dashboard, dashboard agent
    (HTTP, gRPC, metrics), runtime-env agent, Ray client server, workers, autoscaler and
    dashboard metrics (set through AUTOSCALER_METRIC_PORT and DASHBOARD_METRIC_PORT: no flag
    exists for them, and Ray's fixed defaults 44217/44227 would clash between two clusters).

    The same holds with `add_node=True`. `ray start --address` refuses to add a node while
    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, and without that setting Ray rewrites 127.0.0.1 to
    the machine's routable address: the new node then waits forever for a GCS that listens on
    loopback only; and a head started that way has GCS, raylet and agent gRPC servers on all
    interfaces (`*`), metrics servers on 0.0.0.0 and agents on the routable address (measured).
    So the added node's `ray start` runs through `ray_internals.NODE_LAUNCHER`, which lifts
    only that guard and keeps every listener on loopback. Clients need the same setting: use
    `env_for(cluster)` or `connect`.

    Args:
        root: Cluster folder. Defaults to `~/.advtrain/cluster`.
        num_cpus: CPUs of the head node, >= 0 (0: no task or Train worker is placed on the
            head, as on cluster.yaml's head). Defaults to `None` (Ray counts them).
        port: GCS port, 1024-65535. Defaults to `None` (a free one).
        add_node: Whether to add a second node on this machine. Defaults to `False`.
        node_cpus: CPUs of the added node, >= 1. Defaults to `1`.
        node_types: Autoscaled worker node types, `{name: {"resources": {...}, "min_workers": m,
            "max_workers": n}}` (the cluster launcher's `available_node_types`; resources are
            logical, so `{"CPU": 2, "GPU": 2}` works on a machine without GPUs). The head then
            runs Ray's autoscaler with the fake multi-node provider, which starts and stops
            worker nodes on this machine (on 127.0.0.1) as demand comes and goes. Defaults to
            `None` (no autoscaler).
        idle_timeout_minutes: With `node_types`, minutes before an idle worker node is removed.
            Defaults to `0.5`.
        extra_env: Extra environment of every node (and so of jobs and workers), e.g. storage
            credentials. Defaults to `None`.
        timeout_s: Seconds to wait for each `ray start` and for the cluster to answer.

    Returns:
        The started `LocalCluster`, also written to `root/cluster.json`.

    Raises:
        ValueError: On an out-of-range argument, before anything starts.
        ClusterError: If a cluster already runs in `root`, or it does not come up; whatever
            was started is stopped again.

    Example:
        >>> cluster = up("/tmp/c", num_cpus=2)  # doctest: +SKIP
        >>> down(cluster.root)  # doctest: +SKIP
    """
    _check_up(num_cpus, port, add_node, node_cpus, node_types)
    root, temp_dir, token_path = _fresh_root(root)
    env = _node_env(token_path, extra_env)
    taken: set[int] = {port} if port else set()
    head = _node_ports(
        ("gcs", "dashboard", "ray_client_server", *_ENV_PORTS, *_NODE_LISTENERS), taken
    )
    if port is not None:
        head["gcs"] = port
    env.update({var: str(head[name]) for name, var in _ENV_PORTS.items()})
    address = f"{LOOPBACK}:{head['gcs']}"
    common = ["--node-ip-address=" + LOOPBACK, f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    cluster = LocalCluster(
        root=root,
        temp_dir=temp_dir,
        token_path=token_path,
        address=address,
        dashboard_url=f"http://{LOOPBACK}:{head['dashboard']}",
        started_at=time.time(),
        nodes=(),
    )
    sessions: dict[int, float] = {}
    try:
        cmd = _head_command(head, common, num_cpus)
        if node_types is not None:
            config = autoscaling_config(
                node_types,
                address=address,
                head_cpus=num_cpus,
                idle_timeout_minutes=idle_timeout_minutes,
            )
            config_path = write_json(root / "autoscaling.json", config)
            cmd.append(f"--autoscaling-config={config_path}")
            # The fake provider refuses to run without RAY_FAKE_CLUSTER; the monitor loop
            # checks demand every AUTOSCALER_UPDATE_INTERVAL_S seconds (5 by default).
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        logger.info("Starting Ray head at %s (temp dir %s).", address, temp_dir)
        sid = _start_node(cmd, env, temp_dir / "ray-start-head.log", timeout_s, sessions)
        cluster = _recorded(cluster, NodeRecord("head", sid, num_cpus, head))
        if add_node:
            extra = _node_ports(_NODE_LISTENERS, taken)
            cmd = [*_node_command(address, node_cpus), *common, *_flags(extra)]
            logger.info("Adding a %d-CPU node to %s.", node_cpus, address)
            sid = _start_node(cmd, env, temp_dir / "ray-start-node.log", timeout_s, sessions)
            cluster = _recorded(cluster, NodeRecord("worker", sid, node_cpus, extra))
        _wait_for_nodes(cluster, len(cluster.nodes), timeout_s)
        if node_types is not None:
            _publish_node_types(config_path, address, env, timeout_s)
        cluster = _with_pids(cluster, sessions)
        write_json(cluster.cluster_file, cluster.to_dict())
    except BaseException:
        logger.warning("Cluster in %s did not come up; stopping what was started.", root)
        _stop(temp_dir, sessions, timeout_s=15.0)
        cluster.cluster_file.unlink(missing_ok=True)
        raise
    logger.info("Ray cluster up at %s with %d node(s).", address, len(cluster.nodes))
    return cluster


def _check_up(num_cpus, port, add_node, node_cpus, node_types) -> None:
    """`up`'s argument checks, before anything starts."""
    if num_cpus is not None:
        check_number("num_cpus", num_cpus, low=0, integer=True)
    check_number("node_cpus", node_cpus, low=1, integer=True)
    if node_types is not None and add_node:
        raise ValueError(
            "`add_node` and `node_types` exclude each other: the autoscaler adds the nodes. "
            f"Received: add_node={add_node!r}, node_types={dict(node_types)!r}"
        )
    if port is not None:
        check_number("port", port, low=1024, high=65535, integer=True)
    if port is not None and not _port_free(port):
        raise ClusterError(f"Port {port} on 127.0.0.1 is in use; choose another `port`.")


def _fresh_root(root) -> tuple[Path, Path, Path]:
    """The cluster folder, private and without a live cluster (a crashed run's leftovers are
    stopped), with its temp dir and auth token: (root, temp_dir, token_path)."""
    root = _root(root)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    previous = status(root)
    if previous["alive"]:
        raise ClusterError(
            f"A cluster already runs in {root} at {previous['address']}; run `down` first."
        )
    down(root)  # leftovers of a crashed run: stale cluster.json or orphaned processes
    temp_dir, token_path = _temp_dir(root), root / "auth_token"
    if temp_dir.parent != root:
        _make_private_dir(temp_dir.parent)
    temp_dir.mkdir(exist_ok=True, mode=0o700)
    ensure_token(token_path)
    return root, temp_dir, token_path


def _head_command(head: dict[str, int], common: list[str], num_cpus: int | None) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        f"--port={head['gcs']}",
        f"--dashboard-host={LOOPBACK}",
        *common,
        *_flags(head),
    ]
    return cmd + ([f"--num-cpus={num_cpus}"] if num_cpus is not None else [])


def _node_command(address: str, node_cpus: int) -> list[str]:
    # NODE_LAUNCHER: `ray start` without the guard that refuses a second node on loopback.
    return [
        sys.executable,
        "-c",
        NODE_LAUNCHER,
        "start",
        f"--address={address}",
        f"--num-cpus={node_cpus}",
    ]


def _recorded(cluster: LocalCluster, node: NodeRecord) -> LocalCluster:
    """`cluster` with `node` added, written to cluster.json at once so `down` finds every
    started node if a later step fails."""
    cluster = dataclasses.replace(cluster, nodes=(*cluster.nodes, node))
    write_json(cluster.cluster_file, cluster.to_dict())
    return cluster


def _node_env(token_path: Path, extra_env: Mapping[str, str] | None) -> dict[str, str]:
    """The environment every node (and so every job and worker) of the cluster runs with."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")
    }
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        RAY_USAGE_STATS_ENABLED="0",
        **{LOOPBACK_ENV: "0"},
        **dict(extra_env or {}),
    )
    # Job entrypoints (`ray job submit -- python -m workflows.cli ...`) and workers resolve
    # `python` and `advtrain` on the nodes' PATH: put this interpreter's folder first so a
    # cluster started from an unactivated venv runs jobs with the Python that has advtrain.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(
        [bin_dir, *(p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir)]
    )
    return env


def _publish_node_types(config_path: Path, address: str, env: dict, timeout_s: float) -> None:
    """What cluster.yaml's head does after `ray start`: tell the GCS which node types the
    autoscaler can add (workflows.capacity), so drivers see them before any node is up."""
    cmd = [
        sys.executable,
        "-m",
        "workflows.capacity",
        "publish",
        str(config_path),
        "--address",
        address,
    ]
    done = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        raise ClusterError(
            f"publishing the node types failed: {(done.stderr or done.stdout)[-500:]}"
        )


def _with_pids(cluster: LocalCluster, sessions: dict[int, float]) -> LocalCluster:
    """`cluster` with each node's process ids, found by session under its temp dir."""
    pids: dict[int, list[int]] = {}
    for p in _scan(cluster.temp_dir, sessions):
        with contextlib.suppress(OSError):  # it exited meanwhile
            pids.setdefault(os.getsid(p.pid), []).append(p.pid)
    return dataclasses.replace(
        cluster,
        nodes=tuple(
            dataclasses.replace(n, pids=tuple(sorted(pids.get(n.session_id, ()))))
            for n in cluster.nodes
        ),
    )


def autoscaling_config(
    node_types: Mapping[str, Mapping[str, Any]],
    *,
    address: str,
    head_cpus: int | None,
    idle_timeout_minutes: float = 0.5,
) -> dict[str, Any]:
    """The autoscaler's cluster config for Ray's fake multi-node provider on this machine.

    What Ray's `ray.cluster_utils.AutoscalingCluster` builds from the provider's example.yaml
    (which Ray 2.60's wheel does not ship), with every address on loopback: the provider starts
    new nodes against `provider.gcs_address`, which would otherwise default to the machine's
    network address on port 6379.

    Args:
        node_types: worker node types, `{name: {"resources", "min_workers", "max_workers"}}`.
        address: the head's GCS address, `"127.0.0.1:PORT"`.
        head_cpus: the head's CPUs (`None`: not declared to the autoscaler).
        idle_timeout_minutes: minutes before an idle worker node is removed.

    Raises:
        ValueError: a node type without `resources` or `max_workers`, or with `min_workers`
            above `max_workers`.
    """
    types = {}
    for name, spec in node_types.items():
        spec = dict(spec)
        if not isinstance(spec.get("resources"), Mapping) or "max_workers" not in spec:
            raise ValueError(
                f"node type {name!r} needs `resources` and `max_workers`. Received: {name}={spec!r}"
            )
        low = check_number(f"{name}.min_workers", spec.get("min_workers", 0), low=0, integer=True)
        high = check_number(f"{name}.max_workers", spec["max_workers"], low=low, integer=True)
        types[name] = {
            "resources": dict(spec["resources"]),
            "node_config": {},
            "min_workers": low,
            "max_workers": high,
        }
    head = {"CPU": head_cpus} if head_cpus is not None else {}
    types["ray.head.default"] = {"resources": head, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "advtrain-local",
        "max_workers": sum(t["max_workers"] for t in types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": address,
        },
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _wait_for_nodes(cluster: LocalCluster, expected: int, timeout_s: float) -> None:
    deadline, seen = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        seen = query_state(cluster)
        if seen is not None and sum(n["state"] == "ALIVE" for n in seen) >= expected:
            return
        time.sleep(0.5)
    count = "no answer" if seen is None else f"{len(seen)} node(s)"
    raise ClusterError(
        f"Cluster at {cluster.address} did not report {expected} live node(s) "
        f"within {timeout_s:.0f} s ({count}); logs under {cluster.temp_dir}"
    )


def query_state(cluster: LocalCluster, resource: str = "nodes") -> list[dict] | None:
    """One listing of the dashboard's state API (`nodes`, `actors`, `placement_groups`, ...),
    detailed, as dicts; `None` when it does not answer. Needs no Ray connection in this process.
    """
    request = urllib.request.Request(  # our own http://127.0.0.1 URL
        f"{cluster.dashboard_url}/api/v0/{resource}?limit=1000&detail=1",
        headers={"Authorization": "Bearer " + cluster.token_path.read_text().strip()},
    )
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return json.load(response)["data"]["result"]["result"]
    except (OSError, urllib.error.URLError, ValueError, KeyError, TypeError):
        return None


def down(
    root: str | os.PathLike | None = None, *, timeout_s: float = 15.0, purge: bool = False
) -> int:
    """Stops only the processes of the cluster in `root` and removes its `cluster.json`.

    Processes are found by `find_processes`; each is sent SIGTERM (gcs_server last), and
    survivors get SIGKILL after `timeout_s`. Never runs `ray stop`.

    Args:
        root: Cluster folder. Defaults to `~/.advtrain/cluster`.
        timeout_s: Seconds to wait after SIGTERM before SIGKILL. Defaults to `15.0`.
        purge: Whether to delete the temp dir (logs) too. Defaults to `False`.

    Returns:
        How many processes were stopped (0 when nothing ran).
    """
    root = _root(root)
    try:
        cluster = _load(root)
    except ClusterError as e:
        logger.warning("%s Stopping by temp dir only.", e)
        cluster = None
    temp_dir = cluster.temp_dir if cluster else _temp_dir(root)
    sessions = {n.session_id: cluster.started_at for n in cluster.nodes} if cluster else {}
    stopped = _stop(temp_dir, sessions, timeout_s)
    (root / _CLUSTER_FILE).unlink(missing_ok=True)
    if purge:
        # The /tmp/advtrain-<hash> folder too, when the temp dir lives there.
        shutil.rmtree(temp_dir if temp_dir.parent == root else temp_dir.parent, ignore_errors=True)
    if stopped:
        logger.info("Stopped %d process(es) of the cluster in %s.", stopped, root)
    return stopped


def status(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Reports on the cluster in `root` without starting anything.

    Args:
        root: Cluster folder. Defaults to `~/.advtrain/cluster`.

    Returns:
        A dict with `root`, `address` (`None` if never started), `alive` (the GCS port
        answers), `nodes` (live node count), `cpus`, `gpus` (totals over live nodes; `None`
        when the dashboard does not answer), `dashboard_url`, `token_path` and `temp_dir`.
    """
    root = _root(root)
    cluster = _load(root)
    out: dict[str, Any] = {
        "root": str(root),
        "address": None,
        "alive": False,
        "nodes": None,
        "cpus": None,
        "gpus": None,
        "dashboard_url": None,
        "token_path": str(root / "auth_token"),
        "temp_dir": str(_temp_dir(root)),
    }
    if cluster is None:
        return out
    host, port = cluster.address.rsplit(":", 1)
    out.update(
        address=cluster.address,
        dashboard_url=cluster.dashboard_url,
        token_path=str(cluster.token_path),
        temp_dir=str(cluster.temp_dir),
        alive=tcp_open(host, int(port)),
    )
    nodes = query_state(cluster) if out["alive"] else None
    if nodes is not None:
        live = [n for n in nodes if n.get("state") == "ALIVE"]
        out.update(
            nodes=len(live),
            cpus=sum(n.get("resources_total", {}).get("CPU", 0.0) for n in live),
            gpus=sum(n.get("resources_total", {}).get("GPU", 0.0) for n in live),
        )
    return out


def env_for(cluster: LocalCluster) -> dict[str, str]:
    """Returns the environment a client needs to reach `cluster`.

    Covers `ray.init(address=...)` / `ray.init()` (RAY_ADDRESS), `ray job submit`
    (RAY_API_SERVER_ADDRESS), token auth, and keeping 127.0.0.1 from being rewritten to the
    machine's routable address (which the cluster does not listen on). Set it before `import
    ray` in the client process, or pass it to `apply_env` (`connect` needs only `os.environ`).

    Args:
        cluster: A cluster from `up`.

    Returns:
        Variable name to value.
    """
    return {
        "RAY_ADDRESS": cluster.address,
        "RAY_API_SERVER_ADDRESS": cluster.dashboard_url,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(cluster.token_path),
        LOOPBACK_ENV: "0",
    }
