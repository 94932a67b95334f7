"""Streams a file dataset's training split to Ray Train workers through Ray Data.

A file dataset is a folder (local, or a URI that `pyarrow.fs` opens) holding `train/`, `val/`
and `test/`; each split holds only `*.parquet` (columns `image`, a Ray Data tensor column, and
`label`), only `*.npz` shards (arrays `x` and `y`), or one image folder per class (`*.png`,
`*.jpg`, `*.jpeg`; the label is the folder's index in sorted order). Only `train` is streamed:
`trainer_datasets` hands it to `TensorflowTrainer`, which splits it across the workers with
`streaming_split(equal=True)`, so each worker holds its blocks in flight and a prefetch buffer,
never the whole set. `val` and `test` are small and fixed, read in memory by `advtrain.data`.

Ray Data assigns blocks to workers as they are produced (the least-served worker next, by node
locality when it can), so a worker's rows differ from one epoch to the next; every epoch
covers the whole split but for fewer than `world_size * batch_size` rows (see `epoch_dataset`).
Ray Data's tasks need CPUs the Train workers leave free (1 per task unless `num_cpus` says less;
the parquet reader's per-epoch file listing always takes 1): a cluster whose workers hold every
CPU never reads a row.
"""

from __future__ import annotations

import logging

import numpy as np
import ray
import ray.data
import ray.train

from advtrain.config import check_number
from advtrain.file_dataset import FILE_FORMATS, count_split_rows, split_files
from advtrain.formats import (
    IMAGE_SUFFIXES,
    PARQUET_COLUMNS,
    DataError,
    image_mode,
    label_from_path,
    read_image,
    read_npz_shard,
)
from workflows.storage import filesystem, join

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "class_names",
    "count_rows",
    "epoch_dataset",
    "read_split",
    "split_format",
    "trainer_datasets",
]

log = logging.getLogger(__name__)

FORMATS = FILE_FORMATS
IMAGE_EXTENSIONS = tuple(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES)


def split_format(source: str, split: str) -> str:
    """The kind of files a split folder holds: one of `FORMATS`
    (`advtrain.file_dataset.split_files`).

    Raises:
        DataError: a missing or empty folder, files of another kind, images outside class
            folders, or several kinds at once; the message names the folder.
    """
    return split_files(str(source), split)[0]


def class_names(source: str, split: str = "train") -> list[str] | None:
    """The class folder names of an image dataset, sorted (label i is the i-th name); `None`
    for parquet and npz. Every split is labelled with the training split's classes."""
    return split_files(str(source), split)[2]


def count_rows(source: str, split: str) -> int:
    """The rows of a split from file metadata alone (`advtrain.file_dataset.count_split_rows`)."""
    return count_split_rows(str(source), split)


def _decode_npz(batch: dict) -> dict:
    """One npz shard (a batch of one file's bytes) to rows of `image` and `label`
    (`advtrain.formats.read_npz_shard`, as `advtrain.file_dataset` reads it)."""
    images, labels = zip(
        *(read_npz_shard(raw, path) for raw, path in zip(batch["bytes"], batch["path"]))
    )
    return {"image": np.concatenate(images), "label": np.concatenate(labels)}


def _decode_images(batch: dict, *, root: str, classes: list[str], mode: str) -> dict:
    """Image files' bytes to rows of `image` (in `mode`) and `label` (the class folder under
    `root`): `advtrain.formats.read_image` and `label_from_path`, as `advtrain.file_dataset`
    reads them."""
    images = [read_image(raw, path, mode) for raw, path in zip(batch["bytes"], batch["path"])]
    if len({x.shape for x in images}) > 1:
        raise DataError(
            "images of different shapes in one split; every image must be H x W x C alike"
        )
    labels = [label_from_path(path, root, classes) for path in batch["path"]]
    return {"image": np.stack(images), "label": np.asarray(labels, np.int64)}


def _standardize(batch: dict) -> dict:
    """`image` (n, H, W, C) uint8 or float32 and `label` int64; nothing else."""
    x, y = batch["image"], np.asarray(batch["label"])
    if x.dtype == object:
        raise DataError(
            "images of different shapes in one split; every image must be H x W x C alike"
        )
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"images have shape {x.shape[1:]}, expected (H, W) or (H, W, C)")
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32, copy=False)
    elif x.dtype != np.uint8:
        raise DataError(
            f"images have dtype {x.dtype}, expected uint8 in [0, 255] or float in [0, 1]"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels have dtype {y.dtype}, expected integer class labels")
    return {"image": x, "label": y.astype(np.int64, copy=False)}


def read_split(
    source: str,
    split: str,
    *,
    shuffle_files: bool = False,
    seed: int | None = None,
    num_cpus: float | None = None,
) -> ray.data.Dataset:
    """A split as a lazy Ray Dataset of rows `image` (H, W, C) and `label` (int64).

    Images keep their stored dtype, uint8 or float32 (other floats become float32); (H, W)
    images gain C = 1. Image folders are read in the channel mode of the first image ("L" for
    grey, else "RGB"), so every image has the same channels.

    Args:
        source: the dataset folder or URI.
        split: the split's folder name.
        shuffle_files: read the files in a new random order on every execution (every epoch,
            under Ray Train), which keeps the read streaming; rows within a file keep their
            order (`epoch_dataset`'s local shuffle buffer mixes them). Defaults to `False`.
        seed: with `shuffle_files`, makes the sequence of per-epoch file orders reproducible
            (Ray's `FileShuffleConfig`: seed combined with the execution index); `None` draws a
            fresh order each time. Defaults to `None`.
        num_cpus: CPUs each Ray Data read or decode task requests; `None` is Ray's default (1).
            Lower it where Train workers leave only fractions of CPUs free. Defaults to `None`.

    Returns:
        A `ray.data.Dataset` (nothing is read until it is executed).

    Raises:
        DataError: as `split_format`. A file found malformed while reading raises DataError in
            the Ray task, which reaches the caller as `ray.exceptions.RayTaskError` (a
            `UserCodeException`) whose message holds the DataError line; `count_rows` checks
            npz shards and parquet footers up front.
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"`seed` must be an integer or None. Received: seed={seed!r}")
    if num_cpus is not None:
        check_number("num_cpus", num_cpus, low=0, low_open=True)
    kind, files, _ = split_files(str(source), split)
    fs, path = filesystem(join(str(source), split))
    shuffle = None
    if shuffle_files:
        shuffle = ray.data.FileShuffleConfig(seed=seed) if seed is not None else "files"
    remote = {} if num_cpus is None else {"num_cpus": num_cpus}
    if kind == "parquet":
        ds = _stream_parquet(path, fs, shuffle, remote)
    elif kind == "npz":
        ds = _stream_npz(path, fs, shuffle, remote)
    else:
        ds = _stream_images(path, fs, shuffle, remote, first=files[0], classes=class_names(source))
    return ds.map_batches(_standardize, batch_format="numpy", **remote)


def _stream_parquet(path: str, fs, shuffle, remote: dict) -> ray.data.Dataset:
    # select_columns, not columns= (deprecated in Ray 2.60): the projection is still pushed
    # into the read, so other columns are never loaded.
    return ray.data.read_parquet(
        path, filesystem=fs, shuffle=shuffle, file_extensions=["parquet"], **remote
    ).select_columns(list(PARQUET_COLUMNS))


def _stream_npz(path: str, fs, shuffle, remote: dict) -> ray.data.Dataset:
    ds = ray.data.read_binary_files(
        path, filesystem=fs, include_paths=True, shuffle=shuffle, file_extensions=["npz"], **remote
    )
    # One shard per batch: each shard becomes its own block, never one block of all shards.
    return ds.map_batches(_decode_npz, batch_size=1, batch_format="numpy", **remote)


def _stream_images(
    path: str, fs, shuffle, remote: dict, *, first: str, classes: list[str]
) -> ray.data.Dataset:
    # Every image is read in the mode of the split's first (sorted) image, as advtrain.data does.
    with fs.open_input_file(first) as f:
        mode = image_mode(f.read(), first)
    ds = ray.data.read_binary_files(
        path,
        filesystem=fs,
        include_paths=True,
        shuffle=shuffle,
        file_extensions=list(IMAGE_EXTENSIONS),
        **remote,
    )
    return ds.map_batches(
        _decode_images,
        batch_format="numpy",
        fn_kwargs={"root": path, "classes": classes, "mode": mode},
        **remote,
    )


def epoch_dataset(
    iterator,
    *,
    batch_size: int,
    input_shape: tuple[int, int, int],
    steps: int,
    seed: int,
    shuffle_buffer: int,
    prefetch_batches: int = 2,
):
    """One epoch of a worker's shard as a `tf.data.Dataset` of exactly `steps` batches.

    Starts one `iterator.iter_batches` pass (Ray Train's equal split makes every worker call
    it together, so every rank calls `epoch_dataset` once per epoch), reads its first batch
    to learn the stored dtype, and yields `steps` batches. The rest of the pass is drained
    before the last batch is yielded: a loop that pulls exactly `steps` batches then leaves no
    half-read pass behind to block the next epoch. Iterate the result once.

    With N rows and W workers each worker's shard holds floor(N / W) rows (the equal split
    drops N mod W), and `drop_last` its last partial batch: with `steps` = floor(floor(N / W)
    / batch_size) an epoch leaves out N - W * steps * batch_size < W * batch_size rows.

    Args:
        iterator: the worker's `ray.data.DataIterator` (`ray.train.get_dataset_shard("train")`).
        batch_size: rows per batch on this worker, >= 1.
        input_shape: (H, W, C) of one image.
        steps: batches to yield, >= 1; every rank must use the same value (with
            MultiWorkerMirroredStrategy, ranks running different step counts hang).
        seed: the local shuffle's seed; pass a different one each epoch (e.g. seed * 1000 + epoch).
        shuffle_buffer: rows in the local shuffle buffer (>= `batch_size`), 0 for none.
        prefetch_batches: batches Ray fetches ahead, >= 1. Defaults to `2`.

    Returns:
        A `tf.data.Dataset` of (images float32 in [0, 1] (batch_size, H, W, C), labels int32
        (batch_size,)) with static shapes and cardinality `steps`.

    Raises:
        ValueError: an argument out of range.
        DataError: the shard holds fewer than `steps` batches, or images of another shape, or
            float images outside [0, 1] (raised while iterating; TensorFlow reports it as an
            `InvalidArgumentError` whose message holds this one).
    """
    import tensorflow as tf

    _check_epoch_arguments(batch_size, input_shape, steps, shuffle_buffer, prefetch_batches)
    shape = (batch_size, *input_shape)
    batches = iter(
        iterator.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            drop_last=True,
            prefetch_batches=prefetch_batches,
            local_shuffle_buffer_size=shuffle_buffer or None,
            local_shuffle_seed=seed if shuffle_buffer else None,
        )
    )
    first = next(batches, None)
    if first is None:
        raise _short_shard(0, batch_size, steps)
    dtype = tf.uint8 if first["image"].dtype == np.uint8 else tf.float32
    ds = tf.data.Dataset.from_generator(
        lambda: _steps_of(first, batches, shape, steps),
        output_signature=(tf.TensorSpec(shape, dtype), tf.TensorSpec((batch_size,), tf.int32)),
    )
    if dtype == tf.uint8:
        ds = ds.map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y))
    return ds.apply(tf.data.experimental.assert_cardinality(steps))


def _check_epoch_arguments(
    batch_size: int,
    input_shape: tuple[int, int, int],
    steps: int,
    shuffle_buffer: int,
    prefetch_batches: int,
) -> None:
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("steps", steps, 1),
        ("prefetch_batches", prefetch_batches, 1),
        ("shuffle_buffer", shuffle_buffer, 0),
    ):
        check_number(name, value, low=low, integer=True)
    if 0 < shuffle_buffer < batch_size:
        raise ValueError(
            f"`shuffle_buffer` must be 0 or >= batch_size ({batch_size}). "
            f"Received: shuffle_buffer={shuffle_buffer}"
        )
    if len(input_shape) != 3 or not all(isinstance(d, int) and d >= 1 for d in input_shape):
        raise ValueError(
            "`input_shape` must be (H, W, C), positive integers. Received: "
            f"input_shape={input_shape!r}"
        )


def _short_shard(done: int, batch_size: int, steps: int) -> DataError:
    return DataError(
        f"this worker's shard gave {done} batches of {batch_size}, fewer than "
        f"steps={steps}; steps must be at most floor(rows / workers / batch_size)"
    )


def _checked_batch(batch: dict, shape: tuple[int, ...], done: int):
    """(images, int32 labels) of one batch, its shape and float range checked."""
    x, y = batch["image"], batch["label"]
    if x.shape != shape:
        raise DataError(
            f"a batch of images has shape {x.shape}, expected {shape} (batch_size, *input_shape)"
        )
    if x.dtype != np.uint8 and not (x.min() >= 0 and x.max() <= 1):
        raise DataError(
            f"float images span [{x.min()}, {x.max()}] in batch {done}, expected [0, 1]"
        )
    return x, y.astype(np.int32)


def _steps_of(first: dict, batches, shape: tuple[int, ...], steps: int):
    """Yields `steps` checked batches, `first` then the pass's next ones; the rest of the pass
    is drained before the last is yielded (see `epoch_dataset`)."""
    batch, done = first, 0
    while True:
        if done == steps - 1:
            drained = sum(1 for _ in batches)
            if drained:
                log.debug("drained %d batches past steps=%d", drained, steps)
            yield _checked_batch(batch, shape, done)
            return
        yield _checked_batch(batch, shape, done)
        done += 1
        batch = next(batches, None)
        if batch is None:
            raise _short_shard(done, shape[0], steps)


def trainer_datasets(
    source: str, *, seed: int | None, shuffle_files: bool = True, num_cpus: float | None = None
):
    """The `datasets` and `dataset_config` of a `TensorflowTrainer` streaming `train`.

    Only `train` goes through Ray Data, split across the workers; `val` and `test` are read in
    memory by `advtrain.data` (small, fixed, the same on every rank).

    Args:
        source: the dataset folder or URI; it must be readable from every node.
        seed: the file shuffle's seed (see `read_split`); `None` for a fresh order each epoch.
        shuffle_files: shuffle the file order every epoch. Defaults to `True`.
        num_cpus: CPUs per Ray Data task (see `read_split`). Defaults to `None`.

    Returns:
        (`{"train": Dataset}`, `ray.train.DataConfig(datasets_to_split=["train"])`, rows): the
        rows come from `count_rows`, run first so a bad shard fails here, not in a worker.

    Raises:
        DataError: as `count_rows`.
    """
    rows = count_rows(source, "train")
    train = read_split(source, "train", shuffle_files=shuffle_files, seed=seed, num_cpus=num_cpus)
    return {"train": train}, ray.train.DataConfig(datasets_to_split=["train"]), rows
