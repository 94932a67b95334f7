"""Search results collected from Tune: every trial's row, the stopped trials' evaluation, the
top trials' reports and the best model.

`collect` turns a Tune ResultGrid into `trials.json` (plus the best model and the top trials'
evaluation reports) in the experiment folder; `workflows.render.write_all` (re-exported here)
builds everything else from that folder alone, without Ray, so `advtrain report DIR` can
rebuild it. Every file is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.train import Checkpoint

from advtrain import evaluation
from advtrain.files import copy_file, write_json
from advtrain.models import load_model
from workflows.render import COLUMNS, TOP_K, rank, write_all
from workflows.spec import RunSpec, eval_data

__all__ = ["COLUMNS", "collect", "evaluate_trial", "rank", "write_all"]


def evaluate_trial(model, spec: RunSpec, data, out: Path) -> dict[str, Any]:
    """A trial's final evaluation, the same for every trial whoever runs it: the full suite of
    the search's threat model on its test examples. Writes report.json/.md/.html into `out`.

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
    return {
        "test_clean_acc": r.clean_acc,
        "test_robust_acc": r.robust_acc,
        "test_certified_acc": r.certified_acc,
        "test_certified_by": r.certified_method,
        "test_certified_note": r.certified_note,
        "test_flags_failed": rep.failed_at(eps),
    }


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


def _row(result, searched: list[str], scheduler: str, spec: RunSpec) -> dict[str, Any]:
    """One trial's row from its Tune result: its searched config, metrics and how it ended."""
    m = dict(result.metrics or {})
    cfg = result.config or {}
    return {
        "trial_id": m.get("trial_id") or Path(result.path).name,
        "config": {
            k: (round(cfg[k], 4) if isinstance(cfg.get(k), float) else cfg.get(k)) for k in searched
        },
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


def collect(grid, run_dir: Path, spec: RunSpec, *, filesystem=None) -> list[dict]:
    """Reads every trial of the ResultGrid into rows; evaluates trials the scheduler stopped
    (from their last checkpoint, read on `filesystem`: the pyarrow filesystem of the search's
    storage, `None` for a local run folder); copies the best model and the top trials' reports."""
    search = json.loads((run_dir / "spec.json").read_text())["search"]
    searched, scheduler = list(search["space"]), search["scheduler"]
    # Searches saved before `search.metric` ranked on PGD.
    metric = search.get("metric", "val_robust_acc")
    rows = [_row(result, searched, scheduler, spec) for result in grid]
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
        for name in ("report.json", "report.md", "report.html", "model.keras", "history.json"):
            if (src / name).is_file():
                copy_file(src / name, dst / name)
    best = next((r for r in ranked if (trials_dir / r["trial_id"] / "model.keras").is_file()), None)
    if best is not None:
        copy_file(trials_dir / best["trial_id"] / "model.keras", run_dir / "best_model.keras")
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in ranked]
    attack = (
        f"pgd-{spec.train.probe_steps}" if metric == "val_robust_acc" else "ibp+crown-ibp bounds"
    )
    objective = {"metric": metric, "attack": attack, "split": "val", "n": spec.train.probe_size}
    write_json(
        run_dir / "trials.json",
        {
            "threat_model": spec.threat_model.to_dict(),
            "objective": objective,
            "metric": metric,
            "trials": clean,
            "best_trial": best["trial_id"] if best else None,
        },
    )
    return clean
