"""Tests for advtrain.square: the output contract, AutoAttack's initial points and schedule, the
query budget, determinism, validation, and strength on a trained MNIST CNN (also behind a
gradient-masking quantiser).

One small CNN is trained once per module (clean, 1 epoch on 6,000 images: ~90% clean accuracy).
Contract tests use a tiny random dense model, so they run in about a second each.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from advtrain import square as square_module
from advtrain.config import NORMS, TrainConfig
from advtrain.data import load_data
from advtrain.square import square, square_graph
from advtrain.training import fit

TOL = {"linf": 1e-6, "l2": 1e-5}
EPS = {"linf": 0.3, "l2": 2.0}


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


def _dense(shape, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input(shape), keras.layers.Flatten(), keras.layers.Dense(10)])


@pytest.fixture(scope="module")
def dense():
    return _dense((28, 28, 1))


@pytest.fixture(scope="module")
def batch():
    d = load_data()
    return np.array(d.x_test[:16], np.float32), np.array(d.y_test[:16], np.int32)


@pytest.fixture(scope="module")
def trained():
    cfg = TrainConfig(
        model="cnn",
        method="clean",
        epochs=1,
        train_size=6000,
        val_size=1000,
        probe_size=64,
        probe_steps=2,
        schedule="constant",
        seed=0,
    )
    return fit(cfg)[0]


@pytest.fixture(scope="module")
def test_data():
    d = load_data()
    return np.array(d.x_test[:128], np.float32), np.array(d.y_test[:128], np.int32)


def _constant(label):
    """A model whose logits are one-hot(label) whatever the input."""

    def model(x, training=False):
        return tf.one_hot(tf.fill(tf.shape(x)[:1], label), 10)

    return model


def _acc(model, x, y):
    return float(np.mean(np.argmax(np.asarray(model(x, training=False)), -1) == y))


def _dist(a, b, norm):
    d = (np.asarray(a, np.float64) - np.asarray(b, np.float64)).reshape(len(a), -1)
    return np.abs(d).max(axis=1) if norm == "linf" else np.sqrt(np.square(d).sum(axis=1))


def _graph(model, x, y, eps, queries, norm, seed=0, y_target=None):
    run = tf.function(
        lambda x, y: square_graph(
            model, x, y, eps, queries, norm=norm, y_target=y_target, seed=tf.constant([seed, 0])
        )
    )
    return [t.numpy() for t in run(tf.constant(x), tf.constant(y))]


# --------------------------------------------------------------------------------------------
# Contract: shape, dtype, ball, range, budget
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
@pytest.mark.parametrize(
    "shape", [(28, 28, 1), (32, 32, 3), (5, 9, 2)], ids=["mnist", "rgb", "tiny"]
)
@pytest.mark.parametrize("norm", NORMS)
def test_square_output_in_ball_range_and_shape(norm, shape, targeted):
    model = _dense(shape)
    x = np.random.default_rng(0).random((8, *shape), dtype=np.float32)
    y = np.arange(8, dtype=np.int32)
    y_target = (y + 1) % 10 if targeted else None
    eps = EPS[norm] / 3
    x_adv = square(model, x, y, eps=eps, queries=30, norm=norm, y_target=y_target)
    assert x_adv.dtype == tf.float32
    assert tuple(x_adv.shape) == x.shape
    x_adv = x_adv.numpy()
    assert np.all(_dist(x_adv, x, norm) <= eps + TOL[norm])
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


@pytest.mark.parametrize("norm", NORMS)
def test_square_graph_budget_and_success_are_consistent(dense, batch, norm):
    x, y = batch
    queries = 40
    x_adv, margin, used = _graph(dense, x, y, EPS[norm] / 4, queries, norm)
    assert used.dtype == np.int32 and used.shape == y.shape
    assert np.all((used >= 1) & (used <= queries))
    fooled = np.argmax(dense(x_adv), -1) != y
    # An example stops early only when fooled; its margin is that of x_adv.
    assert np.all(fooled[used < queries])
    np.testing.assert_allclose(margin, _margin(dense(x_adv).numpy(), y), atol=1e-4)
    assert np.all(fooled[margin < 0])


def _margin(logits, y):
    own = logits[np.arange(len(y)), y]
    other = np.where(np.eye(10, dtype=bool)[y], -np.inf, logits).max(axis=1)
    return own - other


@pytest.mark.parametrize("norm", NORMS)
def test_square_fooled_at_initial_point_costs_one_query(batch, norm):
    x, y = batch
    y = np.ones_like(y)  # the model always says 0: every initial point already fools it
    x_adv, margin, used = _graph(_constant(0), x, y, EPS[norm], 50, norm)
    np.testing.assert_array_equal(used, 1)
    assert np.all(margin < 0)
    # The result is AutoAttack's initial point: in the ball, not x itself.
    assert np.all(_dist(x_adv, x, norm) <= EPS[norm] + TOL[norm])
    assert np.all(_dist(x_adv, x, norm) > 0)


@pytest.mark.parametrize("norm", NORMS)
def test_square_unbreakable_model_spends_whole_budget(batch, norm):
    x, y = batch
    x_adv, margin, used = _graph(_constant(3), x, np.full_like(y, 3), EPS[norm], 25, norm)
    np.testing.assert_array_equal(used, 25)
    np.testing.assert_allclose(margin, 1.0)
    assert np.all(_dist(x_adv, x, norm) <= EPS[norm] + TOL[norm])


@pytest.mark.parametrize("norm", NORMS)
def test_square_zero_eps_returns_input(dense, batch, norm):
    x, y = batch
    np.testing.assert_array_equal(square(dense, x, y, eps=0.0, queries=20, norm=norm).numpy(), x)


def test_square_single_query_is_autoattack_linf_init():
    """queries=1: x + eps * (random sign per column and channel), the vertical stripes."""
    x = np.full((4, 10, 12, 2), 0.5, np.float32)
    y = np.zeros(4, np.int32)
    delta = square(_dense((10, 12, 2)), x, y, eps=0.1, queries=1).numpy() - x
    np.testing.assert_allclose(np.abs(delta), 0.1, atol=1e-6)
    # Constant down each column: vertical stripes.
    np.testing.assert_array_equal(delta, np.broadcast_to(delta[:, :1], delta.shape))


def test_square_single_query_is_autoattack_l2_init():
    """queries=1: a grid of tiles with l2 norm exactly eps when nothing is clipped."""
    x = np.full((4, 28, 28, 1), 0.5, np.float32)
    y = np.zeros(4, np.int32)
    delta = square(_dense((28, 28, 1)), x, y, eps=1.0, queries=1, norm="l2").numpy() - x
    np.testing.assert_allclose(_dist(delta, 0 * delta, "l2"), 1.0, atol=1e-5)
    # Tiles of side 28 // 5 = 5 cover rows and columns 1..25; the border stays untouched.
    assert np.all(delta[:, 0] == 0) and np.all(delta[:, 26:] == 0)
    assert np.all(delta[:, :, 0] == 0) and np.all(delta[:, :, 26:] == 0)


def test_square_schedule_follows_autoattack():
    p = [float(square_module._p_selection(i, 10000, 0.8)) for i in (0, 10, 11, 50, 51, 8000, 8001)]
    np.testing.assert_allclose(p, [0.8, 0.8, 0.4, 0.4, 0.2, 0.8 / 256, 0.8 / 512])
    # Rescaled to the budget: iteration 11 of 1,000 is iteration 110 of 10,000.
    np.testing.assert_allclose(float(square_module._p_selection(11, 1000, 0.8)), 0.2)
    # Square side: round(sqrt(p * H * W)), linf in [1, H - 1], l2 odd in [3, H].
    assert int(square_module._side(tf.constant(0.8, tf.float64), 28, 28, "linf")) == 25
    assert int(square_module._side(tf.constant(1.0, tf.float64), 28, 28, "linf")) == 27
    assert int(square_module._side(tf.constant(1e-4, tf.float64), 28, 28, "linf")) == 1
    assert int(square_module._side(tf.constant(0.4, tf.float64), 28, 28, "l2")) == 19
    assert int(square_module._side(tf.constant(1e-4, tf.float64), 28, 28, "l2")) == 3


# --------------------------------------------------------------------------------------------
# Determinism and validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
def test_square_seed_reproducible_and_other_seed_differs(dense, batch, norm):
    x, y = batch
    kw = dict(eps=EPS[norm] / 4, queries=30, norm=norm)
    a = square(dense, x, y, seed=1, **kw).numpy()
    b = square(dense, x, y, seed=1, **kw).numpy()
    c = square(dense, x, y, seed=2, **kw).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(eps=-0.1), ValueError),
        (dict(eps=1.5), ValueError),
        (dict(eps=30.0, norm="l2"), ValueError),
        (dict(eps=0.3, queries=0), ValueError),
        (dict(eps=0.3, queries=2.5), TypeError),
        (dict(eps=0.3, p_init=0), ValueError),
        (dict(eps=0.3, p_init=1.5), ValueError),
        (dict(eps=0.3, p_init=float("nan")), ValueError),
        (dict(eps=0.3, p_init="0.8"), TypeError),
        (dict(eps=0.3, norm="l1"), ValueError),
        (dict(eps=0.3, seed=-1), ValueError),
    ],
    ids=[
        "eps-neg",
        "eps-big",
        "eps-l2-big",
        "queries-0",
        "queries-float",
        "p-0",
        "p-big",
        "p-nan",
        "p-str",
        "norm-l1",
        "seed-neg",
    ],
)
def test_square_bad_argument_raises(dense, batch, kwargs, error):
    x, y = batch
    with pytest.raises(error, match="Received:"):
        square(dense, x, y, **kwargs)


def test_square_bad_shapes_raise(dense, batch):
    x, y = batch
    with pytest.raises(ValueError, match="Received:"):
        square(dense, x.reshape(len(x), -1), y, eps=0.1)
    with pytest.raises(ValueError, match="Received:"):
        square(dense, x, y[:-1], eps=0.1)
    with pytest.raises(ValueError, match="Received:"):
        square(dense, x, y, eps=0.1, y_target=y[:-1])


# --------------------------------------------------------------------------------------------
# Strength on a trained model
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_square_linf_breaks_clean_model(trained, test_data):
    x, y = test_data
    clean = _acc(trained, x, y)
    x_adv = square(trained, x, y, eps=0.3, queries=1000).numpy()
    assert clean > 0.8
    assert _acc(trained, x_adv, y) < 0.2  # measured: 0.0
    assert np.all(_dist(x_adv, x, "linf") <= 0.3 + TOL["linf"])


@pytest.mark.slow
def test_square_l2_breaks_clean_model(trained, test_data):
    x, y = test_data
    x_adv = square(trained, x, y, eps=3.0, queries=1000, norm="l2").numpy()
    assert _acc(trained, x_adv, y) < 0.25  # measured: 0.06 (clean 0.9)
    assert np.all(_dist(x_adv, x, "l2") <= 3.0 + TOL["l2"])


@pytest.mark.slow
def test_square_targeted_reaches_target(trained, test_data):
    x, y = test_data[0][:64], test_data[1][:64]
    target = (y + 1) % 10
    x_adv = square(trained, x, y, eps=0.3, queries=1000, y_target=target).numpy()
    hit = np.argmax(trained(x_adv, training=False), -1) == target
    assert hit.mean() > 0.6  # measured: 0.91


@pytest.mark.slow
def test_square_breaks_gradient_masking_quantiser(trained, test_data):
    """Inputs rounded to 8 grey levels: the input gradient vanishes, Square does not care."""

    def quantised(x, training=False):
        return trained(tf.round(x * 7.0) / 7.0, training=training)

    x, y = test_data[0][:64], test_data[1][:64]
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        total = tf.reduce_sum(quantised(xt))
    grad = tape.gradient(total, xt)
    assert grad is None or not np.any(grad.numpy())
    assert _acc(quantised, x, y) > 0.8
    x_adv = square(quantised, x, y, eps=0.3, queries=500).numpy()
    assert _acc(quantised, x_adv, y) < 0.2  # measured: 0.0
