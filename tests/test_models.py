"""Tests for advtrain.models: the registry, logits outputs and safe .keras save/load."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from advtrain.models import MODEL_BUILDERS, build_model, load_model, save_model


@pytest.fixture(scope="module")
def batch():
    return np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)


@pytest.mark.parametrize("name", sorted(MODEL_BUILDERS))
def test_build_model_registry_outputs_logits(name, batch):
    model = build_model(name, seed=0)
    assert model.name == name
    assert tuple(model.input_shape) == (None, 28, 28, 1)
    out = np.asarray(model(batch, training=False))
    assert out.shape == (4, 10) and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    # Logits, not probabilities: rows do not sum to 1 and some entries are negative.
    assert not np.allclose(out.sum(axis=1), 1.0, atol=1e-3)
    assert (out < 0).any()


def test_build_model_seed_reproducible(batch):
    a = build_model("cnn", seed=3)(batch)
    b = build_model("cnn", seed=3)(batch)
    c = build_model("cnn", seed=4)(batch)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))


def test_build_model_unknown_name_raises_listing_known():
    with pytest.raises(
        ValueError, match=r"Unknown model 'resnet50'. Expected one of: mlp, cnn, madry, resnet\."
    ):
        build_model("resnet50")


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_save_model_load_model_round_trip_identical_outputs(tmp_path, name, batch):
    model = build_model(name, seed=1)
    path = tmp_path / "sub" / f"{name}.keras"
    save_model(model, path)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    loaded = load_model(path)
    np.testing.assert_array_equal(
        np.asarray(loaded(batch, training=False)), np.asarray(model(batch, training=False))
    )


def test_load_model_safe_mode_refuses_lambda_layer(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Lambda(lambda z: z * 2.0),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    path = tmp_path / "lambda.keras"
    save_model(model, path)
    with pytest.raises(ValueError, match=r"deserialization of a `Lambda` layer.*safe_mode"):
        load_model(path)


@pytest.mark.parametrize("fn", ["save", "load"])
def test_model_io_non_keras_path_raises(tmp_path, fn):
    path = tmp_path / "model.h5"
    with pytest.raises(
        ValueError, match=r"Model files use the `\.keras` format. Received: path='.*model\.h5'"
    ):
        if fn == "save":
            save_model(build_model("mlp"), path)
        else:
            load_model(path)


def test_load_model_missing_file_raises(tmp_path):
    with pytest.raises(ValueError, match=r"Model file not found: '.*absent\.keras'"):
        load_model(tmp_path / "absent.keras")


def test_load_model_damaged_file_raises(tmp_path):
    path = tmp_path / "broken.keras"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"broken\.keras"):
        load_model(path)
