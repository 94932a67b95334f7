"""Certified bounds (advtrain.bounds): soundness against sampled and attacked points, tightness
order, exactness where the answer is known, and the refusal of layers without a bound."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from advtrain import attacks, bounds

L = keras.layers


def _dense_net(seed=0, shape=(6, 6, 1), classes=4):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(shape),
            L.Flatten(),
            L.Dense(24, activation="relu"),
            L.Dense(16),
            L.ReLU(),
            L.Dense(classes),
        ]
    )


def _conv_net(seed=0, shape=(8, 8, 2), classes=4):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(shape),
            L.Rescaling(2.0, offset=-1.0),
            L.Conv2D(4, 3, padding="same", activation="relu"),
            L.MaxPooling2D(2),
            L.Conv2D(6, 3, strides=2, padding="same"),
            L.Activation("relu"),
            L.Flatten(),
            L.Dropout(0.5),
            L.Dense(12, activation="relu"),
            L.Dense(classes),
        ]
    )


def _residual_net(seed=0, shape=(8, 8, 1), classes=3):
    keras.utils.set_random_seed(seed)
    inp = keras.Input(shape)
    x = L.Normalization(mean=0.5, variance=0.09)(inp)
    x = L.Conv2D(4, 3, padding="same")(x)
    bn = L.BatchNormalization()
    h = L.ReLU()(bn(x))
    h = L.Conv2D(4, 3, padding="same", activation="relu")(h)
    x = L.Add()([x, h])
    x = L.AveragePooling2D(2)(x)
    x = L.GlobalAveragePooling2D()(L.ReLU()(x))
    model = keras.Model(inp, L.Dense(classes)(x))
    # Non-trivial inference statistics, one negative scale: BN must be treated as affine, not
    # monotone.
    bn.set_weights(
        [
            np.array([1.5, -0.7, 0.9, 1.1], "f"),
            np.array([0.1, 0.0, -0.2, 0.3], "f"),
            np.array([0.05, -0.1, 0.0, 0.2], "f"),
            np.array([0.5, 2.0, 1.0, 0.3], "f"),
        ]
    )
    return model


MODELS = {"dense": _dense_net, "conv": _conv_net, "residual": _residual_net}


def _margins(model, x, y):
    z = np.asarray(model(x, training=False))
    return z[np.arange(len(y)), y][:, None] - z


def _ball_points(x, eps, norm, k, rng):
    """k points per example in the eps-ball within [0, 1] (clipping keeps an l2 point in the
    ball)."""
    n, d = len(x), int(np.prod(x.shape[1:]))
    if norm == "linf":
        delta = rng.uniform(-eps, eps, (k, n, d))
        delta[: k // 2] = np.sign(delta[: k // 2]) * eps  # vertices: where linear pieces peak
    else:
        v = rng.normal(size=(k, n, d))
        delta = (
            v
            / np.linalg.norm(v, axis=-1, keepdims=True)
            * eps
            * rng.uniform(0.5, 1, (k, n, 1)) ** (1 / d)
        )
    pts = np.clip(x.reshape(1, n, d) + delta, 0, 1).astype(np.float32)
    return pts.reshape(k * n, *x.shape[1:])


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.3)])
@pytest.mark.parametrize("name", list(MODELS))
def test_bounds_contain_sampled_and_attacked_margins(name, norm, eps):
    model = MODELS[name]()
    rng = np.random.default_rng(1)
    shape = model.input_shape[1:]
    x = rng.uniform(0, 1, (6, *shape)).astype(np.float32)
    y = np.argmax(model(x), -1).astype(np.int32)
    k = 200
    pts = _ball_points(x, eps, norm, k, rng)
    sampled = _margins(model, pts, np.tile(y, k)).reshape(k, len(x), -1).min(0)
    adv = attacks.pgd(model, x, y, eps=eps, steps=30, norm=norm, loss="margin").numpy()
    attacked = _margins(model, adv, y)
    for method in bounds.METHODS:
        lb = bounds.margin_lower_bounds(model, x, y, eps=eps, norm=norm, method=method).numpy()
        assert np.all(lb <= sampled + 1e-4), (method, (lb - sampled).max())
        assert np.all(lb <= attacked + 1e-4), (method, (lb - attacked).max())
        assert np.allclose(lb[np.arange(len(y)), y], 0.0)


@pytest.mark.parametrize("name", list(MODELS))
def test_crown_is_tighter_than_crown_ibp_than_ibp_on_average(name):
    model = MODELS[name](seed=3)
    x = np.random.default_rng(2).uniform(0, 1, (16, *model.input_shape[1:])).astype(np.float32)
    y = np.argmax(model(x), -1).astype(np.int32)
    mean = {
        m: float(tf.reduce_mean(bounds.margin_lower_bounds(model, x, y, eps=0.02, method=m)))
        for m in bounds.METHODS
    }
    assert mean["crown"] >= mean["crown-ibp"] - 1e-6 >= mean["ibp"] - 2e-6, mean


def test_bounds_equal_brute_force_on_a_two_input_net():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((2,)), L.Dense(5, activation="relu"), L.Dense(3)])
    x = np.array([[0.4, 0.6]], np.float32)
    y = np.array([int(np.argmax(model(x)))], np.int32)
    grid = np.linspace(-1, 1, 201)

    def brute(eps):
        pts = np.clip(x + eps * np.array(list(itertools.product(grid, grid)), np.float32), 0, 1)
        return _margins(model, pts, np.repeat(y, len(pts))).min(0)

    # Small enough that no ReLU is unstable: the net is linear on the box, so the backward
    # relaxations are exact (a linear function's minimum over a box is at a vertex, which the grid
    # contains); IBP, which boxes the hidden layer, stays below.
    lo, hi = bounds._ibp(bounds._plan(model), tf.constant(x), 1e-3, "linf")[1]
    assert np.all((lo.numpy() > 0) | (hi.numpy() < 0))
    for method in ("crown-ibp", "crown"):
        lb = bounds.margin_lower_bounds(model, x, y, eps=1e-3, method=method).numpy()[0]
        np.testing.assert_allclose(lb, brute(1e-3), atol=1e-5)
    assert np.all(
        bounds.margin_lower_bounds(model, x, y, eps=1e-3, method="ibp").numpy()[0]
        <= brute(1e-3) + 1e-6
    )
    # Larger: the ReLUs are relaxed; every bound stays below the true minimum, CROWN closest.
    exact = brute(0.3)
    gaps = {
        m: exact - bounds.margin_lower_bounds(model, x, y, eps=0.3, method=m).numpy()[0]
        for m in bounds.METHODS
    }
    assert all(np.all(g >= -1e-5) for g in gaps.values()), gaps
    assert gaps["crown"].sum() <= gaps["ibp"].sum() + 1e-6


def test_certify_matches_margins_and_implies_clean_correct():
    model = _conv_net(seed=1)
    x = np.random.default_rng(0).uniform(0, 1, (40, 8, 8, 2)).astype(np.float32)
    pred = np.argmax(model(x), -1).astype(np.int32)
    y = pred.copy()
    y[::4] = (y[::4] + 1) % 4  # wrong labels are never certified, even at eps 0
    for method in bounds.METHODS:
        proven = bounds.certify(model, x, y, eps=0.0, method=method, batch_size=16)
        np.testing.assert_array_equal(proven[::4], False)
        assert proven[1::4].all()  # eps 0: the bound is the clean margin itself
        small = bounds.certify(model, x, pred, eps=0.01, method=method, batch_size=16)
        lb = bounds.margin_lower_bounds(model, x, pred, eps=0.01, method=method).numpy()
        lb[np.arange(len(pred)), pred] = np.inf
        np.testing.assert_array_equal(small, lb.min(1) > bounds.CERTIFY_TOL)


def test_nested_model_and_discretization_are_bounded():
    inner = _dense_net(seed=2, shape=(6, 6, 1))
    inp = keras.Input((6, 6, 1))
    q = L.Rescaling(1 / 7)(L.Discretization(bin_boundaries=[i / 8 for i in range(1, 8)])(inp))
    model = keras.Model(inp, inner(q))
    x = np.random.default_rng(4).uniform(0, 1, (8, 6, 6, 1)).astype(np.float32)
    y = np.argmax(model(x), -1).astype(np.int32)
    pts = _ball_points(x, 0.05, "linf", 100, np.random.default_rng(5))
    sampled = _margins(model, pts, np.tile(y, 100)).reshape(100, 8, -1).min(0)
    for method in bounds.METHODS:
        lb = bounds.margin_lower_bounds(model, x, y, eps=0.05, method=method).numpy()
        assert np.all(lb <= sampled + 1e-4)


class _Custom(keras.layers.Layer):
    def call(self, x):
        return x * 2.0


@pytest.mark.parametrize(
    "layer,name",
    [
        (L.Dense(8, activation="tanh", name="squash"), "squash"),
        (_Custom(name="mine"), "mine"),
        (L.LeakyReLU(name="leaky"), "leaky"),
    ],
)
def test_unsupported_layer_is_refused_by_name(layer, name):
    model = keras.Sequential([keras.Input((4,)), layer, L.Dense(3)])
    with pytest.raises(
        bounds.UnsupportedLayerError, match=rf"layer '{name}' \(\w+\) cannot be bounded"
    ):
        bounds.check_supported(model)
    with pytest.raises(bounds.UnsupportedLayerError):
        bounds.certify(model, np.zeros((2, 4), np.float32), np.zeros(2, np.int32), eps=0.1)


def test_certify_rejects_bad_arguments():
    model = _dense_net()
    x, y = np.zeros((2, 6, 6, 1), np.float32), np.zeros(2, np.int32)
    with pytest.raises(ValueError, match=r"`method` must be one of .* Received: method='lp'"):
        bounds.certify(model, x, y, eps=0.1, method="lp")
    with pytest.raises(ValueError, match=r"`eps` must be in \[0.0, 1\] .* Received: eps=1.5"):
        bounds.certify(model, x, y, eps=1.5)
    with pytest.raises(ValueError, match=r"`x` must be finite and in \[0, 1\]"):
        bounds.certify(model, x + 2, y, eps=0.1)
