"""The search report as a browser sees it: report.html (and a trial's report.html) rendered by
headless Chromium from a folder `write_all` built, without Ray or training. The page must not be
blank and every href/src in the rendered DOM must resolve inside the folder: a relative file
that exists, or an anchor id on the page (the folder is read where it was copied to, without the
advtrain sources).

Chromium is a test requirement (.ci/run installs it): without it these tests fail, never skip.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from test_results import THREAT, _trial

from advtrain.robustness_report import EpsResult, RobustnessReport
from workflows import render

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


@dataclasses.dataclass(frozen=True)
class _Flag:
    """What a report reads of an `advtrain.flags.Flag` (that module loads TensorFlow)."""

    id: str
    passed: bool | None
    message: str
    eps: float | None = None

    @property
    def summary(self) -> str:
        where = f" at eps={self.eps:g}" if self.eps is not None else ""
        return f"{self.id}{where} {'FAILED' if self.passed is False else 'passed'}: {self.message}"

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "passed": self.passed,
            "message": self.message,
            "summary": self.summary,
            "eps": self.eps,
            "doc": f"docs/flags.md#{self.id}",
        }


def _trial_report(robust: float, failed: tuple[str, ...] = ()) -> RobustnessReport:
    """A standard-suite report at eps 0.1, 0.2, 0.3 with its sanity flags, as an evaluation
    writes it."""
    attack = {
        "name": "apgd-ce-100",
        "attack": "apgd",
        "steps": 100,
        "restarts": 1,
        "loss": "ce",
        "step_size": 0.075,
        "targeted": False,
        "target_classes": 0,
    }
    results = tuple(
        EpsResult(
            eps=e,
            clean_acc=0.98,
            robust_acc=robust * f,
            fgsm_acc=min(robust * f + 0.1, 0.98),
            per_attack={"clean": 0.98, "apgd-ce-100": robust * f},
            broken={"apgd-ce-100": 12},
            attack_seconds={"apgd-ce-100": 40.0},
            seconds=56.6247 * f,
            certified_acc=robust * f * 0.9,
            certified={"ibp": robust * f * 0.9},
        )
        for e, f in ((0.1, 1.2), (0.2, 1.1), (0.3, 1.0))
    )
    flags = tuple(_Flag(i, i not in failed, "measured") for i in ("large-eps", "zero-gradients"))
    return RobustnessReport(
        norm="linf",
        eps=(0.1, 0.2, 0.3),
        suite="standard",
        attacks=(attack,),
        reference_attack={"name": "fgsm"},
        steps_scale=1.0,
        n=500,
        split="test",
        seed=0,
        results=results,
        flags=flags,
        seconds=170.0,
        certify=("ibp",),
    )


@pytest.fixture
def search_folder(tmp_path) -> Path:
    """A finished search's folder: trials.json, the top trials' reports, the best model."""
    rows = [
        {**_trial("masked", 0.99, 0.97, 0.96, ["large-eps", "zero-gradients"]), "wall_s": 252.4},
        {
            **_trial("honest", 0.80, 0.98, 0.85),
            "config": {"eps": 0.3, "steps": 10},
            "wall_s": 56.6247,
            "test_certified_acc": 0.81,
            "test_certified_by": "ibp",
        },
        _trial("weaker", 0.70, 0.99, 0.75),
    ]
    ranked = render.rank(rows)
    for r in ranked:
        failed = tuple(r["test_flags_failed"])
        _trial_report(r["test_robust_acc"] * 0.8, failed).write(tmp_path / "trials" / r["trial_id"])
    (tmp_path / "best_model.keras").write_bytes(b"PK\x03\x04 stand-in")
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
    render.write_all(tmp_path)
    return tmp_path


def _chromium() -> str:
    for name in CHROMIUM:
        if path := shutil.which(name):
            return path
    pytest.fail(
        "Chromium is not installed (looked for: "
        + ", ".join(CHROMIUM)
        + "): the report tests need it. "
        "Install it: apt-get install -y --no-install-recommends chromium (.ci/run does)."
    )


def _browse(page: Path, tmp: Path, *extra: str) -> subprocess.Popen:
    """Starts headless Chromium on the page; each run gets its own profile, so several run at
    once."""
    profile = tempfile.mkdtemp(prefix="profile-", dir=tmp)
    cmd = [
        _chromium(),
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--allow-file-access-from-files",
        *extra,
        page.resolve().as_uri(),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err[-2000:]}"
    return out


class _Links(HTMLParser):
    """Every href and src of a DOM, the ids it defines, and its visible text."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.text: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [a[k] for k in ("href", "src") if a.get(k) is not None]
        if a.get("id"):
            self.ids.add(a["id"])
        self._hidden += tag in ("style", "script", "title")

    def handle_endtag(self, tag):
        self._hidden -= tag in ("style", "script", "title")

    def handle_data(self, data):
        if not self._hidden and data.strip():
            self.text.append(data.strip())


def _unresolved(dom: str, page: Path, root: Path) -> list[str]:
    """The links of the page that do not resolve: anchors to no id, files that do not exist,
    and anything absolute or outside the folder (it would break in a copy)."""
    parsed = _Links()
    parsed.feed(dom)
    bad = []
    for link in parsed.links:
        url = urlsplit(link)
        if url.scheme or url.netloc or url.path.startswith("/"):
            bad.append(f"{link} (not relative)")
            continue
        target = (page.parent / unquote(url.path)).resolve() if url.path else page.resolve()
        if not target.is_relative_to(root.resolve()) or not target.is_file():
            bad.append(f"{link} (no such file in the folder)")
        elif url.fragment and target == page.resolve() and url.fragment not in parsed.ids:
            bad.append(f"{link} (no such id)")
    return bad


def _colours(png: Path) -> int:
    from matplotlib import image

    pixels = image.imread(png)
    return len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::7]})


def test_report_html_in_chromium_not_blank_and_every_link_resolves(search_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chromium")
    page, trial_page = (
        search_folder / "report.html",
        search_folder / "trials" / "honest" / "report.html",
    )
    shot = tmp / "report.png"
    runs = [
        _browse(page, tmp, "--dump-dom"),
        _browse(trial_page, tmp, "--dump-dom"),
        _browse(page, tmp, f"--screenshot={shot}", "--window-size=1100,900", "--hide-scrollbars"),
    ]
    dom, trial_dom, _ = (_finish(p) for p in runs)

    parsed = _Links()
    parsed.feed(dom)
    text = " ".join(parsed.text)
    assert (
        "advtrain search report" in text
        and "Ranked trials" in text
        and "What the flags mean" in text
    )
    # People read the page: three decimals, durations, the trial's page rather than its Markdown.
    assert "0.850" in text and "0.8500" not in text and "57 s" in text and "4 min 12 s" in text
    assert 'href="trials/honest/report.html"' in dom and 'class="num"' in dom
    assert {"pareto.png", "accuracy_vs_eps.png", "best_model.keras", "#large-eps"} <= set(
        parsed.links
    )
    assert _unresolved(dom, page, search_folder) == []
    assert "large-eps" in parsed.ids

    trial = _Links()
    trial.feed(trial_dom)
    assert "Robustness report" in " ".join(trial.text) and "#zero-gradients" in trial.links
    assert _unresolved(trial_dom, trial_page, search_folder) == []
    assert _colours(shot) > 10, "the screenshot of report.html is (nearly) one colour: a blank page"


def test_reports_carry_no_link_outside_the_folder(search_folder):
    for md in [search_folder / "report.md", *search_folder.glob("trials/*/report.md")]:
        text = md.read_text()
        assert "](docs/" not in text and "](/" not in text and "://" not in text, md


def test_render_imports_neither_ray_nor_tensorflow():
    code = (
        "import sys, workflows.render; sys.exit(int('ray' in sys.modules or 'tensorflow' in "
        "sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
