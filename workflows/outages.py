"""Riding out a storage outage: S3, GCS or NFS unreachable for a while in the middle of a run.

Everything a run keeps goes to its storage: each Train worker's checkpoints, each Tune trial's
final report, the driver's search state and results. When the storage stops answering, pyarrow
retries a connection for a few seconds and then raises; Ray Train spends the run's
`max_failures` on it, and the trial fails. `ride_out` catches such a failure, waits until the
storage answers again (saying so, once each way), and calls again: a Train run called again
continues from its latest checkpoint in the storage. Only errors whose text says the storage
could not be reached count (`unreachable_in`); anything else is raised as it is. An outage
longer than `wait_s` raises `StorageUnreachable`, one line; the search then stops as on Ctrl-C
(`workflows.tune.StopOnFatalError`) and `advtrain tune --resume` continues it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TypeVar

from advtrain.files import filesystem
from advtrain.formats import errors_behind

__all__ = [
    "StorageUnreachable",
    "outage_behind",
    "ride_out",
    "unreachable_in",
    "wait_until_reachable",
]

T = TypeVar("T")

# How pyarrow (the AWS SDK's curl, GCS's client, the OS) words a storage it cannot reach; an
# error of another kind (a missing key, a refused credential) is not an outage.
_UNREACHABLE = re.compile(
    r"NETWORK_CONNECTION|curlCode: (?:6|7|28|52|55|56)\b|Could(?:n't| not) (?:connect|resolve)"
    r"|Failed to connect|Connection (?:refused|reset)|Broken pipe|Connection timed out",
    re.IGNORECASE,
)


class StorageUnreachable(OSError):
    """The run's storage did not answer for longer than the run waits for it."""


_OUTAGE_LINE = re.compile(r"(?:^|\s)(?:[\w.]+\.)?StorageUnreachable: (.+)$", re.MULTILINE)


def unreachable_in(error: BaseException) -> str | None:
    """The line saying the storage could not be reached, from `error` or any error behind it
    (`advtrain.formats.errors_behind`; a Train worker's error keeps only its traceback's text).

    Returns:
        That line, or `None` when `error` is not an unreachable storage.
    """
    for e in errors_behind(error):
        if isinstance(e, StorageUnreachable):
            return str(e)
        for line in reversed(str(e).splitlines()):
            if _UNREACHABLE.search(line):
                return line.strip()
    return None


def outage_behind(error: BaseException) -> StorageUnreachable | None:
    """The `StorageUnreachable` behind `error` (`advtrain.formats.errors_behind`), or rebuilt from
    the last line naming it in a traceback's text (a Ray trial's error); else `None`."""
    found = None
    for e in errors_behind(error):
        if isinstance(e, StorageUnreachable):
            return e
        if found is None and (lines := _OUTAGE_LINE.findall(str(e))):
            found = StorageUnreachable(lines[-1].strip())
    return found


def wait_until_reachable(
    location: str,
    *,
    wait_s: float,
    say: Callable[[str], None],
    reason: str,
    poll_s: float = 5.0,
) -> float:
    """Blocks until `location` answers a listing, at most `wait_s` seconds.

    Args:
        location: the run's storage (a URI or a local path).
        wait_s: the longest outage waited out.
        say: where the two lines (unreachable, reachable again) go.
        reason: the error that showed the outage, for the first line.
        poll_s: seconds between probes (each probe itself may take pyarrow's connect retries).

    Returns:
        The seconds waited.

    Raises:
        StorageUnreachable: still unreachable after `wait_s`.
    """
    fs, path = filesystem(location)
    t0 = time.monotonic()
    say(f"advtrain: storage {location} unreachable ({reason}); waiting up to {wait_s:g} s")
    while True:
        try:
            fs.get_file_info(path)
        except OSError as e:
            waited = time.monotonic() - t0
            if unreachable_in(e) is None:
                raise
            if waited >= wait_s:
                raise StorageUnreachable(
                    f"storage {location} unreachable for {waited:.0f} s ({unreachable_in(e)})"
                ) from None
            time.sleep(min(poll_s, max(wait_s - waited, 0.0)))
            continue
        waited = time.monotonic() - t0
        say(f"advtrain: storage {location} reachable again after {waited:.0f} s; continuing")
        return waited


def ride_out(
    call: Callable[[], T],
    location: str,
    *,
    wait_s: float,
    say: Callable[[str], None],
    outages: int = 10,
) -> T:
    """`call()`, called again after each outage of `location` it failed on (`unreachable_in`),
    each outage waited out for at most `wait_s` seconds (`wait_until_reachable`), at most
    `outages` of them: a storage that answers a listing but fails every call is not waited on
    for ever."""
    for _ in range(outages):
        try:
            return call()
        except Exception as e:
            if (reason := unreachable_in(e)) is None or isinstance(e, StorageUnreachable):
                raise
            wait_until_reachable(location, wait_s=wait_s, say=say, reason=reason)
    return call()
