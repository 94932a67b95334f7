"""File datasets: a folder or URI with train/, val/ and test/, each split one kind of file.

A split folder holds only Parquet (`image`, a Ray Data tensor column, and `label`), only .npz
shards (`x`, `y`), or one image subfolder per class (`FILE_FORMATS`). This module finds a split's
files (`split_files`), counts its rows from metadata (`count_split_rows`), reads it whole
(`read_split_files`, for `advtrain.data.load_data`) and writes a dataset (`write_file_dataset`).
Each file is decoded by `advtrain.formats`, the same functions Ray Data's stream
(`workflows.stream`) maps over the training split. No Ray and no TensorFlow here.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from advtrain.config import check_choice, check_number
from advtrain.files import filesystem, is_uri, write_atomic
from advtrain.formats import (
    IMAGE_SUFFIXES,
    DataError,
    image_mode,
    label_from_path,
    npz_shard_rows,
    read_image,
    read_npz_shard,
    read_parquet_shard,
    write_npz_shard,
    write_parquet_shard,
)

__all__ = [
    "FILE_FORMATS",
    "FILE_SPLITS",
    "count_split_rows",
    "is_file_dataset",
    "load_file_dataset",
    "read_split_files",
    "source_filesystem",
    "split_files",
    "write_file_dataset",
]

FILE_FORMATS = ("parquet", "npz", "images")
FILE_SPLITS = ("train", "val", "test")
_LAYOUT = "a split holds only *.parquet, only *.npz, or one folder of images per class"


def is_file_dataset(source: str) -> bool:
    """True when `source` is a URI, or a folder with train/, val/ and test/ subfolders."""
    if is_uri(source):
        return True
    path = Path(os.path.expanduser(source))
    return path.is_dir() and any((path / s).is_dir() for s in FILE_SPLITS)


def source_filesystem(source: str):
    """(pyarrow filesystem, path within it) of a data source (`advtrain.files.filesystem`).

    Raises:
        DataError: a URI pyarrow cannot open.
    """
    try:
        return filesystem(source, what="data")
    except ValueError as e:
        raise DataError(str(e)) from None


def _visible(entries) -> list:
    """Hidden and underscore names (.DS_Store, _SUCCESS) are skipped, as Ray Data's readers do."""
    return [e for e in entries if not e.base_name.startswith((".", "_"))]


def _kinds(visible, folder: str) -> dict[str, list[str]]:
    """{kind: names} of a split folder's entries, kind "parquet", "npz" or "class folders"."""
    import pyarrow.fs as pafs

    kinds: dict[str, list[str]] = {}
    for entry in visible:
        ext = entry.extension.lower()
        if entry.type == pafs.FileType.Directory:
            found = "class folders"
        elif ext in ("parquet", "npz"):
            found = ext
        elif "." + ext in IMAGE_SUFFIXES:
            raise DataError(
                f"{folder}: image {entry.base_name!r} outside a class folder ({_LAYOUT})"
            )
        else:
            raise DataError(f"{folder}: unexpected file {entry.base_name!r} ({_LAYOUT})")
        kinds.setdefault(found, []).append(entry.base_name)
    if not kinds:
        raise DataError(f"{folder}: empty ({_LAYOUT})")
    if len(kinds) > 1:
        listed = "; ".join(
            f"{k} ({', '.join(sorted(v)[:2])}{', ...' if len(v) > 2 else ''})"
            for k, v in sorted(kinds.items())
        )
        raise DataError(f"{folder}: mixes {listed} ({_LAYOUT})")
    return kinds


def split_files(source: str, split: str) -> tuple[str, list[str], list[str] | None]:
    """The format of one split folder of a file dataset, its files and its class folders.

    Hidden and underscore names (.DS_Store, _SUCCESS) are skipped, as Ray Data's readers skip them.

    Returns:
        (format, files, classes): one of `FILE_FORMATS`; the files' paths on the source's
        filesystem, sorted; the class folder names, sorted, for images (else `None`).

    Raises:
        DataError: the folder is missing, empty, holds files of another kind, images outside
            class folders, class folders without images, or several kinds at once; the message
            names the folder.
    """
    import pyarrow.fs as pafs

    fs, root = source_filesystem(source)
    path = f"{root.rstrip('/')}/{split}"
    folder = f"{source.rstrip('/')}/{split}"
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise DataError(
            f"{folder}: missing (a file dataset needs train/, val/ and test/ folders; {_LAYOUT})"
        )
    if kind != pafs.FileType.Directory:
        raise DataError(f"{folder}: is a file, expected a folder ({_LAYOUT})")
    visible = _visible(fs.get_file_info(pafs.FileSelector(path)))
    kinds = _kinds(visible, folder)
    found = next(iter(kinds))
    if found != "class folders":
        return found, sorted(e.path for e in visible), None
    files = sorted(
        i.path
        for i in _visible(fs.get_file_info(pafs.FileSelector(path, recursive=True)))
        if i.type == pafs.FileType.File and "." + i.extension.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise DataError(f"{folder}: its class folders hold no *.png, *.jpg or *.jpeg images")
    return "images", files, sorted(kinds[found])


def count_split_rows(source: str, split: str) -> int:
    """The rows of a split of a file dataset from file metadata alone: parquet footers, the
    headers of the arrays in each npz, or the number of image files.

    Raises:
        DataError: as `split_files`, or an npz shard without `x`/`y` or with unequal lengths.
    """
    import pyarrow.parquet as pq

    kind, files, _ = split_files(source, split)
    fs, _ = source_filesystem(source)
    if kind == "images":
        return len(files)
    total = 0
    for p in files:
        with fs.open_input_file(p) as f:
            total += (
                pq.ParquetFile(f).metadata.num_rows if kind == "parquet" else npz_shard_rows(f, p)
            )
    return total


def _read(fs, path: str) -> bytes:
    with fs.open_input_file(path) as fh:
        return fh.read()


def _read_npz(fs, path: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    return read_npz_shard(_read(fs, path), where)


def _read_labelled_image(
    fs, path: str, where: str, *, mode: str, root: str, classes: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    x = read_image(_read(fs, path), where, mode)[None]
    return x, np.array([label_from_path(path, root, classes)])


def read_split_files(
    source: str, split: str, classes: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split of a file dataset whole: (images as stored, labels).

    Image folders are labelled by `classes` (the training split's class folders, so a class
    missing from one split cannot shift the labels of the others); a folder not among them is
    an error. Every image is read in the channel mode of the first (`advtrain.formats.image_mode`,
    as Ray Data's stream is).
    """
    kind, files, own = split_files(source, split)
    fs, root = source_filesystem(source)
    scheme = source.split("://", 1)[0] + "://" if is_uri(source) else ""
    if kind == "parquet":
        read = read_parquet_shard
    elif kind == "npz":
        read = _read_npz
    else:
        classes = classes or own
        extra = sorted(set(own) - set(classes))
        if extra:
            raise DataError(
                f"{source.rstrip('/')}/{split}: class folder(s) {', '.join(extra)} are not in the "
                f"training split's classes ({', '.join(classes)})"
            )
        mode = image_mode(_read(fs, files[0]), scheme + files[0])
        split_root = f"{root.rstrip('/')}/{split}"
        read = functools.partial(_read_labelled_image, mode=mode, root=split_root, classes=classes)
    xs, ys = zip(*(read(fs, f, scheme + f) for f in files))
    shapes = {x.shape[1:] for x in xs}
    if len(shapes) > 1:
        raise DataError(
            f"{source.rstrip('/')}/{split}: images of different shapes {sorted(shapes)}; "
            "every image of a dataset must share one (H, W, C)"
        )
    return np.concatenate(xs), np.concatenate(ys)


def load_file_dataset(
    source: str, include_train: bool
) -> tuple[dict[str, np.ndarray], list[str] | None, int]:
    """The splits of a file dataset as stored, its class folders (or `None`), its train rows.

    Args:
        source: the dataset folder or URI.
        include_train: read the training split too; else only count its rows (Ray Data streams
            it).

    Returns:
        ({"x_val": ..., "y_val": ..., ...}, class folder names or `None`, training rows).
    """
    arrays: dict[str, np.ndarray] = {}
    names = split_files(source, "train")[2]
    for split in FILE_SPLITS:
        if split == "train" and not include_train:
            continue
        arrays[f"x_{split}"], arrays[f"y_{split}"] = read_split_files(source, split, names)
    n_train = len(arrays["y_train"]) if include_train else count_split_rows(source, "train")
    return arrays, names, n_train


def _chunks(value):
    """(x, y) arrays, or an iterable of (x, y) chunks: a large split written piece by piece."""
    if isinstance(value, tuple) and len(value) == 2 and hasattr(value[0], "shape"):
        return [value]
    return value


def write_file_dataset(
    root: str | Path, splits: dict, *, fmt: str = "parquet", rows_per_file: int = 8192
) -> Path:
    """Writes arrays as a file dataset that `advtrain.data.load_data` reads and Ray Data streams.

    Args:
        root: the folder to create; it must not exist yet.
        splits: {"train": (x, y), "val": (x, y), "test": (x, y)}, images (N, H, W[, C]) uint8 or
            float in [0, 1], integer labels; a split may also be an iterable of (x, y) chunks,
            so a split larger than memory is written piece by piece.
        fmt: `"parquet"` (an `image` column in Ray Data's tensor encoding, and `label`) or `"npz"`
            (shards with `x` and `y`). Defaults to `"parquet"`.
        rows_per_file: rows per file, >= 1: the unit Ray Data reads and shuffles. Defaults to
            `8192`.

    Returns:
        `root`. Each file is written atomically.

    Raises:
        ValueError: `fmt` or `rows_per_file` out of range, `root` exists, or a split missing.
        TypeError: `rows_per_file` not an integer.
    """
    fmt = check_choice("fmt", fmt, ("parquet", "npz"))
    rows_per_file = check_number("rows_per_file", rows_per_file, low=1, integer=True)
    root = Path(root)
    if root.exists():
        raise ValueError(f"`root` must not exist yet. Received: root={str(root)!r}")
    missing = [s for s in FILE_SPLITS if s not in splits]
    if missing:
        raise ValueError(
            f"`splits` must hold {', '.join(FILE_SPLITS)}. Missing: {', '.join(missing)}"
        )
    write = write_npz_shard if fmt == "npz" else write_parquet_shard
    for split in FILE_SPLITS:
        k = 0
        for x, y in _chunks(splits[split]):
            x, y = np.asarray(x), np.asarray(y)
            for lo in range(0, len(x), rows_per_file):
                xs, ys = x[lo : lo + rows_per_file], y[lo : lo + rows_per_file].astype(np.int64)
                path = root / split / f"part-{k:05d}.{fmt}"
                write_atomic(path, lambda tmp, xs=xs, ys=ys: write(tmp, xs, ys))
                k += 1
    return root
