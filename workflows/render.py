"""Search results rendered from the run folder alone: the ranked table (results.csv/.md), the
clean-vs-robust Pareto front and accuracy curves (PNG), report.md and report.html, and a
report.html beside each top trial's report.md.

`workflows.results.collect` writes `trials.json` (it needs Ray); this module reads only the
folder and never imports Ray, so `advtrain report DIR` rebuilds everything without it. Every
link in the reports is relative and inside the folder (the folder is read where it was copied
to, without the advtrain sources), and every file is written atomically.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any

from advtrain import report
from advtrain.config import ThreatModel
from advtrain.files import write_text
from advtrain.flag_text import ANCHOR, HEADING, flag_link, flags_markdown
from advtrain.page import html_page

__all__ = ["COLUMNS", "TOP_K", "csv_columns", "rank", "write_all"]

TOP_K = 3
COLUMNS = (
    "rank",
    "trial_id",
    "config",
    "val_clean_acc",
    "val_robust_acc",
    "val_certified_acc",
    "test_clean_acc",
    "test_robust_acc",
    "test_certified_acc",
    "test_flags_failed",
    "epochs_run",
    "stopped",
    "wall_s",
)
# Shown as upper bounds, with the failed flags beside them, when a trial's model failed a check.
ROBUST_COLUMNS = ("val_robust_acc", "test_robust_acc")
TITLE = "advtrain search report"


def rank(rows: list[dict], metric: str = "val_robust_acc") -> list[dict]:
    """Trials whose model passed every sanity check first (a flagged model's robust accuracy is
    only an upper bound, never a reason to rank it first); then by the search's metric on the
    validation split (`val_robust_acc` or `val_certified_acc`, never the test split), trials
    that trained every epoch before those stopped early, then validation clean accuracy."""

    def key(r):
        full = r.get("stopped") in ("no", "overfitting guard")
        score = r.get(metric)
        return (
            not r.get("test_flags_failed"),
            -1.0 if score is None else score,
            full,
            r.get("val_clean_acc") or -1.0,
        )

    out = sorted(rows, key=key, reverse=True)
    for i, r in enumerate(out, 1):
        r["rank"] = i
    return out


# --------------------------------------------------------------------------- tables


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, dict):
        return ", ".join(
            f"{k}={_fmt(x) if not isinstance(x, float) else f'{x:g}'}" for k, x in v.items()
        )
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "-"
    return str(v)


def _cells(r: dict, digits: int = 4) -> dict[str, str]:
    """A trial's row as shown: its robust accuracies as upper bounds when its model failed a
    flag."""
    cells = {c: _fmt(r.get(c), digits) for c in COLUMNS}
    for c in ROBUST_COLUMNS:
        cells[c] = report.robust_cell(r.get(c), r.get("test_flags_failed") or (), digits)
    # Never 0 for a model the bounds cannot cover: "not available (layer 'x')".
    cells["test_certified_acc"] = report.certified_cell(
        r.get("test_certified_acc"), note=r.get("test_certified_note"), digits=digits
    )
    cells["wall_s"] = report.duration(r.get("wall_s"))
    return cells


def _table(rows: list[dict], digits: int = 4) -> str:
    return report.markdown_table([_cells(r, digits) for r in rows], list(COLUMNS))


def csv_columns(rows: list[dict]) -> list[str]:
    """results.csv's header: COLUMNS with `config` spread into one `config/<key>` column per
    searched key (in order of first appearance), as Tune's `ResultGrid.get_dataframe` names them."""
    keys = list(dict.fromkeys(k for r in rows for k in (r.get("config") or {})))
    at = COLUMNS.index("config")
    return [*COLUMNS[:at], *(f"config/{k}" for k in keys), *COLUMNS[at + 1 :]]


def _csv_value(r: dict, column: str) -> Any:
    v = (
        (r.get("config") or {}).get(column[len("config/") :])
        if column.startswith("config/")
        else r.get(column)
    )
    if isinstance(v, dict):
        return json.dumps(v)
    if isinstance(v, list):
        return ";".join(map(str, v))
    return "" if v is None else v


def _write_csv(run_dir: Path, rows: list[dict]) -> None:
    columns = csv_columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for r in rows:
        writer.writerow([_csv_value(r, c) for c in columns])
    write_text(run_dir / "results.csv", buf.getvalue())


# --------------------------------------------------------------------------- plots


@dataclasses.dataclass
class _Front:
    """The trials with a test result: all of them, the front (through trials that passed every
    check) and the flagged ones (their robust accuracy is an upper bound, never on the front)."""

    points: list[dict]
    front: list[dict]
    flagged: list[dict]


def _front(evaluated: list[dict]) -> _Front:
    points = [
        {
            "label": r["trial_id"],
            "clean": r["test_clean_acc"],
            "robust": r["test_robust_acc"],
            "flags_failed": r.get("test_flags_failed") or [],
        }
        for r in evaluated
    ]
    return _Front(
        points,
        report.pareto_front([p for p in points if not p["flags_failed"]]),
        [p for p in points if p["flags_failed"]],
    )


def _plots(run_dir: Path, rows: list[dict], pf: _Front) -> tuple[bool, bool]:
    """Writes pareto.png and accuracy_vs_eps.png where there is something to draw.

    Returns:
        Whether each was written.
    """
    if pf.points:
        report.plot_pareto(pf.points, pf.front, run_dir / "pareto.png", flagged=pf.flagged)
    curves = []
    for r in rows[:TOP_K]:
        p = run_dir / "trials" / r["trial_id"] / "report.json"
        if p.is_file():
            curves.append((f"#{r['rank']} {r['trial_id']}", json.loads(p.read_text())))
    if curves:
        report.plot_accuracy_vs_eps(curves, run_dir / "accuracy_vs_eps.png")
    return bool(pf.points), bool(curves)


# --------------------------------------------------------------------------- trial pages


def _local_links(markdown: str) -> str:
    """A trial report.md written before the reports carried their flag explanations links
    docs/flags.md, which is not in the folder: point those links at the inline section."""
    markdown = re.sub(r"\]\(docs/flags\.md#([\w-]+)\)", r"](#\1)", markdown)
    markdown = markdown.replace("](docs/flags.md)", f"](#{ANCHOR})")
    if f"## {HEADING}" not in markdown:
        ids = re.findall(r"\]\(#([\w-]+)\)", markdown)
        markdown += "\n" + "\n".join(flags_markdown(ids) if ids else []) + "\n"
    return markdown


def _trial_pages(run_dir: Path, rows: list[dict]) -> list[dict]:
    """A report.html beside each top trial's report.md (kept where the evaluation wrote one).

    Returns:
        The rows whose folder now holds a report.html, in rank order.
    """
    out = []
    for r in rows[:TOP_K]:
        folder = run_dir / "trials" / r["trial_id"]
        if (folder / "report.md").is_file() and not (folder / "report.html").is_file():
            text = _local_links((folder / "report.md").read_text(encoding="utf-8"))
            write_text(
                folder / "report.html",
                html_page(text, f"advtrain robustness report: {r['trial_id']}"),
            )
        if (folder / "report.html").is_file():
            out.append(r)
    return out


# --------------------------------------------------------------------------- the report


@dataclasses.dataclass
class _Report:
    """What the report is made of; `markdown` writes it for report.md or for report.html."""

    data: dict
    rows: list[dict]
    evaluated: list[dict]
    pf: _Front
    pareto_png: bool
    curves_png: bool
    trial_pages: list[dict]
    files: list[str]


def _threat(tm: dict) -> str:
    """trials.json's threat model in `ThreatModel.describe`'s words (the one rendering)."""
    return ThreatModel.from_dict(tm).describe()


def _bracket(r: dict) -> str:
    return report.bracket(
        r["test_clean_acc"],
        r["test_robust_acc"],
        r.get("test_flags_failed") or (),
        r.get("test_certified_acc"),
        r.get("test_certified_by"),
        r.get("test_certified_note"),
    )


def _intro(data: dict) -> list[str]:
    tm = data["threat_model"]
    obj = data.get("objective") or {"metric": "val_robust_acc", "attack": "pgd", "n": "?"}
    return [
        f"# {TITLE}",
        "",
        f"Threat model (fixed for every trial): **{_threat(tm)}**.",
        "",
        (
            f"- The search's objective, `{obj.get('metric', 'val_robust_acc')}`, is a cheap probe: "
            f"{obj['attack'].upper()} on the first {obj['n']} validation examples at {tm['norm']} "
            f"eps {tm['eps']:g}, after every epoch. It ranks the trials and steers the scheduler."
        ),
        (
            f"- The test columns are the full `{tm['suite']}` suite on the {tm['split']} split, "
            "run once on each trial's final model (for trials the scheduler stopped: their last "
            "checkpoint, evaluated by the driver). They never steered the search."
        ),
        (
            "- A robust accuracy marked `<=` is an upper bound: that trial's model failed a "
            f"sanity check (named beside it, see [{HEADING.lower()}](#{ANCHOR})). Such trials rank "
            "below every trial that passed."
        ),
        (
            "- `test_certified_acc` is proven by bound propagation on the same test examples "
            "(a lower bound: no input in the eps-ball changes those predictions); `-` when "
            'certification did not run, "not available" when the model has a layer the bounds '
            "cannot cover."
        ),
    ]


def _front_lines(pf: _Front, digits: int) -> list[str]:
    lines = [
        f"- {p['label']}: clean {p['clean']:.{digits}f}, robust {p['robust']:.{digits}f}"
        for p in pf.front
    ]
    lines = lines or ["- no evaluated trial"]
    return lines + [
        f"- not on the front, flagged: {p['label']}: clean {p['clean']:.{digits}f}, robust "
        f"{report.robust_cell(p['robust'], p['flags_failed'], digits)}"
        for p in pf.flagged
    ]


def _markdown(rep: _Report, digits: int, page: str) -> str:
    """The report as Markdown, linking each trial's report.`page` ("md" or "html")."""
    md = [*_intro(rep.data), "", "## Ranked trials", "", _table(rep.rows, digits), ""]
    if rep.trial_pages:
        md += [
            "Evaluation reports: "
            + ", ".join(
                f"[#{r['rank']} {r['trial_id']}](trials/{r['trial_id']}/report.{page})"
                for r in rep.trial_pages
            )
            + ".",
            "",
        ]
    md += ["## Certified <= robust <= clean (test)", ""]
    md += [f"- {r['trial_id']}: {_bracket(r)}" for r in rep.evaluated] or ["- no evaluated trial"]
    md += ["", "## Clean vs robust (test) Pareto front", "", *_front_lines(rep.pf, digits)]
    if rep.pareto_png:
        md += ["", "![Pareto front](pareto.png)"]
    if rep.curves_png:
        md += [
            "",
            "## Accuracy against eps (top trials)",
            "",
            "![accuracy vs eps](accuracy_vs_eps.png)",
        ]
    if rep.pf.flagged:
        md += ["", "## Sanity-check warnings", ""]
        md += [
            f"- WARNING {p['label']}: failed {', '.join(flag_link(f) for f in p['flags_failed'])}"
            for p in rep.pf.flagged
        ]
    best = rep.data.get("best_trial")
    if best and "best_model.keras" in rep.files:
        pages = {r["trial_id"] for r in rep.trial_pages}
        evaluation = (
            f"; its evaluation: [report](trials/{best}/report.{page})" if best in pages else ""
        )
        md += ["", f"Best model: [best_model.keras](best_model.keras) (trial {best}){evaluation}."]
    others = [n for n in rep.files if n != "best_model.keras"] + (
        ["report.md"] if page == "html" else []
    )
    md += ["", "Files: " + ", ".join(f"[{name}]({name})" for name in others) + "."]
    md += ["", *flags_markdown()]
    return "\n".join(md) + "\n"


def _summary(run_dir: Path, data: dict, table: str, pf: _Front) -> list[str]:
    """The lines the command prints."""
    lines = [f"Threat model: {_threat(data['threat_model'])}", table]
    if pf.front:
        lines.append(
            "Pareto front (test clean, robust): "
            + "; ".join(f"{p['label']} ({p['clean']:.3f}, {p['robust']:.3f})" for p in pf.front)
        )
    lines += [
        f"WARNING: trial {p['label']} failed {', '.join(p['flags_failed'])}: its robust accuracy "
        f"{report.robust_cell(p['robust'], p['flags_failed'])} is an upper bound"
        for p in pf.flagged
    ]
    lines.append(f"Report: {run_dir / 'report.md'} (and report.html)")
    return lines


def write_all(run_dir: Path) -> list[str]:
    """Builds results.csv/.md, pareto.png, accuracy_vs_eps.png, report.md/.html and the top
    trials' report.html from the folder's trials.json (and the trials' report.json/.md).

    Returns:
        The lines to print: the threat model, the table, the front, warnings, the report's path.
    """
    run_dir = Path(run_dir)
    data = json.loads((run_dir / "trials.json").read_text())
    rows = data["trials"]
    _write_csv(run_dir, rows)
    table = _table(rows)
    write_text(run_dir / "results.md", table + "\n")
    evaluated = [r for r in rows if r["test_robust_acc"] is not None]
    pf = _front(evaluated)
    pareto_png, curves_png = _plots(run_dir, rows, pf)
    files = [
        n
        for n in ("best_model.keras", "results.csv", "results.md", "trials.json")
        if (run_dir / n).is_file()
    ]
    rep = _Report(
        data, rows, evaluated, pf, pareto_png, curves_png, _trial_pages(run_dir, rows), files
    )
    write_text(run_dir / "report.md", _markdown(rep, 4, "md"))
    # People read the page: three decimals (the noise of a few hundred examples is larger).
    write_text(run_dir / "report.html", html_page(_markdown(rep, 3, "html"), TITLE))
    return _summary(run_dir, data, table, pf)
