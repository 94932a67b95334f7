"""A real local Ray cluster on 127.0.0.1 with token auth, for tests and development.

`up` starts one with `ray start` in its own folder, `down` stops exactly its processes
(never `ray stop`, which stops every Ray process on the machine), `status` reports without
starting anything, `env_for` gives the environment a client needs, and `connect` is what the
drivers call: an embedded loopback Ray when no address is given, else a bounded-time connection
that fails with one clear line. `register_cli`/`run_cli` expose `advtrain cluster up|down|status`.

Layout of a cluster folder (default `~/.advtrain/cluster`):

    auth_token     the token (mode 0600), shared by every node and client
    temp/          Ray's --temp-dir (session logs, sockets); /tmp/advtrain-<hash>/temp when
                   the folder path is long, because Ray's unix socket paths must fit 107 bytes
    cluster.json   address, ports, process sessions and pids, token path (written atomically)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import ipaddress
import json
import logging
import os
import re
import secrets
import shlex
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

from advtrain.files import write_json

__all__ = [
    "DEFAULT_ROOT",
    "ClusterError",
    "LocalCluster",
    "NodeRecord",
    "apply_env",
    "connect",
    "down",
    "env_for",
    "find_processes",
    "register_cli",
    "run_cli",
    "status",
    "up",
]

logger = logging.getLogger(__name__)

DEFAULT_ROOT = Path("~/.advtrain/cluster")
_LOOPBACK = "127.0.0.1"
_CLUSTER_FILE = "cluster.json"
# Ray puts sockets at <temp>/session_<date>_<pid>/sockets/plasma_store: ~63 bytes after <temp>,
# and sun_path holds 107, so a longer temp dir makes the raylet fail to bind its socket.
_MAX_TEMP_DIR_LEN = 40
_WORKER_PORTS = 256  # per node: one per worker process or actor; ample on a dev machine
# Ray reads this once, at import, and then resolves "127.0.0.1" to the routable address unless
# it is "0"; "0" keeps every node IP, and so every listener, on loopback.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"  # Ray's spelling

# `ray start --address` refuses to add a node while _LOOPBACK_ENV=0 (a guard meant for macOS and
# Windows), yet that same setting is what keeps 127.0.0.1 from being rewritten. This launcher
# lifts only the guard, through a copy of ray_constants that the `ray start` command alone sees;
# address resolution (ray._private.services) still reads the real module and stays on loopback.
_NODE_LAUNCHER = """\
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


class ClusterError(RuntimeError):
    """A cluster could not be started, reached or stopped; the message says which and where."""


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
        out.update(root=str(self.root), temp_dir=str(self.temp_dir),
                   token_path=str(self.token_path))
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
        return cls(**dict(data, root=Path(data["root"]), temp_dir=Path(data["temp_dir"]),
                          token_path=Path(data["token_path"]), nodes=nodes))


# --------------------------------------------------------------------------- paths and files


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


def _ensure_token(path: Path) -> None:
    """Creates a random token file with mode 0600, or tightens an existing one's mode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            logger.warning("Token file %s was readable by others; setting mode 0600.", path)
            path.chmod(0o600)
        if not path.read_text().strip():
            raise ClusterError(
                f"Token file {path} is empty; delete it and run `up` again.") from None
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def _load(root: Path) -> LocalCluster | None:
    try:
        return LocalCluster.from_dict(json.loads((root / _CLUSTER_FILE).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise ClusterError(
            f"Unreadable {root / _CLUSTER_FILE} ({e}); run `down` to clear it.") from e


# --------------------------------------------------------------------------- ports


def _free_ports(count: int) -> list[int]:
    # Hold every socket until all are chosen, so the kernel never hands out one port twice.
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((_LOOPBACK, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((_LOOPBACK, port))
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


def _tcp_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- processes


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
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline", "create_time"])
             if p.info["pid"] not in spared]
    for p in procs:
        cmdline = p.info["cmdline"] or []
        is_ray = p.info["name"] in ("gcs_server", "raylet") or (
            ray_dir is not None and any(ray_dir in arg for arg in cmdline))
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
        logger.info("Process %d (%s) ignored SIGTERM for %.0f s; killing it.", p.pid,
                    _name(p), timeout_s)
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


# --------------------------------------------------------------------------- up / down / status


def _start_node(cmd: list[str], env: Mapping[str, str], log_path: Path, timeout_s: float,
                sessions: dict[int, float]) -> int:
    """Runs one `ray start` in a new session, recorded in `sessions`; returns the session id."""
    started = time.time()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    sessions[proc.pid] = started  # before waiting: a failed start must still be cleaned up
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise ClusterError(
            f"`ray start` did not finish in {timeout_s:.0f} s; see {log_path}") from None
    if code != 0:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else "no output"
        raise ClusterError(f"`ray start` failed (exit {code}): {last} (log: {log_path})")
    return proc.pid


# Head listeners that `ray start` has no flag for: Ray reads these variables, else takes fixed
# ports 44217/44227, which a second cluster on the machine would then fail to bind.
_ENV_PORTS = {"autoscaler_metric": "AUTOSCALER_METRIC_PORT",
              "dashboard_metric": "DASHBOARD_METRIC_PORT"}


def _flags(ports: Mapping[str, int]) -> list[str]:
    return [f"--{name.replace('_', '-')}-port={port}" for name, port in ports.items()
            if name not in ("gcs", "min_worker", "max_worker", *_ENV_PORTS)] + [
        f"--min-worker-port={ports['min_worker']}", f"--max-worker-port={ports['max_worker']}"]


def _node_ports(names: tuple[str, ...], taken: set[int]) -> dict[str, int]:
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    while taken.intersection(ports.values()):  # only a port the caller fixed can collide
        ports = dict(zip(names, _free_ports(len(names)), strict=True))
    start = _free_port_block(_WORKER_PORTS, taken | set(ports.values()))
    ports.update(min_worker=start, max_worker=start + _WORKER_PORTS - 1)
    taken.update(ports.values(), range(start, start + _WORKER_PORTS))
    return ports


_NODE_LISTENERS = ("node_manager", "object_manager", "dashboard_agent_listen",
                   "dashboard_agent_grpc", "metrics_export", "runtime_env_agent")


def _check_count(name: str, value: Any, optional: bool) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")


def up(root: str | os.PathLike | None = None, num_cpus: int | None = None,
       port: int | None = None, add_node: bool = False, node_cpus: int = 1,
       *, timeout_s: float = 120.0) -> LocalCluster:
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
    So the added node's `ray start` runs through `_NODE_LAUNCHER`, which lifts only that guard
    and keeps every listener on loopback. Clients need the same setting: use `env_for(cluster)`
    or `connect`.

    Args:
        root: Cluster folder. Defaults to `~/.advtrain/cluster`.
        num_cpus: CPUs of the head node, >= 1. Defaults to `None` (Ray counts them).
        port: GCS port, 1024-65535. Defaults to `None` (a free one).
        add_node: Whether to add a second node on this machine. Defaults to `False`.
        node_cpus: CPUs of the added node, >= 1. Defaults to `1`.
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
    _check_count("num_cpus", num_cpus, optional=True)
    _check_count("node_cpus", node_cpus, optional=False)
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 1024 <= port <= 65535):
        raise ValueError(f"`port` must be an integer in [1024, 65535]. Received: port={port!r}")
    if port is not None and not _port_free(port):
        raise ClusterError(f"Port {port} on 127.0.0.1 is in use; choose another `port`.")
    root = _root(root)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    previous = status(root)
    if previous["alive"]:
        raise ClusterError(f"A cluster already runs in {root} at {previous['address']}; "
                           f"run `down` first.")
    down(root)  # leftovers of a crashed run: stale cluster.json or orphaned processes
    temp_dir, token_path = _temp_dir(root), root / "auth_token"
    if temp_dir.parent != root:
        _make_private_dir(temp_dir.parent)
    temp_dir.mkdir(exist_ok=True, mode=0o700)
    _ensure_token(token_path)

    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path),
               RAY_USAGE_STATS_ENABLED="0", **{_LOOPBACK_ENV: "0"})
    # Job entrypoints (`ray job submit -- python -m workflows.cli ...`) and workers resolve
    # `python` and `advtrain` on the nodes' PATH: put this interpreter's folder first so a
    # cluster started from an unactivated venv runs jobs with the Python that has advtrain.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, *(p for p in env.get("PATH", "").split(os.pathsep)
                                              if p and p != bin_dir)])
    taken: set[int] = {port} if port else set()
    head = _node_ports(("gcs", "dashboard", "ray_client_server", *_ENV_PORTS, *_NODE_LISTENERS),
                       taken)
    if port is not None:
        head["gcs"] = port
    env.update({var: str(head[name]) for name, var in _ENV_PORTS.items()})
    address = f"{_LOOPBACK}:{head['gcs']}"
    common = ["--node-ip-address=" + _LOOPBACK, f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    cluster = LocalCluster(root=root, temp_dir=temp_dir, token_path=token_path, address=address,
                           dashboard_url=f"http://{_LOOPBACK}:{head['dashboard']}",
                           started_at=time.time(), nodes=())
    sessions: dict[int, float] = {}
    try:
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
               f"--port={head['gcs']}", f"--dashboard-host={_LOOPBACK}", *common, *_flags(head)]
        if num_cpus is not None:
            cmd.append(f"--num-cpus={num_cpus}")
        logger.info("Starting Ray head at %s (temp dir %s).", address, temp_dir)
        sid = _start_node(cmd, env, temp_dir / "ray-start-head.log", timeout_s, sessions)
        nodes = [NodeRecord("head", sid, num_cpus, head)]
        cluster = dataclasses.replace(cluster, nodes=tuple(nodes))
        write_json(cluster.cluster_file, cluster.to_dict())  # so `down` finds it if we fail
        if add_node:
            extra = _node_ports(_NODE_LISTENERS, taken)
            cmd = [sys.executable, "-c", _NODE_LAUNCHER, "start", f"--address={address}",
                   f"--num-cpus={node_cpus}", *common, *_flags(extra)]
            logger.info("Adding a %d-CPU node to %s.", node_cpus, address)
            sid = _start_node(cmd, env, temp_dir / "ray-start-node.log", timeout_s, sessions)
            nodes.append(NodeRecord("worker", sid, node_cpus, extra))
            cluster = dataclasses.replace(cluster, nodes=tuple(nodes))
            write_json(cluster.cluster_file, cluster.to_dict())
        _wait_for_nodes(cluster, len(nodes), timeout_s)
        pids = {}
        for p in _scan(temp_dir, sessions):
            with contextlib.suppress(OSError):  # it exited meanwhile
                pids.setdefault(os.getsid(p.pid), []).append(p.pid)
        cluster = dataclasses.replace(cluster, nodes=tuple(
            dataclasses.replace(n, pids=tuple(sorted(pids.get(n.session_id, ())))) for n in nodes))
        write_json(cluster.cluster_file, cluster.to_dict())
    except BaseException:
        logger.warning("Cluster in %s did not come up; stopping what was started.", root)
        _stop(temp_dir, sessions, timeout_s=15.0)
        cluster.cluster_file.unlink(missing_ok=True)
        raise
    logger.info("Ray cluster up at %s with %d node(s).", address, len(cluster.nodes))
    return cluster


def _wait_for_nodes(cluster: LocalCluster, expected: int, timeout_s: float) -> None:
    deadline, seen = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        seen = _query_nodes(cluster)
        if seen is not None and sum(n["state"] == "ALIVE" for n in seen) >= expected:
            return
        time.sleep(0.5)
    count = "no answer" if seen is None else f"{len(seen)} node(s)"
    raise ClusterError(f"Cluster at {cluster.address} did not report {expected} live node(s) "
                       f"within {timeout_s:.0f} s ({count}); logs under {cluster.temp_dir}")


def _query_nodes(cluster: LocalCluster) -> list[dict] | None:
    """Nodes from the dashboard's state API, or `None` when it does not answer."""
    request = urllib.request.Request(  # our own http://127.0.0.1 URL
        f"{cluster.dashboard_url}/api/v0/nodes?limit=1000&detail=1",
        headers={"Authorization": "Bearer " + cluster.token_path.read_text().strip()})
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return json.load(response)["data"]["result"]["result"]
    except (OSError, urllib.error.URLError, ValueError, KeyError, TypeError):
        return None


def down(root: str | os.PathLike | None = None, *, timeout_s: float = 15.0,
         purge: bool = False) -> int:
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
        shutil.rmtree(temp_dir if temp_dir.parent == root else temp_dir.parent,
                      ignore_errors=True)
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
    out: dict[str, Any] = {"root": str(root), "address": None, "alive": False, "nodes": None,
                           "cpus": None, "gpus": None, "dashboard_url": None,
                           "token_path": str(root / "auth_token"),
                           "temp_dir": str(_temp_dir(root))}
    if cluster is None:
        return out
    host, port = cluster.address.rsplit(":", 1)
    out.update(address=cluster.address, dashboard_url=cluster.dashboard_url,
               token_path=str(cluster.token_path), temp_dir=str(cluster.temp_dir),
               alive=_tcp_open(host, int(port)))
    nodes = _query_nodes(cluster) if out["alive"] else None
    if nodes is not None:
        live = [n for n in nodes if n.get("state") == "ALIVE"]
        out.update(nodes=len(live),
                   cpus=sum(n.get("resources_total", {}).get("CPU", 0.0) for n in live),
                   gpus=sum(n.get("resources_total", {}).get("GPU", 0.0) for n in live))
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
    return {"RAY_ADDRESS": cluster.address, "RAY_API_SERVER_ADDRESS": cluster.dashboard_url,
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(cluster.token_path),
            _LOOPBACK_ENV: "0"}


# --------------------------------------------------------------------------- connect


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _pin_loopback() -> None:
    """Keeps Ray in this process (and its children) from rewriting 127.0.0.1."""
    os.environ[_LOOPBACK_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", False):
        # Ray read the variable at import, before we could set it; it reads this attribute
        # on each address resolution.
        logger.debug("Ray was imported before %s=0 was set; pinning loopback.", _LOOPBACK_ENV)
        constants.ENABLE_RAY_CLUSTER = False


def _refresh_ray_auth() -> None:
    """Makes an already-imported Ray read RAY_AUTH_MODE and the token from os.environ again.

    Ray caches its config, auth mode included, when `ray._raylet` is imported, and the token
    on first use: set later (by a pytest fixture, say), they are silently ignored and the GCS
    answers "Unauthenticated". Ray's own `_enable_token_auth` refreshes the same way.
    """
    raylet = sys.modules.get("ray._raylet")
    if raylet is None:
        return  # Ray reads the environment when it is imported
    if sys.modules["ray"].is_initialized():
        logger.debug("Ray is initialized; its auth settings stay as they are.")
        return
    raylet.Config.initialize("")
    raylet.AuthenticationTokenLoader.instance().reset_cache()


def apply_env(env: Mapping[str, str | None]) -> dict[str, str | None]:
    """Sets `env` in `os.environ` and makes this process's Ray, even if imported, follow it.

    Use it to point the current process at a cluster, e.g. `apply_env(env_for(cluster))`
    before `ray.init(address=...)`: setting `os.environ` alone is not enough once Ray has been
    imported (it caches the auth mode, the token and the loopback setting at import).

    Args:
        env: Variable name to value; `None` unsets the variable.

    Returns:
        The previous values (`None` where unset); `apply_env(previous)` restores them.
    """
    previous = {key: os.environ.get(key) for key in env}
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if env.get(_LOOPBACK_ENV) == "0":
        _pin_loopback()
    _refresh_ray_auth()
    return previous


def _secure_default_token() -> None:
    """Creates ~/.ray/auth_token with mode 0600 when a new embedded Ray is about to create it.

    Ray 2.60 writes that file itself when token auth is on (the default) and no token exists,
    but with the umask's mode (usually 0644: readable by every local user).
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or any(
            os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        return
    path = Path.home() / ".ray" / "auth_token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _ensure_token(path)
    elif path.stat().st_mode & 0o077:
        logger.warning("%s is readable by other users; consider `chmod 600 %s`.", path, path)


def _auth_refused(error: BaseException) -> bool:
    while error is not None:
        text = f"{type(error).__name__} {error}"
        if any(mark in text for mark in ("Unauthenticated", "InvalidAuthToken",
                                         "AuthenticationError", "authentication token")):
            return True
        error = error.__cause__ or error.__context__
    return False


def connect(address: str | None = None, *, num_cpus: int | None = None,
            timeout_s: float = 10.0, **init_kwargs: Any):
    """Connects this process to Ray: an embedded loopback instance, or a running cluster.

    With `address=None`, starts Ray inside this process with `ray.init(address="local")` on
    127.0.0.1, its dashboard (and state API) bound to 127.0.0.1 too. Unless `RAY_AUTH_MODE` says otherwise, Ray 2.60 turns on
    token auth by itself, with `~/.ray/auth_token` as the token: created here first, with mode
    0600, when missing (Ray would leave it readable by all).

    With an address (`"auto"` meaning `$RAY_ADDRESS`, or `"host:port"`), checks that the GCS
    port accepts a TCP connection, then calls `ray.init(address=...)` with Ray's GCS retries
    bounded, so a missing cluster or a refused token fails in about `timeout_s`, never a silent
    wait. The token comes from `RAY_AUTH_MODE`/`RAY_AUTH_TOKEN_PATH` (see `env_for`).

    Args:
        address: `None`, `"auto"` or `"host:port"`. Defaults to `None`.
        num_cpus: CPUs of an embedded instance, >= 1. Defaults to `os.cpu_count()`.
        timeout_s: Rough bound on the time to fail, > 0. Defaults to `10.0`.
        **init_kwargs: Passed on to `ray.init` (for example `runtime_env`).

    Returns:
        The `ray.init` context.

    Raises:
        ValueError: On a malformed address or out-of-range argument.
        ClusterError: If no cluster answers at `address`, it refuses the token, or Ray is
            already initialized in this process.
    """
    _check_count("num_cpus", num_cpus, optional=True)
    if not timeout_s > 0:
        raise ValueError(f"`timeout_s` must be > 0. Received: timeout_s={timeout_s!r}")
    if address is None:
        _pin_loopback()
        import ray

        if ray.is_initialized():
            raise ClusterError("Ray is already initialized in this process; "
                               "call ray.shutdown() first.")
        _secure_default_token()
        _refresh_ray_auth()
        logger.info("Starting embedded Ray on 127.0.0.1.")
        # The dashboard serves Ray's state API, which Train V2's placement-group cleaner polls;
        # without it every run logs "State API may be temporarily unavailable" every second.
        init_kwargs.setdefault("include_dashboard", True)
        init_kwargs.setdefault("dashboard_host", _LOOPBACK)
        return ray.init(address="local", num_cpus=num_cpus or os.cpu_count(),
                        _node_ip_address=_LOOPBACK, **init_kwargs)

    given = address
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
        if not address:
            raise ClusterError("address 'auto' needs RAY_ADDRESS; start a cluster with "
                               "`advtrain cluster up --local` and run the export lines it prints.")
    match = re.fullmatch(r"(?:ray://)?\[?([^\[\]]+?)\]?:(\d{1,5})", address)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"`address` must be None, 'auto' or 'host:port'. "
                         f"Received: address={given!r}")
    host, port = match.group(1), int(match.group(2))
    if _is_loopback(host):
        _pin_loopback()
    if not _tcp_open(host, port, timeout_s=min(timeout_s, 3.0)):
        raise ClusterError(f"No Ray cluster answers at {address} ({given!r}): "
                           f"nothing accepts connections on that port.")
    import ray

    if ray.is_initialized():
        raise ClusterError("Ray is already initialized in this process; call ray.shutdown() first.")
    _refresh_ray_auth()
    # Ray retries the GCS handshake once a second, 20 times by default (more for RocksDB);
    # this variable caps the attempts, and Ray reads it on each connect.
    saved = os.environ.get(_GCS_WAIT_ENV)
    os.environ[_GCS_WAIT_ENV] = str(max(1, int(timeout_s / 2)))
    try:
        return ray.init(address=address, **init_kwargs)
    except Exception as e:
        if _auth_refused(e):
            raise ClusterError(
                f"Ray cluster at {address} refused the connection: auth token missing or wrong "
                f"(RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE')!r}, "
                f"RAY_AUTH_TOKEN_PATH={os.environ.get('RAY_AUTH_TOKEN_PATH')!r})."
            ) from e
        raise ClusterError(f"Could not connect to Ray at {address}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    finally:
        if saved is None:
            os.environ.pop(_GCS_WAIT_ENV, None)
        else:
            os.environ[_GCS_WAIT_ENV] = saved


# --------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1. Received: {text!r}")
    return value


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("up", "down", "status"),
                        help="start, stop, or report on the cluster")
    parser.add_argument("--local", action="store_true",
                        help="a cluster on this machine, on 127.0.0.1 with token auth "
                             "(required: the only kind supported for now)")
    parser.add_argument("--root", metavar="DIR", default=str(DEFAULT_ROOT),
                        help="cluster folder: token, temp dir, cluster.json (default: %(default)s)")
    parser.add_argument("--num-cpus", metavar="N", type=_positive_int, default=None,
                        help="CPUs of the head node (default: all)")
    parser.add_argument("--add-node", action="store_true",
                        help="also start a second 1-CPU node on this machine")

    def one_line_error(message: str):
        # argparse prints usage plus the error; DESIGN asks for one line and exit status 2.
        sys.stderr.write(f"{parser.prog}: error: {message}\n")
        sys.exit(2)

    parser.error = one_line_error


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Adds the `cluster` subcommand (`up|down|status`) to an argparse subparsers object.

    Args:
        subparsers: The result of `parser.add_subparsers(dest="command")`.

    Returns:
        The `cluster` parser.
    """
    parser = subparsers.add_parser(
        "cluster", help="start, stop or inspect a local Ray cluster (127.0.0.1, token auth)",
        description="Local Ray cluster on 127.0.0.1 with token auth. --local is required.")
    _add_arguments(parser)
    return parser


def run_cli(args: argparse.Namespace) -> int:
    """Runs `cluster up|down|status` from parsed arguments and prints a short result.

    Args:
        args: Namespace from a parser set up by `register_cli`.

    Returns:
        Exit status: 0 on success (`status`: the cluster is alive), 1 when the cluster failed
        or is not running, 2 on bad input (one line on stderr).
    """
    if not args.local:
        print("advtrain cluster: error: --local is required (only a local cluster is "
              "supported for now).", file=sys.stderr)
        return 2
    try:
        if args.action == "up":
            cluster = up(args.root, num_cpus=args.num_cpus, add_node=args.add_node)
            info = status(cluster.root)
            print(f"cluster up at {cluster.address}: {info['nodes']} node(s), "
                  f"{info['cpus'] or 0:g} CPU(s), dashboard {cluster.dashboard_url}")
            print(f"token file: {cluster.token_path}")
            for key, value in env_for(cluster).items():
                print(f"export {key}={shlex.quote(value)}")
            return 0
        if args.action == "down":
            print(f"cluster down: stopped {down(args.root)} process(es)")
            return 0
        info = status(args.root)
        if info["address"] is None:
            print(f"no cluster in {info['root']}")
            return 1
        state = "alive" if info["alive"] else "not alive"
        detail = (f", {info['nodes']} node(s), {info['cpus']:g} CPU(s), {info['gpus']:g} GPU(s)"
                  if info["nodes"] is not None else "")
        print(f"cluster at {info['address']}: {state}{detail}")
        return 0 if info["alive"] else 1
    except ValueError as e:
        print(f"advtrain cluster: error: {e}", file=sys.stderr)
        return 2
    except ClusterError as e:
        print(f"advtrain cluster: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    _parser = argparse.ArgumentParser(prog="python -m workflows.cluster",
                                      description="Local Ray cluster on 127.0.0.1, token auth.")
    _add_arguments(_parser)
    sys.exit(run_cli(_parser.parse_args()))
