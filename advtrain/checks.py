"""Model, attack-input and attack-output checks of a robustness evaluation (AutoAttack's
`checks.py`).

`check_model` runs before any attack: the output must be logits (a final softmax layer is
removed, anything else that outputs probabilities is refused), the model deterministic, and its
output differentiable with respect to the input. `verify_adversarial` runs after every attack:
points outside the eps-ball or [0, 1], or NaNs, are an error, never a result.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "PERTURBATION_TOL",
    "AttackOutputError",
    "check_attack_inputs",
    "check_model",
    "input_gradients",
    "predict_logits",
    "verify_adversarial",
]

PERTURBATION_TOL = 1e-5


def check_attack_inputs(x, y, y_target=None, *, images: bool = False):
    """Converts an attack's inputs to tensors, checking that their shapes agree.

    Args:
        x: inputs, (batch, ...); with `images`, (batch, H, W, C) with H, W, C known.
        y: int labels, (batch,).
        y_target: target labels shaped like y, or `None`.
        images: require (batch, H, W, C) inputs (Square draws squares over H and W).

    Returns:
        (x float32, y int32, y_target int32 or None) tensors.

    Raises:
        ValueError: shapes that do not agree, naming them.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    y = tf.convert_to_tensor(y, tf.int32)
    bad_x = (len(x.shape) != 4 or None in x.shape[1:]) if images else len(x.shape) < 2
    if bad_x or len(y.shape) != 1 or x.shape[0] != y.shape[0]:
        want = "(batch, H, W, C)" if images else "(batch, ...)"
        raise ValueError(
            f"`x` must be {want} and `y` (batch,) with the same batch. "
            f"Received: x.shape={tuple(x.shape)}, y.shape={tuple(y.shape)}"
        )
    if y_target is not None:
        y_target = tf.convert_to_tensor(y_target, tf.int32)
        if tuple(y_target.shape) != tuple(y.shape):
            raise ValueError(
                f"`y_target` must have the shape of `y`. Received: y.shape={tuple(y.shape)}, "
                f"y_target.shape={tuple(y_target.shape)}"
            )
    return x, y, y_target


def predict_logits(model, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """The model's outputs on x, in batches, as a float32 numpy array (inference mode)."""
    out = [
        np.asarray(model(x[lo : lo + batch_size], training=False), dtype=np.float32)
        for lo in range(0, len(x), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def input_gradients(model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient of the cross-entropy w.r.t. the input, per example; zeros where the output does
    not depend differentiably on the input at all (`tf.round`, a cast, `argmax` in the graph)."""
    xt = tf.convert_to_tensor(x, tf.float32)
    labels = tf.convert_to_tensor(y, tf.int32)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(xt)
        logits = model(xt, training=False)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        total = tf.reduce_sum(loss)
    return tape.gradient(total, xt, unconnected_gradients=tf.UnconnectedGradients.ZERO).numpy()


class AttackOutputError(RuntimeError):
    """An attack returned points outside the threat model: a bug, never a robustness result."""


def verify_adversarial(
    x,
    x_adv,
    *,
    eps: float,
    norm: str,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    tol: float = PERTURBATION_TOL,
) -> None:
    """Checks an attack's output against the threat model, like AutoAttack's output check.

    Args:
        x: clean inputs, (n, ...).
        x_adv: attack outputs, the shape of x.
        eps: radius of the ball. norm: `"linf"` or `"l2"`.
        clip_min, clip_max: the valid input range. Defaults to `0.0`, `1.0`.
        tol: slack on eps for float rounding. Defaults to `1e-5`.

    Raises:
        AttackOutputError: a shape change, NaN or infinity, a value outside the range, or a
            perturbation larger than eps + tol; the message gives the worst value found.
    """
    x = np.asarray(x, np.float64)
    x_adv = np.asarray(x_adv, np.float64)
    if x.shape != x_adv.shape:
        raise AttackOutputError(f"Attack output has shape {x_adv.shape}, expected {x.shape}")
    bad = ~np.isfinite(x_adv)
    if bad.any():
        raise AttackOutputError(f"Attack output holds {int(bad.sum())} NaN or infinite values")
    lo, hi = float(x_adv.min(initial=clip_min)), float(x_adv.max(initial=clip_max))
    if lo < clip_min - tol or hi > clip_max + tol:
        raise AttackOutputError(
            f"Attack output spans [{lo}, {hi}], outside [{clip_min}, {clip_max}]"
        )
    delta = (x_adv - x).reshape(len(x), -1)
    dist = (
        np.abs(delta).max(axis=1, initial=0.0) if norm == "linf" else np.linalg.norm(delta, axis=1)
    )
    if dist.size and dist.max() > eps + tol:
        raise AttackOutputError(
            f"Attack output leaves the {norm} ball: max perturbation {dist.max():.6g} > "
            f"eps {eps:g} "
            f"(+{tol:g}) on {int((dist > eps + tol).sum())} of {len(x)} examples"
        )


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _strip_softmax(model, x_sample: np.ndarray):
    """A model with the same weights whose output is the logits of `model`'s final softmax."""
    from advtrain.models import strip_softmax

    refuse = (
        "The model outputs probabilities (non-negative rows summing to 1), and its last "
        "layer is not a softmax that can be removed; attacks and checks need logits. "
        "Evaluate the model without its final softmax. Received: last layer={!r}"
    )
    layers = getattr(model, "layers", None)
    if not isinstance(model, keras.Model) or not layers:
        raise ValueError(refuse.format(type(model).__name__))
    try:
        stripped = strip_softmax(model)
    except ValueError as e:
        raise ValueError(refuse.format(layers[-1].name) + f" ({e})") from None
    if stripped is None:
        raise ValueError(refuse.format(layers[-1].name))
    logits_model, name = stripped
    z = predict_logits(logits_model, x_sample)
    if not np.allclose(_softmax(z), predict_logits(model, x_sample), atol=1e-4):
        raise ValueError(refuse.format(name))
    return (
        logits_model,
        f"the final softmax (layer {name!r}) was removed; logits were attacked",
    )


def check_model(model, x_sample: np.ndarray, y_sample: np.ndarray):
    """AutoAttack-style model checks, before any attack.

    Returns:
        (model, notes, gradients): the model to attack (logits), notes for the report, and the
        per-example input gradients of the cross-entropy on the sample.

    Raises:
        ValueError: probabilities from a model whose softmax cannot be removed; a randomized
            model (two forward passes differ); an output that is not (batch, classes >= 2) or
            labels out of range. A model without input gradients is not refused: the
            zero-gradients flag fails, and the suite's gradient-free Square attack evaluates it.
    """
    notes = []
    out = predict_logits(model, x_sample)
    if out.ndim != 2 or out.shape[1] < 2:
        raise ValueError(
            "The model must output (batch, classes >= 2) logits. "
            f"Received: output shape={out.shape}"
        )
    if int(y_sample.max()) >= out.shape[1]:
        raise ValueError(
            f"Labels exceed the model's {out.shape[1]} classes. "
            f"Received: max label={int(y_sample.max())}"
        )
    if np.all(out >= 0) and np.allclose(out.sum(axis=1), 1.0, atol=1e-4):
        model, note = _strip_softmax(model, x_sample)
        notes.append(note)
        out = predict_logits(model, x_sample)
    again = predict_logits(model, x_sample)
    if not np.allclose(out, again, rtol=0, atol=1e-5 * max(1.0, float(np.abs(out).max()))):
        raise ValueError(
            "The model is randomized: two forward passes on the same inputs differ "
            f"(max difference {float(np.abs(out - again).max()):.3g}). This evaluation assumes a "
            "deterministic model; a randomized defense needs EOT attacks, which are not "
            "implemented."
        )
    grads = input_gradients(model, x_sample, y_sample)
    return model, notes, grads
