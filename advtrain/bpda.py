"""BPDA: a straight-through surrogate of a model whose layers have no useful gradient.

Backward Pass Differentiable Approximation (Athalye et al. 2018, "Obfuscated Gradients Give a
False Sense of Security", arXiv:1802.00420): where a layer f has no useful gradient (input
quantisation such as Keras `Discretization`, rounding, casts), attack a surrogate that computes
f in the forward pass and the identity in the backward pass. The attack then follows the
gradient of the rest of the model through f, and its adversarial inputs are judged on the real
model.

`find_gradient_free_layers` finds those layers: per layer of a Sequential or Functional model
(nested models included), one tensor in, one tensor of the same shape out, and a gradient of the
output w.r.t. the input that is missing or all zero on the given batch (a random cotangent, so
layers whose outputs sum to a constant, softmax or layer normalization, are not mistaken).
`straight_through_model` builds the surrogate with `keras.models.clone_model`: each such layer
wrapped in `StraightThrough`, every other layer the original object, so the weights are shared.
`bpda_surrogate` does both and checks that the surrogate's forward equals the model's.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras.src.models.functional import Functional  # the class clone_model recurses into

__all__ = [
    "StraightThrough",
    "Surrogate",
    "bpda_surrogate",
    "find_gradient_free_layers",
    "straight_through_model",
]

log = logging.getLogger(__name__)

# Seed of the random cotangent the layer gradients are probed with (fixed: detection is
# deterministic for a model and a batch).
PROBE_SEED = (20180201, 0)


class StraightThrough(keras.layers.Layer):
    """Wraps `layer`: its output in the forward pass, the identity in the backward pass.

    The output is `stop_gradient(f(x)) + (x - stop_gradient(x))`: bit for bit f(x) (cast to x's
    float dtype), with gradient 1 w.r.t. x. The wrapped layer keeps its weights.

    Args:
        layer: a Keras layer mapping one float tensor to one tensor of the same shape.

    Example:
        >>> q = StraightThrough(keras.layers.Discretization(bin_boundaries=[0.5]))
    """

    def __init__(self, layer, **kwargs):
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                f"`layer` must be a Keras layer. Received: layer={type(layer).__name__}"
            )
        super().__init__(name=kwargs.pop("name", f"{layer.name}_bpda"), autocast=False, **kwargs)
        self.layer = layer

    def call(self, x):
        out = keras.ops.cast(self.layer(x), x.dtype)
        return keras.ops.stop_gradient(out) + (x - keras.ops.stop_gradient(x))

    def compute_output_spec(self, x):
        return keras.KerasTensor(x.shape, x.dtype)


class _Probe(keras.layers.Layer):
    """Wraps `layer` and, when called eagerly, calls `record(layer, none)`: whether the gradient
    of its output w.r.t. its input is missing or all zero. (A callable, not the dict it fills:
    Keras would track, and copy, a dict set on a layer.)"""

    def __init__(self, layer, record):
        super().__init__(name=f"{layer.name}_probe", autocast=False)
        self.layer, self._record = layer, record

    def call(self, x):
        if not tf.executing_eagerly() or not x.dtype.is_floating:
            return self.layer(x)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(x)
            out = self.layer(x)
            real = tf.cast(out, x.dtype)
        if tuple(out.shape) == tuple(x.shape):
            cotangent = tf.random.stateless_normal(tf.shape(real), PROBE_SEED, dtype=x.dtype)
            grad = tape.gradient(real, x, output_gradients=cotangent)
            self._record(self.layer, grad is None or not bool(tf.reduce_any(grad != 0)))
        return out

    def compute_output_spec(self, x):
        return self.layer.compute_output_spec(x)


def _is_graph(model) -> bool:
    return isinstance(model, (keras.Sequential, Functional))


def _walk(model, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, layer) for every layer of a Sequential/Functional model, nested models entered
    (paths `outer/inner`); input layers and the nested models themselves are left out."""
    for layer in model.layers:
        path = prefix + layer.name
        if _is_graph(layer):
            yield from _walk(layer, path + "/")
        elif not isinstance(layer, keras.layers.InputLayer):
            yield path, layer


def _same_shape_single_tensor(layer) -> bool:
    """One tensor in, one tensor out, the same shape: as built in its model's graph."""
    try:
        x, out = layer.input, layer.output
    except (AttributeError, ValueError):  # never called symbolically
        return False
    tensor = keras.KerasTensor
    return isinstance(x, tensor) and isinstance(out, tensor) and tuple(x.shape) == tuple(out.shape)


def _clone(model, wrap: dict[int, Any]):
    """`model` with each layer whose id is in `wrap` replaced by `wrap[id]`; the other layers
    are the original objects (shared weights)."""
    return keras.models.clone_model(
        model, clone_function=lambda layer: wrap.get(id(layer), layer), recursive=True
    )


def find_gradient_free_layers(model, x) -> tuple[str, ...]:
    """The layers of `model` without a useful gradient on the batch `x`.

    A layer qualifies when it takes one tensor and returns one of the same shape and the
    gradient of its output w.r.t. its input, under a random cotangent, is missing (`tf.round`,
    a cast, Keras `Discretization`) or exactly zero (`round(x) + 0 * x`) on `x`. Only
    Sequential and Functional models (and the Sequential or Functional models nested in them)
    can be inspected: any other model or callable gives `()`.

    Args:
        model: a Keras model mapping `x` to logits.
        x: float32 inputs, (batch, H, W, C), e.g. the evaluation's sample batch.

    Returns:
        The layers' paths (`"quantise"`; `"sequential/quantise"` inside a nested model), in
        the model's order; `()` when there are none.

    Example:
        >>> find_gradient_free_layers(model, x[:200])
        ('discretization',)
    """
    if not _is_graph(model):
        return ()
    layers = [(path, layer) for path, layer in _walk(model) if _same_shape_single_tensor(layer)]
    if not layers:
        return ()
    found: dict[int, bool] = {}  # id(layer) -> no gradient at every call so far

    def record(layer, none: bool) -> None:
        found[id(layer)] = found.get(id(layer), True) and none

    try:
        probe = _clone(model, {id(layer): _Probe(layer, record) for _, layer in layers})
    except Exception as e:  # noqa: BLE001 - custom layers: keras raises assorted errors
        log.info("BPDA: the model cannot be cloned (%s); no layer is approximated", e)
        return ()
    probe(tf.convert_to_tensor(x, tf.float32), training=False)
    return tuple(path for path, layer in layers if found.get(id(layer), False))


def straight_through_model(model, layers) -> keras.Model:
    """A copy of `model` with `StraightThrough` around `layers`, sharing every weight.

    Args:
        model: a Sequential or Functional Keras model.
        layers: paths of its layers, as `find_gradient_free_layers` returns them; at least one.

    Returns:
        A Keras model with the same forward values as `model` and, through `layers`, the
        identity in the backward pass.

    Raises:
        TypeError: `model` is not a Sequential or Functional model.
        ValueError: `layers` is empty or names a layer the model does not have.

    Example:
        >>> surrogate = straight_through_model(model, ("discretization",))
    """
    if not _is_graph(model):
        raise TypeError(
            "`model` must be a Sequential or Functional Keras model. "
            f"Received: model={type(model).__name__}"
        )
    layers = (layers,) if isinstance(layers, str) else tuple(layers)
    by_path = dict(_walk(model))
    unknown = [p for p in layers if p not in by_path]
    if not layers or unknown:
        raise ValueError(
            "`layers` must name one or more layers of the model. Expected some of: "
            f"{', '.join(sorted(by_path))}. Received: layers={layers!r}"
        )
    return _clone(model, {id(by_path[p]): StraightThrough(by_path[p]) for p in layers})


@dataclasses.dataclass(frozen=True)
class Surrogate:
    """What `bpda_surrogate` found.

    Args:
        model: the straight-through model to take gradients from, or `None` (no layer to
            approximate, or a surrogate whose forward differs: see `note`).
        layers: paths of the layers without a useful gradient (`find_gradient_free_layers`).
        note: why there is no surrogate although `layers` were found, or `None`.
    """

    model: Any
    layers: tuple[str, ...]
    note: str | None = None


def bpda_surrogate(model, x) -> Surrogate:
    """The layers of `model` without a useful gradient on `x`, and its straight-through
    surrogate (`straight_through_model`), checked to give the model's outputs on `x`.

    Args:
        model: a Keras model (or callable) mapping x to logits.
        x: float32 inputs, (batch, H, W, C): the evaluation's sample batch.

    Returns:
        A `Surrogate`; `Surrogate(None, ())` for a model with no such layer.
    """
    layers = find_gradient_free_layers(model, x)
    if not layers:
        return Surrogate(None, ())
    surrogate = straight_through_model(model, layers)
    x = tf.convert_to_tensor(x, tf.float32)
    want = np.asarray(model(x, training=False))
    got = np.asarray(surrogate(x, training=False))
    if want.shape != got.shape or not np.allclose(want, got, rtol=0.0, atol=1e-6):
        diff = float(np.abs(want - got).max()) if want.shape == got.shape else float("nan")
        note = (
            f"BPDA not run: the straight-through surrogate of layers {_quoted(layers)} changes "
            f"the model's outputs (max difference {diff:.3g})"
        )
        log.warning(note)
        return Surrogate(None, layers, note)
    return Surrogate(surrogate, layers)


def _quoted(layers) -> str:
    """`'a', 'b'`: layer paths as the reports name them."""
    return ", ".join(f"'{p}'" for p in layers)
