"""Tests of advtrain.bpda: finding the layers without a useful gradient, and the straight-through
surrogate (same forward values, identity backward through those layers, shared weights).

Small untrained models on random images: no training, a few forward passes each.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from advtrain.bpda import (
    StraightThrough,
    bpda_surrogate,
    find_gradient_free_layers,
    straight_through_model,
)

L = keras.layers
SHAPE = (12, 12, 1)


class RoundInput(L.Layer):
    """Input quantised to 8 grey levels; `keep_path` adds 0 * x (an exact zero gradient
    instead of none)."""

    def __init__(self, keep_path=True, **kwargs):
        super().__init__(**kwargs)
        self.keep_path = keep_path

    def call(self, x):
        q = tf.round(x * 8.0) / 8.0
        return q + 0.0 * x if self.keep_path else q


def _head(seed=0):
    init = keras.initializers.GlorotUniform
    return keras.Sequential(
        [
            keras.Input(SHAPE),
            L.Conv2D(4, 3, activation="relu", kernel_initializer=init(seed)),
            L.Flatten(),
            L.Dense(10, kernel_initializer=init(seed + 1)),
        ],
        name="head",
    )


def _x(n=16):
    return np.random.default_rng(0).random((n, *SHAPE), dtype=np.float32)


def _discretized(head):
    inp = keras.Input(SHAPE)
    levels = L.Discretization(bin_boundaries=[i / 8 for i in range(1, 8)], name="quantise")(inp)
    return keras.Model(inp, head(L.Rescaling(1 / 7)(levels)))


def _input_gradient(model, x):
    xt = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        total = tf.reduce_sum(model(xt, training=False) ** 2)
    return tape.gradient(total, xt, unconnected_gradients=tf.UnconnectedGradients.ZERO).numpy()


QUANTISERS = {
    "discretization": lambda head: _discretized(head),
    "rounding-zero-gradient": lambda head: keras.Sequential(
        [keras.Input(SHAPE), RoundInput(name="quantise"), head]
    ),
    "rounding-no-gradient": lambda head: keras.Sequential(
        [keras.Input(SHAPE), RoundInput(keep_path=False, name="quantise"), head]
    ),
    "cast-lambda": lambda head: keras.Sequential(
        [
            keras.Input(SHAPE),
            L.Lambda(
                lambda x: tf.cast(tf.cast(x * 255.0, tf.uint8), tf.float32) / 255.0, name="quantise"
            ),
            head,
        ]
    ),
}


@pytest.mark.parametrize("kind", sorted(QUANTISERS))
def test_find_gradient_free_layers_quantiser_found(kind):
    model = QUANTISERS[kind](_head())
    assert find_gradient_free_layers(model, _x()) == ("quantise",)


def test_find_gradient_free_layers_differentiable_same_shape_layers_none():
    # Softmax and LayerNormalization outputs sum to constants: a cotangent of ones would see a
    # zero gradient there, the random one does not.
    model = keras.Sequential(
        [
            keras.Input(SHAPE),
            L.Rescaling(2.0),
            L.BatchNormalization(),
            L.Dropout(0.5),
            L.LayerNormalization(axis=(1, 2, 3)),
            L.Softmax(axis=(1, 2)),
            L.Activation("relu"),
            _head(),
        ]
    )
    assert find_gradient_free_layers(model, _x()) == ()


def test_find_gradient_free_layers_nested_model_path():
    outer = keras.Sequential(
        [keras.Input(SHAPE), L.Rescaling(1.0, name="scale"), _discretized(_head())], name="outer"
    )
    (path,) = find_gradient_free_layers(outer, _x())
    assert path.endswith("/quantise") and path.count("/") == 1


def test_find_gradient_free_layers_plain_callable_empty():
    head = _head()
    assert find_gradient_free_layers(lambda x, training=False: head(x), _x()) == ()


@pytest.mark.parametrize("kind", sorted(QUANTISERS))
def test_straight_through_model_same_forward_identity_backward_shared_weights(kind):
    head, x = _head(), _x()
    model = QUANTISERS[kind](head)
    surrogate = straight_through_model(model, ("quantise",))
    np.testing.assert_array_equal(surrogate(x, training=False), model(x, training=False))
    assert not _input_gradient(model, x).any()
    assert np.all(np.abs(_input_gradient(surrogate, x)).sum(axis=(1, 2, 3)) > 0)
    # One set of weights: training the model moves the surrogate too.
    assert {id(v) for v in surrogate.weights} == {id(v) for v in model.weights}
    assert not any(isinstance(layer, StraightThrough) for layer in model.layers)


def test_straight_through_model_backward_is_the_identity_at_the_layer():
    head, x = _head(), _x()
    surrogate = straight_through_model(QUANTISERS["rounding-no-gradient"](head), "quantise")
    q = tf.round(x * 8.0) / 8.0  # the gradient of the head, taken at the quantised input
    np.testing.assert_allclose(_input_gradient(surrogate, x), _input_gradient(head, q), atol=1e-5)


def test_bpda_surrogate_without_such_layers_none():
    found = bpda_surrogate(_head(), _x())
    assert (found.model, found.layers, found.note) == (None, (), None)


def test_straight_through_model_unknown_layer_raises():
    model = QUANTISERS["discretization"](_head())
    with pytest.raises(
        ValueError, match=r"Expected some of: .*quantise.* Received: layers=\('nope',\)"
    ):
        straight_through_model(model, ("nope",))
    with pytest.raises(ValueError, match=r"Received: layers=\(\)"):
        straight_through_model(model, ())


def test_straight_through_model_subclassed_model_raises():
    class Net(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="Sequential or Functional.*Received: model=Net"):
        straight_through_model(Net(), ("quantise",))


def test_straight_through_not_a_layer_raises():
    with pytest.raises(TypeError, match="Received: layer=function"):
        StraightThrough(tf.round)
