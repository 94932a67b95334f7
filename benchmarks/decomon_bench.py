#!/usr/bin/env python
"""Margin lower bounds with airbus/decomon (PyPI `decomon` 0.2.1) under Keras 3.15 / TF 2.21.

Usage:
  pip install --target /tmp/decomon-lib --no-deps decomon==0.2.1
  PYTHONPATH=/tmp/decomon-lib .venv/bin/python -m benchmarks.decomon_bench MODEL.keras \
      --eps 0.1 --n 1000 --method crown|ibp|crown-ibp --batch 100 --out result.json

Bounds: lower bounds of z_y - z_j (j != y) over {x' : |x' - x|_inf <= eps} ∩ [0,1]^d.
  crown / crown-ibp: decomon's own "backward bounds" input (clone(..., back_bounds=[C])):
      the specification matrix C (per example, 10 x 9, column j = e_y - e_j) is merged into the
      final CROWN backward pass, i.e. the margin is bounded directly (last layer folded into C).
  ibp: decomon's forward IBP has no back_bounds path (convert_forward ignores it), so the margin
      is folded into the last Dense by hand (IBP-paper elision): the last Dense(10) is replaced
      by a Dense(90) with rows W_y - W_j, b_y - b_j for all ordered pairs; decomon then bounds
      that model with forward-ibp and the 9 rows of the true label are picked per example.
  --margin-mode pairs forces this all-pairs folding for crown / crown-ibp too (cross-check).

decomon method names: crown -> "crown" (CROWN for every intermediate layer), crown-ibp ->
"crown-forward-ibp" (IBP for intermediate bounds, CROWN backward for the output),
ibp -> "forward-ibp".

Compatibility patches (applied at import, nothing installed is edited):
  1. numpy 2 removed np.float_ (decomon/wrapper.py uses it in annotations at import time):
     np.float_ = np.float64 if missing.
  2. Keras >= 3.1 made Conv kernel a read-only property (LoRA); DecomonConv2D.share_weights does
     `self.kernel = layer.kernel` -> AttributeError. Replaced by `self._kernel = layer._kernel`
     (what decomon already does for DecomonDense).
  3. BatchedDiagLike.call uses len(x) / K.split on the batch axis -> TypeError on a symbolic
     tensor in graph mode (tf.function). Replaced by x[..., None] * eye(n) (same result for the
     rank-2 inputs decomon feeds it).
  BatchedIdentityLike (np.prod of the shape) works in graph mode only with a static batch size,
  so every batch is padded to --batch (one traced shape, no retrace inside the timing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

if not hasattr(np, "float_"):  # patch 1
    np.float_ = np.float64


def _parse():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--method", choices=["crown", "ibp", "crown-ibp"], default="crown")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--out", default=None)
    p.add_argument(
        "--margin-mode",
        choices=["auto", "backbounds", "pairs"],
        default="auto",
        help="auto: backbounds for crown/crown-ibp, pairs for ibp",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="TF intra/inter-op threads (0 = TF default)"
    )
    p.add_argument(
        "--sanity", type=int, default=10, help="soundness check on the first K examples (0 = off)"
    )
    p.add_argument(
        "--sanity-points",
        type=int,
        default=20,
        help="random points per example (half at box corners)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="bundled", help="advtrain.data.load_data source")
    p.add_argument(
        "--cache-toeplitz",
        action="store_true",
        help="optional speed patch (not needed for correctness): compute decomon's dense Toeplitz "
        "matrix of each Conv2D once, eagerly, and embed it as a constant, instead of rebuilding "
        "it (a ~5 GB intermediate for conv2 of the small CNN) in every call. Same bounds.",
    )
    return p.parse_args()


args = _parse()

import tensorflow as tf

if args.threads > 0:
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)

import itertools

import decomon
import decomon.keras_utils as _ku
import decomon.layers.decomon_layers as _dl
import keras
import keras.ops as K
from decomon.models import clone


def _conv_share_weights(self, layer):  # patch 2
    if not self.shared:
        return
    self._kernel = layer._kernel
    self.bias = layer.bias


_dl.DecomonConv2D.share_weights = _conv_share_weights


def _batched_diag_call(self, x):  # patch 3
    return x[..., None] * K.eye(x.shape[-1], dtype=x.dtype)


_ku.BatchedDiagLike.call = _batched_diag_call

if args.cache_toeplitz:  # optional speed patch, off by default
    import decomon.backward_layers.backward_layers as _bl

    _orig_toeplitz = _bl.get_toeplitz
    _toeplitz_cache = {}

    def _cached_toeplitz(conv_layer, flatten=True):
        key = (id(conv_layer), flatten)
        if key not in _toeplitz_cache:
            with tf.init_scope():  # eager, once
                _toeplitz_cache[key] = K.convert_to_numpy(_orig_toeplitz(conv_layer, flatten))
        return K.convert_to_tensor(_toeplitz_cache[key])

    _bl.get_toeplitz = _cached_toeplitz

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, for advtrain.data


def load_model(path):
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as first:  # noqa: BLE001 - custom advtrain layers
        try:
            import advtrain.models  # noqa: F401
        except Exception:  # noqa: BLE001 - a second loader is tried after any failure
            raise first
        return keras.models.load_model(path, compile=False)


def chain_layers(model):
    layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
    if not isinstance(model, keras.Sequential):
        # accept a functional model only if it is a plain chain
        for a, b in itertools.pairwise(layers):
            if len(b._inbound_nodes) != 1 or b._inbound_nodes[0].parent_nodes[0].operation is not a:
                raise SystemExit("only sequential (chain) models are supported by this harness")
    return layers


def build_flat(model, fold_pairs):
    """Input(d) -> Reshape -> layers[:-1] -> last Dense (linear), or the all-pairs margin Dense."""
    in_shape = tuple(model.input_shape[1:])
    d = int(np.prod(in_shape))
    layers = chain_layers(model)
    last = layers[-1]
    if not isinstance(last, keras.layers.Dense):
        raise SystemExit(f"last layer must be Dense, got {type(last).__name__}")
    W, b = (
        [np.asarray(v) for v in last.get_weights()]
        if last.use_bias
        else (np.asarray(last.get_weights()[0]), None)
    )
    if b is None:
        b = np.zeros(W.shape[1], W.dtype)
    nc = W.shape[1]
    inp = keras.Input((d,))
    h = keras.layers.Reshape(in_shape)(inp)
    for l in layers[:-1]:
        h = l(h)
    if fold_pairs:
        pairs = [(i, j) for i in range(nc) for j in range(nc) if i != j]
        Wp = np.stack([W[:, i] - W[:, j] for i, j in pairs], 1)
        bp = np.array([b[i] - b[j] for i, j in pairs], W.dtype)
        head = keras.layers.Dense(len(pairs), name="margin_pairs")
    else:
        head = keras.layers.Dense(nc, name="logits_linear")
    out = head(h)
    if fold_pairs:
        head.set_weights([Wp, bp])
    else:
        head.set_weights([W, b])
    return keras.Model(inp, out), nc, d


def spec_matrix(y, nc):
    """C[b, :, k] = e_y - e_{j_k}, j_k the k-th class != y  -> (z @ C)[k] = z_y - z_{j_k}."""
    C = np.zeros((len(y), nc, nc - 1), np.float32)
    for b_, yy in enumerate(y):
        others = [j for j in range(nc) if j != yy]
        C[b_, yy, :] = 1.0
        C[b_, others, np.arange(nc - 1)] = -1.0
    return C


def pair_index(y, nc):
    pos = {}
    k = 0
    for i in range(nc):
        for j in range(nc):
            if i != j:
                pos[(i, j)] = k
                k += 1
    return np.array([[pos[(yy, j)] for j in range(nc) if j != yy] for yy in y])


def main():
    from advtrain.data import load_data

    dmethod = {"crown": "crown", "crown-ibp": "crown-forward-ibp", "ibp": "forward-ibp"}[
        args.method
    ]
    mode = args.margin_mode
    if mode == "auto":
        mode = "pairs" if args.method == "ibp" else "backbounds"
    if mode == "backbounds" and args.method == "ibp":
        raise SystemExit("decomon forward-ibp ignores back_bounds; use --margin-mode pairs")

    model = load_model(args.model)
    data = load_data(args.data)
    x = np.asarray(data.x_test[: args.n], np.float32)
    y = np.asarray(data.y_test[: args.n]).astype(int)
    n = len(x)

    t0 = time.perf_counter()
    flat, nc, d = build_flat(model, fold_pairs=(mode == "pairs"))
    if mode == "backbounds":
        C_in = keras.Input((nc, nc - 1), name="margin_spec")
        dm = clone(flat, method=dmethod, back_bounds=[C_in], final_ibp=True, final_affine=False)
    else:
        dm = clone(flat, method=dmethod, final_ibp=True, final_affine=False)
    convert_s = time.perf_counter() - t0

    fn = tf.function(lambda inputs: dm(inputs))

    xf = x.reshape(n, d)
    lo = np.clip(xf - args.eps, 0.0, 1.0)
    hi = np.clip(xf + args.eps, 0.0, 1.0)
    B = min(args.batch, n)

    def run_batch(s):
        e = min(s + B, n)
        m = e - s
        z = np.stack([lo[s:e], hi[s:e]], 1)
        yb = y[s:e]
        if m < B:  # pad to the traced batch size
            z = np.concatenate([z, np.repeat(z[-1:], B - m, 0)], 0)
            yb = np.concatenate([yb, np.repeat(yb[-1:], B - m)])
        if mode == "backbounds":
            out = fn([tf.constant(z), tf.constant(spec_matrix(yb, nc))])
        else:
            out = fn([tf.constant(z)])
        _u, l = out[0], out[1]
        l = l.numpy()[:m]
        if mode == "pairs":
            l = np.take_along_axis(l, pair_index(yb[:m], nc), 1)
        return l

    t0 = time.perf_counter()
    run_batch(0)  # warm-up (trace + first run)
    warm_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    lbs = [run_batch(s) for s in range(0, n, B)]
    seconds = time.perf_counter() - t0
    lb = np.concatenate(lbs, 0)  # (n, nc-1), column k = class k-th of [j != y]
    min_lb = lb.min(1)

    # full per-class table: lb_full[i][j] = bound on z_y - z_j, None at j = y
    lb_full = []
    for i in range(n):
        others = [j for j in range(nc) if j != y[i]]
        row = [None] * nc
        for k, j in enumerate(others):
            row[j] = float(lb[i, k])
        lb_full.append(row)

    # soundness check: lb <= true margin at clean x and random points of the ball
    sanity = None
    if args.sanity > 0:
        rng = np.random.default_rng(args.seed)
        k = min(args.sanity, n)
        P = args.sanity_points
        worst = np.inf
        viol = 0
        checks = 0
        for i in range(k):
            pts = [xf[i]]
            for p in range(P):
                if p % 2 == 0:
                    r = rng.uniform(lo[i], hi[i])
                else:  # box corner
                    r = np.where(rng.random(d) < 0.5, lo[i], hi[i])
                pts.append(r.astype(np.float32))
            pts = np.stack(pts).reshape((-1,) + tuple(model.input_shape[1:]))
            zt = np.asarray(model(pts, training=False))
            others = [j for j in range(nc) if j != y[i]]
            margins = zt[:, y[i]][:, None] - zt[:, others]  # (P+1, nc-1)
            slack = margins - lb[i][None]  # must be >= 0
            worst = min(worst, float(slack.min()))
            viol += int((slack < -1e-4).sum())
            checks += slack.size
        sanity = {
            "examples": k,
            "points_per_example": P + 1,
            "checks": checks,
            "violations(tol 1e-4)": viol,
            "min_slack(true_margin - lb)": worst,
            "ok": viol == 0,
        }

    clean_pred = np.argmax(np.asarray(model(x, training=False)), 1)
    res = {
        "method": args.method,
        "decomon_method": dmethod,
        "bound": (
            "margin via decomon back_bounds (spec matrix C in the final CROWN backward pass)"
            if mode == "backbounds"
            else "margin folded into the last Dense (all ordered pairs W_i - W_j), bounded by "
            "decomon"
        ),
        "eps": args.eps,
        "n": n,
        "batch": B,
        "seconds": seconds,
        "examples_per_s": n / seconds,
        "mean_min_margin_lb": float(min_lb.mean()),
        "certified_fraction": float((min_lb > 0).mean()),
        "clean_accuracy": float((clean_pred == y).mean()),
        "convert_seconds": convert_s,
        "warmup_seconds": warm_s,
        "decomon_version": getattr(decomon, "__version__", "?"),
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
        "devices": [dv.name for dv in tf.config.list_logical_devices()],
        "tf_threads": args.threads or "default",
        "cache_toeplitz": bool(args.cache_toeplitz),
        "model": os.path.abspath(args.model),
        "sanity": sanity,
        "labels": y.tolist(),
        "min_margin_lb": min_lb.tolist(),
        "margin_lb": lb_full,
    }
    summary = {k: v for k, v in res.items() if k not in ("labels", "min_margin_lb", "margin_lb")}
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
