"""One reader (and writer) per data file format: IDX, .npz, image files, Parquet tensor columns.

Both paths that read a dataset decode its files here: the in-memory one (`advtrain.data`,
`advtrain.file_dataset`) and the Ray Data stream (`workflows.stream`, whose map functions call
`read_npz_shard`, `read_image` and `label_from_path`), so a file reads the same, and fails with
the same message, whichever path reads it. Every bad file raises `DataError` naming the file and
what is wrong with it. No Ray and no TensorFlow here; pyarrow and PIL are imported when used.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np

__all__ = [
    "GRAY_MODES",
    "IDX_FILES",
    "IMAGE_MAGIC",
    "IMAGE_SUFFIXES",
    "LABEL_MAGIC",
    "PARQUET_COLUMNS",
    "DataError",
    "errors_behind",
    "image_mode",
    "label_from_path",
    "npz_shard_rows",
    "read_idx",
    "read_idx_folder",
    "read_image",
    "read_npz_dataset",
    "read_npz_shard",
    "read_parquet_shard",
    "tensor_column",
    "write_npz_shard",
    "write_parquet_shard",
]

IMAGE_MAGIC = 0x00000803
LABEL_MAGIC = 0x00000801
# The MNIST file layout: array key -> IDX file stem (read raw, .gz, or with `.idx` spelled so).
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# PIL modes with one channel: such a dataset is read as "L", every other as "RGB".
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
# A Parquet shard's columns: `image`, a Ray Data tensor column, and `label`.
PARQUET_COLUMNS = ("image", "label")
# An .npz shard's arrays: images and labels.
_NPZ_SHARD_ARRAYS = ("x", "y")


class DataError(ValueError):
    """A data file or array that cannot be used, with the file and the problem named."""


# How a DataError reads in a traceback's text: the last line of one re-raised elsewhere.
_DATA_ERROR_LINE = re.compile(r"(?:^|\s)(?:[\w.]+\.)?DataError: (.+)$", re.MULTILINE)


def errors_behind(error: BaseException):
    """`error`, then every error behind it, each once: a Ray task's error's `cause`, a Ray Train
    worker group's `worker_failures`, and the chain (`__cause__`, `__context__`)."""
    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if isinstance(cause := getattr(e, "cause", None), BaseException):
            todo.append(cause)
        if isinstance(failures := getattr(e, "worker_failures", None), dict):
            todo += failures.values()
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]


def data_error_in(error: BaseException) -> DataError | None:
    """The `DataError` behind an error raised where data was read on another thread or process
    (`errors_behind`), or in one that kept only a traceback's text (a TensorFlow input pipeline,
    a Train worker's error): then the text's last `DataError: ` line is rebuilt as one.

    Returns:
        The DataError, or `None` when none is behind `error`.
    """
    text: list[str] = []
    for e in errors_behind(error):
        # A Ray task's error may pass for a DataError itself: its cause is the one to return.
        if isinstance(e, DataError) and not isinstance(getattr(e, "cause", None), BaseException):
            return e
        text.append(str(e))
    for t in text:
        if lines := _DATA_ERROR_LINE.findall(t):
            return DataError(lines[-1].strip())
    return None


def raise_data_error_in(error: BaseException) -> None:
    """Raises the DataError behind `error` (`data_error_in`) as a fresh one-line DataError, for a
    caller that then re-raises `error` itself when there is none."""
    if (data_error := data_error_in(error)) is not None:
        raise DataError(str(data_error)) from None


# --------------------------------------------------------------------------- IDX


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot be read ({e})") from None


def read_idx(path: str | Path, *, expected_sha256: str | None = None) -> np.ndarray:
    """Parses one IDX file (raw or .gz) into a uint8 array.

    Args:
        path: the file.
        expected_sha256: when given, the decompressed bytes must hash to it.

    Returns:
        uint8 array, (N, rows, cols) for images or (N,) for labels.

    Raises:
        DataError: unreadable file, wrong magic number, truncated or overlong data, or a
            checksum mismatch; the message names the file.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if expected_sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != expected_sha256:
            raise DataError(
                f"{path}: checksum mismatch (sha256 {digest}, expected {expected_sha256}); "
                "the file is damaged or not MNIST"
            )
    if len(raw) < 8:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic == IMAGE_MAGIC:
        header = 16
        if len(raw) < header:
            raise DataError(f"{path}: truncated header ({len(raw)} bytes)")
        n, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
        if rows < 1 or cols < 1:
            raise DataError(f"{path}: images are {rows}x{cols}, expected at least 1x1")
        shape: tuple[int, ...] = (n, rows, cols)
    elif magic == LABEL_MAGIC:
        header = 8
        n = int.from_bytes(raw[4:8], "big")
        shape = (n,)
    else:
        raise DataError(
            f"{path}: wrong magic number 0x{magic:08x} (expected 0x{IMAGE_MAGIC:08x} for images "
            f"or 0x{LABEL_MAGIC:08x} for labels)"
        )
    expected = int(np.prod(shape))
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise DataError(f"{path}: data {what}: header promises {expected} bytes, found {got}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: missing {stem}(.gz)")


def read_idx_folder(folder: Path, checksums: dict[str, str] | None) -> dict[str, np.ndarray]:
    """The four `IDX_FILES` of a folder as arrays keyed x_train, y_train, x_test, y_test.

    Args:
        folder: the folder holding them.
        checksums: IDX stem -> expected sha256 of its decompressed bytes, or `None`.

    Raises:
        DataError: a missing or bad file, or images where labels belong (or the reverse).
    """
    out = {}
    for key, stem in IDX_FILES.items():
        path = _find_idx(folder, stem)
        arr = read_idx(path, expected_sha256=checksums[stem] if checksums else None)
        want_images = key.startswith("x_")
        if (arr.ndim == 3) != want_images:
            raise DataError(
                f"{path}: holds {'labels' if want_images else 'images'}, expected "
                f"{'images' if want_images else 'labels'}"
            )
        out[key] = arr
    return out


# --------------------------------------------------------------------------- .npz


def read_npz_dataset(path: Path) -> dict[str, np.ndarray]:
    """A whole dataset in one .npz: x_train, y_train, x_test, y_test (and optionally x_val,
    y_val), as stored.

    Raises:
        DataError: unreadable, a key missing, or only one of x_val, y_val.
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in IDX_FILES if k not in f.files]
            if missing:
                raise DataError(
                    f"{path}: missing key(s) {', '.join(missing)} (found: "
                    f"{', '.join(f.files) or 'none'})"
                )
            if ("x_val" in f.files) != ("y_val" in f.files):
                raise DataError(
                    f"{path}: holds only one of x_val, y_val (found: {', '.join(f.files)})"
                )
            return {k: f[k] for k in (*IDX_FILES, "x_val", "y_val") if k in f.files}
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot be read as .npz ({e})") from None


def _check_shard_arrays(names: list[str], where: str) -> None:
    missing = [k for k in _NPZ_SHARD_ARRAYS if k not in names]
    if missing:
        raise DataError(
            f"{where}: missing array{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(k) for k in missing)} (found: {', '.join(names) or 'none'})"
        )


def _check_shard_lengths(n_x: int, n_y: int, where: str) -> None:
    if n_x != n_y:
        raise DataError(f"{where}: {n_x} images but {n_y} labels")


def read_npz_shard(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One .npz shard of a file dataset, from its bytes: (x, y) as stored.

    Args:
        raw: the file's bytes.
        where: the file, for the error message.

    Raises:
        DataError: not an .npz, an array `x` or `y` missing, or unequal lengths.
    """
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as shard:
            _check_shard_arrays(list(shard.files), where)
            x, y = shard["x"], shard["y"]
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: cannot be read as .npz ({e})") from None
    _check_shard_lengths(len(x), len(y), where)
    return x, y


def npz_shard_rows(file, where: str) -> int:
    """The rows of an .npz shard from its arrays' headers alone (no data is read).

    Args:
        file: the shard, an open binary file (seekable).
        where: the file, for the error message.

    Raises:
        DataError: an array `x` or `y` missing, or unequal lengths.
    """
    import zipfile

    with zipfile.ZipFile(file) as z:
        names = [n.removesuffix(".npy") for n in z.namelist()]
        _check_shard_arrays(names, where)
        lengths = {}
        for key in _NPZ_SHARD_ARRAYS:
            with z.open(f"{key}.npy") as member:
                # Only the header is read; format 3.0 (utf-8 field names) has 2.0's layout.
                version = np.lib.format.read_magic(member)
                read = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape = read(member)[0]
                lengths[key] = shape[0] if shape else 0
    _check_shard_lengths(lengths["x"], lengths["y"], where)
    return lengths["y"]


def write_npz_shard(path: str, x: np.ndarray, y: np.ndarray) -> None:
    """Writes one .npz shard with arrays `x` and `y`."""
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a bare name
        np.savez(f, x=x, y=y)


# --------------------------------------------------------------------------- image files


def _open_image(raw: bytes, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
        return img
    except UnidentifiedImageError:
        # PIL's own message names the in-memory buffer, not the file.
        raise DataError(f"{where}: cannot be read as an image (no format PIL reads)") from None
    except OSError as e:
        raise DataError(f"{where}: cannot be read as an image ({e})") from None


def image_mode(raw: bytes, where: str) -> str:
    """The mode a folder of images is read in, from its first image's bytes: "L" for a
    one-channel image (`GRAY_MODES`), else "RGB"; every image of the folder is converted to it.

    Raises:
        DataError: not an image PIL reads.
    """
    return "L" if _open_image(raw, where).mode in GRAY_MODES else "RGB"


def read_image(raw: bytes, where: str, mode: str) -> np.ndarray:
    """One image file's bytes as a uint8 array in `mode`: (H, W) for "L", (H, W, 3) for "RGB".

    Raises:
        DataError: not an image PIL reads.
    """
    return np.asarray(_open_image(raw, where).convert(mode), dtype=np.uint8)


def label_from_path(path: str, root: str, classes: list[str]) -> int:
    """The label of an image under a split folder: the index in `classes` of the first folder
    under `root`, whatever lies deeper.

    Args:
        path: the image's path.
        root: the split folder's path, on the same filesystem.
        classes: the training split's class folder names, sorted.

    Raises:
        DataError: the class folder is not one of `classes`.
    """
    name = path.split(root.rstrip("/") + "/", 1)[-1].split("/", 1)[0]
    if name not in classes:
        raise DataError(
            f"{path}: class folder {name!r} is not one of the training split's classes "
            f"({', '.join(classes)})"
        )
    return classes.index(name)


# --------------------------------------------------------------------------- Parquet


def tensor_column(table, name: str, where: str) -> np.ndarray:
    """An (N, ...) array from a Ray Data tensor column of a pyarrow table, read with or without
    Ray imported (a plain numeric column gives an (N,) array).

    Raises:
        DataError: no such column, or one that is neither numeric nor a fixed-shape tensor.
    """
    import pyarrow as pa

    if name not in table.column_names:
        raise DataError(f"{where}: no `{name}` column (found: {', '.join(table.column_names)})")
    col = table.column(name)
    field = table.schema.field(name)
    shape = getattr(field.type, "shape", None)
    if shape is None and field.metadata and b"ARROW:extension:metadata" in field.metadata:
        meta = json.loads(field.metadata[b"ARROW:extension:metadata"])
        shape = meta.get("shape") if isinstance(meta, dict) else meta
    if not shape:
        if pa.types.is_integer(field.type) or pa.types.is_floating(field.type):
            return col.to_numpy()
        raise DataError(
            f"{where}: column `{name}` ({field.type}) is not a fixed-shape tensor column "
            "(write it with ray.data.from_numpy(...).write_parquet or as Ray Data's tensor type)"
        )
    chunks = [c.storage if isinstance(c, pa.ExtensionArray) else c for c in col.chunks]
    values = np.concatenate([np.asarray(c.flatten()) for c in chunks]) if chunks else np.zeros(0)
    return values.reshape(-1, *shape)


def read_parquet_shard(fs, path: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One Parquet shard of a file dataset: (images as stored, labels).

    Args:
        fs: the `pyarrow.fs` filesystem holding it.
        path: its path on `fs`.
        where: the file, for the error message.

    Raises:
        DataError: damaged, a column missing, or `image` not a tensor column.
    """
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, filesystem=fs, columns=list(PARQUET_COLUMNS))
    except Exception as e:  # noqa: BLE001 - ArrowInvalid on a damaged file or a missing column
        raise DataError(
            f"{where}: cannot be read as Parquet with `image` and `label` columns ({e})"
        ) from None
    return tensor_column(table, "image", where), table.column("label").to_numpy()


def write_parquet_shard(path: str, x: np.ndarray, y: np.ndarray) -> None:
    """Writes one Parquet shard: `image` in Ray Data's tensor encoding, and int64 `label`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.ascontiguousarray(x)
    per = int(np.prod(x.shape[1:]))
    storage = pa.LargeListArray.from_arrays(
        np.arange(0, len(x) * per + 1, per, dtype=np.int64), pa.array(x.reshape(-1))
    )
    # Ray Data's tensor column, as `Dataset.write_parquet` writes it: large_list storage and the
    # shape in the extension metadata, so Ray reads (N, H, W, C) arrays back without Ray here.
    field = pa.field(
        "image",
        storage.type,
        metadata={
            b"ARROW:extension:name": b"ray.data.arrow_tensor_v2",
            b"ARROW:extension:metadata": json.dumps(list(x.shape[1:])).encode(),
        },
    )
    table = pa.Table.from_arrays(
        [storage, pa.array(y)], schema=pa.schema([field, pa.field("label", pa.int64())])
    )
    pq.write_table(table, path)
