"""Atomic file writes: the one writer every result, report, model and JSON file goes through.

Each file is written to a temporary name in its target folder and renamed into place
(`os.replace`), so a reader never sees half a file and a failed write leaves nothing behind.
No TensorFlow here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["copy_file", "write_atomic", "write_json", "write_text"]


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
