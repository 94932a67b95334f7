"""Certified accuracy beside the attacked one: bound methods (`advtrain.bounds`) run on the same
examples as the attacks, checked against them per example, and the `advtrain certify` report.

No TensorFlow at import: `advtrain.bounds` is imported when a bound is computed, so the report
module (`advtrain.robustness_report`) can use the mask helpers here.

Attacks give an upper bound on the robust accuracy, bounds a lower one (IBP: Gowal et al. 2018,
arXiv:1810.12715; CROWN: Zhang et al. 2018, arXiv:1811.00866; CROWN-IBP: Zhang et al. 2020,
arXiv:1906.06316). A certified example is proven: no input in the eps-ball (within [0, 1])
changes the prediction away from its label. So a certified example that is misclassified, or
that any attack broke, is a bug in the bound or the attack: `CertificationError`, never a
result. A model with a layer the bounds cannot cover has no certified figure ("not available
(layer X)"), never 0.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CERTIFY_SCHEMA",
    "CertificationError",
    "attacked_figure",
    "certified_by",
    "certify_at",
    "certify_lines",
    "certify_report",
    "check_certified",
    "mask_from_hex",
    "mask_hex",
    "unavailable_reason",
]

log = logging.getLogger(__name__)

CERTIFY_SCHEMA = "advtrain.certify_report/1"
SHOWN = 5  # indices named in a CertificationError


def mask_hex(mask) -> str:
    """A per-example boolean mask as hex: bit i (most significant first) = example i.

    `np.packbits(mask).tobytes().hex()`; the last byte is padded with zeros.

    Example:
        >>> mask_hex([True, False, True, True, False, False, False, False, True])
        'b080'
    """
    return np.packbits(np.asarray(mask, dtype=bool)).tobytes().hex()


def mask_from_hex(text: str, n: int) -> np.ndarray:
    """The inverse of `mask_hex`: the first `n` bits of `text` as a bool array of shape (n,).

    Raises:
        ValueError: `text` is not hex or holds fewer than `n` bits.
    """
    try:
        raw = np.frombuffer(bytes.fromhex(text), dtype=np.uint8)
    except (TypeError, ValueError):
        raise ValueError(f"`mask` must be a hex string. Received: mask={text!r}") from None
    if raw.size * 8 < n:
        raise ValueError(
            f"`mask` holds {raw.size * 8} bits, fewer than n={n}. Received: mask={text!r}"
        )
    return np.unpackbits(raw)[:n].astype(bool)


def certified_by(certified: dict[str, float], masks: dict[str, str] | None = None) -> str | None:
    """The method named beside a certified accuracy: the one that certified most (the first of
    equals), followed by `+ other` for each other method that certified examples it did not
    (then the union exceeds every single method). None when no method ran."""
    if not certified:
        return None
    best = max(certified, key=lambda m: certified[m])  # max keeps the first of equals
    if not masks or best not in masks:
        return best
    top = int(masks[best] or "0", 16)
    extra = [
        m
        for m in sorted(certified, key=lambda m: -certified[m])
        if m != best and m in masks and int(masks[m] or "0", 16) & ~top
    ]
    return " + ".join([best, *extra])


class CertificationError(RuntimeError):
    """A certified example was misclassified or broken by an attack: the bound or the attack is
    wrong. Never a result: the evaluation stops (exit status 1 from the CLI)."""


def check_certified(certified, attacked, *, eps: float, method: str) -> None:
    """Checks `certified <= robust` per example: every certified example is clean-correct and
    was never broken by any attack.

    Args:
        certified: bool (n,), True = proven by `method` at `eps`.
        attacked: bool (n,), True = clean-correct and not broken by any attack (the final
            `robust` mask of the evaluation).
        eps: the radius, method: the bound method, both named in the error.

    Raises:
        CertificationError: naming how many examples, the first few indices, eps and method.

    Example:
        >>> check_certified(np.array([True, False]), np.array([True, True]), eps=0.1, method="ibp")
    """
    certified, attacked = np.asarray(certified, dtype=bool), np.asarray(attacked, dtype=bool)
    if certified.shape != attacked.shape:
        raise ValueError(
            f"`certified` and `attacked` must have the same shape. Received: "
            f"certified.shape={certified.shape}, attacked.shape={attacked.shape}"
        )
    bad = np.flatnonzero(certified & ~attacked)
    if bad.size:
        shown = ", ".join(str(i) for i in bad[:SHOWN]) + (", ..." if bad.size > SHOWN else "")
        raise CertificationError(
            f"{bad.size} example(s) certified by {method} at eps {eps:g} were misclassified or "
            f"broken by an attack (indices {shown}): a certified figure above the attacked one is "
            "a bug in the bound or the attack, not a result"
        )


def unavailable_reason(error: Exception) -> str:
    """`layer 'lstm'` from an `advtrain.bounds.UnsupportedLayerError` (its `layer`), else its
    text."""
    layer = getattr(error, "layer", None)
    return f"layer {layer!r}" if layer else (str(error).splitlines() or ["unknown reason"])[0]


def _note(unavailable: dict[str, str], ran: bool) -> str | None:
    if not unavailable:
        return None
    if ran:
        return "; ".join(f"{m} not available ({why})" for m, why in unavailable.items())
    reasons = set(unavailable.values())
    if len(reasons) == 1:
        return f"not available ({reasons.pop()})"
    return "not available (" + "; ".join(f"{m}: {why}" for m, why in unavailable.items()) + ")"


def certify_at(
    model,
    x,
    y,
    attacked,
    *,
    eps: float,
    norm: str,
    methods: Sequence[str],
    unavailable: dict[str, str],
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Runs each bound method on the examples of one eps and checks it against the attacks.

    Args:
        model: the Keras model the attacks ran on (logits).
        x, y: the evaluated examples, float32 in [0, 1] (n, H, W, C) and int labels (n,).
        attacked: bool (n,), the evaluation's final `robust` mask at this eps.
        eps, norm: the threat model.
        methods: bound methods, in order (`EvalConfig.certify`).
        unavailable: `{method: reason}` of the methods that could not bound this model; updated
            here, so a later eps does not try them again.
        progress: called as `progress(label, done, total)` before and after each method.

    Returns:
        The certified fields of `advtrain.robustness_report.EpsResult`: `certified_acc` (the
        per-example union, None when no method could run), `certified`, `certified_masks`,
        `certified_note` and `certify_seconds`.

    Raises:
        CertificationError: a certified example was misclassified or broken (`check_certified`).
    """
    from advtrain import bounds

    certified, masks, seconds, union = {}, {}, {}, np.zeros(len(y), dtype=bool)
    if not hasattr(model, "layers"):  # a plain callable: nothing to propagate bounds through
        for m in methods:
            unavailable.setdefault(m, "not a Keras model")
    for method in methods:
        if method in unavailable:
            continue
        label = f"eps {eps:g} certify {method}"
        if progress is not None:
            progress(label, 0, len(y))
        t0 = time.perf_counter()
        try:
            mask = np.asarray(
                bounds.certify(model, x, y, eps=eps, norm=norm, method=method), dtype=bool
            )
        except bounds.UnsupportedLayerError as e:
            unavailable[method] = unavailable_reason(e)
            log.info("certify %s: %s", method, e)
            continue
        seconds[method] = time.perf_counter() - t0
        if progress is not None:
            progress(label, len(y), len(y))
        check_certified(mask, attacked, eps=eps, method=method)
        certified[method], masks[method] = float(mask.mean()), mask_hex(mask)
        union |= mask
        log.info(
            "certify %s %s eps=%g: certified %.4f (%d/%d), %.1fs",
            method,
            norm,
            eps,
            mask.mean(),
            int(mask.sum()),
            len(mask),
            seconds[method],
        )
    return {
        "certified_acc": float(union.mean()) if certified else None,
        "certified": certified,
        "certified_masks": masks,
        "certified_note": _note(
            {m: unavailable[m] for m in methods if m in unavailable}, bool(certified)
        ),
        "certify_seconds": seconds,
    }


# -- the `advtrain certify` report --------------------------------------------------------------


def certify_report(
    model,
    x,
    y,
    *,
    eps: Sequence[float],
    norm: str,
    methods: Sequence[str],
    split: str,
    data: dict | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Certified accuracy of `model` at each eps and method, with per-example masks.

    Args:
        model: a Keras model returning logits (see `advtrain.checks.check_model`).
        x, y: the first n examples of `split`, float32 in [0, 1] (n, H, W, C), int labels (n,).
        eps: radii, norm: `"linf"` or `"l2"`, methods: bound methods (`advtrain.bounds.METHODS`).
        split: the split the examples came from; data: `ImageData.describe()` or None.
        batch_size: examples per bound batch. Defaults to `256`.

    Returns:
        A JSON-ready dict (schema `CERTIFY_SCHEMA`): `threat_model` (norm, eps, clip), `methods`,
        `n`, `split`, `data`, `clean_acc`, `per_eps` (per eps: `certified_acc` and
        `certified_mask` of the union, `certified_by`, and `methods`: `{method: {certified_acc,
        certified_mask, seconds}}`) and `seconds`.

    Raises:
        advtrain.bounds.UnsupportedLayerError: a layer no asked method can bound (one line
            naming it).
    """
    from advtrain import bounds
    from advtrain.checks import predict_logits

    start = time.perf_counter()
    bounds.check_supported(model)
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y).astype(np.int32)
    correct = np.argmax(predict_logits(model, x, batch_size), axis=1) == y
    rows = []
    for e in eps:
        per_method, union = {}, np.zeros(len(y), dtype=bool)
        for method in methods:
            t0 = time.perf_counter()
            mask = np.asarray(
                bounds.certify(model, x, y, eps=e, norm=norm, method=method, batch_size=batch_size),
                dtype=bool,
            )
            # Proven implies clean-correct: the one per-example check possible without attacks.
            check_certified(mask, correct, eps=e, method=method)
            per_method[method] = {
                "certified_acc": float(mask.mean()),
                "certified_mask": mask_hex(mask),
                "seconds": time.perf_counter() - t0,
            }
            union |= mask
        accs = {m: v["certified_acc"] for m, v in per_method.items()}
        rows.append(
            {
                "norm": norm,
                "eps": e,
                "split": split,
                "n": len(y),
                "clean_acc": float(correct.mean()),
                "certified_acc": float(union.mean()),
                "certified_mask": mask_hex(union),
                "certified_by": certified_by(
                    accs, {m: v["certified_mask"] for m, v in per_method.items()}
                ),
                "methods": per_method,
            }
        )
    return {
        "schema": CERTIFY_SCHEMA,
        "threat_model": {"norm": norm, "eps": list(eps), "clip": [0.0, 1.0]},
        "methods": list(methods),
        "n": len(y),
        "split": split,
        "data": data,
        "clean_acc": float(correct.mean()),
        "per_eps": rows,
        "seconds": time.perf_counter() - start,
    }


def attacked_figure(
    report: dict, *, eps: float, norm: str, n: int, split: str, data: dict | None = None
) -> dict | None:
    """The attacked figure of an `advtrain evaluate` report (a `RobustnessReport.to_dict()`)
    made under the same threat model on the same examples: its per-eps entry, or None when the
    report is not one, or was made at another norm, eps, n or split (or on other data, when
    both describe theirs)."""
    from advtrain.robustness_report import READABLE

    if not isinstance(report, dict) or report.get("schema") not in READABLE:
        return None
    if (report.get("n"), report.get("split")) != (n, split):
        return None
    if data and report.get("data") and report["data"] != data:
        return None
    for entry in report.get("per_eps") or []:
        if entry.get("norm") == norm and math.isclose(entry.get("eps", -1.0), eps, abs_tol=1e-9):
            return entry
    return None


def certify_lines(d: dict[str, Any]) -> list[str]:
    """One line per eps of a `certify_report` dict, for the CLI:
    `eps 0.1: certified 0.912 (crown-ibp 0.912, ibp 0.850)  clean 0.991`, followed by
    `  robust <= 0.934` when the entry holds the attacked figure (`robust_acc`, with its failed
    sanity flags named beside it)."""
    lines = []
    for r in d["per_eps"]:
        accs = sorted(r["methods"].items(), key=lambda kv: -kv[1]["certified_acc"])
        each = ", ".join(f"{m} {v['certified_acc']:.3f}" for m, v in accs)
        line = (
            f"eps {r['eps']:g}: certified {r['certified_acc']:.3f} ({each})  clean "
            f"{r['clean_acc']:.3f}"
        )
        if (
            r.get("robust_acc") is not None
        ):  # an upper bound in any case; flags say why it may be loose
            failed = r.get("robust_flags_failed") or []
            line += f"  robust <= {r['robust_acc']:.3f}" + (
                f" (upper bound: {', '.join(failed)})" if failed else ""
            )
        lines.append(line)
    return lines
