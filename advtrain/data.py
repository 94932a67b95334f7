"""Image datasets: the bundled MNIST, user files, Keras' loaders, checks, splits, shards, tf.data.

Images come out float32 in [0, 1] shaped (N, H, W, C); labels int32 in [0, classes - 1]. Height,
width, channels and the class count come from the data. Every bad file raises `DataError`
naming the file and what is wrong with it: nothing downstream ever sees a half-read array.
Files are decoded by `advtrain.formats` (one reader per format); file datasets are laid out and
read by `advtrain.file_dataset`. TensorFlow is imported only by `make_dataset`, Keras only for a
`keras:` source.

Sources (`load_data`):
    "bundled"                 MNIST as shipped in the package, sha256-verified (the default)
    "keras:mnist", "keras:fashion_mnist", "keras:cifar10"
                              Keras' own loaders: they download once into ~/.keras (internet)
    FILE.npz                  x_train, y_train, x_test, y_test (and optionally x_val, y_val)
    FOLDER of IDX files       the MNIST file layout (train-images-idx3-ubyte[.gz], ...)
    FOLDER or URI with train/, val/, test/   a file dataset (`advtrain.file_dataset`), the layout
                              Ray Data streams to the workers (workflows.stream); read whole here
"""

from __future__ import annotations

import dataclasses
import functools
import os
from importlib import resources
from pathlib import Path

import numpy as np

from advtrain.config import check_choice, check_number
from advtrain.file_dataset import is_file_dataset, load_file_dataset
from advtrain.formats import DataError, read_idx_folder, read_npz_dataset

__all__ = [
    "BUNDLED_SHA256",
    "KERAS_DATASETS",
    "DataError",
    "ImageData",
    "check_arrays",
    "load_data",
    "make_dataset",
    "shard",
]

# sha256 of the decompressed IDX bytes (shared/datasets/mnist/README.md): the bundled copy is
# refused if any byte differs, so a damaged install never trains silently on wrong data.
BUNDLED_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
KERAS_DATASETS = ("mnist", "fashion_mnist", "cifar10")
SPLITS = ("train", "val", "test")


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
        """(images, labels) of the split `name`: one of `"train"`, `"val"`, `"test"`."""
        name = check_choice("split", name, SPLITS)
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


def _load_keras(name: str) -> dict[str, np.ndarray]:
    import keras  # Keras downloads and caches under ~/.keras; only on explicit request.

    (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _bundled_dir() -> Path:
    return Path(str(resources.files("advtrain.datasets.mnist")))


def _read_source(source: str, include_train: bool):
    """(arrays as stored, where, class count or `None`, training rows or `None`) of a source;
    the counts are known up front only for a file dataset (its class folders, and a training
    split Ray Data streams)."""
    if source == "bundled":
        folder = _bundled_dir()
        return read_idx_folder(folder, BUNDLED_SHA256), str(folder), None, None
    if source.startswith("keras:"):
        name = source.split(":", 1)[1]
        if name not in KERAS_DATASETS:
            raise DataError(
                f"Keras dataset {name!r} is not one of {', '.join(KERAS_DATASETS)}. Received: "
                f"data={source!r}"
            )
        return _load_keras(name), f"keras.datasets.{name}", None, None
    if is_file_dataset(source):
        arrays, names, n_train = load_file_dataset(source, include_train)
        return arrays, source, len(names) if names else None, n_train
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        return read_idx_folder(path, None), str(path), None, None
    if path.suffix == ".npz" and path.is_file():
        return read_npz_dataset(path), str(path), None, None
    raise DataError(
        f"data {source!r} is neither 'bundled', keras:{{{','.join(KERAS_DATASETS)}}}, an "
        ".npz file, a folder of MNIST IDX files nor a file dataset (a folder or URI with "
        "train/, val/ and test/)"
    )


def _check_splits(arrays: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Every split present through `check_arrays`, read-only, all of one (H, W, C)."""
    checked = {}
    for split in SPLITS:
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
    return checked


def _check_classes(checked: dict[str, np.ndarray], where: str, n_classes: int | None) -> int:
    """The class count, checked against every split's labels.

    The classes are the image folders, else those the training labels name (a val or test
    label beyond them is a mislabelled file, not a new class).
    """
    ref = "y_train" if "y_train" in checked else next(k for k in checked if k.startswith("y_"))
    if n_classes is None:
        n_classes = max(2, 1 + int(checked[ref].max()))
    for k, v in checked.items():
        if k.startswith("y_") and int(v.max()) >= n_classes:
            raise DataError(
                f"{where}: {k} labels span [{int(v.min())}, {int(v.max())}] but the {ref[2:]} "
                f"labels name {n_classes} classes [0, {n_classes - 1}]"
            )
    return n_classes


@functools.lru_cache(maxsize=4)
def _load_raw(
    source: str, include_train: bool = True
) -> tuple[str, tuple[tuple[str, np.ndarray], ...], int, int]:
    """(where, checked splits, class count, training rows) of a source, parsed once per process."""
    arrays, where, n_classes, n_train = _read_source(source, include_train)
    checked = _check_splits(arrays, where)
    n_classes = _check_classes(checked, where, n_classes)
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
        TypeError: `val_size` not an integer (or a bool).
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
        val_size = check_number("val_size", val_size, low=1, high=n - 1, integer=True)
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

    Raises:
        ValueError: `world_size` or `rank` out of range, or fewer examples than workers.
        TypeError: `world_size` or `rank` not an integer (or a bool).
    """
    world_size = check_number("world_size", world_size, low=1, integer=True)
    rank = check_number("rank", rank, low=0, high=world_size - 1, integer=True)
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
