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

from advtrain.config import check_number
from advtrain.files import write_atomic

# 2x a screen's 100 dpi: sharp on high-density displays and when zoomed in a report.
DPI = 200

__all__ = [
    "bracket",
    "certified_cell",
    "duration",
    "markdown_table",
    "pareto_front",
    "plot_accuracy_vs_eps",
    "plot_adversarial_grid",
    "plot_pareto",
    "robust_cell",
]


def duration(seconds: float | None) -> str:
    """Seconds as people read them: `57 s`, `4 min 12 s`, `2 h 05 min`; `-` for None.

    Example:
        >>> duration(56.6247), duration(252.4), duration(7500)
        ('57 s', '4 min 12 s', '2 h 05 min')
    """
    if seconds is None:
        return "-"
    s = round(float(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def robust_cell(acc: float | None, failed: Sequence[str] = (), digits: int = 4) -> str:
    """A robust accuracy as shown to people: `0.9052`, or, when any sanity flag failed, an upper
    bound with the flags named right beside it:
    `<= 0.9790 (upper bound: zero-gradients, large-eps)`.
    `digits` decimals (4; report.html shows 3).

    A robust accuracy is only ever an upper bound (the worst case over the attacks tried); a
    failed flag says the attacks may have been fooled, so the number must not read as a result.
    """
    if acc is None:
        return "-"
    if not failed:
        return f"{acc:.{digits}f}"
    return f"<= {acc:.{digits}f} (upper bound: {', '.join(failed)})"


def certified_cell(
    acc: float | None, method: str | None = None, note: str | None = None, digits: int = 4
) -> str:
    """A certified accuracy as shown to people: `0.9120 (crown-ibp)` (the method that certified
    most), `not available (layer 'lstm')` when no bound method could bound the model (never 0),
    or `-` when certification did not run. `digits` decimals (4; report.html shows 3).
    """
    if acc is None:
        return note or "-"
    return f"{acc:.{digits}f}" + (f" ({method})" if method else "")


def bracket(
    clean: float,
    robust: float,
    failed: Sequence[str] = (),
    certified: float | None = None,
    method: str | None = None,
    note: str | None = None,
) -> str:
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
    rob = (
        f"robust {robust:.3f}"
        if not failed
        else (f"robust <= {robust:.3f} (upper bound: {', '.join(failed)})")
    )
    upper = f"{rob} <= clean {clean:.3f}"
    if certified is not None:
        return f"certified {certified:.3f}" + (f" ({method})" if method else "") + f" <= {upper}"
    if note:
        return f"certified {note}; {upper}"
    return upper


def _cell(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return "nan" if math.isnan(v) else f"{float(v):.{digits}f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Sequence, digits: int = 4) -> str:
    """A GitHub Markdown table.

    Args:
        rows: mappings from column key to value; a missing key is an empty cell.
        columns: column keys, or `(key, header)` pairs.
        digits: decimals of float cells. Defaults to 4.

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
        lines.append("| " + " | ".join(_cell(row.get(k), digits) for k, _ in cols) + " |")
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
            path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
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


def _plot_model_curves(ax, rows: list[dict], prefix: str, own: str | None, colors) -> None:
    """One model's curves: each attack, the worst case, the certified bound, the FGSM reference
    (`own`: this model's colour when several share the axes, else None: a colour per curve)."""
    eps, at = _from_zero(rows)
    names = list(rows[0]["per_attack"])
    for j, name in enumerate(names[:-1] if len(names) > 1 else names):
        color = own or colors[j % len(colors)]
        ax.plot(
            eps,
            at(lambda r, n=name: r["per_attack"][n]),
            marker="o",
            lw=1,
            alpha=0.7,
            color=color,
            linestyle=":" if own else "-",
            label=f"{prefix}{name}",
        )
    color = own or "black"
    ax.plot(
        eps,
        at(lambda r: r["robust_acc"]),
        marker="s",
        lw=2.5,
        color=color,
        label=f"{prefix}worst case ({names[-1]})",
    )
    certified = [
        (e, a)
        for e, a in zip(eps, at(lambda r: r.get("certified_acc")), strict=True)
        if a is not None
    ]
    if len(certified) > 1:  # eps 0 alone (the clean accuracy) is no curve
        ce, ca = zip(*certified, strict=True)
        ax.plot(
            ce,
            ca,
            marker="D",
            lw=2,
            linestyle="-.",
            color=own or "tab:green",
            label=f"{prefix}certified (lower bound)",
        )
    if rows[0].get("fgsm_acc") is not None and "fgsm" not in names:
        ax.plot(
            eps,
            at(lambda r: r["fgsm_acc"]),
            marker="^",
            lw=1,
            linestyle="--",
            color=own or "gray",
            label=f"{prefix}fgsm (reference)",
        )


def plot_accuracy_vs_eps(results, path, *, title: str | None = None) -> Path:
    """Accuracy against eps: one line per attack (cumulative, as in the report), the worst case
    in bold, the FGSM reference dashed, and the certified accuracy (a proven lower bound)
    dash-dotted where it was computed; one colour per model when several are given. Every curve
    starts at eps 0 with the clean accuracy.

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
    several = len(series) > 1
    fig, ax = plt.subplots(figsize=(8.8 if several else 6.4, 4.4))  # wider: the legend goes beside
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, per_eps) in enumerate(series):
        rows = sorted(per_eps, key=lambda r: r["eps"])
        if rows:
            prefix = f"{label}: " if several and label else (f"{label} " if label else "")
            own = colors[i % len(colors)] if several else None  # one colour per model
            _plot_model_curves(ax, rows, prefix, own, colors)
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
    ax.set_xlim(left=0.0)
    if several:  # a dozen entries would hide the curves: beside the axes (bbox_inches="tight")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def _clean(row: Mapping) -> float:
    return row["per_attack"].get("clean", row.get("clean_acc"))


def _from_zero(rows: Sequence[Mapping]):
    """The eps axis from 0, where every curve starts at the clean accuracy (no perturbation:
    nothing is broken, everything correct is certified), unless eps 0 was itself evaluated.

    Returns:
        `(eps, at)`: the eps values, and `at(value)` giving `value(row)` per eps, the clean
        accuracy first when eps 0 was added.
    """
    if rows[0]["eps"] <= 0:
        return [r["eps"] for r in rows], lambda value: [value(r) for r in rows]
    clean = _clean(rows[0])
    return [0.0] + [r["eps"] for r in rows], lambda value: [clean] + [value(r) for r in rows]


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
    check_number("n", n, low=1, integer=True)
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


def plot_pareto(
    points: Sequence, front: Sequence, path, *, title: str | None = None, flagged: Sequence = ()
) -> Path:
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
    ax.margins(0.08)  # room around the extreme points, so their labels fit inside
    flagged_ids = {id(p) for p in flagged}
    plain = [p for p in points if id(p) not in flagged_ids]
    if plain:
        xs, ys = zip(*(_xy(p) for p in plain), strict=True)
        ax.scatter(xs, ys, s=18, color="tab:gray", alpha=0.7, label=f"trials ({len(plain)})")
    labels = []
    if flagged:
        xs, ys = zip(*(_xy(p) for p in flagged), strict=True)
        ax.scatter(
            xs,
            ys,
            s=40,
            marker="x",
            color="tab:orange",
            label=f"upper bound: sanity check failed ({len(flagged)})",
        )
        for p in flagged:
            label = p.get("label") if isinstance(p, Mapping) else None
            failed = p.get("flags_failed", ()) if isinstance(p, Mapping) else ()
            text = f"{label + ' ' if label else ''}upper bound ({', '.join(failed) or 'flagged'})"
            labels.append((text, _xy(p), 6, "tab:orange", -1))
    if front:
        fr = sorted(front, key=lambda p: _xy(p)[0])
        fx, fy = zip(*(_xy(p) for p in fr), strict=True)
        ax.plot(fx, fy, "-o", color="tab:red", lw=2, ms=6, label="Pareto front")
        for k, p in enumerate(fr):
            label = p.get("label") if isinstance(p, Mapping) else None
            labels.append((str(label if label is not None else k + 1), _xy(p), 7, "tab:red", 1))
    ax.set_xlabel("clean accuracy")
    ax.set_ylabel("robust accuracy")
    ax.grid(alpha=0.3)
    ax.set_title(title or "Clean vs robust accuracy")
    ax.legend(fontsize=8, loc="best")
    _label_inside(ax, labels)
    fig.tight_layout()
    return _save(fig, path)


def _label_inside(ax, labels) -> None:
    """Point labels that stay inside the axes: each one is offset towards the middle of the
    plot (left of a point in the right half, below one in the top half), and clipped to the
    axes as a last resort, so a long label never runs past the figure's edge.

    Args:
        labels: `(text, (x, y), fontsize, color, side)`; side 1 prefers above the point, -1 below.
    """
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    for text, (x, y), size, color, side in labels:
        right = x > (x0 + x1) / 2
        # Above the point unless that is the top of the plot; below it unless that is the bottom.
        up = (y < y0 + 0.85 * (y1 - y0)) if side > 0 else (y < y0 + 0.15 * (y1 - y0))
        ax.annotate(
            text,
            (x, y),
            textcoords="offset points",
            xytext=(-5 if right else 5, 5 if up else -5),
            ha="right" if right else "left",
            va="bottom" if up else "top",
            fontsize=size,
            color=color,
            annotation_clip=True,
            clip_on=True,
        )
