"""Square attack (Andriushchenko, Croce, Flammarion and Hein 2020, arXiv:1912.00049).

A score-based black-box attack: it reads the model's logits only, never its gradient, so a
masked or obfuscated gradient (quantised inputs, non-differentiable layers) does not stop it.
Threat model: an input x in [0, 1]^(H x W x C) may be replaced by any x' with ||x' - x|| <= eps
(linf or l2), staying in [0, 1]. Each query proposes a random square-shaped change of the best
point so far and keeps it if the margin loss falls; AutoAttack (Croce and Hein 2020,
arXiv:2003.01690) runs it with 5,000 queries, p_init = 0.8 and the margin loss, as here.

The whole search runs inside one `tf.function` (`tf.while_loop`): randomness is stateless and
seeded from (seed, iteration), so a seed gives the same result, and nothing is copied to numpy
between queries. An example is frozen once fooled; each iteration queries the model on the
examples still to fool only, and the loop stops when all are fooled or the budget is spent.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf

from advtrain.checks import check_attack_inputs
from advtrain.config import AttackConfig, check_eps_fits
from advtrain.graphs import compiled

__all__ = ["square", "square_graph"]

CLIP_MIN, CLIP_MAX = 0.0, 1.0

# AutoAttack's schedule: p = p_init / 2**k once the iteration, rescaled to 10,000 queries, has
# passed k of these marks (`SquareAttack.p_selection`).
_P_MARKS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


# --------------------------------------------------------------------------------------------
# Loss and schedule
# --------------------------------------------------------------------------------------------


def _margin(logits: tf.Tensor, y: tf.Tensor, y_target) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-example margin to minimise and success flag.

    Untargeted: z_y - max_{i != y} z_i, success when argmax != y. Targeted: max_{i != t} z_i - z_t,
    success when argmax == t. A negative margin always means success (ties at 0 go by argmax).
    """
    logits = tf.cast(logits, tf.float32)
    label = y if y_target is None else y_target
    own = tf.gather(logits, label, axis=-1, batch_dims=1)
    mask = tf.one_hot(label, tf.shape(logits)[-1], on_value=True, off_value=False)
    other = tf.reduce_max(tf.where(mask, tf.fill(tf.shape(logits), -np.inf), logits), axis=-1)
    pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
    if y_target is None:
        return own - other, pred != y
    return other - own, pred == y_target


def _p_selection(i, queries, p_init):
    """Fraction of pixels to change at iteration i: p_init halved at `_P_MARKS`, rescaled so the
    schedule spans `queries` instead of 10,000."""
    it = (tf.cast(i, tf.int64) * 10000) // tf.cast(queries, tf.int64)
    k = tf.reduce_sum(tf.cast(it > tf.constant(_P_MARKS, tf.int64), tf.float64))
    return tf.cast(p_init, tf.float64) * tf.pow(tf.constant(0.5, tf.float64), k)


def _side(p, h: int, w: int, norm: str):
    """Side of the square: round(sqrt(p * H * W)), at least 1 (linf) or an odd number >= 3 (l2),
    at most min(H, W) - 1 (linf, as the paper's code) or min(H, W) (l2, as AutoAttack)."""
    s = tf.cast(tf.round(tf.sqrt(p * float(h * w))), tf.int32)
    if norm == "linf":
        return tf.clip_by_value(s, 1, max(min(h, w) - 1, 1))
    s = tf.maximum(s, 3)
    s = s + 1 - s % 2
    return tf.minimum(s, min(h, w))


# --------------------------------------------------------------------------------------------
# Geometry: squares, signs and AutoAttack's l2 window pattern
# --------------------------------------------------------------------------------------------


def _per_example(v: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """Reshapes a (batch,) tensor to broadcast against `like` (batch, ...)."""
    return tf.reshape(v, [-1] + [1] * (len(like.shape) - 1))


def _l2_norm(v: tf.Tensor, axis=(1, 2, 3)) -> tf.Tensor:
    return tf.sqrt(tf.reduce_sum(tf.square(v), axis=axis, keepdims=True))


def _signs(seed, shape) -> tf.Tensor:
    """Uniform random +-1 of the given shape."""
    return tf.where(tf.random.stateless_uniform(shape, seed) < 0.5, -1.0, 1.0)


def _corners(u, h: int, w: int, s) -> tuple[tf.Tensor, tf.Tensor]:
    """Top-left corners of squares of side s from uniforms u (2, n) in [0, 1), uniform over all
    positions inside H x W."""
    vh = tf.cast(tf.floor(u[0] * tf.cast(h - s + 1, tf.float32)), tf.int32)
    vw = tf.cast(tf.floor(u[1] * tf.cast(w - s + 1, tf.float32)), tf.int32)
    return vh, vw


def _square_mask(vh, vw, s, h: int, w: int) -> tf.Tensor:
    """(n, H, W, 1) float mask of one s x s square per example at corner (vh, vw)."""
    rows = tf.range(h)[None, :]
    cols = tf.range(w)[None, :]
    in_rows = (rows >= vh[:, None]) & (rows < vh[:, None] + s)
    in_cols = (cols >= vw[:, None]) & (cols < vw[:, None] + s)
    return tf.cast(in_rows[:, :, None, None] & in_cols[:, None, :, None], tf.float32)


def _rectangle(i, j, nx, ny, inv_sq_cumsum):
    """AutoAttack's `eta_rectangles(nx, ny)` at integer coordinates (i, j), 0 outside, unit l2.

    The loop there adds 1 / (k + 1)^2 on concentric squares of half-width k around
    (nx // 2, ny // 2), k = 0 .. max(nx // 2, ny // 2); so a cell at Chebyshev distance m from
    the centre holds sum_{k=m}^{K-1} 1 / (k + 1)^2, read off a cumulative table.
    """
    big_k = tf.maximum(nx // 2 + 1, ny // 2 + 1)
    m = tf.maximum(tf.abs(i - nx // 2), tf.abs(j - ny // 2))
    m = tf.minimum(m, big_k)
    value = tf.gather(inv_sq_cumsum, big_k) - tf.gather(inv_sq_cumsum, m)
    inside = (i >= 0) & (i < nx) & (j >= 0) & (j < ny)
    value = tf.where(inside, value, 0.0)
    return tf.math.divide_no_nan(value, tf.sqrt(tf.reduce_sum(tf.square(value))))


def _eta(s, size: int) -> tf.Tensor:
    """AutoAttack's l2 window `eta(s)` (before its random transpose), in the top-left s x s
    corner of a (size, size) grid: a positive pseudo-Gaussian bump on the top s // 2 rows, a
    negative one below, unit l2 norm."""
    k = np.arange(1, size + 2, dtype=np.float32)
    inv_sq_cumsum = tf.constant(np.concatenate([[0.0], np.cumsum(1.0 / k**2)]).astype(np.float32))
    i = tf.range(size)[:, None]
    j = tf.range(size)[None, :]
    top = _rectangle(i, j, s // 2, s, inv_sq_cumsum)
    bottom = _rectangle(i - s // 2, j, s - s // 2, s, inv_sq_cumsum)
    delta = top - bottom
    return delta / tf.sqrt(tf.reduce_sum(tf.square(delta)))


def _place_eta(eta, vh, vw, transpose, h: int, w: int) -> tf.Tensor:
    """(n, H, W, 1): the (size, size) window `eta` put at each corner, transposed where asked."""
    size = eta.shape[0]
    li = tf.clip_by_value(tf.range(h)[None, :] - vh[:, None], 0, size - 1)[:, :, None]
    lj = tf.clip_by_value(tf.range(w)[None, :] - vw[:, None], 0, size - 1)[:, None, :]
    t = transpose[:, None, None]  # tf.where broadcasts (n, 1, 1), (n, H, 1), (n, 1, W) to (n, H, W)
    return tf.gather_nd(eta, tf.stack([tf.where(t, lj, li), tf.where(t, li, lj)], -1))[..., None]


# --------------------------------------------------------------------------------------------
# Initial points and proposals (AutoAttack's `attack_single_run`)
# --------------------------------------------------------------------------------------------


def _init_linf(x, eps, seed):
    """Vertical stripes: each column and channel shifted by +-eps."""
    shape = tf.shape(x)
    signs = _signs(seed, tf.stack([shape[0], 1, shape[2], shape[3]]))
    return tf.clip_by_value(x + eps * signs, CLIP_MIN, CLIP_MAX)


def _init_l2(x, eps, seed):
    """A centred grid of tiles of side min(H, W) // 5, each an `eta` window, randomly transposed,
    with a random sign per channel; then scaled to l2 norm eps."""
    _, h, w, c = x.shape
    batch = tf.shape(x)[0]
    t = max(min(h, w) // 5, 1)
    n_h, n_w = h // t, w // t
    eta = _eta(tf.constant(t), t)
    seeds = tf.random.experimental.stateless_split(seed, 2)
    flip = tf.random.stateless_uniform(tf.stack([batch, n_h, n_w]), seeds[0]) < 0.5
    tiles = tf.where(flip[..., None, None], tf.transpose(eta), eta)  # (batch, n_h, n_w, t, t)
    tiles = tiles[..., None] * _signs(seeds[1], tf.stack([batch, n_h, n_w, 1, 1, c]))
    delta = tf.transpose(tiles, [0, 1, 3, 2, 4, 5])  # (batch, n_h, t, n_w, t, c)
    delta = tf.reshape(delta, tf.stack([batch, n_h * t, n_w * t, c]))
    top, left = (h - n_h * t) // 2, (w - n_w * t) // 2
    delta = tf.pad(delta, [[0, 0], [top, h - n_h * t - top], [left, w - n_w * t - left], [0, 0]])
    return tf.clip_by_value(x + delta / (_l2_norm(delta) + 1e-12) * eps, CLIP_MIN, CLIP_MAX)


def _draws(seed, batch, channels: int, norm: str) -> dict[str, tf.Tensor]:
    """The random numbers of one iteration for the whole batch, each with the batch first.

    Drawn for every example and then gathered for the active ones, so an example's random
    stream does not depend on which other examples are still being attacked.
    """
    seeds = tf.random.experimental.stateless_split(seed, 4)
    out = {
        "corner": tf.random.stateless_uniform(tf.stack([batch, 2]), seeds[0]),
        "sign": _signs(seeds[1], tf.stack([batch, 1, 1, channels])),
    }
    if norm == "l2":
        out["corner2"] = tf.random.stateless_uniform(tf.stack([batch, 2]), seeds[2])
        out["transpose"] = tf.random.stateless_uniform(tf.stack([batch]), seeds[3]) < 0.5
    return out


def _propose_linf(x, x_best, eps, s, draws):
    """One square per example moved to +-eps around x (a +-2 eps step, then clipped), a random
    sign per channel."""
    _, h, w, _ = x.shape
    vh, vw = _corners(tf.transpose(draws["corner"]), h, w, s)
    step = _square_mask(vh, vw, s, h, w) * (2.0 * eps) * draws["sign"]
    lo = tf.maximum(x - eps, CLIP_MIN)
    hi = tf.minimum(x + eps, CLIP_MAX)
    return tf.clip_by_value(x_best + step, lo, hi)


def _propose_l2(x, x_best, eps, s, draws):
    """AutoAttack's l2 update: per example, window 1 gets a fresh `eta` (random sign per channel,
    random transpose) added to its normalised old content, window 2 is emptied, and the mass
    of both windows plus the unused budget goes to window 1; the whole is rescaled to norm eps."""
    _, h, w, c = x.shape
    vh, vw = _corners(tf.transpose(draws["corner"]), h, w, s)
    vh2, vw2 = _corners(tf.transpose(draws["corner2"]), h, w, s)
    m1 = _square_mask(vh, vw, s, h, w)
    m2 = _square_mask(vh2, vw2, s, h, w)
    union = tf.maximum(m1, m2)
    delta = x_best - x
    norm_w1 = _l2_norm(delta * m1, axis=(1, 2))  # per example and channel, as AutoAttack
    norm_union = _l2_norm(delta * union, axis=(1, 2))
    norm_image = _l2_norm(delta)
    eta = _place_eta(_eta(s, min(h, w)), vh, vw, draws["transpose"], h, w) * m1
    new = eta * draws["sign"] + delta * m1 / (1e-12 + norm_w1)
    budget = tf.maximum(eps**2 - norm_image**2, 0.0) / c + norm_union**2
    new = new / (1e-12 + _l2_norm(new, axis=(1, 2))) * tf.sqrt(budget)
    delta = new + delta * (1.0 - union)
    return tf.clip_by_value(x + delta / (_l2_norm(delta) + 1e-12) * eps, CLIP_MIN, CLIP_MAX)


# --------------------------------------------------------------------------------------------
# Graph-level attack
# --------------------------------------------------------------------------------------------


def square_graph(model, x, y, eps, queries, *, norm="linf", p_init=0.8, y_target=None, seed=(0, 0)):
    """Square attack as graph ops, without validation or caching (for use in a `tf.function`).

    Args:
        model: callable returning logits, called as `model(x, training=False)`.
        x: float32 (batch, H, W, C) in [0, 1]; H, W and C must be static.
        y: int32 labels, (batch,).
        eps: ball radius (scalar tensor or float).
        queries: model evaluations allowed per example, the initial point included, >= 1.
        norm: `"linf"` or `"l2"` (Python string, static).
        p_init: initial fraction of pixels changed per query, in (0, 1].
        y_target: int32 target labels, (batch,), or `None` for untargeted.
        seed: int32 pair; iteration i draws from a seed folded from it and i.

    Returns:
        `(x_adv, margin, queries_used)`: x_adv float32 shaped like x (the first point that fools
        the model, else the lowest-margin point), margin float32 (batch,) at x_adv (< 0 means
        fooled), queries_used int32 (batch,) in [1, queries].
    """
    x = tf.convert_to_tensor(x, tf.float32)
    y = tf.cast(y, tf.int32)
    y_target = None if y_target is None else tf.cast(y_target, tf.int32)
    eps = tf.cast(eps, tf.float32)
    queries = tf.cast(queries, tf.int32)
    seed = tf.cast(seed, tf.int32)
    _, h, w, _ = x.shape
    init, propose = (_init_linf, _propose_linf) if norm == "linf" else (_init_l2, _propose_l2)

    x_best = init(x, eps, tf.random.experimental.stateless_fold_in(seed, 0))
    margin, done = _margin(model(x_best, training=False), y, y_target)
    used = tf.ones_like(y)

    def body(i, x_best, margin, done, used):
        s = _side(_p_selection(i, queries, p_init), h, w, norm)
        # Only the examples still to fool are queried; their rows are gathered, updated and
        # scattered back. Proposals are drawn for the whole batch and then gathered, so an
        # example's random stream does not depend on which others are still active.
        idx = tf.where(~done)
        draws = _draws(
            tf.random.experimental.stateless_fold_in(seed, i + 1), tf.shape(x)[0], x.shape[-1], norm
        )
        draws = {k: tf.gather_nd(v, idx) for k, v in draws.items()}
        x_a = tf.gather_nd(x, idx)
        margin_a = tf.gather_nd(margin, idx)
        x_new = propose(x_a, tf.gather_nd(x_best, idx), eps, s, draws)
        margin_new, hit = _margin(
            model(x_new, training=False),
            tf.gather_nd(y, idx),
            None if y_target is None else tf.gather_nd(y_target, idx),
        )
        better = hit | (margin_new < margin_a)
        x_best = tf.tensor_scatter_nd_update(
            x_best, tf.boolean_mask(idx, better), tf.boolean_mask(x_new, better)
        )
        margin = tf.tensor_scatter_nd_update(margin, idx, tf.where(better, margin_new, margin_a))
        used = used + tf.cast(~done, tf.int32)
        done = tf.tensor_scatter_nd_update(done, idx, hit)
        return i + 1, x_best, margin, done, used

    def not_done(i, x_best, margin, done, used):
        return (i < queries - 1) & ~tf.reduce_all(done)

    _, x_best, margin, _, used = tf.while_loop(
        not_done, body, (tf.constant(0), x_best, margin, done, used), parallel_iterations=1
    )
    return x_best, margin, used


# --------------------------------------------------------------------------------------------
# Public, validated, compiled attack
# --------------------------------------------------------------------------------------------


def _check_p_init(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`p_init` must be a number. Received: p_init={value!r}")
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"`p_init` must be in (0, 1]. Received: p_init={value!r}")
    return float(value)


def square(model, x, y, *, eps, queries=5000, norm="linf", p_init=0.8, y_target=None, seed=0):
    """Square attack (Andriushchenko, Croce, Flammarion and Hein 2020, arXiv:1912.00049).

    A black-box random search on the margin loss z_y - max_{i != y} z_i of the logits (targeted:
    max_{i != t} z_i - z_t): from AutoAttack's initial point (linf: vertical stripes of +-eps;
    l2: a grid of pseudo-Gaussian tiles of norm eps), each query changes one random square of
    side about sqrt(p * H * W) and keeps the change if the margin falls. p starts at `p_init`
    and halves on AutoAttack's schedule, rescaled to `queries`. linf squares are set to +-eps
    around x (a random sign per channel); l2 moves mass from a second window into the first
    and keeps the norm at eps. Needs only the model's outputs, so gradient masking does not
    hide it. AutoAttack's standard suite runs it with 5,000 queries, p_init 0.8, margin loss.

    Each example stops at the first point that fools the model (prediction != y, or == y_target)
    and costs at most `queries` model evaluations, the initial point included; an example fooled
    at the initial point costs one. Threat model: ||x' - x|| <= eps in `norm`, x' in [0, 1].

    Args:
        model: callable returning logits, (batch, H, W, C) -> (batch, classes).
        x: float32 images in [0, 1], (batch, H, W, C) with static H, W, C.
        y: int true labels, (batch,).
        eps: ball radius, in [0, 1] for linf, [0, 28] for l2.
        queries: model evaluations per example, >= 1. Defaults to `5000`.
        norm: `"linf"` or `"l2"`. Defaults to `"linf"`.
        p_init: initial fraction of the pixels changed per query, in (0, 1]. Defaults to `0.8`.
        y_target: target labels for a targeted attack, (batch,), or `None`. Defaults to `None`.
        seed: seed of the random search, >= 0; a seed gives the same result. Defaults to `0`.

    Returns:
        float32 tensor shaped like x, within eps of x and in [0, 1]: per example the first point
        that fools the model, else the lowest-margin point found.

    Raises:
        ValueError: an argument out of range, or mismatched shapes.
        TypeError: an argument of the wrong type.

    Example:
        >>> x_adv = square(model, x, y, eps=0.3, queries=5000)
    """
    cfg = AttackConfig(name="square", eps=eps, steps=queries, norm=norm, seed=seed)
    p_init = _check_p_init(p_init)
    x, y, y_target = check_attack_inputs(x, y, y_target, images=True)
    check_eps_fits("eps", cfg.eps, cfg.norm, x.shape[1:])
    # The image shape is static in the graph (the l2 tiles depend on it): part of the key.
    key = ("square", cfg.norm, y_target is not None, tuple(x.shape[1:]))

    def build():
        def run(x, y, y_target, eps, queries, p_init, seed):
            return square_graph(
                model,
                x,
                y,
                eps,
                queries,
                norm=cfg.norm,
                p_init=p_init,
                y_target=y_target,
                seed=seed,
            )[0]

        return run

    return compiled(model, key, build)(
        x,
        y,
        y_target,
        tf.constant(cfg.eps),
        tf.constant(cfg.steps),
        tf.constant(p_init),
        tf.constant([cfg.seed, 0]),
    )
