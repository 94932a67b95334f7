"""Tests for advtrain.data: the bundled MNIST facts, splits, shards, tf.data and bad files.

Loads are cached per source string (`functools.lru_cache`), so every bad-file test writes to its
own tmp path; the bundled copy is parsed once for the whole module.
"""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest

from advtrain import data, formats
from advtrain.data import DataError, load_data, make_dataset, shard
from advtrain.formats import read_idx

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --------------------------------------------------------------------------------------------
# Helpers: IDX writers
# --------------------------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    if magic is None:
        magic = formats.IMAGE_MAGIC if arr.ndim == 3 else formats.LABEL_MAGIC
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def _write(path, payload: bytes) -> None:
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _small_arrays(n_train=20, n_test=10, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }


def _write_folder(folder, arrays: dict[str, np.ndarray], *, gz: bool = True, override=None):
    """Writes the four IDX files; `override` maps a key to raw bytes written instead."""
    folder.mkdir(parents=True, exist_ok=True)
    override = override or {}
    for key, stem in formats.IDX_FILES.items():
        path = folder / (stem + (".gz" if gz else ""))
        _write(path, override[key] if key in override else _idx_bytes(arrays[key]))
    return folder


@pytest.fixture(scope="module")
def mnist():
    return load_data()


@pytest.fixture(scope="module")
def raw():
    """The bundled arrays before the validation split (uint8 -> float32 already applied)."""
    _, items, _, _ = data._load_raw("bundled")
    return dict(items)


# --------------------------------------------------------------------------------------------
# The bundled copy reproduces the README facts
# --------------------------------------------------------------------------------------------


def test_load_data_bundled_shapes_dtypes_range(mnist):
    assert mnist.x_train.shape == (55000, 28, 28, 1)
    assert mnist.x_val.shape == (5000, 28, 28, 1)
    assert mnist.x_test.shape == (10000, 28, 28, 1)
    assert (
        mnist.y_train.shape == (55000,)
        and mnist.y_val.shape == (5000,)
        and mnist.y_test.shape == (10000,)
    )
    for x in (mnist.x_train, mnist.x_val, mnist.x_test):
        assert x.dtype == np.float32
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    for y in (mnist.y_train, mnist.y_val, mnist.y_test):
        assert y.dtype == np.int32
        assert y.min() == 0 and y.max() == 9


def test_load_data_bundled_train_class_counts_match_readme(mnist):
    y = np.concatenate([mnist.y_train, mnist.y_val])
    assert np.bincount(y, minlength=10).tolist() == TRAIN_COUNTS


def test_load_data_bundled_test_class_counts_match_readme(mnist):
    assert np.bincount(mnist.y_test, minlength=10).tolist() == TEST_COUNTS


def test_load_data_bundled_pixel_mean_std_match_readme(raw):
    x = raw["x_train"].astype(np.float64)
    assert x.shape == (60000, 28, 28, 1)
    assert round(float(x.mean()), 4) == 0.1307
    assert round(float(x.std()), 4) == 0.3081


def test_load_data_arrays_read_only(mnist, raw):
    assert not raw["x_train"].flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        raw["y_test"][0] = 3


def test_load_data_val_split_deterministic_by_seed(mnist):
    again = load_data(val_size=5000, seed=0)
    np.testing.assert_array_equal(again.x_val, mnist.x_val)
    np.testing.assert_array_equal(again.y_train, mnist.y_train)
    other = load_data(val_size=5000, seed=1)
    assert not np.array_equal(other.y_val, mnist.y_val)


def _rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each example as one sortable byte row (pixels as uint8 + label)."""
    pix = np.round(x.reshape(len(x), -1) * 255).astype(np.uint8)
    rows = np.concatenate([pix, y.astype(np.uint8)[:, None]], axis=1)
    return np.sort(rows.view(np.dtype((np.void, rows.shape[1]))).ravel())


def test_load_data_val_split_partitions_train(mnist, raw):
    # train + val is exactly the original 60k training set as a multiset: the split is a
    # partition of the indices (disjoint, covering), not a resample.
    split = _rows(
        np.concatenate([mnist.x_train, mnist.x_val]), np.concatenate([mnist.y_train, mnist.y_val])
    )
    full = _rows(raw["x_train"], raw["y_train"])
    np.testing.assert_array_equal(split, full)


def test_load_data_val_size_changes_split_sizes():
    small = load_data(val_size=1000, seed=0)
    assert len(small.x_val) == 1000 and len(small.x_train) == 59000


@pytest.mark.parametrize(
    "val_size, error, wording",
    [
        (0, ValueError, r"must be in \[1, 59999\]"),
        (60000, ValueError, r"must be in \[1, 59999\]"),
        (True, TypeError, "must be an integer"),
        (10.0, TypeError, "must be an integer"),
    ],
)
def test_load_data_bad_val_size_raises(val_size, error, wording):
    with pytest.raises(error, match=rf"`val_size` {wording}. Received: val_size={val_size!r}"):
        load_data(val_size=val_size)


def test_mnist_split_by_name_returns_arrays(mnist):
    x, y = mnist.split("val")
    assert x is mnist.x_val and y is mnist.y_val
    with pytest.raises(ValueError, match=r"Received: split='validation'"):
        mnist.split("validation")


def test_read_idx_bundled_checksum_mismatch_raises():
    path = data._bundled_dir() / "t10k-labels-idx1-ubyte.gz"
    labels = read_idx(path, expected_sha256=data.BUNDLED_SHA256["t10k-labels-idx1-ubyte"])
    assert labels.shape == (10000,)
    with pytest.raises(
        DataError, match=r"t10k-labels-idx1-ubyte\.gz: checksum mismatch .*expected 0{64}"
    ):
        read_idx(path, expected_sha256="0" * 64)


def test_read_idx_tampered_copy_of_bundled_raises(tmp_path):
    # One label changed: still a valid IDX file, only the checksum can tell.
    src = data._bundled_dir() / "t10k-labels-idx1-ubyte.gz"
    raw_bytes = bytearray(gzip.decompress(src.read_bytes()))
    raw_bytes[100] = (raw_bytes[100] + 1) % 10
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(bytes(raw_bytes))
    assert read_idx(path).shape == (10000,)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: checksum mismatch"):
        read_idx(path, expected_sha256=data.BUNDLED_SHA256["t10k-labels-idx1-ubyte"])


def test_load_bundled_checksum_mismatch_names_file(monkeypatch):
    # The bundled loader verifies every file; bypass the per-source cache with __wrapped__.
    monkeypatch.setitem(data.BUNDLED_SHA256, "train-labels-idx1-ubyte", "f" * 64)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: checksum mismatch"):
        data._load_raw.__wrapped__("bundled")


def test_bundled_sha256_matches_sums_file():
    # SHA256SUMS holds the hashes of the .gz files as shipped.
    folder = data._bundled_dir()
    sums = dict(
        line.split()[::-1]
        for line in (folder / "SHA256SUMS").read_text().splitlines()
        if line.strip()
    )
    for stem in formats.IDX_FILES.values():
        name = next(k for k in sums if k.lstrip("*").endswith(stem + ".gz"))
        assert hashlib.sha256((folder / (stem + ".gz")).read_bytes()).hexdigest() == sums[name]


# --------------------------------------------------------------------------------------------
# User sources: a folder of IDX files (raw or gz) and .npz
# --------------------------------------------------------------------------------------------


def test_load_data_folder_raw_idx_matches_bundled(tmp_path, raw):
    arrays = {
        "x_train": np.round(raw["x_train"][:1000, ..., 0] * 255).astype(np.uint8),
        "y_train": raw["y_train"][:1000],
        "x_test": np.round(raw["x_test"][:300, ..., 0] * 255).astype(np.uint8),
        "y_test": raw["y_test"][:300],
    }
    folder = _write_folder(tmp_path / "raw", arrays, gz=False)
    got = load_data(str(folder), val_size=100, seed=0)
    assert got.source == str(folder)
    np.testing.assert_array_equal(got.x_test, raw["x_test"][:300])
    np.testing.assert_array_equal(got.y_test, raw["y_test"][:300])
    assert len(got.x_train) == 900 and len(got.x_val) == 100
    assert got.x_train.dtype == np.float32 and got.y_train.dtype == np.int32


def test_load_data_folder_dot_idx_names_found(tmp_path):
    # The names some mirrors use: train-images.idx3-ubyte
    arrays = _small_arrays()
    folder = tmp_path / "dots"
    folder.mkdir()
    for key, stem in formats.IDX_FILES.items():
        (folder / stem.replace("-idx", ".idx")).write_bytes(_idx_bytes(arrays[key]))
    got = load_data(str(folder), val_size=5)
    np.testing.assert_array_equal(got.y_test, arrays["y_test"])


def test_load_data_npz_matches_bundled(tmp_path, raw):
    path = tmp_path / "mnist.npz"
    np.savez(
        path,
        x_train=np.round(raw["x_train"][:500, ..., 0] * 255).astype(np.uint8),
        y_train=raw["y_train"][:500].astype(np.uint8),
        x_test=raw["x_test"][:200],  # float32 (N, 28, 28, 1) in [0, 1] is accepted too
        y_test=raw["y_test"][:200].astype(np.int64),
    )
    got = load_data(str(path), val_size=50, seed=0)
    np.testing.assert_array_equal(got.x_test, raw["x_test"][:200])
    np.testing.assert_array_equal(got.y_test, raw["y_test"][:200])
    assert got.y_test.dtype == np.int32
    assert len(got.x_train) + len(got.x_val) == 500


def test_load_data_npz_float_integral_labels_accepted(tmp_path):
    a = _small_arrays()
    path = tmp_path / "f.npz"
    np.savez(path, **{**a, "y_train": a["y_train"].astype(np.float32)})
    np.testing.assert_array_equal(load_data(str(path), val_size=5).y_test, a["y_test"])


# --------------------------------------------------------------------------------------------
# Bad IDX files: each names the file and the problem
# --------------------------------------------------------------------------------------------


def test_read_idx_wrong_magic_raises(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(_idx_bytes(np.zeros((2, 28, 28)), magic=0x00000804))
    with pytest.raises(
        DataError, match=r"x\.idx: wrong magic number 0x00000804 \(expected 0x00000803"
    ):
        read_idx(path)


def test_read_idx_truncated_data_raises(tmp_path):
    path = tmp_path / "t.idx"
    path.write_bytes(_idx_bytes(np.zeros((3, 28, 28)))[:-10])
    with pytest.raises(
        DataError, match=r"t\.idx: data truncated: header promises 2352 bytes, found 2342"
    ):
        read_idx(path)


def test_read_idx_trailing_bytes_raises(tmp_path):
    path = tmp_path / "l.idx.gz"
    _write(path, _idx_bytes(np.zeros(5)) + b"\x00\x01")
    with pytest.raises(
        DataError, match=r"l\.idx\.gz: data has trailing bytes: header promises 5 bytes, found 7"
    ):
        read_idx(path)


def test_read_idx_truncated_header_raises(tmp_path):
    path = tmp_path / "h.idx"
    path.write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match=r"h\.idx: truncated header \(3 bytes\)"):
        read_idx(path)


def test_read_idx_image_header_cut_raises(tmp_path):
    path = tmp_path / "h2.idx"
    path.write_bytes(formats.IMAGE_MAGIC.to_bytes(4, "big") + (5).to_bytes(4, "big") + b"\x00\x1c")
    with pytest.raises(DataError, match=r"h2\.idx: truncated header \(10 bytes\)"):
        read_idx(path)


def test_read_idx_other_image_size_reads(tmp_path):
    path = tmp_path / "s.idx"
    path.write_bytes(_idx_bytes(np.zeros((2, 32, 32))))
    assert read_idx(path).shape == (
        2,
        32,
        32,
    )  # any image size: EMNIST, KMNIST, ... share the format


def test_read_idx_not_gzip_raises(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match=r"bad\.gz: cannot be read"):
        read_idx(path)


def test_read_idx_truncated_gzip_raises(tmp_path):
    path = tmp_path / "cut.gz"
    payload = gzip.compress(_idx_bytes(np.arange(2000) % 10))
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(DataError, match=r"cut\.gz: cannot be read"):
        read_idx(path)


def test_load_data_folder_image_label_count_mismatch_raises(tmp_path):
    a = _small_arrays()
    a["y_train"] = a["y_train"][:19]
    folder = _write_folder(tmp_path / "count", a)
    with pytest.raises(DataError, match=r"count: 20 train images but 19 train labels"):
        load_data(str(folder), val_size=5)


def test_load_data_folder_truncated_file_raises(tmp_path):
    a = _small_arrays()
    folder = _write_folder(tmp_path / "trunc", a, override={"x_test": _idx_bytes(a["x_test"])[:-1]})
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: data truncated"):
        load_data(str(folder), val_size=5)


def test_load_data_folder_labels_where_images_expected_raises(tmp_path):
    a = _small_arrays()
    folder = _write_folder(tmp_path / "swap", a, override={"x_train": _idx_bytes(a["y_train"])})
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte\.gz: holds labels, expected images"
    ):
        load_data(str(folder), val_size=5)


def test_load_data_folder_label_out_of_range_raises(tmp_path):
    a = _small_arrays()
    a["y_test"][3] = 12
    folder = _write_folder(tmp_path / "lab", a)
    with pytest.raises(
        DataError,
        match=r"lab: y_test labels span \[0, 12\] but the train labels name 10 classes \[0, 9\]",
    ):
        load_data(str(folder), val_size=5)


def test_load_data_folder_missing_file_raises(tmp_path):
    folder = _write_folder(tmp_path / "miss", _small_arrays())
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"miss: missing t10k-labels-idx1-ubyte\(\.gz\)"):
        load_data(str(folder), val_size=5)


# --------------------------------------------------------------------------------------------
# Bad .npz files and sources
# --------------------------------------------------------------------------------------------


def _npz(tmp_path, name, **changes):
    a = {**_small_arrays(), **changes}
    a = {k: v for k, v in a.items() if v is not None}
    path = tmp_path / name
    np.savez(path, **a)
    return str(path)


def test_load_data_npz_missing_keys_raises(tmp_path):
    path = _npz(tmp_path, "keys.npz", y_test=None, x_test=None)
    with pytest.raises(
        DataError, match=r"keys\.npz: missing key\(s\) x_test, y_test \(found: x_train, y_train\)"
    ):
        load_data(path, val_size=5)


def test_load_data_npz_wrong_image_shape_raises(tmp_path):
    path = _npz(tmp_path, "shape.npz", x_train=np.zeros((20, 28, 27), np.uint8))
    with pytest.raises(
        DataError,
        match=r"shape\.npz: the splits' images differ in shape \(x_train \(28, 27, 1\), x_test "
        r"\(28, 28, 1\)\)",
    ):
        load_data(path, val_size=5)


def test_load_data_npz_wrong_label_shape_raises(tmp_path):
    path = _npz(tmp_path, "lshape.npz", y_test=np.zeros((10, 10), np.uint8))
    with pytest.raises(
        DataError, match=r"lshape\.npz: y_test has shape \(10, 10\), expected \(N,\)"
    ):
        load_data(path, val_size=5)


def test_load_data_npz_values_out_of_range_raises(tmp_path):
    x = np.full((20, 28, 28), 0.5, np.float32)
    x[0, 0, 0] = 2.0
    path = _npz(tmp_path, "range.npz", x_train=x)
    with pytest.raises(
        DataError, match=r"range\.npz: x_train values span \[0\.5, 2\.0\], expected \[0, 1\]"
    ):
        load_data(path, val_size=5)


def test_load_data_npz_nan_raises(tmp_path):
    x = np.full((10, 28, 28), 0.5, np.float32)
    x[1, 2, 3] = np.nan
    path = _npz(tmp_path, "nan.npz", x_test=x)
    with pytest.raises(DataError, match=r"nan\.npz: x_test holds NaN or infinite values"):
        load_data(path, val_size=5)


def test_load_data_npz_negative_label_raises(tmp_path):
    y = np.arange(20) % 10
    y[4] = -1
    path = _npz(tmp_path, "yneg.npz", y_train=y)
    with pytest.raises(
        DataError, match=r"y_train labels span \[-1, 9\], expected class indices >= 0"
    ):
        load_data(path, val_size=5)


def test_load_data_class_count_comes_from_the_training_labels(tmp_path):
    y = np.arange(20) % 10
    y[4] = 11
    assert load_data(_npz(tmp_path, "y11.npz", y_train=y), val_size=5).num_classes == 12


def test_load_data_npz_fractional_labels_raises(tmp_path):
    path = _npz(tmp_path, "frac.npz", y_test=np.full(10, 0.5))
    with pytest.raises(
        DataError, match=r"frac\.npz: y_test must hold integer class labels, found dtype float64"
    ):
        load_data(path, val_size=5)


def test_load_data_npz_empty_split_raises(tmp_path):
    path = _npz(
        tmp_path, "empty.npz", x_test=np.zeros((0, 28, 28), np.uint8), y_test=np.zeros(0, np.uint8)
    )
    with pytest.raises(DataError, match=r"empty\.npz: the test split is empty"):
        load_data(path, val_size=5)


def test_load_data_npz_not_a_zip_raises(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match=r"junk\.npz: cannot be read as \.npz"):
        load_data(str(path), val_size=5)


def test_load_data_nonexistent_source_raises(tmp_path):
    missing = str(tmp_path / "nowhere.npz")
    with pytest.raises(
        DataError,
        match=r"data '.*nowhere\.npz' is neither 'bundled', "
        r"keras:\{mnist,fashion_mnist,cifar10\}, an \.npz file",
    ):
        load_data(missing)


# --------------------------------------------------------------------------------------------
# shard
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, world", [(100, 4), (103, 4), (7, 7), (10, 3), (55000, 8)])
def test_shard_disjoint_equal_sized_covering(n, world):
    shards = [shard(n, r, world, seed=3) for r in range(world)]
    assert all(len(s) == n // world for s in shards)
    assert all(s.dtype == np.int64 and np.all(np.diff(s) > 0) for s in shards)
    union = np.concatenate(shards)
    assert len(np.unique(union)) == len(union)  # disjoint
    assert union.min() >= 0 and union.max() < n
    assert n - len(union) == n % world  # all when divisible, exactly n % world dropped otherwise


def test_shard_deterministic_by_seed():
    np.testing.assert_array_equal(shard(1000, 1, 3, seed=5), shard(1000, 1, 3, seed=5))
    assert not np.array_equal(shard(1000, 1, 3, seed=5), shard(1000, 1, 3, seed=6))


def test_shard_single_worker_covers_all():
    np.testing.assert_array_equal(shard(17, 0, 1), np.arange(17))


@pytest.mark.parametrize(
    "n, rank, world, error, match",
    [
        (10, 0, 0, ValueError, r"`world_size` must be in \[1, inf\]. Received: world_size=0"),
        (10, 0, True, TypeError, r"`world_size` must be an integer. Received: world_size=True"),
        (10, 2, 2, ValueError, r"`rank` must be in \[0, 1\]. Received: rank=2"),
        (10, -1, 2, ValueError, r"`rank` must be in \[0, 1\]. Received: rank=-1"),
        (10, 0.0, 2, TypeError, r"`rank` must be an integer. Received: rank=0.0"),
        (
            3,
            0,
            4,
            ValueError,
            r"Cannot shard 3 examples over 4 workers. Received: n=3, world_size=4",
        ),
    ],
)
def test_shard_bad_arguments_raise(n, rank, world, error, match):
    with pytest.raises(error, match=match):
        shard(n, rank, world)


# --------------------------------------------------------------------------------------------
# make_dataset
# --------------------------------------------------------------------------------------------


def test_make_dataset_static_batch_shapes_drop_remainder():
    x = np.random.default_rng(0).random((70, 28, 28, 1), dtype=np.float32)
    y = (np.arange(70) % 10).astype(np.int32)
    ds = make_dataset(x, y, 32, seed=1)
    assert tuple(ds.element_spec[0].shape) == (32, 28, 28, 1)
    assert tuple(ds.element_spec[1].shape) == (32,)
    batches = list(ds)
    assert len(batches) == 2
    assert all(tuple(b[0].shape) == (32, 28, 28, 1) for b in batches)


def test_make_dataset_no_shuffle_keeps_order_and_repeat_repeats():
    x = np.zeros((8, 28, 28, 1), np.float32)
    y = np.arange(8, dtype=np.int32)
    first = next(iter(make_dataset(x, y, 4, shuffle=False)))
    np.testing.assert_array_equal(first[1].numpy(), [0, 1, 2, 3])
    assert len(list(make_dataset(x, y, 4, shuffle=False, repeat=True).take(5))) == 5


def test_make_dataset_batch_larger_than_data_raises():
    x = np.zeros((8, 28, 28, 1), np.float32)
    with pytest.raises(
        ValueError, match=r"at most the number of examples \(8\). Received: batch_size=16"
    ):
        make_dataset(x, np.zeros(8, np.int32), 16)
