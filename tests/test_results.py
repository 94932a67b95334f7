"""The search results stage without Ray: ranking, the table, the Pareto front and the report
when a trial's model failed a sanity check (its robust accuracy is only an upper bound)."""

from __future__ import annotations

import csv
import json

from workflows import render as results  # the rendering half: no Ray, no TensorFlow

THREAT = {"norm": "linf", "eps": 0.3, "suite": "standard", "n": 500, "split": "test"}


def _trial(trial_id, val_robust, test_clean, test_robust, failed=()):
    return {
        "trial_id": trial_id,
        "config": {"eps": 0.3},
        "val_clean_acc": 0.98,
        "val_robust_acc": val_robust,
        "test_clean_acc": test_clean,
        "test_robust_acc": test_robust,
        "test_flags_failed": list(failed),
        "epochs_run": 2,
        "stopped": "no",
        "wall_s": 10.0,
    }


def _write(tmp_path, rows):
    ranked = results.rank(rows)
    (tmp_path / "trials.json").write_text(
        json.dumps(
            {
                "threat_model": THREAT,
                "objective": {
                    "metric": "val_robust_acc",
                    "attack": "pgd-10",
                    "split": "val",
                    "n": 256,
                },
                "metric": "val_robust_acc",
                "trials": ranked,
                "best_trial": ranked[0]["trial_id"],
            }
        )
    )
    return ranked, results.write_all(tmp_path)


def test_rank_flagged_trial_never_first_on_its_upper_bound():
    rows = [
        _trial("masked", 0.99, 0.97, 0.96, ["zero-gradients", "large-eps"]),
        _trial("honest", 0.80, 0.98, 0.85),
    ]
    assert [r["trial_id"] for r in results.rank(rows)] == ["honest", "masked"]


def test_rank_orders_by_validation_robust_accuracy_then_full_training():
    rows = [
        {"trial_id": "a", "val_robust_acc": 0.5, "val_clean_acc": 0.9, "stopped": "asha"},
        {"trial_id": "b", "val_robust_acc": 0.7, "val_clean_acc": 0.8, "stopped": "no"},
        {"trial_id": "c", "val_robust_acc": 0.5, "val_clean_acc": 0.8, "stopped": "no"},
    ]
    assert [r["trial_id"] for r in results.rank(rows)] == ["b", "c", "a"]


def test_rank_on_the_certified_probe_when_the_search_metric_says_so():
    rows = [
        {"trial_id": "a", "val_robust_acc": 0.9, "val_certified_acc": 0.2, "stopped": "no"},
        {"trial_id": "b", "val_robust_acc": 0.7, "val_certified_acc": 0.6, "stopped": "no"},
        {"trial_id": "c", "val_robust_acc": 0.8, "val_certified_acc": 0.0, "stopped": "no"},
    ]
    assert [r["trial_id"] for r in results.rank(rows, "val_certified_acc")] == ["b", "a", "c"]
    assert [r["trial_id"] for r in results.rank(rows)] == ["a", "c", "b"]


def test_write_all_marks_flagged_trial_as_upper_bound_everywhere(tmp_path):
    rows = [
        _trial("masked", 0.99, 0.97, 0.96, ["large-eps", "zero-gradients"]),
        _trial("honest", 0.80, 0.98, 0.85),
        _trial("weaker", 0.70, 0.99, 0.75),
    ]
    _ranked, lines = _write(tmp_path, rows)
    bound = "<= 0.9600 (upper bound: large-eps, zero-gradients)"
    table = (tmp_path / "results.md").read_text()
    masked_row = next(line for line in table.splitlines() if "| masked |" in line)
    assert (
        bound in masked_row and "<= 0.9900 (upper bound: large-eps, zero-gradients)" in masked_row
    )
    honest_row = next(line for line in table.splitlines() if "| honest |" in line)
    assert "| 0.8500 |" in honest_row and "<=" not in honest_row
    with open(tmp_path / "results.csv") as f:
        csv_rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert csv_rows["masked"]["test_flags_failed"] == "large-eps;zero-gradients"
    # One column per searched key, named as Tune's ResultGrid.get_dataframe names them.
    assert csv_rows["masked"]["config/eps"] == "0.3" and "config" not in csv_rows["masked"]
    assert (
        float(csv_rows["masked"]["test_robust_acc"]) == 0.96
    )  # the number itself, flagged beside it
    report = (tmp_path / "report.md").read_text()
    # The front runs through trials that passed; the flagged one is listed apart, as a bound.
    front = report.split("## Clean vs robust (test) Pareto front")[1].split("![Pareto front]")[0]
    assert "- honest: clean 0.9800, robust 0.8500" in front and "- weaker: clean 0.9900" in front
    assert f"- not on the front, flagged: masked: clean 0.9700, robust {bound}" in front
    assert "cheap probe: PGD-10 on the first 256 validation examples at linf eps 0.3" in report
    assert "full `standard` suite on the test split" in report
    assert any(
        line.startswith("WARNING: trial masked failed large-eps, zero-gradients") and bound in line
        for line in lines
    )
    assert (tmp_path / "pareto.png").read_bytes().startswith(b"\x89PNG")
    assert "<strong>" in (tmp_path / "report.html").read_text()  # markdown-it: **bold**


def test_write_all_certified_column_bracket_and_not_available(tmp_path):
    proven = {
        **_trial("proven", 0.90, 0.98, 0.93),
        "test_certified_acc": 0.91,
        "test_certified_by": "crown-ibp",
    }
    lstm = {
        **_trial("lstm", 0.80, 0.97, 0.60),
        "test_certified_acc": None,
        "test_certified_note": "not available (layer 'lstm')",
    }
    _ranked, lines = _write(tmp_path, [proven, lstm, _trial("old", 0.7, 0.96, 0.5)])
    table = (tmp_path / "results.md").read_text()
    header = table.splitlines()[0]
    assert "| test_robust_acc | test_certified_acc |" in header
    assert "| 0.9300 | 0.9100 |" in next(
        line for line in table.splitlines() if "| proven |" in line
    )
    assert "| not available (layer 'lstm') |" in next(
        line for line in table.splitlines() if "| lstm |" in line
    )
    assert "| 0.5000 | - |" in next(
        line for line in table.splitlines() if "| old |" in line
    )  # not run
    with open(tmp_path / "results.csv") as f:
        csv_rows = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert (
        float(csv_rows["proven"]["test_certified_acc"]) == 0.91
        and csv_rows["lstm"]["test_certified_acc"] == ""
    )
    report = (tmp_path / "report.md").read_text()
    assert "- proven: certified 0.910 (crown-ibp) <= robust 0.930 <= clean 0.980" in report
    assert "- lstm: certified not available (layer 'lstm'); robust 0.600 <= clean 0.970" in report
    assert "- old: robust 0.500 <= clean 0.960" in report
    assert "<th>test_certified_acc</th>" in (tmp_path / "report.html").read_text()
    assert any("test_certified_acc" in line for line in lines)


def test_write_all_csv_one_column_per_config_key_and_durations(tmp_path):
    rows = [
        {**_trial("a", 0.9, 0.98, 0.9), "config": {"eps": 0.3, "steps": 10}, "wall_s": 252.4},
        {
            **_trial("b", 0.8, 0.97, 0.8),
            "config": {"eps": 0.1, "schedule": "cosine"},
            "wall_s": 56.6247,
        },
    ]
    _write(tmp_path, rows)
    with open(tmp_path / "results.csv") as f:
        reader = csv.DictReader(f)
        table = list(reader)
    assert reader.fieldnames[:5] == [
        "rank",
        "trial_id",
        "config/eps",
        "config/steps",
        "config/schedule",
    ]
    assert [(r["config/eps"], r["config/steps"], r["config/schedule"]) for r in table] == [
        ("0.3", "10", ""),
        ("0.1", "", "cosine"),
    ]
    assert float(table[0]["wall_s"]) == 252.4  # the number in the CSV, a duration for people
    md = (tmp_path / "results.md").read_text()
    assert "| 4 min 12 s |" in md and "| 57 s |" in md and "56.6247" not in md
    html = (tmp_path / "report.html").read_text()
    assert (
        '<td class="num">0.900</td>' in html and "0.9000" not in html
    )  # three decimals on the page
    assert (
        'href="docs/' not in html and 'href="#large-eps"' not in html
    )  # no flag failed: none linked


def test_write_all_trial_page_of_an_older_report_links_inside_the_folder(tmp_path):
    rows = [_trial("old", 0.9, 0.98, 0.9, ["large-eps"])]
    trial = tmp_path / "trials" / "old"
    trial.mkdir(parents=True)
    # As report.md read before the reports carried their flag explanations.
    (trial / "report.md").write_text(
        "# Robustness report\n\n- see [docs/flags.md](docs/flags.md).\n\n"
        "## Sanity checks\n\n- **WARNING** large-eps FAILED: x "
        "([large-eps](docs/flags.md#large-eps))\n"
    )
    _write(tmp_path, rows)
    page = (trial / "report.html").read_text()
    assert (
        'href="#large-eps"' in page
        and 'id="large-eps"' in page
        and 'href="#what-the-flags-mean"' in page
    )
    assert 'href="docs/' not in page
    assert 'href="trials/old/report.html"' in (tmp_path / "report.html").read_text()
    assert "(trials/old/report.md)" in (tmp_path / "report.md").read_text()
