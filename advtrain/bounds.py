"""Certified robustness: IBP and CROWN lower bounds on the classification margin.

An attack gives an upper bound on robust accuracy; a bound propagated through the network gives a
lower one. For an input x, label y and the threat-model set S = {x' : ||x' - x|| <= eps} within
[0, 1]^d, this module computes, for every class j, a number m_j with

    m_j <= min over x' in S of z_y(x') - z_j(x'),

where z are the model's logits. When m_j > 0 for every j != y, no input of S changes the
prediction: the example is certified. The margin specification (z_y - z_j) is folded into the last
linear layer, as the IBP and CROWN-IBP papers do, which is much tighter than bounding each logit.

Methods (`METHODS`):

- `ibp`: interval bound propagation (Gowal et al. 2018, arXiv:1810.12715): a box per layer,
  centre/radius form through linear layers (`c @ W + b`, `r @ |W|`), monotone layers on the ends.
- `crown-ibp` (Zhang et al. 2020, arXiv:1906.06316): IBP boxes for the intermediate layers, then one
  backward linear relaxation (CROWN) from the margin to the input. Costs about one backward pass
  with (classes) specifications; this is what certified training differentiates through.
- `crown` (Zhang et al. 2018, arXiv:1811.00866): backward relaxation for every intermediate layer
  as well (each ReLU's pre-activation bounded by its own backward pass, intersected with IBP), then
  the margin. Tighter, and its cost grows with the number of neurons: for large convolutional
  layers use `crown-ibp`.

The input set is the eps-ball intersected with [0, 1]: exactly a box for linf; for l2 every linear
bound is concretised over both the ball (Cauchy-Schwarz) and the box, and the larger lower bound is
kept (both sets contain S, so both are sound).

Keras layers covered: Dense, Conv2D (with or without a `relu` activation), ReLU / Activation
(`relu`, `linear`), Flatten, Reshape, Rescaling, Normalization, BatchNormalization (inference
statistics), AveragePooling2D, GlobalAveragePooling2D, MaxPooling2D, Add, Dropout and
Discretization (a monotone step: its output box is [f(lo), f(hi)], and CROWN treats it as a
constant box), in Sequential or functional models, nested ones included. Any other layer raises
`UnsupportedLayerError` naming it: a bound that cannot be proven is never made up.

Everything is batched TensorFlow; `ibp` and `crown-ibp` run as one compiled graph per batch shape.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from advtrain.config import CERTIFY_METHODS, NORMS, check_choice, check_eps_fits, check_number
from advtrain.graphs import compiled

__all__ = [
    "METHODS",
    "UnsupportedLayerError",
    "certify",
    "check_supported",
    "margin_lower_bounds",
    "margins_graph",
    "worst_case_logits",
]

log = logging.getLogger(__name__)

METHODS = CERTIFY_METHODS
# A margin bound must clear float32 rounding of the propagation, not only zero.
CERTIFY_TOL = 1e-5
# Floats of the largest coefficient tensor in one backward pass of `crown` (chunks of neurons).
CROWN_BUDGET = 1 << 24

BOUNDED_LAYERS = (
    "Dense",
    "Conv2D",
    "ReLU",
    "Activation(relu|linear)",
    "Flatten",
    "Reshape",
    "Rescaling",
    "Normalization",
    "BatchNormalization",
    "AveragePooling2D",
    "GlobalAveragePooling2D",
    "MaxPooling2D",
    "Add",
    "Dropout",
    "Discretization",
)


class UnsupportedLayerError(ValueError):
    """A layer the bounds do not cover; `layer` is its name."""

    def __init__(self, layer, why: str):
        self.layer = layer.name if hasattr(layer, "name") else str(layer)
        kind = type(layer).__name__
        super().__init__(
            f"layer {self.layer!r} ({kind}) cannot be bounded: {why}. Bounded layers: "
            f"{', '.join(BOUNDED_LAYERS)}"
        )


# --------------------------------------------------------------------------------------------
# The model as a list of bounded operations
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Op:
    """One bounded operation: `kind` is "linear", "add", "relu", "maxpool" or "monotone".

    Linear operations are f(x) = apply(x) + bias(); `abs_apply` is the same map with absolute
    weights (IBP radii), `transpose` its adjoint (CROWN's backward step), both on (N, *shape).
    """

    kind: str
    layer: Any
    inputs: tuple[int, ...]
    output: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    apply: Callable | None = None
    abs_apply: Callable | None = None
    transpose: Callable | None = None
    bias: Callable | None = None
    l2_radius: Callable | None = None  # ||row||_2 of a linear map on the input (l2 IBP)


@dataclasses.dataclass(frozen=True)
class _Plan:
    ops: tuple[_Op, ...]
    output: int
    input_shape: tuple[int, ...]
    classes: int
    shapes: dict  # tensor id -> per-example shape
    after_nonlinear: frozenset  # tensors with a nonlinear operation among their ancestors


def _shape(t) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape[1:])


def _relu_activation(layer) -> bool | None:
    """True for activation relu, False for linear, None for anything else."""
    act = getattr(layer, "activation", None)
    name = getattr(act, "__name__", None)
    if act is None or name == "linear":
        return False
    if name == "relu":
        return True
    return None


def _dense(layer, in_shape, out_shape):
    def kernel():
        return tf.convert_to_tensor(layer.kernel)

    def matmul(x, k, transpose_b=False):
        # tf.matmul, not an ellipsis einsum: the einsum's kernel gradient was 10x slower on CPU.
        flat = tf.reshape(x, (-1, x.shape[-1]))
        out = tf.matmul(flat, k, transpose_b=transpose_b)
        return tf.reshape(out, tf.concat([tf.shape(x)[:-1], tf.shape(out)[-1:]], 0))

    return dict(
        apply=lambda x: matmul(x, kernel()),
        abs_apply=lambda r: matmul(r, tf.abs(kernel())),
        transpose=lambda a: matmul(a, kernel(), transpose_b=True),
        bias=(lambda: tf.convert_to_tensor(layer.bias)) if layer.use_bias else None,
        l2_radius=(lambda: tf.sqrt(tf.reduce_sum(tf.square(kernel()), axis=0)))
        if len(in_shape) == 1
        else None,
    )


def _conv2d(layer, in_shape, out_shape):
    if layer.data_format != "channels_last":
        raise UnsupportedLayerError(layer, "only channels_last convolutions are bounded")
    if tuple(layer.dilation_rate) != (1, 1) or getattr(layer, "groups", 1) != 1:
        raise UnsupportedLayerError(layer, "dilated or grouped convolutions are not bounded")
    strides, padding = tuple(layer.strides), layer.padding.upper()

    def kernel():
        return tf.convert_to_tensor(layer.kernel)

    def conv(x, k):
        return tf.nn.conv2d(x, k, strides=strides, padding=padding)

    def transpose(a):
        shape = tf.concat([tf.shape(a)[:1], tf.constant(in_shape, tf.int32)], 0)
        return tf.nn.conv2d_transpose(a, kernel(), shape, strides=strides, padding=padding)

    return dict(
        apply=lambda x: conv(x, kernel()),
        abs_apply=lambda r: conv(r, tf.abs(kernel())),
        transpose=transpose,
        bias=(lambda: tf.convert_to_tensor(layer.bias)) if layer.use_bias else None,
        l2_radius=lambda: tf.sqrt(conv(tf.ones((1, *in_shape)), tf.square(kernel()))),
    )


def _elementwise(scale: Callable, offset: Callable | None):
    """y = x * scale + offset, with tensors broadcasting against (N, *shape)."""
    return dict(
        apply=lambda x: x * scale(),
        abs_apply=lambda r: r * tf.abs(scale()),
        transpose=lambda a: a * scale(),
        bias=offset,
    )


def _batch_norm(layer, in_shape, out_shape):
    if layer.axis not in (-1, len(in_shape)):
        raise UnsupportedLayerError(
            layer, f"only the channel axis is normalised (axis={layer.axis})"
        )

    def scale():
        s = tf.math.rsqrt(tf.convert_to_tensor(layer.moving_variance) + layer.epsilon)
        return s * tf.convert_to_tensor(layer.gamma) if layer.scale else s

    def offset():
        shift = -tf.convert_to_tensor(layer.moving_mean) * scale()
        return shift + tf.convert_to_tensor(layer.beta) if layer.center else shift

    return _elementwise(scale, offset)


def _rescaling(layer, in_shape, out_shape):
    return _elementwise(
        lambda: tf.cast(layer.scale, tf.float32), lambda: tf.cast(layer.offset, tf.float32)
    )


def _normalization(layer, in_shape, out_shape):
    def std():
        return tf.maximum(tf.sqrt(tf.convert_to_tensor(layer.variance)), keras.config.epsilon())

    mean = lambda: tf.convert_to_tensor(layer.mean)
    if layer.invert:
        return _elementwise(std, mean)
    return _elementwise(lambda: 1.0 / std(), lambda: -mean() / std())


def _reshape(layer, in_shape, out_shape):
    def to(shape):
        return lambda a: tf.reshape(a, (-1, *shape))

    return dict(apply=to(out_shape), abs_apply=to(out_shape), transpose=to(in_shape))


def _by_vjp(fn, in_shape):
    """The adjoint of a linear map `fn` (no weights) from its gradient, for pooling layers."""

    def transpose(a):
        z = tf.zeros(tf.concat([tf.shape(a)[:1], tf.constant(in_shape, tf.int32)], 0))
        with tf.GradientTape() as tape:
            tape.watch(z)
            out = fn(z)
        return tape.gradient(out, z, output_gradients=a)

    return transpose


def _avg_pool(layer, in_shape, out_shape):
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise UnsupportedLayerError(layer, "only channels_last pooling is bounded")
    fn = layer.call
    return dict(apply=fn, abs_apply=fn, transpose=_by_vjp(fn, in_shape))


def _global_avg_pool(layer, in_shape, out_shape):
    if getattr(layer, "data_format", "channels_last") != "channels_last" or len(in_shape) != 3:
        raise UnsupportedLayerError(layer, "only channels_last 2D pooling is bounded")
    h, w, _ = in_shape

    def fn(x):
        return tf.reduce_mean(x, axis=(1, 2), keepdims=bool(layer.keepdims))

    def transpose(a):
        a = a if layer.keepdims else a[:, None, None, :]
        return tf.broadcast_to(
            a, tf.concat([tf.shape(a)[:1], tf.constant(in_shape, tf.int32)], 0)
        ) / (h * w)

    return dict(apply=fn, abs_apply=fn, transpose=transpose)


_LINEAR = {
    keras.layers.Dense: _dense,
    keras.layers.Conv2D: _conv2d,
    keras.layers.BatchNormalization: _batch_norm,
    keras.layers.Rescaling: _rescaling,
    keras.layers.Normalization: _normalization,
    keras.layers.Flatten: _reshape,
    keras.layers.Reshape: _reshape,
    keras.layers.AveragePooling2D: _avg_pool,
    keras.layers.GlobalAveragePooling2D: _global_avg_pool,
}
_IDENTITY = (
    keras.layers.Dropout,
    keras.layers.InputLayer,
    keras.layers.SpatialDropout2D,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
    keras.layers.Identity,
)


class _Builder:
    """Walks a Keras model's graph from its output back to its input, emitting `_Op`s in
    topological order."""

    def __init__(self):
        self.ops: list[_Op] = []
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.count = 0

    def new_tensor(self, shape) -> int:
        self.count += 1
        self.shapes[self.count] = shape
        return self.count

    def walk(self, tensor, ids: dict) -> int:
        if id(tensor) in ids:
            return ids[id(tensor)]
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            raise UnsupportedLayerError("?", "the model's graph cannot be read (no Keras history)")
        layer, node_index, _ = history
        node = layer._inbound_nodes[node_index]
        inputs = [self.walk(t, ids) for t in node.input_tensors]
        if isinstance(layer, keras.layers.InputLayer) or not inputs:
            raise UnsupportedLayerError(layer, "the model has a second input")
        out = self.emit(layer, inputs, node.input_tensors, tensor)
        ids[id(tensor)] = out
        return out

    def emit(self, layer, inputs: list[int], in_tensors, out_tensor) -> int:
        in_shape, out_shape = _shape(in_tensors[0]), _shape(out_tensor)
        if isinstance(layer, keras.Model):
            return self.nested(layer, inputs)
        if isinstance(layer, keras.layers.Add):
            if any(_shape(t) != out_shape for t in in_tensors):
                raise UnsupportedLayerError(layer, "broadcasting additions are not bounded")
            return self.op("add", layer, inputs, in_shape, out_shape)
        if len(inputs) != 1:
            raise UnsupportedLayerError(
                layer, "layers with several inputs other than Add are not bounded"
            )
        if isinstance(layer, _IDENTITY):
            return inputs[0]
        if isinstance(layer, keras.layers.MaxPooling2D):
            if layer.data_format != "channels_last":
                raise UnsupportedLayerError(layer, "only channels_last pooling is bounded")
            return self.op("maxpool", layer, inputs, in_shape, out_shape)
        if isinstance(layer, keras.layers.Discretization):
            return self.op("monotone", layer, inputs, in_shape, out_shape)
        if isinstance(layer, keras.layers.ReLU):
            if (
                layer.max_value is not None
                or float(layer.negative_slope) != 0
                or float(layer.threshold) != 0
            ):
                raise UnsupportedLayerError(
                    layer, "only the plain ReLU (no max_value, slope, threshold) is bounded"
                )
            return self.op("relu", layer, inputs, in_shape, out_shape)
        for cls, parts in _LINEAR.items():
            if type(layer) is cls:  # a subclass may compute something else
                relu = _relu_activation(layer)
                if relu is None:
                    raise UnsupportedLayerError(
                        layer, f"activation {layer.activation.__name__!r} is not bounded"
                    )
                t = self.op(
                    "linear",
                    layer,
                    inputs,
                    in_shape,
                    out_shape,
                    **parts(layer, in_shape, out_shape),
                )
                return self.op("relu", layer, [t], out_shape, out_shape) if relu else t
        if type(layer) is keras.layers.Activation:
            relu = _relu_activation(layer)
            if relu is None:
                raise UnsupportedLayerError(
                    layer, f"activation {layer.activation.__name__!r} is not bounded"
                )
            return self.op("relu", layer, inputs, in_shape, out_shape) if relu else inputs[0]
        raise UnsupportedLayerError(layer, "no bound is implemented for this layer")

    def op(self, kind, layer, inputs, in_shape, out_shape, **parts) -> int:
        out = self.new_tensor(out_shape)
        self.ops.append(_Op(kind, layer, tuple(inputs), out, in_shape, out_shape, **parts))
        return out

    def nested(self, model, inputs: list[int]) -> int:
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise UnsupportedLayerError(model, "nested models must have one input and one output")
        return self.walk(model.outputs[0], {id(model.inputs[0]): inputs[0]})


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(model) -> _Plan:
    """The bounded operations of `model` (cached per model)."""
    if model in _PLANS:
        return _PLANS[model]
    inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
    if not isinstance(model, keras.Model) or not inputs or not outputs:
        raise UnsupportedLayerError(
            model,
            "only built Sequential or functional Keras models are bounded "
            "(a subclassed model has no readable graph)",
        )
    if len(inputs) != 1 or len(outputs) != 1:
        raise UnsupportedLayerError(model, "the model must have one input and one output")
    b = _Builder()
    b.shapes[0] = _shape(inputs[0])
    out = b.walk(outputs[0], {id(inputs[0]): 0})
    shape = b.shapes[out]
    if len(shape) != 1:
        raise UnsupportedLayerError(
            model, f"the output must be (batch, classes), not (batch, {shape})"
        )
    after = set()
    for op in b.ops:
        if op.kind in ("relu", "maxpool", "monotone") or any(i in after for i in op.inputs):
            after.add(op.output)
    plan = _Plan(tuple(b.ops), out, b.shapes[0], shape[0], dict(b.shapes), frozenset(after))
    _PLANS[model] = plan
    return plan


def check_supported(model) -> None:
    """Raises `UnsupportedLayerError` (one line naming the layer) unless every layer is bounded."""
    _plan(model)


# --------------------------------------------------------------------------------------------
# Interval bounds (IBP)
# --------------------------------------------------------------------------------------------


def _input_box(x, eps, norm):
    # The eps-ball's bounding box within [0, 1]: exact for linf, a superset for l2.
    return tf.maximum(x - eps, 0.0), tf.minimum(x + eps, 1.0)


def _ibp(plan: _Plan, x, eps, norm) -> dict[int, tuple[tf.Tensor, tf.Tensor]]:
    bounds = {0: _input_box(x, eps, norm)}
    for op in plan.ops:
        lo, hi = bounds[op.inputs[0]]
        if op.kind == "linear":
            c, r = (lo + hi) / 2, (hi - lo) / 2
            bias = op.bias() if op.bias is not None else 0.0
            centre, radius = op.apply(c) + bias, op.abs_apply(r)
            lo, hi = centre - radius, centre + radius
            if norm == "l2" and op.inputs[0] == 0 and op.l2_radius is not None:
                centre, radius = op.apply(x) + bias, eps * op.l2_radius()
                lo, hi = tf.maximum(lo, centre - radius), tf.minimum(hi, centre + radius)
        elif op.kind == "add":
            lo = tf.add_n([bounds[i][0] for i in op.inputs])
            hi = tf.add_n([bounds[i][1] for i in op.inputs])
        elif op.kind == "relu":
            lo, hi = tf.nn.relu(lo), tf.nn.relu(hi)
        else:  # maxpool, monotone: non-decreasing in every input
            lo, hi = _call(op.layer, lo), _call(op.layer, hi)
        bounds[op.output] = (lo, hi)
    return bounds


def _call(layer, x):
    return tf.cast(layer(x), tf.float32)


# --------------------------------------------------------------------------------------------
# Linear relaxations, backward (CROWN)
# --------------------------------------------------------------------------------------------


def _relu_relaxation(lo, hi):
    """Slopes and intercept of the ReLU's linear bounds on [lo, hi] (CROWN's adaptive lower)."""
    unstable = tf.logical_and(lo < 0, hi > 0)
    active = lo >= 0
    width = tf.where(unstable, hi - lo, tf.ones_like(hi))
    upper = tf.where(unstable, hi / width, tf.cast(active, hi.dtype))
    upper_b = tf.where(unstable, -lo * upper, tf.zeros_like(lo))
    lower = tf.where(unstable, tf.cast(hi > -lo, hi.dtype), tf.cast(active, hi.dtype))
    return lower, upper, upper_b


def _flat(a):
    return tf.reshape(a, tf.concat([[-1], tf.shape(a)[2:]], 0))


def _unflat(a, batch, k):
    return tf.reshape(a, tf.concat([[batch, k], tf.shape(a)[1:]], 0))


def _sum(a):
    """Sum over every axis but (batch, spec)."""
    return tf.reduce_sum(tf.reshape(a, tf.concat([tf.shape(a)[:2], [-1]], 0)), -1)


def _backward(plan: _Plan, a, start: int, bounds: dict, stop: Callable[[_Op], bool]):
    """Propagates the linear function a . t_start back through the graph.

    Returns (coefficients {tensor id: (B, K, *shape)}, bias (B, K)) such that, for every input in
    the set, a . t_start >= sum over tensors t of coefficient_t . t + bias, where the remaining
    tensors are the input (0) and the outputs of the operations `stop` kept (concretised by the
    caller against their intervals). Relaxations use `bounds` (intervals of every tensor).
    """
    batch, k = tf.shape(a)[0], tf.shape(a)[1]
    coeffs, bias = {start: a}, tf.zeros(tf.shape(a)[:2])

    def add(t, c):
        coeffs[t] = coeffs[t] + c if t in coeffs else c

    for op in reversed(plan.ops):
        if op.output not in coeffs or stop(op):
            continue
        a = coeffs.pop(op.output)
        pos, neg = tf.nn.relu(a), -tf.nn.relu(-a)
        if op.kind == "linear":
            if op.bias is not None:
                bias += _sum(a * op.bias())
            add(op.inputs[0], _unflat(op.transpose(_flat(a)), batch, k))
        elif op.kind == "add":
            for t in op.inputs:
                add(t, a)
        elif op.kind == "relu":
            lower, upper, upper_b = (v[:, None] for v in _relu_relaxation(*bounds[op.inputs[0]]))
            bias += _sum(neg * upper_b)
            add(op.inputs[0], pos * lower + neg * upper)
        elif op.kind == "maxpool":
            a_in, b = _maxpool_backward(op, pos, neg, bounds, batch, k)
            bias += b
            add(op.inputs[0], a_in)
        else:  # monotone step: bounded by its constant output box
            lo, hi = bounds[op.output]
            bias += _sum(pos * lo[:, None] + neg * hi[:, None])
    return coeffs, bias


def _maxpool_backward(op: _Op, pos, neg, bounds, batch, k):
    """max over a window >= the element with the largest lower bound (a selection); <= that
    element when it dominates the window (its lower bound >= every other upper bound), else <=
    the window's largest upper bound, a constant."""
    lo, hi = bounds[op.inputs[0]]
    tiled = tf.repeat(lo, k, axis=0)
    pool = op.layer.call
    with tf.GradientTape() as tape:  # the gradient of max at lo is the selection's adjoint
        tape.watch(tiled)
        out = pool(tiled)
    select_t = lambda c: _unflat(tape.gradient(out, tiled, output_gradients=_flat(c)), batch, k)
    lo_max, hi_max = pool(lo), pool(hi)
    strides = tuple(op.layer.strides)
    dominated = tf.zeros_like(lo_max, dtype=tf.bool)
    if strides == tuple(op.layer.pool_size):  # windows do not overlap: a selection is per window
        with tf.GradientTape() as t2:
            t2.watch(lo)
            chosen = pool(lo)
        picked = t2.gradient(chosen, lo) > 0
        others = pool(tf.where(picked, tf.fill(tf.shape(hi), -np.inf), hi))
        dominated = lo_max >= others
    dom = tf.cast(dominated, pos.dtype)[:, None]
    a_lin = pos + neg * dom
    b = _sum(neg * (1.0 - dom) * hi_max[:, None])
    return select_t(a_lin), b


def _concretize(coeffs: dict, bias, bounds, x, eps, norm):
    """The lower bound of sum_t c_t . t + bias over the boxes of the tensors (the input set for
    the input)."""
    total = bias
    for t, c in coeffs.items():
        lo, hi = bounds[t]
        box = _sum(tf.nn.relu(c) * lo[:, None] - tf.nn.relu(-c) * hi[:, None])
        if t == 0 and norm == "l2":
            ball = _sum(c * x[:, None]) - eps * tf.sqrt(_sum(tf.square(c)))
            box = tf.maximum(box, ball)
        total += box
    return total


def _margin_spec(y, classes: int):
    """(B, classes, classes): row j is e_y - e_j (row y is zero, so its bound is 0)."""
    onehot = tf.one_hot(y, classes)
    return onehot[:, None, :] - tf.eye(classes)[None]


def _crown_bounds(plan: _Plan, bounds: dict, x, eps, norm) -> dict:
    """Replaces the interval of every pre-activation after a nonlinearity by its intersection
    with the CROWN bound, layer by layer (eager: the neurons go in chunks)."""
    bounds = dict(bounds)
    batch = int(x.shape[0])
    largest = max(math.prod(s) for s in plan.shapes.values())
    for op in plan.ops:
        t = op.inputs[0]
        if op.kind not in ("relu", "maxpool", "monotone") or t not in plan.after_nonlinear:
            continue
        shape = plan.shapes[t]
        n = math.prod(shape)
        chunk = max(1, min(n, CROWN_BUDGET // (2 * batch * largest)))
        lows, highs = [], []
        for lo_i in range(0, n, chunk):
            idx = tf.range(lo_i, min(lo_i + chunk, n))
            eye = tf.reshape(tf.one_hot(idx, n), (1, -1, *shape))
            spec = tf.tile(tf.concat([eye, -eye], 1), (batch, 1, *([1] * len(shape))))
            coeffs, bias = _backward(plan, spec, t, bounds, stop=lambda _: False)
            lb = _concretize(coeffs, bias, bounds, x, eps, norm)
            m = lb.shape[1] // 2
            lows.append(lb[:, :m])
            highs.append(-lb[:, m:])
        lo, hi = bounds[t]
        lo = tf.maximum(lo, tf.reshape(tf.concat(lows, 1), (batch, *shape)))
        hi = tf.minimum(hi, tf.reshape(tf.concat(highs, 1), (batch, *shape)))
        bounds[t] = (lo, tf.maximum(hi, lo))
        # The operation's own output box follows from the tightened input.
        bounds.update(_forward_one(plan, op, bounds))
    return bounds


def _forward_one(plan, op, bounds):
    lo, hi = bounds[op.inputs[0]]
    if op.kind == "relu":
        out = (tf.nn.relu(lo), tf.nn.relu(hi))
    else:
        out = (_call(op.layer, lo), _call(op.layer, hi))
    # Tensors computed from this output keep their IBP boxes: sound, if looser; the next
    # nonlinearity's input is tightened again by its own backward pass.
    return {
        op.output: (
            tf.maximum(out[0], bounds[op.output][0]),
            tf.minimum(out[1], bounds[op.output][1]),
        )
    }


def margins_graph(model, x, y, eps, norm: str, methods: tuple[str, ...]) -> dict[str, tf.Tensor]:
    """Margin lower bounds for each method of `methods`, sharing one IBP pass; no validation,
    for use inside a compiled function (the certified train step).

    Returns:
        {method: (batch, classes) float32}: entry j bounds z_y - z_j from below; entry y is 0.
    """
    plan = _plan(model)
    x = tf.convert_to_tensor(x, tf.float32)
    eps = tf.cast(eps, tf.float32)
    bounds = _ibp(plan, x, eps, norm)
    spec = _margin_spec(y, plan.classes)
    out = {}
    for method in methods:
        if method == "ibp":
            # Fold the margin into the trailing linear layers, then the IBP box before them.
            coeffs, bias = _backward(
                plan, spec, plan.output, bounds, stop=lambda op: op.kind != "linear"
            )
            out[method] = _concretize(coeffs, bias, bounds, x, eps, norm)
        else:
            b = bounds if method == "crown-ibp" else _crown_bounds(plan, bounds, x, eps, norm)
            coeffs, bias = _backward(plan, spec, plan.output, b, stop=lambda _: False)
            out[method] = _concretize(coeffs, bias, b, x, eps, norm)
    return out


def worst_case_logits(margins: tf.Tensor) -> tf.Tensor:
    """Logits whose cross-entropy is the verified loss of Gowal et al. 2018: -m_j for every class
    (0 for the true class), an upper bound on the cross-entropy of any input in the set."""
    return -margins


def _check(x, y, eps, norm, method):
    method = check_choice("method", method, METHODS)
    norm = check_choice("norm", norm, NORMS)
    eps = check_number("eps", eps, low=0.0)
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    if x.ndim < 2 or y.shape != (len(x),):
        raise ValueError(
            f"`x` must be (n, ...) and `y` (n,). Received: x.shape={x.shape}, y.shape={y.shape}"
        )
    if len(x) and (not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(
            f"`x` must be finite and in [0, 1]. Received: x in [{np.nanmin(x)}, {np.nanmax(x)}]"
        )
    if x.ndim == 4:
        check_eps_fits("eps", eps, norm, x.shape[1:])
    return x, y, eps, norm, method


def margin_lower_bounds(model, x, y, *, eps, norm="linf", method="crown-ibp") -> tf.Tensor:
    """Lower bounds of z_y - z_j over the eps-ball (within [0, 1]) around each example.

    Args:
        model: a Keras model of the layers listed in the module docstring, returning logits.
        x: float32 images in [0, 1], (n, H, W, C).
        y: int labels, (n,).
        eps: ball radius, >= 0 (at most the image diameter in the norm).
        norm: `"linf"` or `"l2"`. Defaults to `"linf"`.
        method: `"ibp"`, `"crown-ibp"` or `"crown"`. Defaults to `"crown-ibp"`.

    Returns:
        float32 tensor (n, classes); entry y is 0; the example is certified when every other
        entry is positive.

    Raises:
        UnsupportedLayerError: a layer the bounds do not cover.
        ValueError: an argument out of range.
    """
    x, y, eps, norm, method = _check(x, y, eps, norm, method)
    return margins_graph(model, x, y, eps, norm, (method,))[method]


def certify(model, x, y, *, eps, norm="linf", method="crown-ibp", batch_size=256) -> np.ndarray:
    """Which examples are proven robust: no input within eps (and [0, 1]) changes the
    prediction away from the label.

    Args:
        model: see `margin_lower_bounds`.
        x: float32 images in [0, 1], (n, H, W, C).
        y: int labels, (n,).
        eps: ball radius, >= 0.
        norm: `"linf"` or `"l2"`. Defaults to `"linf"`.
        method: `"ibp"`, `"crown-ibp"` or `"crown"`. Defaults to `"crown-ibp"`.
        batch_size: examples per call, >= 1 (`crown` splits its own passes further). Defaults to
            `256`.

    Returns:
        bool numpy array (n,); True implies the clean prediction is y.

    Raises:
        UnsupportedLayerError: a layer the bounds do not cover (one line naming it).
        ValueError: an argument out of range.

    Example:
        >>> proven = certify(model, x_test[:1000], y_test[:1000], eps=0.1, method="crown-ibp")
        >>> proven.mean()
    """
    x, y, eps, norm, method = _check(x, y, eps, norm, method)
    batch_size = check_number("batch_size", batch_size, low=1, integer=True)
    plan = _plan(model)
    if len(y) and int(y.max()) >= plan.classes:
        raise ValueError(
            f"Labels exceed the model's {plan.classes} classes. Received: max label={int(y.max())}"
        )

    def build():
        def run(xb, yb, e):
            m = margins_graph(model, xb, yb, e, norm, (method,))[method]
            return _proven(m, yb, plan.classes)

        return run

    # `crown` sizes its chunks from the batch: eager, never retraced per chunk.
    run = build() if method == "crown" else compiled(model, ("certify", method, norm), build)
    n, bs = len(x), min(batch_size, max(len(x), 1))
    out = np.zeros(n, bool)
    for lo in range(0, n, bs):
        xb, yb = x[lo : lo + bs], y[lo : lo + bs]
        pad = bs - len(xb)
        if pad:  # one static shape: the last batch is padded, so the graph is traced once
            xb, yb = (
                np.concatenate([xb, np.repeat(xb[-1:], pad, 0)]),
                np.concatenate([yb, np.repeat(yb[-1:], pad)]),
            )
        out[lo : lo + bs] = run(
            tf.constant(xb), tf.constant(yb), tf.constant(eps, tf.float32)
        ).numpy()[: bs - pad]
    return out


def _proven(margins, y, classes):
    others = tf.where(tf.one_hot(y, classes) > 0, np.inf, margins)
    return tf.reduce_min(others, axis=1) > CERTIFY_TOL
