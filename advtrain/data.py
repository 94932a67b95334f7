"""MNIST: the bundled copy, user files, checks, the validation split, worker shards and tf.data.

Images come out float32 in [0, 1] shaped (N, 28, 28, 1); labels int32 in [0, 9]. Every bad file
raises `DataError` naming the file and what is wrong with it: nothing downstream ever sees a
half-read array.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import os
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "MNIST",
    "load_mnist",
    "read_idx",
    "shard",
    "make_dataset",
    "check_arrays",
    "BUNDLED_SHA256",
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


class DataError(ValueError):
    """A data file or array that cannot be used, with the file and the problem named."""


@dataclasses.dataclass(frozen=True)
class MNIST:
    """The three splits. The validation split is carved from train and never overlaps it."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"`split` must be one of 'train', 'val', 'test'. Received: split={name!r}")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")


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
        uint8 array, (N, 28, 28) for images or (N,) for labels.

    Raises:
        DataError: unreadable file, wrong magic number, wrong image size, truncated or
            overlong data, or a checksum mismatch; the message names the file.
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
        if (rows, cols) != (28, 28):
            raise DataError(f"{path}: images are {rows}x{cols}, expected 28x28")
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


def check_arrays(x: np.ndarray, y: np.ndarray, where: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Converts to float32 [0, 1] images (N, 28, 28, 1) and int32 labels, or raises DataError."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DataError(f"{where}: x_{split} has shape {x.shape}, expected (N, 28, 28) or (N, 28, 28, 1)")
    if y.ndim != 1:
        raise DataError(f"{where}: y_{split} has shape {y.shape}, expected (N,)")
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x)} {split} images but {len(y)} {split} labels")
    if len(x) == 0:
        raise DataError(f"{where}: the {split} split is empty")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    else:
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise DataError(f"{where}: x_{split} holds NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"{where}: x_{split} values span [{lo}, {hi}], expected [0, 1] (or uint8)")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise DataError(f"{where}: y_{split} must hold integer class labels, found dtype {y.dtype}")
    if y.min() < 0 or y.max() > 9:
        raise DataError(f"{where}: y_{split} labels span [{y.min()}, {y.max()}], expected [0, 9]")
    return x[..., None], y.astype(np.int32)


def _load_folder(folder: Path, checksums: dict[str, str] | None) -> dict[str, np.ndarray]:
    out = {}
    for key, stem in FILES.items():
        path = _find_idx(folder, stem)
        arr = read_idx(path, expected_sha256=checksums[stem] if checksums else None)
        want_images = key.startswith("x_")
        if (arr.ndim == 3) != want_images:
            raise DataError(f"{path}: holds {'labels' if want_images else 'images'}, expected {'images' if want_images else 'labels'}")
        out[key] = arr
    return out


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in FILES if k not in f.files]
            if missing:
                raise DataError(f"{path}: missing key(s) {', '.join(missing)} (found: {', '.join(f.files) or 'none'})")
            return {k: f[k] for k in FILES}
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot be read as .npz ({e})") from None


def _load_keras() -> dict[str, np.ndarray]:
    import keras  # Keras downloads and caches under ~/.keras; only on explicit request.

    (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _bundled_dir() -> Path:
    return Path(str(resources.files("advtrain.datasets.mnist")))


@functools.lru_cache(maxsize=4)
def _load_raw(source: str) -> tuple[str, tuple[tuple[str, np.ndarray], ...]]:
    if source == "bundled":
        folder = _bundled_dir()
        arrays = _load_folder(folder, BUNDLED_SHA256)
        where = str(folder)
    elif source == "keras":
        arrays, where = _load_keras(), "keras.datasets.mnist"
    else:
        path = Path(os.path.expanduser(source))
        if path.is_dir():
            arrays = _load_folder(path, None)
        elif path.suffix == ".npz" and path.is_file():
            arrays = _load_npz(path)
        else:
            raise DataError(
                f"MNIST source {source!r} is neither 'bundled', 'keras', a folder of IDX files nor an "
                ".npz file"
            )
        where = str(path)
    checked = {}
    for split in ("train", "test"):
        x, y = check_arrays(arrays[f"x_{split}"], arrays[f"y_{split}"], where, split)
        x.setflags(write=False)
        y.setflags(write=False)
        checked[f"x_{split}"], checked[f"y_{split}"] = x, y
    return where, tuple(checked.items())


def load_mnist(source: str = "bundled", *, val_size: int = 5000, seed: int = 0) -> MNIST:
    """Loads MNIST and carves a deterministic validation split out of train.

    Args:
        source: `"bundled"` (the copy shipped in the package, sha256-verified), `"keras"`
            (Keras' download and cache; needs internet once), a folder of IDX files (.gz or
            raw) or a `.npz` with `x_train`, `y_train`, `x_test`, `y_test`. Defaults to
            `"bundled"`.
        val_size: examples moved from train to validation, in [1, n_train - 1]. Defaults to `5000`.
        seed: seed of the permutation choosing the validation examples. Defaults to `0`.

    Returns:
        `MNIST` with float32 images in [0, 1], (N, 28, 28, 1), and int32 labels. Arrays are
        read-only and shared between calls (the files are parsed once per process).

    Raises:
        DataError: a missing, damaged or malformed source, naming the file and the problem.
        ValueError: `val_size` out of range.
    """
    where, items = _load_raw(str(source))
    a = dict(items)
    n = len(a["x_train"])
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 1 <= val_size < n:
        raise ValueError(f"`val_size` must be an integer in [1, {n - 1}]. Received: val_size={val_size!r}")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(perm[:val_size]), np.sort(perm[val_size:])
    return MNIST(
        x_train=a["x_train"][train_idx],
        y_train=a["y_train"][train_idx],
        x_val=a["x_train"][val_idx],
        y_val=a["y_train"][val_idx],
        x_test=a["x_test"],
        y_test=a["y_test"],
        source=where,
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
        raise ValueError(f"`world_size` must be an integer >= 1. Received: world_size={world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"`rank` must be in [0, {world_size - 1}]. Received: rank={rank!r}")
    if n < world_size:
        raise ValueError(f"Cannot shard {n} examples over {world_size} workers. Received: n={n}, world_size={world_size}")
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
    """A tf.data pipeline of fixed-size (batch_size, 28, 28, 1) batches.

    The last partial batch is dropped so every step has the same static shape (no retracing,
    and equal step counts across workers).
    """
    import tensorflow as tf

    if len(x) < batch_size:
        raise ValueError(
            f"`batch_size` must be at most the number of examples ({len(x)}). Received: batch_size={batch_size}"
        )
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
