"""Files: the one atomic writer, and the one resolution of a local path or URI to `pyarrow.fs`.

Each file is written to a temporary name in its target folder and renamed into place
(`os.replace`), so a reader never sees half a file and a failed write leaves nothing behind.
A location is a URI when it starts with a scheme (`s3://`, `gs://`, `file://`, ...; `is_uri`),
else a local path; `filesystem` opens either, for data sources (`advtrain.file_dataset`) and run
storage (`workflows.storage`) alike. No TensorFlow here.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["copy_file", "filesystem", "is_uri", "write_atomic", "write_json", "write_text"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` (s3, gs, file, ...); False for a plain local path."""
    return isinstance(location, str) and bool(_SCHEME.match(location))


def filesystem(location: str | Path, *, what: str = "storage"):
    """(pyarrow filesystem, path on it) for a local path (user-expanded, resolved) or a URI.

    Args:
        location: a local path or a URI.
        what: what the location is, for the error message. Defaults to `"storage"`.

    Raises:
        ValueError: the URI's scheme is not one pyarrow can open, or the URI is malformed.
    """
    import pyarrow
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(location)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError) as e:
        raise ValueError(
            f"{what} {location!r} is not a location pyarrow.fs can open ({e}). Use a local path "
            "or a URI such as s3://bucket/prefix, gs://bucket/prefix or file:///path"
        ) from None


def write_atomic(path, write: Callable[[str], Any]) -> Path:
    """Calls `write(tmp_path)` on a temporary file beside `path`, then renames it onto `path`.

    Args:
        path: the file to (re)place; its folder is created.
        write: writes the whole content to the temporary path it is given.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The suffix is kept: writers such as Keras' `model.save` and `np.savez` check it.
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path, text: str) -> Path:
    """Writes `text` (UTF-8) to `path` atomically."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _finite(o):
    """NaN and infinities become null: JSON has no such numbers."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def write_json(path, obj: Any) -> Path:
    """Writes `obj` as indented JSON atomically (numpy scalars and arrays as plain values)."""
    text = json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False) + "\n"
    return write_text(path, text)


def copy_file(src, dst) -> Path:
    """Copies `src` onto `dst` atomically."""
    return write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))
