"""The search results stage without Ray: ranking, the table, the Pareto front and the report
when a trial's model failed a sanity check (its robust accuracy is only an upper bound)."""

from __future__ import annotations

import csv
import json

from workflows import results

THREAT = {"norm": "linf", "eps": 0.3, "suite": "standard", "n": 500, "split": "test"}


def _trial(trial_id, val_robust, test_clean, test_robust, failed=()):
    return {"trial_id": trial_id, "config": {"eps": 0.3}, "val_clean_acc": 0.98, "val_robust_acc": val_robust,
            "test_clean_acc": test_clean, "test_robust_acc": test_robust, "test_flags_failed": list(failed),
            "epochs_run": 2, "stopped": "no", "wall_s": 10.0}


def _write(tmp_path, rows):
    ranked = results.rank(rows)
    (tmp_path / "trials.json").write_text(json.dumps({
        "threat_model": THREAT, "objective": {"metric": "val_robust_acc", "attack": "pgd-10", "split": "val", "n": 256},
        "metric": "val_robust_acc", "trials": ranked, "best_trial": ranked[0]["trial_id"]}))
    return ranked, results.write_all(tmp_path)


def test_rank_flagged_trial_never_first_on_its_upper_bound():
    rows = [_trial("masked", 0.99, 0.97, 0.96, ["zero-gradients", "large-eps"]),
            _trial("honest", 0.80, 0.98, 0.85)]
    assert [r["trial_id"] for r in results.rank(rows)] == ["honest", "masked"]


def test_rank_orders_by_validation_robust_accuracy_then_full_training():
    rows = [{"trial_id": "a", "val_robust_acc": 0.5, "val_clean_acc": 0.9, "stopped": "asha"},
            {"trial_id": "b", "val_robust_acc": 0.7, "val_clean_acc": 0.8, "stopped": "no"},
            {"trial_id": "c", "val_robust_acc": 0.5, "val_clean_acc": 0.8, "stopped": "no"}]
    assert [r["trial_id"] for r in results.rank(rows)] == ["b", "c", "a"]


def test_write_all_marks_flagged_trial_as_upper_bound_everywhere(tmp_path):
    rows = [_trial("masked", 0.99, 0.97, 0.96, ["large-eps", "zero-gradients"]),
            _trial("honest", 0.80, 0.98, 0.85), _trial("weaker", 0.70, 0.99, 0.75)]
    ranked, lines = _write(tmp_path, rows)
    bound = "<= 0.9600 (upper bound: large-eps, zero-gradients)"
    table = (tmp_path / "results.md").read_text()
    masked_row = next(line for line in table.splitlines() if "| masked |" in line)
    assert bound in masked_row and "<= 0.9900 (upper bound: large-eps, zero-gradients)" in masked_row
    honest_row = next(line for line in table.splitlines() if "| honest |" in line)
    assert "| 0.8500 |" in honest_row and "<=" not in honest_row
    with open(tmp_path / "results.csv") as f:
        csv_rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert csv_rows["masked"]["test_flags_failed"] == "large-eps;zero-gradients"
    assert float(csv_rows["masked"]["test_robust_acc"]) == 0.96  # the number itself, flagged beside it
    report = (tmp_path / "report.md").read_text()
    # The front runs through trials that passed; the flagged one is listed apart, as a bound.
    front = report.split("## Clean vs robust (test) Pareto front")[1].split("![Pareto front]")[0]
    assert "- honest: clean 0.9800, robust 0.8500" in front and "- weaker: clean 0.9900" in front
    assert f"- not on the front, flagged: masked: clean 0.9700, robust {bound}" in front
    assert "cheap probe: PGD-10 on the first 256 validation examples at linf eps 0.3" in report
    assert "full `standard` suite on the test split" in report
    assert any(line.startswith("WARNING: trial masked failed large-eps, zero-gradients") and bound in line
               for line in lines)
    assert (tmp_path / "pareto.png").read_bytes().startswith(b"\x89PNG")
    assert "<b>" in (tmp_path / "report.html").read_text()
