"""Search results: the ranked table, the clean-vs-robust Pareto front, curves and the report.

`collect` turns a Tune ResultGrid into `trials.json` (plus the best model and the top trials'
evaluation reports) in the experiment folder; `write_all` builds everything else from that folder
alone, so `advtrain report DIR` can rebuild it without Ray. Every file is written atomically.
"""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import Any

from ray.train import Checkpoint

from advtrain import evaluation, report
from advtrain.files import copy_file, write_json, write_text
from advtrain.models import load_model
from workflows.spec import RunSpec, eval_data

__all__ = ["evaluate_trial", "collect", "write_all", "rank", "COLUMNS"]

TOP_K = 3
COLUMNS = ("rank", "trial_id", "config", "val_clean_acc", "val_robust_acc", "val_certified_acc", "test_clean_acc",
           "test_robust_acc", "test_certified_acc", "test_flags_failed", "epochs_run", "stopped", "wall_s")
# Shown as upper bounds, with the failed flags beside them, when a trial's model failed a check.
ROBUST_COLUMNS = ("val_robust_acc", "test_robust_acc")


def evaluate_trial(model, spec: RunSpec, data, out: Path) -> dict[str, Any]:
    """A trial's final evaluation, the same for every trial whoever runs it: the full suite of
    the search's threat model on its test examples. Writes report.json/.md into `out`.

    Returns:
        The `test_*` metrics at the judged eps: clean and robust accuracy, the flags that
        failed (non-empty: the robust accuracy is an upper bound), and the certified accuracy
        (`test_certified_acc`, a proven lower bound; None when not run or not available, with
        `test_certified_note` saying why) with the method that certified most.
    """
    rep = evaluation.evaluate_split(model, spec.eval, data)
    rep.write(out)
    eps = spec.threat_model.eps
    r = rep.result(eps)
    return {"test_clean_acc": r.clean_acc, "test_robust_acc": r.robust_acc,
            "test_certified_acc": r.certified_acc, "test_certified_by": r.certified_method,
            "test_certified_note": r.certified_note, "test_flags_failed": rep.failed_at(eps)}


def _stopped(metrics: dict, error: Any, scheduler: str) -> str:
    """Why the trial ended where it did: "no", "overfitting guard", "error", or the scheduler's
    name ("asha", "sha") when it was stopped at a rung."""
    if error is not None:
        return "error"
    if metrics.get("evaluated"):
        return "overfitting guard" if metrics.get("stopped_early") else "no"
    return scheduler


def _evaluate_stopped(row: dict, spec: RunSpec, data, filesystem) -> None:
    """Evaluates a trial the scheduler stopped, from its last Train checkpoint, on the same
    threat model and test examples as finished trials (its own last act never ran).

    The checkpoint path comes from the trial's metrics, where Tune's report has dropped the
    URI's scheme: it is read back on the storage's own filesystem."""
    import tempfile

    src = Path(Checkpoint(row["_train_checkpoint"], filesystem=filesystem).to_directory())
    out = Path(tempfile.mkdtemp(prefix="advtrain-eval-"))
    row.update(evaluate_trial(load_model(src / "model.keras"), spec, data, out))
    copy_file(src / "model.keras", out / "model.keras")
    row["_dir"] = out


def collect(grid, run_dir: Path, spec: RunSpec, *, filesystem=None) -> list[dict]:
    """Reads every trial of the ResultGrid into rows; evaluates trials the scheduler stopped
    (from their last checkpoint, read on `filesystem`: the pyarrow filesystem of the search's
    storage, `None` for a local run folder); copies the best model and the top trials' reports."""
    search = json.loads((run_dir / "spec.json").read_text())["search"]
    searched, scheduler = list(search["space"]), search["scheduler"]
    metric = search.get("metric", "val_robust_acc")  # searches saved before `search.metric` ranked on PGD
    rows = []
    for result in grid:
        m = dict(result.metrics or {})
        cfg = result.config or {}
        row = {
            "trial_id": m.get("trial_id") or Path(result.path).name,
            "config": {k: (round(cfg[k], 4) if isinstance(cfg.get(k), float) else cfg.get(k)) for k in searched},
            "val_clean_acc": m.get("val_clean_acc"),
            "val_robust_acc": m.get("val_robust_acc"),
            "val_certified_acc": m.get("val_certified_acc"),
            "test_clean_acc": m.get("test_clean_acc"),
            "test_robust_acc": m.get("test_robust_acc"),
            "test_certified_acc": m.get("test_certified_acc"),
            "test_certified_by": m.get("test_certified_by"),
            "test_certified_note": m.get("test_certified_note"),
            "test_flags_failed": m.get("test_flags_failed", []),
            "epochs_run": m.get("epoch"),
            "planned_epochs": spec.train.epochs,
            "stopped": _stopped(m, result.error, scheduler),
            "wall_s": m.get("time_total_s"),
            "error": None if result.error is None else str(result.error).splitlines()[0][:300],
            "_dir": Path(result.checkpoint.to_directory()) if result.checkpoint is not None else None,
            "_train_checkpoint": m.get("checkpoint_path"),
        }
        rows.append(row)
    data = None
    for row in rows:
        if row["stopped"] == scheduler and row["_train_checkpoint"]:
            data = data or eval_data(spec)
            _evaluate_stopped(row, spec, data, filesystem)
            row["evaluated_by"] = "driver (last checkpoint)"
    ranked = rank(rows, metric)
    trials_dir = run_dir / "trials"
    for row in ranked[:TOP_K]:
        src = row.get("_dir")
        if src is None:
            continue
        dst = trials_dir / row["trial_id"]
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("report.json", "report.md", "model.keras", "history.json"):
            if (src / name).is_file():
                copy_file(src / name, dst / name)
    best = next((r for r in ranked if (trials_dir / r["trial_id"] / "model.keras").is_file()), None)
    if best is not None:
        copy_file(trials_dir / best["trial_id"] / "model.keras", run_dir / "best_model.keras")
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in ranked]
    attack = f"pgd-{spec.train.probe_steps}" if metric == "val_robust_acc" else "ibp+crown-ibp bounds"
    objective = {"metric": metric, "attack": attack, "split": "val", "n": spec.train.probe_size}
    write_json(run_dir / "trials.json", {"threat_model": spec.threat_model.to_dict(), "objective": objective,
                                         "metric": metric, "trials": clean,
                                         "best_trial": best["trial_id"] if best else None})
    return clean


def rank(rows: list[dict], metric: str = "val_robust_acc") -> list[dict]:
    """Trials whose model passed every sanity check first (a flagged model's robust accuracy is
    only an upper bound, never a reason to rank it first); then by the search's metric on the
    validation split (`val_robust_acc` or `val_certified_acc`, never the test split), trials
    that trained every epoch before those stopped early, then validation clean accuracy."""
    def key(r):
        full = r.get("stopped") in ("no", "overfitting guard")
        score = r.get(metric)
        return (not r.get("test_flags_failed"), -1.0 if score is None else score, full, r.get("val_clean_acc") or -1.0)

    out = sorted(rows, key=key, reverse=True)
    for i, r in enumerate(out, 1):
        r["rank"] = i
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x) if not isinstance(x, float) else f'{x:g}'}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "-"
    return str(v)


def _cells(r: dict) -> dict[str, str]:
    """A trial's row as shown: its robust accuracies as upper bounds when its model failed a flag."""
    cells = {c: _fmt(r.get(c)) for c in COLUMNS}
    for c in ROBUST_COLUMNS:
        cells[c] = report.robust_cell(r.get(c), r.get("test_flags_failed") or ())
    # Never 0 for a model the bounds cannot cover: "not available (layer 'x')".
    cells["test_certified_acc"] = report.certified_cell(r.get("test_certified_acc"), note=r.get("test_certified_note"))
    return cells


def _bracket(r: dict) -> str:
    return report.bracket(r["test_clean_acc"], r["test_robust_acc"], r.get("test_flags_failed") or (),
                          r.get("test_certified_acc"), r.get("test_certified_by"), r.get("test_certified_note"))


def _csv_cell(v: Any) -> Any:
    if isinstance(v, dict):
        return json.dumps(v)
    if isinstance(v, list):
        return ";".join(map(str, v))
    return "" if v is None else v


def write_all(run_dir: Path) -> list[str]:
    """Builds results.csv/.md, pareto.png, accuracy_vs_eps.png and report.md/.html from the folder."""
    data = json.loads((run_dir / "trials.json").read_text())
    rows, tm = data["trials"], data["threat_model"]

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([_csv_cell(r.get(c)) for c in COLUMNS])
    write_text(run_dir / "results.csv", buf.getvalue())
    table = report.markdown_table([_cells(r) for r in rows], list(COLUMNS))
    write_text(run_dir / "results.md", table + "\n")

    evaluated = [r for r in rows if r["test_robust_acc"] is not None]
    points = [{"label": r["trial_id"], "clean": r["test_clean_acc"], "robust": r["test_robust_acc"],
               "flags_failed": r.get("test_flags_failed") or []} for r in evaluated]
    # The front is drawn through trials whose number is a result; flagged ones are upper bounds.
    front = report.pareto_front([p for p in points if not p["flags_failed"]])
    flagged = [p for p in points if p["flags_failed"]]
    if points:
        report.plot_pareto(points, front, run_dir / "pareto.png", flagged=flagged)
    curves = []
    for r in rows[:TOP_K]:
        p = run_dir / "trials" / r["trial_id"] / "report.json"
        if p.is_file():
            curves.append((f"#{r['rank']} {r['trial_id']}", json.loads(p.read_text())))
    if curves:
        report.plot_accuracy_vs_eps(curves, run_dir / "accuracy_vs_eps.png")

    threat = f"{tm['norm']} eps={tm['eps']:g}, {tm['suite']} suite, {tm['split']} split, n={tm['n'] or 'all'}"
    obj = data.get("objective") or {"metric": "val_robust_acc", "attack": "pgd", "n": "?"}
    md = ["# advtrain search report", "", f"Threat model (fixed for every trial): **{threat}**.", "",
          f"- The search's objective, `{obj.get('metric', 'val_robust_acc')}`, is a cheap probe: "
          f"{obj['attack'].upper()} on the first "
          f"{obj['n']} validation examples at {tm['norm']} eps {tm['eps']:g}, after every epoch. It ranks the trials "
          "and steers the scheduler.",
          f"- The test columns are the full `{tm['suite']}` suite on the {tm['split']} split, run once on each trial's "
          "final model (for trials the scheduler stopped: their last checkpoint, evaluated by the driver). They never "
          "steered the search.",
          "- A robust accuracy marked `<=` is an upper bound: that trial's model failed a sanity check (named beside "
          "it, see docs/flags.md). Such trials rank below every trial that passed.",
          "- `test_certified_acc` is proven by bound propagation on the same test examples (a lower bound: no input "
          "in the eps-ball changes those predictions); `-` when certification did not run, \"not available\" when "
          "the model has a layer the bounds cannot cover.", "",
          "## Ranked trials", "", table, "", "## Certified <= robust <= clean (test)", ""]
    md += [f"- {r['trial_id']}: {_bracket(r)}" for r in evaluated] or ["- no evaluated trial"]
    md += ["", "## Clean vs robust (test) Pareto front", ""]
    md += [f"- {p['label']}: clean {p['clean']:.4f}, robust {p['robust']:.4f}" for p in front] or ["- no evaluated trial"]
    md += [f"- not on the front, flagged: {p['label']}: clean {p['clean']:.4f}, robust "
           f"{report.robust_cell(p['robust'], p['flags_failed'])}" for p in flagged]
    if points:
        md += ["", "![Pareto front](pareto.png)"]
    if curves:
        md += ["", "## Accuracy against eps (top trials)", "", "![accuracy vs eps](accuracy_vs_eps.png)"]
    if flagged:
        md += ["", "## Sanity-check warnings", ""]
        md += [f"- WARNING {p['label']}: failed {', '.join(p['flags_failed'])} (see docs/flags.md)" for p in flagged]
    if data.get("best_trial"):
        md += ["", f"Best model: [best_model.keras](best_model.keras) (trial {data['best_trial']}); its evaluation: "
                   f"[report](trials/{data['best_trial']}/report.md)."]
    md += ["", "Files: [results.csv](results.csv), [results.md](results.md), [trials.json](trials.json)."]
    text = "\n".join(md) + "\n"
    write_text(run_dir / "report.md", text)
    write_text(run_dir / "report.html", _html(text))

    lines = [f"Threat model: {threat}", table]
    if front:
        lines.append("Pareto front (test clean, robust): " + "; ".join(
            f"{p['label']} ({p['clean']:.3f}, {p['robust']:.3f})" for p in front))
    lines += [f"WARNING: trial {p['label']} failed {', '.join(p['flags_failed'])}: its robust accuracy "
              f"{report.robust_cell(p['robust'], p['flags_failed'])} is an upper bound" for p in flagged]
    lines.append(f"Report: {run_dir / 'report.md'} (and report.html)")
    return lines


def _html(markdown: str) -> str:
    """A minimal, dependency-free rendering: headings, lists, tables, images and links."""
    import re

    out, in_table, in_list = [], False, False
    for line in markdown.splitlines():
        esc = html.escape(line)
        esc = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2" style="max-width:720px">', esc)
        esc = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', esc)
        esc = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", esc)
        esc = re.sub(r"`([^`]+)`", r"<code>\1</code>", esc)
        if line.startswith("|"):
            cells = [c.strip() for c in esc.strip("|").split("|")]
            if set("".join(cells)) <= set("-: "):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table border=1 cellpadding=4>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{esc[2:]}</li>")
            continue
        if in_list:
            out.append("</ul>")
            in_list = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{esc[level:].strip()}</h{level}>")
        elif line.strip():
            out.append(f"<p>{esc}</p>")
    if in_table:
        out.append("</table>")
    if in_list:
        out.append("</ul>")
    return "<!doctype html><meta charset=utf-8><title>advtrain search report</title>\n" + "\n".join(out) + "\n"
