"""Where a run's files live: a local folder, or a URI that `pyarrow.fs` resolves (s3://, gs://,
file://, hdfs://, ...), as Ray Train and Tune resolve their `storage_path`.

A run is written into a local folder first (the run folder itself, or a staging copy when the run
lives in storage) and published to `{storage}/{run name}` file by file through `pyarrow.fs`: an
object store makes each object visible only when its upload completes, and a local destination
goes through `advtrain.files` (write to a temporary name, then rename), so a reader never sees
half a file. Reading back (`advtrain report URI`, `advtrain tune --resume URI`,
`advtrain evaluate URI/model.keras`) copies the needed files into a local folder first.

Credentials and endpoints come from the environment, as for Ray: an instance profile or
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an S3-compatible server, or the
URI's own query (`s3://bucket/prefix?endpoint_override=host:port&scheme=http`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

from advtrain import files
from advtrain.files import copy_file, is_uri, write_atomic

__all__ = [
    "FolderTaken",
    "RunFolder",
    "basename",
    "download",
    "exists",
    "fetch_file",
    "filesystem",
    "is_uri",
    "join",
    "parent",
    "upload",
]

# Ray's own folders under a search's location: the Tune experiment and the Train runs. They are
# Ray's to read (Tuner.restore, checkpoints), never copied back to a local folder.
RAY_FOLDERS = ("tune", "train", "ray")

# A driver's hold on a new run's location while it runs (`RunFolder.create`, `release`).
CLAIM_PREFIX = ".advtrain-claim-"

logger = logging.getLogger(__name__)


class FolderTaken(ValueError):
    """A new run's location exists already, or another driver is writing to it."""


def _split(uri: str) -> tuple[str, str]:
    base, _, query = uri.partition("?")
    return base, query


def join(base: str, *parts: str) -> str:
    """`base/part/...`, keeping a URI's query (`?endpoint_override=...`) at the end."""
    path, query = _split(str(base))
    path = "/".join([path.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return f"{path}?{query}" if query else path


def parent(location: str) -> str:
    """The location one level up (query kept)."""
    path, query = _split(location)
    head = path.rstrip("/").rsplit("/", 1)[0]
    return f"{head}?{query}" if query else head


def basename(location: str) -> str:
    """The last path component of a location."""
    return _split(str(location))[0].rstrip("/").rsplit("/", 1)[-1]


def filesystem(location: str | Path):
    """(pyarrow filesystem, path on it) for a run's storage: `advtrain.files.filesystem`.

    Raises:
        ValueError: the URI's scheme is not one pyarrow can open, or the URI is malformed.
    """
    return files.filesystem(location, what="storage")


def _is_local(fs) -> bool:
    import pyarrow.fs as pafs

    return isinstance(fs, pafs.LocalFileSystem)


def _put(src: Path, fs, dst: str) -> None:
    """One file to `dst` on `fs`, never visible half-written."""
    import pyarrow.fs as pafs

    if _is_local(fs):
        copy_file(src, dst)
        return
    # An object store publishes the object when the upload stream closes (a multipart upload
    # completes then); an error before that aborts it and leaves no object behind.
    pafs.copy_files(
        str(src), dst, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def upload(local_dir: Path, location: str, *, skip: tuple[str, ...] = RAY_FOLDERS) -> list[str]:
    """Copies every file under `local_dir` to the same relative path under `location`.

    Args:
        local_dir: the local folder.
        location: a local path or URI.
        skip: top-level folders of `local_dir` left out. Defaults to Ray's own folders.

    Returns:
        The relative paths copied, sorted.
    """
    fs, root = filesystem(location)
    copied = []
    for src in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        rel = src.relative_to(local_dir)
        if rel.parts[0] in skip or _is_scratch(rel.name):
            continue
        dst = f"{root.rstrip('/')}/{rel.as_posix()}"
        _put(src, fs, dst)
        copied.append(rel.as_posix())
    return copied


def _is_scratch(name: str) -> bool:
    """A writer's temporary file, or a driver's claim: never copied between locations."""
    return name.startswith(CLAIM_PREFIX) or (name.startswith(".") and ".tmp" in name)


def _claims(fs, root: str) -> list[str]:
    import pyarrow.fs as pafs

    entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(e.path for e in entries if e.base_name.startswith(CLAIM_PREFIX))


def claim(location: str) -> str:
    """Holds `location` for this driver: writes a claim file there, then lists the folder; a
    claim of another driver beside it means two new runs picked the same location at once.

    Object stores offer no exclusive create through pyarrow, but S3 (and NFS, and a local
    disk) read their own writes and list them: of two drivers that write a claim each and then
    list, the later one sees both, so at most one goes on (both refuse in a dead heat).

    Returns:
        The claim's path on the location's filesystem (`release` removes it).

    Raises:
        FolderTaken: another driver's claim is there.
    """
    fs, root = filesystem(location)
    root = root.rstrip("/")
    if _is_local(fs):  # an object store has no folders (pyarrow would write a marker object)
        fs.create_dir(root, recursive=True)
    path = f"{root}/{CLAIM_PREFIX}{time.time_ns()}-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(path) as f:
        f.write(f"{socket.gethostname()} pid {os.getpid()}\n".encode())
    if [c for c in _claims(fs, root) if c != path]:
        fs.delete_file(path)
        raise FolderTaken(
            f"{location!r} is being written by another advtrain run started at the same time; "
            "choose another --out name"
        )
    return path


def list_files(location: str) -> list[str]:
    """Relative paths of every file under `location`, sorted; empty when it is not a folder."""
    import pyarrow.fs as pafs

    fs, root = filesystem(location)
    root = root.rstrip("/")
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    return sorted(
        entry.path[len(root) :].lstrip("/")
        for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if entry.type == pafs.FileType.File
    )


def download(location: str, local_dir: Path, *, skip: tuple[str, ...] = RAY_FOLDERS) -> list[str]:
    """Copies every file under `location` (but `skip`'s top-level folders) into `local_dir`.

    Returns:
        The relative paths copied, sorted; empty when `location` holds nothing.
    """
    import pyarrow.fs as pafs

    fs, root = filesystem(location)
    root = root.rstrip("/")
    copied = [
        rel
        for rel in list_files(location)
        if rel.split("/", 1)[0] not in skip and not _is_scratch(rel.rsplit("/", 1)[-1])
    ]
    for rel in copied:
        write_atomic(
            Path(local_dir, rel),
            lambda tmp, path=f"{root}/{rel}": pafs.copy_files(
                path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
            ),
        )
    return copied


def exists(location: str) -> bool:
    """True when `location` is an existing file or folder."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def fetch_file(location: str, local_dir: Path) -> Path:
    """Copies one file from a location into `local_dir`; returns the local path.

    Raises:
        ValueError: no file at `location`.
    """
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise ValueError(f"no file at {location!r}")
    dst = Path(local_dir, basename(location))
    write_atomic(
        dst,
        lambda tmp: pafs.copy_files(
            path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        ),
    )
    return dst


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """A run's files: written into `local`, published to `remote` when the run lives in storage.

    Args:
        local: the local folder every file is written to first.
        remote: `{storage}/{run name}` (a local path or URI), or `None` when the run folder is
            `local` itself.
    """

    local: Path
    remote: str | None = None
    claim: str | None = None
    created: Path | None = None

    @classmethod
    def create(cls, out: str | None, name: str, storage: str | None) -> RunFolder:
        """A new run folder named `name`: `out` (or `runs/<name>`) without storage; with
        storage, `{storage}/{name}` staged in `out` (or a new temporary folder).

        The run's location is claimed for this driver (`claim`) until `release`, so two
        drivers that pick the same location at once cannot interleave their files.

        Raises:
            FolderTaken: `out` exists and is not empty, `{storage}/{name}` already exists, or
                another driver claimed the location first.
        """
        local = Path(out) if out else None
        if local is not None and local.exists() and (not local.is_dir() or any(local.iterdir())):
            raise FolderTaken(
                f"output folder {str(local)!r} exists and is not empty; choose another --out"
            )
        if storage is None:
            local = local or Path("runs") / name
            created = _first_missing(local.resolve())
            return cls(local, claim=claim(str(local)), created=created)
        remote = join(storage, name)
        if exists(remote):
            raise FolderTaken(f"{remote!r} already exists in storage; choose another --out name")
        local = local or Path(tempfile.mkdtemp(prefix=f"advtrain-{name}-"))
        created = None if is_uri(remote) else _first_missing(Path(remote).expanduser().resolve())
        return cls(local, remote, claim=claim(remote), created=created)

    def release(self) -> None:
        """Ends this driver's claim; a location left with nothing in it is removed (a run that
        failed before writing anything leaves no folder behind)."""
        if self.claim is None:
            return
        fs, _ = filesystem(self.location)
        try:
            fs.delete_file(self.claim)
        except OSError as e:  # storage gone meanwhile: the claim stays, the run's files too
            logger.warning("could not remove the run's claim %s: %s", self.claim, e)
            return
        root = self.claim.rsplit("/", 1)[0]
        if not _is_local(fs):
            # pyarrow leaves a folder marker where it deleted an object's last sibling.
            if not self.remote or list_files(self.remote):
                return
            fs.delete_dir(root)
        elif self.created is not None:
            # The claim's own folder: `local` may be relative to a cwd the command changed.
            _remove_empty(Path(root), self.created)

    @classmethod
    def open(cls, location: str) -> RunFolder:
        """An existing run folder: a local path, or a location in storage copied (but Ray's
        folders) into a new local staging folder.

        Raises:
            ValueError: nothing at `location`.
        """
        if not is_uri(location):
            return cls(Path(location))
        staging = Path(tempfile.mkdtemp(prefix=f"advtrain-{basename(location)}-"))
        if not download(location, staging):
            raise ValueError(f"{location!r} holds no advtrain run (nothing found there)")
        return cls(staging, location)

    @property
    def name(self) -> str:
        return basename(self.remote) if self.remote else self.local.resolve().name

    @property
    def location(self) -> str:
        """The run's one location: `remote` when it lives in storage, else the local folder
        (resolved). Ray's Tune experiment and Train runs go under it, beside the results."""
        return self.remote if self.remote else str(self.local.resolve())

    def publish(self) -> list[str]:
        """Uploads the local files to `remote` (nothing to do without one); returns what it
        copied."""
        return upload(self.local, self.remote) if self.remote else []

    def __str__(self) -> str:
        return self.remote or str(self.local)


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` (itself included) that does not exist yet."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def _remove_empty(path: Path, top: Path) -> None:
    """Removes `path` and its parents up to `top` while they are empty folders."""
    path = path.resolve()
    for p in (path, *path.parents):
        try:
            p.rmdir()
        except OSError:
            return
        if p == top:
            return
