"""Connecting this process to Ray: an embedded loopback instance, or a running cluster.

`connect` is what every `advtrain train` and `advtrain tune` calls: with no address it starts Ray
inside the process on 127.0.0.1 (token auth on, as Ray 2.60 defaults); with one it joins the
cluster in bounded time or fails with one clear line. `apply_env` points a process (even one that
has imported Ray) at a cluster's address and token. The local development cluster itself
(`advtrain cluster up --local`) is `workflows.local_cluster`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from advtrain.config import check_number

__all__ = [
    "LOOPBACK",
    "LOOPBACK_ENV",
    "ClusterError",
    "apply_env",
    "connect",
    "ensure_token",
    "pin_loopback",
    "tcp_open",
]

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# Ray reads this once, at import, and then resolves "127.0.0.1" to the routable address unless
# it is "0"; "0" keeps every node IP, and so every listener, on loopback.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

_GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"  # Ray's spelling


class ClusterError(RuntimeError):
    """A cluster could not be started, reached or stopped; the message says which and where."""


def ensure_token(path: Path) -> None:
    """Creates a random token file with mode 0600, or tightens an existing one's mode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            logger.warning("Token file %s was readable by others; setting mode 0600.", path)
            path.chmod(0o600)
        if not path.read_text().strip():
            raise ClusterError(
                f"Token file {path} is empty; delete it and run `up` again."
            ) from None
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def tcp_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def pin_loopback() -> None:
    """Keeps Ray in this process (and its children) from rewriting 127.0.0.1."""
    from workflows.ray_internals import pin_loopback_in_imported_ray

    os.environ[LOOPBACK_ENV] = "0"
    if pin_loopback_in_imported_ray():
        logger.debug("Ray was imported before %s=0 was set; pinned loopback.", LOOPBACK_ENV)


def _refresh_ray_auth() -> None:
    """Makes an already-imported Ray read RAY_AUTH_MODE and the token from os.environ again.

    Ray caches its config, auth mode included, when its core module is imported, and the
    token on first use: set later (by a pytest fixture, say), they are silently ignored and the
    GCS answers "Unauthenticated". Ray's own `_enable_token_auth` refreshes the same way.
    """
    from workflows.ray_internals import refresh_auth_in_imported_ray

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        logger.debug("Ray is initialized; its auth settings stay as they are.")
        return
    refresh_auth_in_imported_ray()


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
    if env.get(LOOPBACK_ENV) == "0":
        pin_loopback()
    _refresh_ray_auth()
    return previous


def _secure_default_token() -> None:
    """Creates ~/.ray/auth_token with mode 0600 when a new embedded Ray is about to create it.

    Ray 2.60 writes that file itself when token auth is on (the default) and no token exists,
    but with the umask's mode (usually 0644: readable by every local user).
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or any(
        os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    ):
        return
    path = Path.home() / ".ray" / "auth_token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        ensure_token(path)
    elif path.stat().st_mode & 0o077:
        logger.warning("%s is readable by other users; consider `chmod 600 %s`.", path, path)


def _auth_refused(error: BaseException) -> bool:
    while error is not None:
        text = f"{type(error).__name__} {error}"
        if any(
            mark in text
            for mark in (
                "Unauthenticated",
                "InvalidAuthToken",
                "AuthenticationError",
                "authentication token",
            )
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def _start_embedded(num_cpus: int | None, init_kwargs: dict[str, Any]):
    """Ray inside this process, on 127.0.0.1, with token auth and the dashboard on loopback."""
    pin_loopback()
    import ray

    if ray.is_initialized():
        raise ClusterError("Ray is already initialized in this process; call ray.shutdown() first.")
    _secure_default_token()
    _refresh_ray_auth()
    logger.info("Starting embedded Ray on 127.0.0.1.")
    # The dashboard serves Ray's state API, which Train V2's placement-group cleaner polls;
    # without it every run logs "State API may be temporarily unavailable" every second.
    init_kwargs.setdefault("include_dashboard", True)
    init_kwargs.setdefault("dashboard_host", LOOPBACK)
    return ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        _node_ip_address=LOOPBACK,
        **init_kwargs,
    )


def _join_cluster(address: str, timeout_s: float, init_kwargs: dict[str, Any]):
    """Joins the running cluster at `address` ('auto': RAY_ADDRESS), failing fast and by name."""
    given = address
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
        if not address:
            raise ClusterError(
                "address 'auto' needs RAY_ADDRESS; start a cluster with "
                "`advtrain cluster up --local` and run the export lines it prints."
            )
    match = re.fullmatch(r"(?:ray://)?\[?([^\[\]]+?)\]?:(\d{1,5})", address)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ValueError(
            f"`address` must be None, 'auto' or 'host:port'. Received: address={given!r}"
        )
    host, port = match.group(1), int(match.group(2))
    if _is_loopback(host):
        pin_loopback()
    if not tcp_open(host, port, timeout_s=min(timeout_s, 3.0)):
        raise ClusterError(
            f"No Ray cluster answers at {address} ({given!r}): "
            f"nothing accepts connections on that port."
        )
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
        raise ClusterError(
            f"Could not connect to Ray at {address}: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    finally:
        if saved is None:
            os.environ.pop(_GCS_WAIT_ENV, None)
        else:
            os.environ[_GCS_WAIT_ENV] = saved


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    timeout_s: float = 10.0,
    **init_kwargs: Any,
):
    """Connects this process to Ray: an embedded loopback instance, or a running cluster.

    With `address=None`, starts Ray inside this process with `ray.init(address="local")` on
    127.0.0.1, its dashboard (and state API) bound to 127.0.0.1 too. Unless `RAY_AUTH_MODE`
    says otherwise, Ray 2.60 turns on
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
    if num_cpus is not None:
        check_number("num_cpus", num_cpus, low=1, integer=True)
    check_number("timeout_s", timeout_s, low=0, low_open=True)
    if address is None:
        return _start_embedded(num_cpus, init_kwargs)
    return _join_cluster(address, timeout_s, init_kwargs)
