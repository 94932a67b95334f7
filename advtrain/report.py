"""Tables, plots and atomic writes for results: plain dicts and arrays in, files out.

No TensorFlow here. matplotlib is imported on first plot, with the non-interactive Agg backend,
so importing this module is cheap and works on machines without a display. Every plot is written
atomically (`advtrain.files`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from advtrain.files import write_atomic

__all__ = [
    "bracket",
    "certified_cell",
    "robust_cell",
    "markdown_table",
    "pareto_front",
    "plot_accuracy_vs_eps",
    "plot_adversarial_grid",
    "plot_pareto",
]


def robust_cell(acc: float | None, failed: Sequence[str] = ()) -> str:
    """A robust accuracy as shown to people: `0.9052`, or, when any sanity flag failed, an upper
    bound with the flags named right beside it: `<= 0.9790 (upper bound: zero-gradients, large-eps)`.

    A robust accuracy is only ever an upper bound (the worst case over the attacks tried); a
    failed flag says the attacks may have been fooled, so the number must not read as a result.
    """
    if acc is None:
        return "-"
    if not failed:
        return f"{acc:.4f}"
    return f"<= {acc:.4f} (upper bound: {', '.join(failed)})"


def certified_cell(acc: float | None, method: str | None = None, note: str | None = None) -> str:
    """A certified accuracy as shown to people: `0.9120 (crown-ibp)` (the method that certified
    most), `not available (layer 'lstm')` when no bound method could bound the model (never 0),
    or `-` when certification did not run.
    """
    if acc is None:
        return note or "-"
    return f"{acc:.4f}" + (f" ({method})" if method else "")


def bracket(clean: float, robust: float, failed: Sequence[str] = (), certified: float | None = None,
            method: str | None = None, note: str | None = None) -> str:
    """The honest bracket at one eps: `certified 0.912 (crown-ibp) <= robust 0.934 <= clean 0.991`.

    The certified accuracy is proven (a lower bound on the true robust accuracy), the robust one
    found by attacks (an upper bound): the truth lies between them. With failed sanity flags the
    robust figure reads `robust <= 0.934 (upper bound: zero-gradients)`, as in `robust_cell`.
    Unavailable bounds read `certified not available (layer 'lstm'); robust ...`; without
    certification (switched off, or an older report) the bracket is `robust ... <= clean ...`.

    Args:
        clean: clean accuracy. robust: the per-example worst case over the attacks.
        failed: ids of the failed sanity flags bearing on `robust`. Defaults to none.
        certified: the certified accuracy, or None. method: the method named beside it.
        note: why `certified` is None (`"not available (layer 'lstm')"`), or None.

    Example:
        >>> bracket(0.991, 0.934, certified=0.912, method="crown-ibp")
        'certified 0.912 (crown-ibp) <= robust 0.934 <= clean 0.991'
    """
    rob = f"robust {robust:.3f}" if not failed else (
        f"robust <= {robust:.3f} (upper bound: {', '.join(failed)})")
    upper = f"{rob} <= clean {clean:.3f}"
    if certified is not None:
        return f"certified {certified:.3f}" + (f" ({method})" if method else "") + f" <= {upper}"
    if note:
        return f"certified {note}; {upper}"
    return upper


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return "nan" if math.isnan(v) else f"{float(v):.4f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Sequence) -> str:
    """A GitHub Markdown table.

    Args:
        rows: mappings from column key to value; a missing key is an empty cell.
        columns: column keys, or `(key, header)` pairs. Floats print with 4 decimals.

    Returns:
        The table, lines joined by newlines, without a trailing newline.

    Example:
        >>> print(markdown_table([{"eps": 0.3, "acc": 0.9}], ["eps", ("acc", "accuracy")]))
        | eps | accuracy |
        |---|---|
        | 0.3000 | 0.9000 |
    """
    cols = [(c, c) if isinstance(c, str) else tuple(c) for c in columns]
    lines = ["| " + " | ".join(_cell(h) for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines)


def _xy(p) -> tuple[float, float]:
    if isinstance(p, Mapping):
        clean = p["clean_acc"] if "clean_acc" in p else p["clean"]
        robust = p["robust_acc"] if "robust_acc" in p else p["robust"]
        return float(clean), float(robust)
    clean, robust = p[0], p[1]
    return float(clean), float(robust)


def pareto_front(points: Sequence) -> list:
    """The points not dominated in (clean accuracy, robust accuracy), both maximised.

    A point is dominated when another is at least as good in both and better in one; equal
    points do not dominate each other, so duplicates on the front are all kept.

    Args:
        points: `(clean, robust)` pairs, or mappings with `"clean_acc"` and `"robust_acc"` (or
            `"clean"` and `"robust"`).

    Returns:
        The non-dominated points themselves, sorted by clean accuracy (ascending), then robust
        accuracy (descending).

    Example:
        >>> pareto_front([(0.99, 0.1), (0.98, 0.9), (0.97, 0.8)])
        [(0.98, 0.9), (0.99, 0.1)]
    """
    xy = [_xy(p) for p in points]
    front = [
        p
        for p, (c, r) in zip(points, xy, strict=True)
        if not any(c2 >= c and r2 >= r and (c2 > c or r2 > r) for c2, r2 in xy)
    ]
    return sorted(front, key=lambda p: (_xy(p)[0], -_xy(p)[1]))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    plt = _pyplot()
    try:
        return write_atomic(
            path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        )
    finally:
        plt.close(fig)


def _series(results) -> list[tuple[str, list[Mapping]]]:
    """Normalises a report dict or a list of (label, per-eps results) to [(label, per_eps)]."""
    if isinstance(results, Mapping):
        if "per_eps" not in results:
            raise ValueError(
                f"A report dict needs a 'per_eps' list. Received keys: {sorted(results)}"
            )
        return [("", list(results["per_eps"]))]
    out = []
    for item in results:
        label, per_eps = item
        out.append(
            (str(label), list(per_eps["per_eps"] if isinstance(per_eps, Mapping) else per_eps))
        )
    if not out:
        raise ValueError("`results` is empty: nothing to plot.")
    return out


def plot_accuracy_vs_eps(results, path, *, title: str | None = None) -> Path:
    """Accuracy against eps: one line per attack (cumulative, as in the report), the worst case
    in bold, the FGSM reference dashed, and the certified accuracy (a proven lower bound)
    dash-dotted where it was computed; one colour per model when several are given.

    Args:
        results: a `RobustnessReport.to_dict()` dict, or a list of `(label, per_eps)` where
            per_eps is that dict's `"per_eps"` list (or the dict itself). Each per-eps entry
            needs `eps`, `per_attack` (with `clean`), `robust_acc`, and optionally `fgsm_acc`,
            `certified_acc` (None where not available) and `norm`.
        path: the PNG to write (atomically).
        title: figure title. Defaults to the norm and split of the first result.

    Returns:
        The path written.
    """
    series = _series(results)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    several = len(series) > 1
    for i, (label, per_eps) in enumerate(series):
        rows = sorted(per_eps, key=lambda r: r["eps"])
        if not rows:
            continue
        eps = [r["eps"] for r in rows]
        names = list(rows[0]["per_attack"])
        prefix = f"{label}: " if several and label else (f"{label} " if label else "")
        for j, name in enumerate(names[:-1] if len(names) > 1 else names):
            color = colors[i % len(colors)] if several else colors[j % len(colors)]
            ax.plot(
                eps,
                [r["per_attack"][name] for r in rows],
                marker="o",
                lw=1,
                alpha=0.7,
                color=color,
                linestyle=":" if several else "-",
                label=f"{prefix}{name}",
            )
        color = colors[i % len(colors)] if several else "black"
        ax.plot(
            eps,
            [r["robust_acc"] for r in rows],
            marker="s",
            lw=2.5,
            color=color,
            label=f"{prefix}worst case ({names[-1]})",
        )
        certified = [(r["eps"], r["certified_acc"]) for r in rows if r.get("certified_acc") is not None]
        if certified:
            ce, ca = zip(*certified, strict=True)
            ax.plot(ce, ca, marker="D", lw=2, linestyle="-.", color=color if several else "tab:green",
                    label=f"{prefix}certified (lower bound)")
        if rows[0].get("fgsm_acc") is not None and "fgsm" not in names:
            ax.plot(
                eps,
                [r["fgsm_acc"] for r in rows],
                marker="^",
                lw=1,
                linestyle="--",
                color=color if several else "gray",
                label=f"{prefix}fgsm (reference)",
            )
    first = series[0][1][0] if series[0][1] else {}
    norm = first.get("norm", "")
    ax.set_xlabel(f"eps ({norm})" if norm else "eps")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    default = "Accuracy vs eps" + (
        f" ({first.get('split')} split, n={first.get('n')})" if "n" in first else ""
    )
    ax.set_title(title or default)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_adversarial_grid(x, x_adv, y, pred_clean, pred_adv, path, n: int = 16) -> Path:
    """A grid of clean images over their adversarial versions, with predictions.

    Examples are laid out 8 per row group: a row of clean images titled `y=7 pred=7` above a
    row of adversarial images titled `adv pred=3`; a title is red when the prediction is wrong.

    Args:
        x, x_adv: images in [0, 1], (m, H, W), (m, H, W, 1) (drawn in grey) or (m, H, W, 3)
            (drawn in colour).
        y, pred_clean, pred_adv: int labels and predictions, (m,).
        path: the PNG to write (atomically).
        n: examples shown (the first n), >= 1. Defaults to `16`.

    Returns:
        The path written.
    """
    x, x_adv = np.asarray(x), np.asarray(x_adv)
    y, pc, pa = (np.asarray(a).astype(int).reshape(-1) for a in (y, pred_clean, pred_adv))
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be an integer >= 1. Received: n={n!r}")
    if not (len(x) == len(x_adv) == len(y) == len(pc) == len(pa)) or len(x) == 0:
        raise ValueError(
            "`x`, `x_adv`, `y`, `pred_clean` and `pred_adv` must be non-empty and equally long. "
            f"Received: lengths {len(x)}, {len(x_adv)}, {len(y)}, {len(pc)}, {len(pa)}"
        )
    m = min(n, len(x))
    cols = min(m, 8)
    groups = math.ceil(m / cols)
    plt = _pyplot()
    fig, axes = plt.subplots(2 * groups, cols, figsize=(1.3 * cols, 2.8 * groups), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(m):
        g, c = divmod(i, cols)
        for row, img, text, wrong in (
            (2 * g, x[i], f"y={y[i]} pred={pc[i]}", pc[i] != y[i]),
            (2 * g + 1, x_adv[i], f"adv pred={pa[i]}", pa[i] != y[i]),
        ):
            ax = axes[row, c]
            if img.ndim == 3 and img.shape[-1] == 3:
                ax.imshow(np.clip(img, 0.0, 1.0))
            else:
                ax.imshow(img.reshape(img.shape[:2]), cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_title(text, fontsize=8, color="red" if wrong else "black")
    fig.tight_layout()
    return _save(fig, path)


def plot_pareto(points: Sequence, front: Sequence, path, *, title: str | None = None,
                flagged: Sequence = ()) -> Path:
    """Clean accuracy (x) against robust accuracy (y): every trial as a dot, the Pareto front
    as a highlighted, labelled line, and trials whose model failed a sanity check as labelled
    crosses marked "upper bound" (never on the front).

    Args:
        points: all trials, `(clean, robust)` pairs or mappings with `clean_acc`, `robust_acc`
            (or `clean`, `robust`) and optionally `label`.
        front: the front (e.g. `pareto_front(points)`), same element types.
        path: the PNG to write (atomically).
        title: figure title. Defaults to `"Clean vs robust accuracy"`.
        flagged: points (same element types, subset of `points`) whose robust accuracy is only an
            upper bound; mappings may carry `flags_failed`, named in their label. Defaults to none.

    Returns:
        The path written.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.6))
    flagged_ids = {id(p) for p in flagged}
    plain = [p for p in points if id(p) not in flagged_ids]
    if plain:
        xs, ys = zip(*(_xy(p) for p in plain), strict=True)
        ax.scatter(xs, ys, s=18, color="tab:gray", alpha=0.7, label=f"trials ({len(plain)})")
    if flagged:
        xs, ys = zip(*(_xy(p) for p in flagged), strict=True)
        ax.scatter(xs, ys, s=40, marker="x", color="tab:orange",
                   label=f"upper bound: sanity check failed ({len(flagged)})")
        for p in flagged:
            label = p.get("label") if isinstance(p, Mapping) else None
            failed = p.get("flags_failed", ()) if isinstance(p, Mapping) else ()
            text = f"{label + ' ' if label else ''}upper bound ({', '.join(failed) or 'flagged'})"
            ax.annotate(text, _xy(p), textcoords="offset points", xytext=(4, -10), fontsize=6,
                        color="tab:orange")
    if front:
        fr = sorted(front, key=lambda p: _xy(p)[0])
        fx, fy = zip(*(_xy(p) for p in fr), strict=True)
        ax.plot(fx, fy, "-o", color="tab:red", lw=2, ms=6, label="Pareto front")
        for k, p in enumerate(fr):
            label = p.get("label") if isinstance(p, Mapping) else None
            ax.annotate(
                str(label if label is not None else k + 1),
                _xy(p),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color="tab:red",
            )
    ax.set_xlabel("clean accuracy")
    ax.set_ylabel("robust accuracy")
    ax.grid(alpha=0.3)
    ax.set_title(title or "Clean vs robust accuracy")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)
