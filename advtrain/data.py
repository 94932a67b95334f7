"""Image datasets: the bundled MNIST, user files, Keras' loaders, checks, splits, shards, tf.data.

Images come out float32 in [0, 1] shaped (N, H, W, C); labels int32 in [0, classes - 1]. Height,
width, channels and the class count come from the data. Every bad file raises `DataError`
naming the file and what is wrong with it: nothing downstream ever sees a half-read array.

Sources (`load_data`):
    "bundled"                 MNIST as shipped in the package, sha256-verified (the default)
    "keras:mnist", "keras:fashion_mnist", "keras:cifar10"
                              Keras' own loaders: they download once into ~/.keras (internet)
    FILE.npz                  x_train, y_train, x_test, y_test (and optionally x_val, y_val)
    FOLDER of IDX files       the MNIST file layout (train-images-idx3-ubyte[.gz], ...)
    FOLDER or URI with train/, val/, test/   a file dataset (`FILE_FORMATS`), the layout Ray Data
                              streams to the workers (workflows.stream); read whole here
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import json
import os
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = [
    "BUNDLED_SHA256",
    "FILE_FORMATS",
    "GRAY_MODES",
    "IMAGE_SUFFIXES",
    "KERAS_DATASETS",
    "DataError",
    "ImageData",
    "check_arrays",
    "count_split_rows",
    "is_file_dataset",
    "load_data",
    "make_dataset",
    "read_idx",
    "read_split_files",
    "shard",
    "split_files",
    "write_file_dataset",
]

IMAGE_MAGIC = 0x00000803
LABEL_MAGIC = 0x00000801
FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
# sha256 of the decompressed IDX bytes (shared/datasets/mnist/README.md): the bundled copy is
# refused if any byte differs, so a damaged install never trains silently on wrong data.
BUNDLED_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
KERAS_DATASETS = ("mnist", "fashion_mnist", "cifar10")
# A file dataset's split folder holds one kind of file: Parquet (an `image` tensor column as Ray
# Data writes it, and `label`), .npz shards (`x`, `y`), or one image subfolder per class.
FILE_FORMATS = ("parquet", "npz", "images")
FILE_SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# PIL modes with one channel: such a dataset is read as "L", every other as "RGB".
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class DataError(ValueError):
    """A data file or array that cannot be used, with the file and the problem named."""


@dataclasses.dataclass(frozen=True)
class ImageData:
    """The three splits of an image classification dataset. The validation split never overlaps
    train; `num_classes` covers every label of every split.

    A file dataset loaded with `include_train=False` (a Ray Data run, whose training split streams
    to the workers) holds an empty (0, H, W, C) training split and its size in `n_train`.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    num_classes: int
    n_train: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(int(d) for d in self.x_val.shape[1:])  # type: ignore[return-value]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in ("train", "val", "test"):
            raise ValueError(
                f"`split` must be one of 'train', 'val', 'test'. Received: split={name!r}"
            )
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def describe(self) -> dict:
        """What a report says about the data: source, shape, classes, split sizes."""
        h, w, c = self.input_shape
        return {
            "source": self.source,
            "input_shape": [h, w, c],
            "num_classes": self.num_classes,
            "train": self.n_train,
            "val": len(self.y_val),
            "test": len(self.y_test),
        }


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


def check_arrays(
    x: np.ndarray, y: np.ndarray, where: str, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """Converts one split to float32 [0, 1] images (N, H, W, C) and int32 labels >= 0.

    Args:
        x: images (N, H, W) or (N, H, W, C), uint8 in [0, 255] or float in [0, 1].
        y: integer class labels (N,) (floats holding whole numbers are accepted).
        where: the file or source, for the error message.
        split: the split's name, for the error message.

    Raises:
        DataError: a wrong shape or dtype, NaNs, values out of range, or mismatched lengths.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or min(x.shape[1:], default=0) < 1:
        raise DataError(
            f"{where}: x_{split} has shape {x.shape}, expected (N, H, W) or (N, H, W, C)"
        )
    if y.ndim == 2 and y.shape[1] == 1:  # Keras' CIFAR-10 labels are (N, 1)
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{where}: y_{split} has shape {y.shape}, expected (N,)")
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x)} {split} images but {len(y)} {split} labels")
    if len(x) == 0:
        raise DataError(f"{where}: the {split} split is empty")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise DataError(f"{where}: x_{split} holds NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(
                f"{where}: x_{split} values span [{lo}, {hi}], expected [0, 1] (or uint8)"
            )
    else:
        raise DataError(
            f"{where}: x_{split} has dtype {x.dtype}, expected uint8 in [0, 255] or float in [0, 1]"
        )
    if not np.issubdtype(y.dtype, np.integer):
        if (
            np.issubdtype(y.dtype, np.floating)
            and np.all(np.isfinite(y))
            and np.all(y == np.round(y))
        ):
            y = y.astype(np.int64)
        else:
            raise DataError(
                f"{where}: y_{split} must hold integer class labels, found dtype {y.dtype}"
            )
    if y.min() < 0:
        raise DataError(
            f"{where}: y_{split} labels span [{y.min()}, {y.max()}], expected class indices >= 0"
        )
    return x, y.astype(np.int32)


def _load_idx_folder(folder: Path, checksums: dict[str, str] | None) -> dict[str, np.ndarray]:
    out = {}
    for key, stem in FILES.items():
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


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in FILES if k not in f.files]
            if missing:
                raise DataError(
                    f"{path}: missing key(s) {', '.join(missing)} (found: "
                    f"{', '.join(f.files) or 'none'})"
                )
            if ("x_val" in f.files) != ("y_val" in f.files):
                raise DataError(
                    f"{path}: holds only one of x_val, y_val (found: {', '.join(f.files)})"
                )
            return {k: f[k] for k in (*FILES, "x_val", "y_val") if k in f.files}
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot be read as .npz ({e})") from None


def _load_keras(name: str) -> dict[str, np.ndarray]:
    import keras  # Keras downloads and caches under ~/.keras; only on explicit request.

    (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _bundled_dir() -> Path:
    return Path(str(resources.files("advtrain.datasets.mnist")))


# --------------------------------------------------------------------------- file datasets


def is_file_dataset(source: str) -> bool:
    """True when `source` is a URI, or a folder with train/, val/ and test/ subfolders."""
    if "://" in source:
        return True
    path = Path(os.path.expanduser(source))
    return path.is_dir() and any((path / s).is_dir() for s in FILE_SPLITS)


def _filesystem(source: str):
    """(pyarrow filesystem, path within it) of a local path or a URI."""
    import pyarrow.fs as pafs

    if "://" in source:
        try:
            return pafs.FileSystem.from_uri(source)
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError for unknown schemes
            raise DataError(f"{source}: cannot be opened ({e})") from None
    return pafs.LocalFileSystem(), str(Path(os.path.expanduser(source)).resolve())


_LAYOUT = "a split holds only *.parquet, only *.npz, or one folder of images per class"


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

    fs, root = _filesystem(source)
    path = f"{root.rstrip('/')}/{split}"
    folder = f"{source.rstrip('/')}/{split}"
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise DataError(
            f"{folder}: missing (a file dataset needs train/, val/ and test/ folders; {_LAYOUT})"
        )
    if kind != pafs.FileType.Directory:
        raise DataError(f"{folder}: is a file, expected a folder ({_LAYOUT})")
    visible = [
        e
        for e in fs.get_file_info(pafs.FileSelector(path))
        if not e.base_name.startswith((".", "_"))
    ]
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
    found = next(iter(kinds))
    if found != "class folders":
        return found, sorted(e.path for e in visible), None
    files = sorted(
        i.path
        for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if i.type == pafs.FileType.File
        and not i.base_name.startswith((".", "_"))
        and "." + i.extension.lower() in IMAGE_SUFFIXES
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
    import zipfile

    import pyarrow.parquet as pq

    kind, files, _ = split_files(source, split)
    fs, _ = _filesystem(source)
    if kind == "images":
        return len(files)
    total = 0
    for p in files:
        if kind == "parquet":
            with fs.open_input_file(p) as f:
                total += pq.ParquetFile(f).metadata.num_rows
            continue
        with fs.open_input_file(p) as f, zipfile.ZipFile(f) as z:
            lengths = {}
            for key in ("x", "y"):
                if f"{key}.npy" not in z.namelist():
                    raise DataError(
                        f"{p}: missing array {key!r} (found: {', '.join(z.namelist()) or 'none'})"
                    )
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
        if lengths["x"] != lengths["y"]:
            raise DataError(f"{p}: {lengths['x']} images but {lengths['y']} labels")
        total += lengths["y"]
    return total


def _tensor_column(table, name: str, where: str) -> np.ndarray:
    """An (N, ...) array from a Ray Data tensor column, read with or without Ray imported."""
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


def read_split_files(
    source: str, split: str, classes: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split of a file dataset whole: (images as stored, labels).

    Image folders are labelled by `classes` (the training split's class folders, so a class
    missing from one split cannot shift the labels of the others); a folder not among them is
    an error."""
    kind, files, own = split_files(source, split)
    if kind == "images":
        classes = classes or own
        extra = sorted(set(own) - set(classes))
        if extra:
            raise DataError(
                f"{source.rstrip('/')}/{split}: class folder(s) {', '.join(extra)} are not in the "
                f"training split's classes ({', '.join(classes)})"
            )
    fs, _ = _filesystem(source)
    xs, ys, mode = [], [], None
    for f in files:
        where = f if "://" not in source else source.split("://", 1)[0] + "://" + f
        if kind == "parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(f, filesystem=fs, columns=["image", "label"])
            except Exception as e:  # noqa: BLE001 - ArrowInvalid on a damaged file or a missing column
                raise DataError(
                    f"{where}: cannot be read as Parquet with `image` and `label` columns ({e})"
                ) from None
            xs.append(_tensor_column(table, "image", where))
            ys.append(table.column("label").to_numpy())
        elif kind == "npz":
            with fs.open_input_file(f) as fh:
                raw = fh.read()
            try:
                with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                    if "x" not in z.files or "y" not in z.files:
                        raise DataError(
                            f"{where}: needs arrays 'x' and 'y' (found: "
                            f"{', '.join(z.files) or 'none'})"
                        )
                    xs.append(z["x"])
                    ys.append(z["y"])
            except (OSError, ValueError) as e:
                if isinstance(e, DataError):
                    raise
                raise DataError(f"{where}: cannot be read as .npz ({e})") from None
        else:
            # The class is the first folder under the split; every image is read in the channel
            # mode of the first (as Ray Data's read_images is given one mode).
            mode = mode or _image_mode(fs, f, where)
            xs.append(_read_image(fs, f, where, mode)[None])
            ys.append(np.array([classes.index(f.split(f"/{split}/", 1)[-1].split("/", 1)[0])]))
    shapes = {x.shape[1:] for x in xs}
    if len(shapes) > 1:
        raise DataError(
            f"{source.rstrip('/')}/{split}: images of different shapes {sorted(shapes)}; "
            "every image of a dataset must share one (H, W, C)"
        )
    return np.concatenate(xs), np.concatenate(ys)


def _open_image(fs, path: str, where: str):
    from PIL import Image, UnidentifiedImageError

    with fs.open_input_file(path) as fh:
        raw = fh.read()
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
        return img
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{where}: cannot be read as an image ({e})") from None


def _image_mode(fs, path: str, where: str) -> str:
    """ "L" for a one-channel image, else "RGB"."""
    return "L" if _open_image(fs, path, where).mode in GRAY_MODES else "RGB"


def _read_image(fs, path: str, where: str, mode: str) -> np.ndarray:
    return np.asarray(_open_image(fs, path, where).convert(mode), dtype=np.uint8)


def write_file_dataset(
    root: str | Path, splits: dict, *, fmt: str = "parquet", rows_per_file: int = 8192
) -> Path:
    """Writes arrays as a file dataset that `load_data` reads and Ray Data streams.

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
    """
    from advtrain.files import write_atomic

    if fmt not in ("parquet", "npz"):
        raise ValueError(f"`fmt` must be one of 'parquet', 'npz'. Received: fmt={fmt!r}")
    if isinstance(rows_per_file, bool) or not isinstance(rows_per_file, int) or rows_per_file < 1:
        raise ValueError(
            f"`rows_per_file` must be an integer >= 1. Received: rows_per_file={rows_per_file!r}"
        )
    root = Path(root)
    if root.exists():
        raise ValueError(f"`root` must not exist yet. Received: root={str(root)!r}")
    missing = [s for s in FILE_SPLITS if s not in splits]
    if missing:
        raise ValueError(
            f"`splits` must hold {', '.join(FILE_SPLITS)}. Missing: {', '.join(missing)}"
        )
    for split in FILE_SPLITS:
        value = splits[split]
        # (x, y) arrays, or an iterable of (x, y) chunks: a large split written piece by piece.
        chunks = (
            [value]
            if isinstance(value, tuple) and len(value) == 2 and hasattr(value[0], "shape")
            else value
        )
        k = 0
        for x, y in chunks:
            x, y = np.asarray(x), np.asarray(y)
            for lo in range(0, len(x), rows_per_file):
                xs, ys = x[lo : lo + rows_per_file], y[lo : lo + rows_per_file].astype(np.int64)
                path = root / split / f"part-{k:05d}.{fmt}"
                write = _write_npz if fmt == "npz" else _write_parquet
                write_atomic(path, lambda tmp, xs=xs, ys=ys, write=write: write(tmp, xs, ys))
                k += 1
    return root


def _write_npz(path: str, x: np.ndarray, y: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a bare name
        np.savez(f, x=x, y=y)


def _write_parquet(path: str, x: np.ndarray, y: np.ndarray) -> None:
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


def _load_file_dataset(
    source: str, include_train: bool
) -> tuple[dict[str, np.ndarray], list[str] | None, int]:
    arrays: dict[str, np.ndarray] = {}
    names = split_files(source, "train")[2]
    for split in FILE_SPLITS:
        if split == "train" and not include_train:
            continue
        arrays[f"x_{split}"], arrays[f"y_{split}"] = read_split_files(source, split, names)
    return (
        arrays,
        names,
        len(arrays["y_train"]) if include_train else count_split_rows(source, "train"),
    )


@functools.lru_cache(maxsize=4)
def _load_raw(
    source: str, include_train: bool = True
) -> tuple[str, tuple[tuple[str, np.ndarray], ...], int, int]:
    n_classes = None
    n_train = None
    if source == "bundled":
        folder = _bundled_dir()
        arrays = _load_idx_folder(folder, BUNDLED_SHA256)
        where = str(folder)
    elif source.startswith("keras:"):
        name = source.split(":", 1)[1]
        if name not in KERAS_DATASETS:
            raise DataError(
                f"Keras dataset {name!r} is not one of {', '.join(KERAS_DATASETS)}. Received: "
                f"data={source!r}"
            )
        arrays, where = _load_keras(name), f"keras.datasets.{name}"
    elif is_file_dataset(source):
        arrays, names, n_train = _load_file_dataset(source, include_train)
        n_classes = len(names) if names else None
        where = source
    else:
        path = Path(os.path.expanduser(source))
        if path.is_dir():
            arrays = _load_idx_folder(path, None)
        elif path.suffix == ".npz" and path.is_file():
            arrays = _load_npz(path)
        else:
            raise DataError(
                f"data {source!r} is neither 'bundled', keras:{{{','.join(KERAS_DATASETS)}}}, an "
                ".npz file, a folder of MNIST IDX files nor a file dataset (a folder or URI with "
                "train/, val/ and test/)"
            )
        where = str(path)
    checked = {}
    for split in ("train", "val", "test"):
        if f"x_{split}" not in arrays:
            continue
        x, y = check_arrays(arrays[f"x_{split}"], arrays[f"y_{split}"], where, split)
        x.setflags(write=False)
        y.setflags(write=False)
        checked[f"x_{split}"], checked[f"y_{split}"] = x, y
    shapes = {k: v.shape[1:] for k, v in checked.items() if k.startswith("x_")}
    if len(set(shapes.values())) > 1:
        detail = ", ".join(f"{k} {v}" for k, v in shapes.items())
        raise DataError(
            f"{where}: the splits' images differ in shape ({detail}); every split must share one "
            "(H, W, C)"
        )
    # The classes are the image folders, else those the training labels name (a val or test
    # label beyond them is a mislabelled file, not a new class).
    ref = "y_train" if "y_train" in checked else next(k for k in checked if k.startswith("y_"))
    if n_classes is None:
        n_classes = max(2, 1 + int(checked[ref].max()))
    for k, v in checked.items():
        if k.startswith("y_") and int(v.max()) >= n_classes:
            raise DataError(
                f"{where}: {k} labels span [{int(v.min())}, {int(v.max())}] but the {ref[2:]} "
                f"labels name {n_classes} classes [0, {n_classes - 1}]"
            )
    if n_train is None:
        n_train = len(checked["y_train"])
    return where, tuple(checked.items()), n_classes, n_train


def load_data(
    source: str = "bundled",
    *,
    val_size: int | None = 5000,
    seed: int = 0,
    include_train: bool = True,
) -> ImageData:
    """Loads a dataset and, unless it brings its own validation split, carves one out of train.

    Args:
        source: see the module docstring: `"bundled"` (MNIST, the default), `"keras:NAME"`, an
            `.npz`, a folder of MNIST IDX files, or a file dataset (folder or URI with train/,
            val/, test/). Defaults to `"bundled"`.
        val_size: examples moved from train to validation, in [1, n_train - 1] (ignored when
            the source has its own validation split); `None` takes 5000 or a tenth of train,
            whichever is smaller (for evaluating a model on the test split). Defaults to `5000`.
        seed: seed of the permutation choosing the validation examples. Defaults to `0`.
        include_train: read the training split; a file dataset streamed by Ray Data leaves it
            out (only its validation and test splits are read). Defaults to `True`.

    Returns:
        `ImageData` with float32 images in [0, 1], (N, H, W, C), and int32 labels. Arrays are
        read-only and shared between calls (a source is parsed once per process).

    Raises:
        DataError: a missing, damaged or malformed source, naming the file and the problem.
        ValueError: `val_size` out of range.
    """
    source = str(source)
    where, items, n_classes, n_train = _load_raw(
        source, include_train or not is_file_dataset(source)
    )
    a = dict(items)
    if "x_val" in a:
        x_train, y_train, x_val, y_val = a.get("x_train"), a.get("y_train"), a["x_val"], a["y_val"]
        if x_train is None:  # a file dataset whose training split was left to Ray Data
            x_train = np.zeros((0, *a["x_val"].shape[1:]), np.float32)
            y_train = np.zeros((0,), np.int32)
    else:
        n = len(a["x_train"])
        if val_size is None:
            val_size = max(1, min(5000, n // 10))
        if isinstance(val_size, bool) or not isinstance(val_size, int) or not 1 <= val_size < n:
            raise ValueError(f"`val_size` must be in [1, {n - 1}]. Received: val_size={val_size!r}")
        perm = np.random.default_rng(seed).permutation(n)
        val_idx, train_idx = np.sort(perm[:val_size]), np.sort(perm[val_size:])
        x_train, y_train = a["x_train"][train_idx], a["y_train"][train_idx]
        x_val, y_val = a["x_train"][val_idx], a["y_train"][val_idx]
        n_train = len(train_idx)
    return ImageData(
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=a["x_test"],
        y_test=a["y_test"],
        source=where,
        num_classes=n_classes,
        n_train=n_train,
    )


def shard(n: int, rank: int, world_size: int, *, seed: int = 0) -> np.ndarray:
    """Indices of one worker's shard of `n` examples.

    All workers draw the same seeded permutation and rank r takes every world_size-th index
    from position r, so shards are disjoint and deterministic. Shards are equal-sized
    (n // world_size each), because MultiWorkerMirroredStrategy hangs when ranks run different
    numbers of steps: the n % world_size examples left over at the end of the permutation
    (fewer than world_size) are left out of every shard.

    Args:
        n: examples in the split, >= world_size.
        rank: this worker, in [0, world_size - 1].
        world_size: number of workers, >= 1.
        seed: seed of the shared permutation. Defaults to `0`.

    Returns:
        int64 indices, sorted, length n // world_size.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(
            f"`world_size` must be an integer >= 1. Received: world_size={world_size!r}"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"`rank` must be in [0, {world_size - 1}]. Received: rank={rank!r}")
    if n < world_size:
        raise ValueError(
            f"Cannot shard {n} examples over {world_size} workers. Received: n={n}, "
            f"world_size={world_size}"
        )
    per = n // world_size
    perm = np.random.default_rng(seed).permutation(n)[: per * world_size]
    return np.sort(perm[rank::world_size])


def make_dataset(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    repeat: bool = False,
):
    """A tf.data pipeline of fixed-size (batch_size, H, W, C) batches.

    The last partial batch is dropped so every step has the same static shape (no retracing,
    and equal step counts across workers).
    """
    import tensorflow as tf

    if len(x) < batch_size:
        raise ValueError(
            f"`batch_size` must be at most the number of examples ({len(x)}). Received: "
            f"batch_size={batch_size}"
        )
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
