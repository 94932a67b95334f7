"""Tests of advtrain.files: the one atomic writer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from advtrain.files import copy_file, write_atomic, write_json, write_text


def test_write_text_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "report.md"
    write_text(path, "one\n")
    write_text(path, "two\n")
    assert path.read_text() == "two\n"
    assert [p.name for p in path.parent.iterdir()] == ["report.md"]


def test_write_text_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_text(tmp_path / "x.md", None)
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_failing_writer_keeps_the_old_file(tmp_path):
    path = write_text(tmp_path / "a.json", "old")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_write_atomic_keeps_the_suffix_for_format_checking_writers(tmp_path):
    seen = []
    write_atomic(tmp_path / "x.npz", lambda tmp: (seen.append(tmp), np.savez(tmp, a=np.arange(3))))
    assert seen[0].endswith(".npz")
    with np.load(tmp_path / "x.npz") as f:
        assert f["a"].tolist() == [0, 1, 2]


def test_write_json_numpy_values_and_nan_as_null(tmp_path):
    path = write_json(
        tmp_path / "m.json",
        {"acc": np.float32(0.5), "n": np.int64(3), "v": np.arange(2), "bad": float("nan")},
    )
    assert json.loads(path.read_text()) == {"acc": 0.5, "n": 3, "v": [0, 1], "bad": None}


def test_copy_file_copies_and_leaves_no_temp_files(tmp_path):
    src = write_text(tmp_path / "src.txt", "model bytes")
    dst = copy_file(src, tmp_path / "out" / "dst.txt")
    assert dst.read_text() == "model bytes" and [p.name for p in dst.parent.iterdir()] == [
        "dst.txt"
    ]
