"""Evasion attacks: FGSM, PGD (linf, l2), APGD and the gradient-free Square, one compiled graph per
batch each.

Threat model: an input x in [clip_min, clip_max]^d (MNIST: [0, 1]) may be replaced by any x' with
||x' - x|| <= eps in the chosen norm, staying in range. The attacks maximise a loss of the
model's logits (untargeted) or drive the prediction to `y_target` (targeted).

Every attack here is a pure function of (model, x, y) and keyword budget. The loops run inside
one `tf.function` (`tf.while_loop`), shapes are static, randomness is stateless and seeded, so
the same seed gives the same result and nothing is copied to numpy between steps. Compiled
graphs are cached per model and per static option, so sweeping `eps` or `steps` never retraces.

The `*_graph` functions are the same attacks without validation or caching, for use inside
another compiled function (the adversarial train step).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from advtrain.checks import check_attack_inputs
from advtrain.config import AttackConfig, check_eps_fits, check_number
from advtrain.graphs import compiled
from advtrain.square import square

__all__ = [
    "ATTACKS",
    "apgd",
    "apgd_checkpoints",
    "fgsm",
    "fgsm_graph",
    "objective",
    "pgd",
    "pgd_graph",
    "run_attack",
    "square",
]

log = logging.getLogger(__name__)

CLIP_MIN, CLIP_MAX = 0.0, 1.0


# --------------------------------------------------------------------------------------------
# Losses (per example, to be maximised by the attacker)
# --------------------------------------------------------------------------------------------


def _other_max(logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """Largest logit among the classes other than y."""
    mask = tf.one_hot(y, tf.shape(logits)[-1], on_value=True, off_value=False)
    return tf.reduce_max(tf.where(mask, tf.fill(tf.shape(logits), -np.inf), logits), axis=-1)


def _true_logit(logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    return tf.gather(logits, y, axis=-1, batch_dims=1)


def objective(logits, y, y_target=None, *, loss: str = "ce"):
    """Per-example objective the attacker ascends.

    Untargeted: cross-entropy of y (`"ce"`), the Carlini-Wagner margin
    max_{i != y} z_i - z_y (`"margin"`), or the difference of logits ratio (`"dlr"`, Croce and
    Hein 2020, arXiv:2003.01690), -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3).
    Targeted (y_target given): -CE(y_target), z_t - max_{i != t} z_i, or the targeted DLR
    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2). A callable `loss` maps logits to the
    per-example objective directly (graph-level use only).

    Returns:
        float32 tensor of shape (batch,).
    """
    if callable(loss):  # a custom objective of the logits (TRADES' KL term)
        return loss(logits)
    y = tf.cast(y, tf.int32)
    if y_target is None:
        if loss == "ce":
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        if loss == "margin":
            return _other_max(logits, y) - _true_logit(logits, y)
        top = tf.math.top_k(logits, k=3).values
        return -(_true_logit(logits, y) - _other_max(logits, y)) / (top[:, 0] - top[:, 2] + 1e-12)
    t = tf.cast(y_target, tf.int32)
    if loss == "ce":
        return -tf.nn.sparse_softmax_cross_entropy_with_logits(labels=t, logits=logits)
    if loss == "margin":
        return _true_logit(logits, t) - _other_max(logits, t)
    top = tf.math.top_k(logits, k=4).values
    denom = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12
    return -(_true_logit(logits, y) - _true_logit(logits, t)) / denom


def _success(logits, y, y_target):
    pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
    if y_target is None:
        return pred != tf.cast(y, tf.int32)
    return pred == tf.cast(y_target, tf.int32)


# --------------------------------------------------------------------------------------------
# Geometry: steps, projections and random starts in the linf and l2 balls
# --------------------------------------------------------------------------------------------


def _per_example(v: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """Reshapes a (batch,) tensor to broadcast against `like` (batch, ...)."""
    return tf.reshape(v, [-1] + [1] * (len(like.shape) - 1))


def _select_rows(mask: tf.Tensor, a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Per example, `a` where the (batch,) `mask` holds, else `b`.

    One select over (batch, features) views: on CPU a (batch, 1) condition against 2-D operands
    costs about two thirds of the 4-D broadcast select, and this runs at every attack step.
    """
    shape = tf.shape(a)
    flat = tf.where(mask[:, None], tf.reshape(a, [shape[0], -1]), tf.reshape(b, [shape[0], -1]))
    out = tf.reshape(flat, shape)
    out.set_shape(a.shape)
    return out


def _l2_norm(v: tf.Tensor) -> tf.Tensor:
    return tf.sqrt(tf.reduce_sum(tf.square(v), axis=list(range(1, len(v.shape)))) + 1e-12)


def _direction(grad: tf.Tensor, norm: str) -> tf.Tensor:
    if norm == "linf":
        return tf.sign(grad)
    return grad / _per_example(_l2_norm(grad), grad)


def _project(x_adv, x, eps, norm: str):
    """Onto the eps-ball around x, then onto [CLIP_MIN, CLIP_MAX] (which stays in the ball)."""
    delta = x_adv - x
    if norm == "linf":
        delta = tf.clip_by_value(delta, -eps, eps)
    else:
        factor = tf.minimum(1.0, eps / _l2_norm(delta))
        delta = delta * _per_example(factor, delta)
    return tf.clip_by_value(x + delta, CLIP_MIN, CLIP_MAX)


def _random_start(x, eps, norm: str, seed):
    shape = tf.shape(x)
    if norm == "linf":
        delta = tf.random.stateless_uniform(shape, seed, -1.0, 1.0) * eps
    else:
        # Uniform in the l2 ball: Gaussian direction, radius eps * u^(1/d).
        g = tf.random.stateless_normal(shape, seed)
        d = tf.cast(tf.reduce_prod(shape[1:]), tf.float32)
        u = tf.random.stateless_uniform(shape[:1], seed + 1)
        r = eps * tf.pow(u, 1.0 / d)
        delta = g / _per_example(_l2_norm(g), g) * _per_example(r, g)
    return tf.clip_by_value(x + delta, CLIP_MIN, CLIP_MAX)


def _value_and_grad(model, x, y, y_target, loss):
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(x)
        logits = model(x, training=False)
        value = objective(logits, y, y_target, loss=loss)
        total = tf.reduce_sum(value)  # per-example gradients: examples do not interact
    # A model whose output does not depend differentiably on x (tf.round, a cast) yields zeros:
    # the attack then stays put, and the gradient-free Square and the flags find the truth.
    return (
        logits,
        value,
        tape.gradient(total, x, unconnected_gradients=tf.UnconnectedGradients.ZERO),
    )


def _keep_stronger(best_x, best_loss, best_hit, x, value, hit):
    """Per example: the first successful point found, else the highest loss."""
    take = ~best_hit & (hit | (value > best_loss))
    return (
        _select_rows(take, x, best_x),
        tf.where(take, value, best_loss),
        best_hit | hit,
    )


def _projector(x, eps, norm: str) -> Callable:
    """`_project` onto the ball around a fixed x, for use at every step of an attack.

    For linf the ball and [CLIP_MIN, CLIP_MAX] are both boxes, so their intersection is the box
    [max(x - eps, min), min(x + eps, max)]: one clip against bounds computed once per attack
    instead of subtract, clip, add, clip at every step.
    """
    if norm == "linf":
        lo = tf.maximum(x - eps, CLIP_MIN)
        hi = tf.minimum(x + eps, CLIP_MAX)
        return lambda z: tf.clip_by_value(z, lo, hi)
    return lambda z: _project(z, x, eps, norm)


# --------------------------------------------------------------------------------------------
# Graph-level attacks (no validation, no caching): composable inside other tf.functions
# --------------------------------------------------------------------------------------------


def fgsm_graph(
    model,
    x,
    y,
    eps,
    *,
    step_size=None,
    norm="linf",
    loss="ce",
    random_start=False,
    y_target=None,
    seed=(0, 0),
):
    """One signed-gradient step (Goodfellow et al. 2015), or FGSM-RS with `random_start`."""
    eps = tf.cast(eps, x.dtype)
    step = eps if step_size is None else tf.cast(step_size, x.dtype)
    seed = tf.cast(seed, tf.int32)
    x0 = _random_start(x, eps, norm, seed) if random_start else x
    _, _, grad = _value_and_grad(model, x0, y, y_target, loss)
    return _project(x0 + step * _direction(grad, norm), x, eps, norm)


def pgd_graph(
    model,
    x,
    y,
    eps,
    step_size,
    steps,
    *,
    norm="linf",
    loss="ce",
    random_start=True,
    y_target=None,
    seed=(0, 0),
    track_best=False,
):
    """PGD (Madry et al. 2018): steps of ascent, each projected onto the eps-ball and [0, 1].

    With `track_best` each example keeps the first iterate that succeeds (else the highest-loss
    iterate): the loss and logits come free with each gradient, so the evaluation attack is
    strictly stronger than the last iterate at one extra forward pass, and the loop stops as
    soon as every example of the batch has succeeded (the result cannot change after that).
    Training uses the last iterate, as Madry et al. do.
    """
    return _pgd_run(
        model,
        x,
        y,
        eps,
        step_size,
        steps,
        norm=norm,
        loss=loss,
        random_start=random_start,
        y_target=y_target,
        seed=seed,
        track_best=track_best,
    )[0]


def _pgd_run(
    model, x, y, eps, step_size, steps, *, norm, loss, random_start, y_target, seed, track_best
):
    """`pgd_graph` returning (x_adv, loss, success) per example, so restarts merge without
    another forward pass. Without `track_best` the loss and success are not computed (None).

    With `track_best` the loop stops once every example of the batch has succeeded: later steps
    could not change any example's first successful iterate, so the result is the same.
    """
    eps = tf.cast(eps, x.dtype)
    step_size = tf.cast(step_size, x.dtype)
    seed = tf.cast(seed, tf.int32)
    project = _projector(x, eps, norm)
    x_adv = _random_start(x, eps, norm, seed) if random_start else tf.identity(x)

    if not track_best:

        def step(i, x_adv):
            _, _, grad = _value_and_grad(model, x_adv, y, y_target, loss)
            return i + 1, project(x_adv + step_size * _direction(grad, norm))

        _, x_adv = tf.while_loop(
            lambda i, _: i < steps, step, (tf.constant(0), x_adv), parallel_iterations=1
        )
        return x_adv, None, None

    batch = tf.shape(x)[0]
    best = (x_adv, tf.fill([batch], tf.constant(-np.inf, x.dtype)), tf.zeros([batch], tf.bool))

    def body(i, x_adv, best):
        logits, value, grad = _value_and_grad(model, x_adv, y, y_target, loss)
        best = _keep_stronger(*best, x_adv, value, _success(logits, y, y_target))
        return i + 1, project(x_adv + step_size * _direction(grad, norm)), best

    def not_done(i, x_adv, best):
        return (i < steps) & ~tf.reduce_all(best[2])

    _, x_adv, best = tf.while_loop(
        not_done, body, (tf.constant(0), x_adv, best), parallel_iterations=1
    )

    def with_last_iterate():
        logits = model(x_adv, training=False)
        value = objective(logits, y, y_target, loss=loss)
        return _keep_stronger(*best, x_adv, value, _success(logits, y, y_target))

    # The last iterate needs one forward pass, unless every example already succeeded.
    return tf.cond(tf.reduce_all(best[2]), lambda: best, with_last_iterate)


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations where APGD may halve its step: p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), scaled by `steps` (Croce and Hein 2020)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    # Rounded before ceil: 0.57 * 100 is 57.00000000000001 in floating point, which is 57, not 58.
    marks = (math.ceil(round(q * steps, 6)) for q in p[1:])
    return sorted({m for m in marks if m < steps})


def _checkpoint_masks(steps: int):
    """Per iteration: is it an APGD checkpoint, and the iterations since the previous one."""
    is_ckpt = np.zeros(steps, dtype=bool)
    interval = np.zeros(steps, dtype=np.float32)
    last = 0
    for c in apgd_checkpoints(steps):
        is_ckpt[c], interval[c], last = True, c - last, c
    return tf.constant(is_ckpt), tf.constant(interval)


def _apgd_graph(model, x, y, eps, steps: int, *, norm, loss, y_target, seed):
    """One run of APGD (Croce and Hein 2020, arXiv:2003.01690, Algorithm 1): momentum 0.75,
    step 2 * eps halved at checkpoints when the loss stalls, restarting from the best point.

    Returns (x_adv, loss, success) per example: the first successful iterate, else the
    highest-loss one. The loop stops early once every example of the batch has succeeded."""
    # Longer than most: one tf.while_loop whose body follows Algorithm 1 line by line, so the
    # step, the momentum and the checkpoint rule read together as in the paper.
    eps = tf.cast(eps, x.dtype)
    is_ckpt, interval = _checkpoint_masks(steps)
    batch = tf.shape(x)[0]
    project = _projector(x, eps, norm)

    x_k = _random_start(x, eps, norm, tf.cast(seed, tf.int32))
    logits, value, grad = _value_and_grad(model, x_k, y, y_target, loss)
    hit = _success(logits, y, y_target)
    state = dict(
        x_k=x_k,
        x_prev=x_k,
        value=value,
        grad=grad,
        step=tf.fill([batch], 2.0) * eps,
        x_best=x_k,
        loss_best=value,
        grad_best=grad,
        adv=_select_rows(hit, x_k, x),
        found=hit,
        increases=tf.zeros([batch]),
        loss_at_ckpt=value,
        reduced_at_ckpt=tf.ones([batch], tf.bool),
    )

    def body(k, s):
        s = dict(s)
        # Step from x_k with heavy-ball momentum (none on the first step).
        alpha = tf.where(k > 0, 0.75, 1.0)
        step = _per_example(s["step"], x)
        z = project(s["x_k"] + step * _direction(s["grad"], norm))
        x_next = project(
            s["x_k"] + alpha * (z - s["x_k"]) + (1.0 - alpha) * (s["x_k"] - s["x_prev"])
        )
        logits, value, grad = _value_and_grad(model, x_next, y, y_target, loss)
        hit = _success(logits, y, y_target)
        new_hit = hit & ~s["found"]
        s["adv"] = _select_rows(new_hit, x_next, s["adv"])
        s["found"] = s["found"] | hit
        s["increases"] += tf.cast(value > s["value"], tf.float32)
        better = value > s["loss_best"]
        s["x_best"] = _select_rows(better, x_next, s["x_best"])
        s["grad_best"] = _select_rows(better, grad, s["grad_best"])
        s["loss_best"] = tf.where(better, value, s["loss_best"])
        s["x_prev"], s["x_k"], s["value"], s["grad"] = s["x_k"], x_next, value, grad

        def at_checkpoint(s):
            s = dict(s)
            oscillating = s["increases"] <= 0.75 * tf.gather(interval, k)
            stalled = ~s["reduced_at_ckpt"] & (s["loss_at_ckpt"] >= s["loss_best"])
            reduce = oscillating | stalled
            s["reduced_at_ckpt"], s["loss_at_ckpt"] = reduce, s["loss_best"]
            s["step"] = tf.where(reduce, s["step"] / 2.0, s["step"])
            s["x_k"] = _select_rows(reduce, s["x_best"], s["x_k"])
            s["grad"] = _select_rows(reduce, s["grad_best"], s["grad"])
            s["increases"] = tf.zeros_like(s["increases"])
            return s

        s = tf.cond(tf.gather(is_ckpt, k), lambda: at_checkpoint(s), lambda: s)
        return k + 1, s

    _, s = tf.while_loop(
        lambda k, s: (k < steps) & ~tf.reduce_all(s["found"]),
        body,
        (tf.constant(0), state),
        parallel_iterations=1,
    )
    # Successful points first; elsewhere the highest-loss point (for merging restarts).
    return _select_rows(s["found"], s["adv"], s["x_best"]), s["loss_best"], s["found"]


# --------------------------------------------------------------------------------------------
# Public, validated, compiled attacks
# --------------------------------------------------------------------------------------------


def _with_restarts(run_once, x, restarts, seed):
    """Runs `run_once(seed) -> (x_adv, loss, success)` up to `restarts` times inside the graph,
    keeping each example's strongest; stops once every example has succeeded."""
    batch = tf.shape(x)[0]
    best = (
        tf.identity(x),
        tf.fill([batch], tf.constant(-np.inf, x.dtype)),
        tf.zeros([batch], tf.bool),
    )

    def body(r, best):
        return r + 1, _keep_stronger(
            *best, *run_once(tf.stack([seed[0], seed[1] * 1009 + r * 7919]))
        )

    def not_done(r, best):
        return (r < restarts) & ~tf.reduce_all(best[2])

    _, best = tf.while_loop(not_done, body, (tf.constant(0), best))
    return best[0]


def fgsm(
    model,
    x,
    y,
    *,
    eps,
    norm="linf",
    loss="ce",
    random_start=False,
    step_size=None,
    y_target=None,
    seed=0,
):
    """Fast Gradient Sign Method (Goodfellow et al. 2015, arXiv:1412.6572).

    x' = clip(x + eps * sign(grad_x L(model(x), y)), 0, 1) for linf (the l2 form steps along
    grad / ||grad||). With `random_start` it is FGSM-RS (Wong et al. 2020, arXiv:2001.03994):
    a uniform start in the ball, a step of `step_size` (1.25 * eps by default), then projection.

    Args:
        model: callable returning logits, (batch, 28, 28, 1) -> (batch, classes).
        x: float32 images in [0, 1], (batch, 28, 28, 1).
        y: int labels, (batch,).
        eps: ball radius, in [0, 1].
        norm: `"linf"` or `"l2"`. Defaults to `"linf"`.
        loss: `"ce"`, `"margin"` or `"dlr"`. Defaults to `"ce"`.
        random_start: FGSM-RS. Defaults to `False`.
        step_size: step length, > 0; `None` means eps (1.25 * eps with `random_start`).
        y_target: target labels for a targeted attack, or `None`. Defaults to `None`.
        seed: seed of the random start. Defaults to `0`.

    Returns:
        float32 tensor shaped like x, within eps of x and in [0, 1].

    Example:
        >>> x_adv = fgsm(model, x, y, eps=0.1)
    """
    cfg = AttackConfig(
        name="fgsm",
        eps=eps,
        steps=1,
        step_size=step_size,
        norm=norm,
        random_start=random_start,
        loss=loss,
        seed=seed,
    )
    x, y, y_target = check_attack_inputs(x, y, y_target)
    # The default is resolved after validation: eps=0 with random_start gives step 0, not an error.
    if cfg.step_size is not None:
        step = cfg.step_size
    else:
        step = 1.25 * cfg.eps if cfg.random_start else cfg.eps
    key = ("fgsm", cfg.norm, cfg.loss, cfg.random_start, y_target is not None)

    def build():
        def run(x, y, y_target, eps, step, seed):
            return fgsm_graph(
                model,
                x,
                y,
                eps,
                step_size=step,
                norm=cfg.norm,
                loss=cfg.loss,
                random_start=cfg.random_start,
                y_target=y_target,
                seed=seed,
            )

        return run

    return compiled(model, key, build)(
        x, y, y_target, tf.constant(cfg.eps), tf.constant(step), tf.constant([cfg.seed, 0])
    )


def pgd(
    model,
    x,
    y,
    *,
    eps,
    steps=40,
    step_size=None,
    norm="linf",
    loss="ce",
    random_start=True,
    restarts=1,
    y_target=None,
    seed=0,
):
    """Projected Gradient Descent attack (Madry et al. 2018, arXiv:1706.06083).

    From a uniform random start in the eps-ball, `steps` steps of gradient **ascent** on the
    loss (sign of the gradient for linf, the normalised gradient for l2), each followed by
    projection onto the eps-ball and [0, 1]. Each example keeps the first iterate that fools the
    model (else its highest-loss iterate), over all `restarts`. Steps and restarts stop early
    once every example of the batch is fooled, which never changes the result.

    Args:
        model: callable returning logits.
        x: float32 images in [0, 1], (batch, 28, 28, 1).
        y: int labels, (batch,).
        eps: ball radius, in [0, 1].
        steps: ascent steps, >= 1. Defaults to `40`.
        step_size: step length, > 0. `None` means 2.5 * eps / steps.
        norm: `"linf"` or `"l2"`. Defaults to `"linf"`.
        loss: `"ce"`, `"margin"` or `"dlr"`. Defaults to `"ce"`.
        random_start: start uniformly in the ball. Defaults to `True`.
        restarts: independent runs, >= 1; the strongest result per example is kept. Defaults to `1`.
        y_target: target labels (descend towards them), or `None`. Defaults to `None`.
        seed: seed of the random starts. Defaults to `0`.

    Returns:
        float32 tensor shaped like x, within eps of x and in [0, 1].

    Raises:
        ValueError: an argument out of range, naming it and the value.

    Example:
        >>> x_adv = pgd(model, x, y, eps=0.3, steps=40)
    """
    cfg = AttackConfig(
        name="pgd",
        eps=eps,
        steps=steps,
        step_size=step_size,
        norm=norm,
        random_start=random_start,
        restarts=restarts,
        loss=loss,
        seed=seed,
    )
    x, y, y_target = check_attack_inputs(x, y, y_target)
    key = ("pgd", cfg.norm, cfg.loss, cfg.random_start, y_target is not None)

    def build():
        def run(x, y, y_target, eps, step_size, steps, restarts, seed):
            def once(s):
                return _pgd_run(
                    model,
                    x,
                    y,
                    eps,
                    step_size,
                    steps,
                    norm=cfg.norm,
                    loss=cfg.loss,
                    random_start=cfg.random_start,
                    y_target=y_target,
                    seed=s,
                    track_best=True,
                )

            return _with_restarts(once, x, restarts, seed)

        return run

    return compiled(model, key, build)(
        x,
        y,
        y_target,
        tf.constant(cfg.eps),
        tf.constant(cfg.resolved_step_size()),
        tf.constant(cfg.steps),
        tf.constant(cfg.restarts),
        tf.constant([cfg.seed, 0]),
    )


def apgd(model, x, y, *, eps, steps=100, norm="linf", loss="ce", restarts=1, y_target=None, seed=0):
    """Auto-PGD (Croce and Hein 2020, arXiv:2003.01690): APGD-CE, APGD-DLR and targeted APGD-DLR.

    Step-size free: starts at 2 * eps, halves it at fixed checkpoints when the loss stopped
    improving (then restarts from the best point), with momentum 0.75. `loss="dlr"` with
    `y_target` is APGD-T's targeted DLR loss.

    Args:
        model: callable returning logits (DLR needs at least 4 classes).
        x: float32 images in [0, 1], (batch, 28, 28, 1).
        y: int true labels, (batch,). Targeted DLR needs them as well as `y_target`.
        eps: ball radius, in [0, 1].
        steps: iterations (gradient evaluations after the start), >= 1. Defaults to `100`.
        norm: `"linf"` or `"l2"`. Defaults to `"linf"`.
        loss: `"ce"`, `"margin"` or `"dlr"`. Defaults to `"ce"`.
        restarts: random restarts, >= 1. Defaults to `1`.
        y_target: target labels, or `None`. Defaults to `None`.
        seed: seed of the random starts. Defaults to `0`.

    Returns:
        float32 tensor shaped like x, within eps of x and in [0, 1].

    Example:
        >>> x_adv = apgd(model, x, y, eps=0.3, loss="dlr")
    """
    cfg = AttackConfig(
        name="apgd", eps=eps, steps=steps, norm=norm, restarts=restarts, loss=loss, seed=seed
    )
    x, y, y_target = check_attack_inputs(x, y, y_target)
    # steps is static here: the checkpoint schedule is baked into the graph.
    key = ("apgd", cfg.norm, cfg.loss, cfg.steps, y_target is not None)

    def build():
        def run(x, y, y_target, eps, restarts, seed):
            def once(s):
                return _apgd_graph(
                    model,
                    x,
                    y,
                    eps,
                    cfg.steps,
                    norm=cfg.norm,
                    loss=cfg.loss,
                    y_target=y_target,
                    seed=s,
                )

            return _with_restarts(once, x, restarts, seed)

        return run

    return compiled(model, key, build)(
        x, y, y_target, tf.constant(cfg.eps), tf.constant(cfg.restarts), tf.constant([cfg.seed, 0])
    )


# Square lives in its own module (`advtrain.square`): it queries logits only and shares none of the
# gradient machinery above.
ATTACKS: dict[str, Callable] = {"fgsm": fgsm, "pgd": pgd, "apgd": apgd, "square": square}


def run_attack(
    name, model, x, y, *, batch_size=256, y_target=None, on_batch=None, **kwargs
) -> np.ndarray:
    """Runs an attack over whole arrays in fixed-size batches (the last one padded, so the
    compiled graph is traced once).

    Args:
        name: a key of `ATTACKS` (`"fgsm"`, `"pgd"`, `"apgd"`, `"square"`).
        model: callable returning logits.
        x: float32 images in [0, 1], (n, 28, 28, 1).
        y: int labels, (n,).
        batch_size: examples per compiled call, >= 1. Defaults to `256`.
        y_target: target labels, (n,), or `None`.
        on_batch: called with the number of examples done after each batch (progress), or
            `None`.
        **kwargs: the attack's budget (`eps`, `steps`, ...). `seed` is combined with the batch
            index, so batches draw different random starts and the run is reproducible.

    Returns:
        float32 numpy array shaped like x.
    """
    if name not in ATTACKS:
        raise ValueError(f"Unknown attack {name!r}. Expected one of: {', '.join(sorted(ATTACKS))}.")
    check_number("batch_size", batch_size, low=1, integer=True)
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int32)
    if len(x) != len(y):
        raise ValueError(
            f"`x` and `y` must hold as many examples. Received: len(x)={len(x)}, len(y)={len(y)}"
        )
    if len(x) and (not np.all(np.isfinite(x)) or x.min() < CLIP_MIN or x.max() > CLIP_MAX):
        raise ValueError(
            f"`x` must be finite and in [{CLIP_MIN}, {CLIP_MAX}]. Received: x in "
            f"[{np.nanmin(x)}, {np.nanmax(x)}]"
        )
    if y_target is not None:
        y_target = np.asarray(y_target, dtype=np.int32)
        if y_target.shape != y.shape:
            raise ValueError(
                f"`y_target` must have the shape of `y`. Received: y.shape={y.shape}, "
                f"y_target.shape={y_target.shape}"
            )
    seed = kwargs.pop("seed", 0)
    # A numpy integer seed (from a seed array or a sweep) is as good as an int.
    seed = check_number(
        "seed", int(seed) if isinstance(seed, np.integer) else seed, low=0, integer=True
    )
    if "eps" in kwargs and x.ndim == 4:
        check_eps_fits("eps", kwargs["eps"], kwargs.get("norm", "linf"), x.shape[1:])
    attack = ATTACKS[name]
    n = len(x)
    bs = min(batch_size, max(n, 1))
    out = np.empty_like(x)
    start = time.perf_counter()
    for i, lo in enumerate(range(0, n, bs)):
        hi = min(lo + bs, n)
        xb, yb = x[lo:hi], y[lo:hi]
        tb = None if y_target is None else y_target[lo:hi]
        pad = bs - (hi - lo)
        if pad:
            xb = np.concatenate([xb, np.repeat(xb[-1:], pad, axis=0)])
            yb = np.concatenate([yb, np.repeat(yb[-1:], pad)])
            if tb is not None:
                tb = np.concatenate([tb, np.repeat(tb[-1:], pad)])
        # A distinct, reproducible seed per batch: identical batches would otherwise share starts.
        # Kept in int32, so a large seed neither overflows nor changes the traced signature.
        batch_seed = (int(seed) * 100003 + i) % 2147483647
        adv = attack(model, xb, yb, y_target=tb, seed=batch_seed, **kwargs)
        out[lo:hi] = adv.numpy()[: hi - lo]
        if on_batch is not None:
            on_batch(hi)
    log.debug("%s on %d examples: %.2fs", name, n, time.perf_counter() - start)
    return out
