"""Tests of advtrain.report: Pareto front, Markdown tables, atomic writes and PNG plots."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from advtrain.flag_text import FLAG_TEXT, flags_markdown
from advtrain.page import html_page, slug
from advtrain.report import (
    bracket,
    certified_cell,
    duration,
    markdown_table,
    pareto_front,
    plot_accuracy_vs_eps,
    plot_adversarial_grid,
    plot_pareto,
    robust_cell,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _per_eps(robust):
    return [
        {
            "norm": "linf",
            "eps": e,
            "split": "test",
            "n": 100,
            "suite": "standard",
            "clean_acc": 0.99,
            "robust_acc": r,
            "fgsm_acc": min(r + 0.1, 0.99),
            "per_attack": {
                "clean": 0.99,
                "pgd-100x5": r + 0.02,
                "apgd-ce-100": r + 0.01,
                "apgd-t-100-top9": r,
            },
        }
        for e, r in zip((0.1, 0.2, 0.3), robust, strict=True)
    ]


def _only_file(folder, name):
    assert sorted(p.name for p in folder.iterdir()) == [name]  # no temp file left behind
    data = (folder / name).read_bytes()
    assert data.startswith(PNG) and len(data) > 1000


def test_pareto_front_hand_made_points_exact():
    points = [
        (0.99, 0.10),
        (0.98, 0.90),
        (0.97, 0.80),
        (0.95, 0.92),
        (0.95, 0.91),
        (0.90, 0.92),
        (0.99, 0.05),
    ]
    assert pareto_front(points) == [(0.95, 0.92), (0.98, 0.90), (0.99, 0.10)]


def test_pareto_front_mappings_duplicates_kept():
    a = {"label": "a", "clean_acc": 0.9, "robust_acc": 0.5}
    b = {"label": "b", "clean_acc": 0.9, "robust_acc": 0.5}
    c = {"label": "c", "clean_acc": 0.8, "robust_acc": 0.4}
    assert [p["label"] for p in pareto_front([c, a, b])] == ["a", "b"]
    short = [
        {"clean": 0.9, "robust": 0.3},
        {"clean": 0.8, "robust": 0.6},
        {"clean": 0.7, "robust": 0.5},
    ]
    assert pareto_front(short) == short[1::-1]
    assert pareto_front([]) == []


def test_markdown_table_formats_floats_and_escapes_pipes():
    table = markdown_table(
        [{"eps": 0.3, "acc": 0.91234, "name": "a|b"}, {"eps": 0.1}],
        ["eps", ("acc", "accuracy"), "name"],
    )
    assert table.splitlines() == [
        "| eps | accuracy | name |",
        "|---|---|---|",
        "| 0.3000 | 0.9123 | a\\|b |",
        "| 0.1000 |  |  |",
    ]


def test_robust_cell_without_flags_is_the_number():
    assert robust_cell(0.9052) == "0.9052"
    assert robust_cell(None) == "-"


def test_robust_cell_with_failed_flags_is_an_upper_bound_naming_them():
    cell = robust_cell(0.979, ["large-eps", "zero-gradients"])
    assert cell == "<= 0.9790 (upper bound: large-eps, zero-gradients)"


def test_bracket_certified_le_robust_le_clean_three_decimals():
    assert bracket(0.991, 0.934, certified=0.912, method="crown-ibp") == (
        "certified 0.912 (crown-ibp) <= robust 0.934 <= clean 0.991"
    )


def test_bracket_failed_flags_robust_is_an_upper_bound_naming_them():
    assert bracket(0.991, 0.934, ["zero-gradients"], certified=0.0, method="ibp") == (
        "certified 0.000 (ibp) <= robust <= 0.934 (upper bound: zero-gradients) <= clean 0.991"
    )


def test_bracket_not_available_and_not_run():
    assert bracket(0.991, 0.934, note="not available (layer 'lstm')") == (
        "certified not available (layer 'lstm'); robust 0.934 <= clean 0.991"
    )
    assert bracket(0.991, 0.934) == "robust 0.934 <= clean 0.991"


def test_certified_cell_number_method_or_reason():
    assert certified_cell(0.912, "crown-ibp") == "0.9120 (crown-ibp)"
    assert (
        certified_cell(None, note="not available (layer 'lstm')") == "not available (layer 'lstm')"
    )
    assert certified_cell(None) == "-"


def test_plot_accuracy_vs_eps_with_certified_curve_writes_png(tmp_path):
    rows = _per_eps([0.9, 0.7, 0.5])
    for r, c in zip(rows, (0.8, 0.3, None), strict=True):
        r["certified_acc"] = c  # None: not available at that eps, left off the curve
    plot_accuracy_vs_eps([("a", rows), ("b", _per_eps([0.8, 0.4, 0.1]))], tmp_path / "acc.png")
    _only_file(tmp_path, "acc.png")


def test_plot_accuracy_vs_eps_report_dict_writes_png(tmp_path):
    out = tmp_path / "plots"
    out.mkdir()
    plot_accuracy_vs_eps({"per_eps": _per_eps([0.9, 0.7, 0.5])}, out / "acc.png")
    _only_file(out, "acc.png")


def test_plot_accuracy_vs_eps_several_models_writes_png(tmp_path):
    plot_accuracy_vs_eps(
        [("pgd", _per_eps([0.9, 0.7, 0.5])), ("fgsm", {"per_eps": _per_eps([0.8, 0.4, 0.1])})],
        tmp_path / "acc.png",
        title="two models",
    )
    _only_file(tmp_path, "acc.png")


def test_plot_accuracy_vs_eps_missing_per_eps_raises(tmp_path):
    with pytest.raises(ValueError, match="'per_eps'"):
        plot_accuracy_vs_eps({"results": []}, tmp_path / "acc.png")


def test_plot_adversarial_grid_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(20, 28, 28, 1)).astype(np.float32)
    x_adv = np.clip(x + rng.uniform(-0.3, 0.3, x.shape), 0, 1)
    y = rng.integers(0, 10, 20)
    plot_adversarial_grid(x, x_adv, y, y, (y + 1) % 10, tmp_path / "grid.png", n=12)
    _only_file(tmp_path, "grid.png")


def test_plot_adversarial_grid_mismatched_lengths_raises(tmp_path):
    x = np.zeros((4, 28, 28, 1))
    with pytest.raises(ValueError, match="Received: lengths 4, 4, 3, 4, 4"):
        plot_adversarial_grid(x, x, np.zeros(3), np.zeros(4), np.zeros(4), tmp_path / "g.png")


def test_plot_adversarial_grid_bad_n_raises(tmp_path):
    x = np.zeros((4, 28, 28, 1))
    with pytest.raises(ValueError, match="Received: n=0"):
        plot_adversarial_grid(x, x, np.zeros(4), np.zeros(4), np.zeros(4), tmp_path / "g.png", n=0)


def test_plot_pareto_writes_png(tmp_path):
    points = [
        {"label": f"t{i}", "clean_acc": c, "robust_acc": r}
        for i, (c, r) in enumerate([(0.99, 0.1), (0.98, 0.9), (0.97, 0.8), (0.95, 0.92)])
    ]
    plot_pareto(points, pareto_front(points), tmp_path / "pareto.png")
    _only_file(tmp_path, "pareto.png")


def test_report_module_import_loads_no_tensorflow():
    code = (
        "import sys, advtrain.report; "
        "sys.exit(int('tensorflow' in sys.modules or 'matplotlib' in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False)
    assert result.returncode == 0


def test_duration_reads_as_seconds_minutes_hours():
    assert [duration(s) for s in (0.4, 56.6247, 252.4, 3599.6, 7500)] == [
        "0 s",
        "57 s",
        "4 min 12 s",
        "1 h 00 min",
        "2 h 05 min",
    ]
    assert duration(None) == "-"


def test_cells_take_their_decimals():
    assert robust_cell(0.97912, ["large-eps"], digits=3) == "<= 0.979 (upper bound: large-eps)"
    assert certified_cell(0.9124, "ibp", digits=3) == "0.912 (ibp)"
    assert markdown_table([{"acc": 0.91234}], ["acc"], digits=3).splitlines()[-1] == "| 0.912 |"


def test_html_page_numeric_cells_heading_ids_and_no_raw_html():
    md = (
        "# Title\n\n| name | acc | time |\n|---|---|---|\n| a<b | <= 0.960 (upper bound: x) | 4 "
        "min 12 s |\n\n## Title\n"
    )
    page = html_page(md, "t <1>")
    assert (
        page.startswith("<!doctype html>")
        and "<title>t &lt;1&gt;</title>" in page
        and "<style>" in page
    )
    assert "<td>a&lt;b</td>" in page and '<td class="num">&lt;= 0.960 (upper bound: x)</td>' in page
    assert '<td class="num">4 min 12 s</td>' in page
    assert '<h1 id="title">' in page and '<h2 id="title-1">' in page  # unique, as GitHub makes them
    assert slug("What the flags mean") == "what-the-flags-mean"


def test_flags_markdown_has_one_anchored_heading_per_flag_asked_in_order():
    lines = flags_markdown(["zero-gradients", "large-eps", "not-a-flag"])
    assert lines[0] == "## What the flags mean"
    assert [x for x in lines if x.startswith("### ")] == ["### large-eps", "### zero-gradients"]
    assert len([x for x in flags_markdown() if x.startswith("### ")]) == len(FLAG_TEXT) == 9
    assert flags_markdown(["not-a-flag"]) == []
    page = html_page("\n".join(flags_markdown()), "flags")
    assert all(f'id="{i}"' in page for i in FLAG_TEXT)


def test_plot_accuracy_vs_eps_starts_at_eps_zero_with_clean_accuracy(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "plot",
        lambda self, x, y, *a, **k: drawn.append((list(x), list(y))) or real(self, x, y, *a, **k),
    )
    plot_accuracy_vs_eps({"per_eps": _per_eps([0.9, 0.7, 0.5])}, tmp_path / "acc.png")
    assert drawn and all(
        x[0] == 0.0 and y[0] == 0.99 for x, y in drawn
    )  # every curve, clean at eps 0


def test_plots_are_written_at_twice_screen_resolution(tmp_path):
    from matplotlib import image

    points = [
        {"label": "a-long-trial-label-at-the-right-edge", "clean": 0.99, "robust": 0.9},
        {"label": "b", "clean": 0.9, "robust": 0.95},
    ]
    plot_pareto(points, pareto_front(points), tmp_path / "pareto.png")
    height, width = image.imread(tmp_path / "pareto.png").shape[:2]
    assert width > 1000 and height > 800  # 6.0 x 4.6 inches at 200 dpi, trimmed to the drawing
