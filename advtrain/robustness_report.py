"""`RobustnessReport`: the result of `advtrain.evaluation.evaluate_robustness`, and its JSON, HTML,
Markdown and metrics forms.

Every number leaves this module with its context: the threat model (norm, eps), the attack that
produced it, the number of examples and the split. No TensorFlow here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from advtrain.certification import certified_by
from advtrain.files import write_text
from advtrain.flag_text import ANCHOR, flag_link, flags_markdown
from advtrain.page import html_page
from advtrain.report import bracket, certified_cell, duration, markdown_table, robust_cell

__all__ = [
    "SCHEMA",
    "EpsResult",
    "RobustnessReport",
    "bpda_layers",
    "bracket_of",
    "per_eps",
    "summary_lines",
]

# /3 added the certified accuracy (per bound method, with per-example masks) and the bracket;
# /2 the upper-bound marking and the examples each attack broke. /2 and /1 files still read.
SCHEMA = "advtrain.robustness_report/3"
READABLE = (SCHEMA, "advtrain.robustness_report/2", "advtrain.robustness_report/1")
WORST_CASE = "worst-case"
HEADING_LINK = "what the flags mean"


@dataclasses.dataclass(frozen=True)
class EpsResult:
    """Results at one eps.

    Args:
        eps: the radius.
        clean_acc: accuracy on clean inputs.
        robust_acc: per-example worst case over the suite (the last entry of `per_attack`).
        fgsm_acc: accuracy under FGSM alone (weak reference, not part of the worst case unless
            the suite is `"fgsm"`).
        per_attack: ordered `{"clean": acc, attack name: accuracy after that attack, ...}`;
            cumulative, since each attack runs on the examples its predecessors did not break.
        broken: `{attack name: examples that attack broke}` (among those still robust before it),
            as AutoAttack lists them.
        attack_seconds: seconds per attack (the reference as `"fgsm (reference)"`).
        seconds: seconds for this eps, sanity checks and certification included.
        adversarial: worst-case inputs (the clean input where no attack succeeded), only with
            `keep_adversarial=True`; never serialised.
        certified_acc: share of the examples certified by at least one bound method (each is
            sound, so the per-example union is), or None when none ran or none could bound the
            model (`certified_note` says why): never 0 for "could not".
        certified: `{method: certified accuracy}` for the methods that ran, in config order.
        certified_masks: `{method: hex mask}` (`mask_hex`): bit i = example i certified.
        certified_note: why a method did not run (`"not available (layer 'lstm')"`, or
            `"crown not available (layer 'max_pooling2d')"` when others did), or None.
        certify_seconds: seconds per bound method.
    """

    eps: float
    clean_acc: float
    robust_acc: float
    fgsm_acc: float
    per_attack: dict[str, float]
    broken: dict[str, int]
    attack_seconds: dict[str, float]
    seconds: float
    adversarial: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    certified_acc: float | None = None
    certified: dict[str, float] = dataclasses.field(default_factory=dict)
    certified_masks: dict[str, str] = dataclasses.field(default_factory=dict)
    certified_note: str | None = None
    certify_seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def certified_mask(self) -> str | None:
        """The union of `certified_masks` as hex (`mask_hex`), or None when no method ran."""
        if self.certified_acc is None or not self.certified_masks:
            return None
        raw = [bytes.fromhex(h) for h in self.certified_masks.values()]
        return bytes(np.bitwise_or.reduce([np.frombuffer(b, np.uint8) for b in raw])).hex()

    @property
    def certified_method(self) -> str | None:
        """The method named beside the certified accuracy (`certified_by`)."""
        return certified_by(self.certified, self.certified_masks)


@dataclasses.dataclass(frozen=True)
class RobustnessReport:
    """A robustness evaluation: threat model, sample, per-eps results, sanity flags and notes.

    Args:
        norm: `"linf"` or `"l2"`.
        eps: the radii evaluated, in order.
        suite: the suite's name (`"fgsm"`, `"quick"`, `"standard"`).
        attacks: the suite's attacks as run (`SuiteAttack.describe()` dicts, in order).
        reference_attack: the FGSM reference, described likewise.
        steps_scale: factor applied to the suite's step counts (1.0 = the suite as defined).
        n: examples evaluated. split: the split they came from. seed: the evaluation seed.
        results: one `EpsResult` per eps, in the order of `eps`.
        flags: `advtrain.sanity.Flag`s (empty when sanity checks were off).
        notes: plain-language notes (softmax removed, sample choice, reduced suite, ...).
        seconds: total wall time.
        data: the dataset described (`advtrain.data.ImageData.describe()`: source, input shape,
            classes, split sizes), or `None`.
        certify: the bound methods asked for (`EvalConfig.certify`); `()` when switched off.
    """

    norm: str
    eps: tuple[float, ...]
    suite: str
    attacks: tuple[dict, ...]
    reference_attack: dict
    steps_scale: float
    n: int
    split: str
    seed: int
    results: tuple[EpsResult, ...]
    flags: tuple = ()
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    data: dict | None = None
    certify: tuple[str, ...] = ()

    # -- access ---------------------------------------------------------------------------

    def result(self, eps: float | None = None) -> EpsResult:
        """The result at `eps` (the first eps evaluated when None)."""
        if eps is None:
            return self.results[0]
        for r in self.results:
            if math.isclose(r.eps, eps, abs_tol=1e-9):
                return r
        raise ValueError(
            f"`eps` was not evaluated. Expected one of: {list(self.eps)}. Received: eps={eps!r}"
        )

    @property
    def failed_flags(self) -> tuple:
        return tuple(f for f in self.flags if f.passed is False)

    def failed_at(self, eps: float) -> list[str]:
        """Ids of the failed flags that bear on the robust accuracy at `eps`: those checked at
        this eps and those of the whole evaluation (zero gradients, large eps, eps sweep)."""
        return sorted(
            {
                f.id
                for f in self.failed_flags
                if f.eps is None or math.isclose(f.eps, eps, abs_tol=1e-9)
            }
        )

    @property
    def bpda_layers(self) -> tuple[str, ...]:
        """The layers a BPDA attack of the suite approximated (`advtrain.bpda`), or `()`."""
        return bpda_layers(self.attacks)

    @property
    def sanity_passed(self) -> bool | None:
        """False if any flag failed; None when no check ran; True otherwise."""
        if self.failed_flags:
            return False
        return True if any(f.passed for f in self.flags) else None

    def describe_suite(self) -> str:
        parts = []
        for a in self.attacks:
            what = {"fgsm": "FGSM", "pgd": "PGD", "apgd": "APGD", "square": "Square"}[a["attack"]]
            unit = (
                "quer" + ("ies" if a["steps"] > 1 else "y")
                if a["attack"] == "square"
                else ("step" + "s" * (a["steps"] > 1))
            )
            s = f"{a['name']} ({what}, {a['steps']} {unit}"
            if a["restarts"] > 1:
                s += f", {a['restarts']} restarts"
            s += f", loss {a['loss']}, step size {a['step_size']}"
            if a["targeted"]:
                s += f", targeted at each of the top-{a['target_classes']} other classes"
            if a.get("gradient_free"):
                s += ", gradient-free"
            if a.get("bpda"):
                s += (
                    ", BPDA: gradients through the identity at layers "
                    f"{_quoted(a['bpda_layers'])}, judged on the model"
                )
            parts.append(s + ")")
        scaled = "" if self.steps_scale == 1.0 else f" [REDUCED: steps x{self.steps_scale:g}]"
        return f"`{self.suite}`{scaled}: " + "; ".join(parts)

    # -- serialisation --------------------------------------------------------------------

    def _context(self, eps: float) -> dict[str, Any]:
        return {
            "norm": self.norm,
            "eps": eps,
            "split": self.split,
            "n": self.n,
            "suite": self.suite,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; every accuracy row carries norm, eps, split, n, suite and attack."""
        return {
            "schema": SCHEMA,
            "threat_model": self._threat_model_dict(),
            "n": self.n,
            "split": self.split,
            "seed": self.seed,
            "results": [row for r in self.results for row in self._accuracy_rows(r)],
            "per_eps": [self._per_eps_entry(r) for r in self.results],
            "flags": [
                {**f.to_dict(), "norm": self.norm, "split": self.split, "suite": self.suite}
                for f in self.flags
            ],
            "sanity": {
                "failed": [f.id for f in self.flags if f.passed is False],
                "passed": [f.id for f in self.flags if f.passed is True],
                "not_run": [f.id for f in self.flags if f.passed is None],
            },
            "notes": list(self.notes),
            "seconds": self.seconds,
            "data": self.data,
        }

    def _threat_model_dict(self) -> dict[str, Any]:
        return {
            "norm": self.norm,
            "eps": list(self.eps),
            "suite": self.suite,
            "attacks": [dict(a) for a in self.attacks],
            "reference_attack": dict(self.reference_attack),
            "steps_scale": self.steps_scale,
            "certify": list(self.certify),
            "clip": [0.0, 1.0],
        }

    def _accuracy_rows(self, r: EpsResult) -> list[dict[str, Any]]:
        """One eps's rows: clean and each attack (cumulative), the worst case, the reference."""
        ctx = self._context(r.eps)
        rows = [
            {
                **ctx,
                "attack": name,
                "kind": "clean" if name == "clean" else "cumulative",
                "accuracy": acc,
                "seconds": r.attack_seconds.get(name),
            }
            for name, acc in r.per_attack.items()
        ]
        rows.append(
            {
                **ctx,
                "attack": WORST_CASE,
                "kind": "robust",
                "accuracy": r.robust_acc,
                "seconds": r.seconds,
            }
        )
        if self.suite != "fgsm":
            rows.append(
                {
                    **ctx,
                    "attack": "fgsm",
                    "kind": "reference",
                    "accuracy": r.fgsm_acc,
                    "seconds": r.attack_seconds.get("fgsm (reference)"),
                }
            )
        return rows

    def _per_eps_entry(self, r: EpsResult) -> dict[str, Any]:
        failed = self.failed_at(r.eps)
        return {
            **self._context(r.eps),
            "clean_acc": r.clean_acc,
            "robust_acc": r.robust_acc,
            # A failed flag makes the robust accuracy an upper bound, said beside it.
            "robust_upper_bound": bool(failed),
            "robust_flags_failed": failed,
            "robust_display": robust_cell(r.robust_acc, failed),
            "fgsm_acc": r.fgsm_acc,
            "per_attack": dict(r.per_attack),
            "broken": dict(r.broken),
            "seconds": r.seconds,
            **self._certified_entry(r),
        }

    def _certified_entry(self, r: EpsResult) -> dict[str, Any]:
        """The certified part of a per-eps entry, and the bracket."""
        method = r.certified_method
        return {
            "certified_acc": r.certified_acc,
            "certified": dict(r.certified),
            "certified_by": method,
            "certified_mask": r.certified_mask,
            "certified_masks": dict(r.certified_masks),
            "certified_note": r.certified_note,
            "certified_display": self._certified_display(r),
            "certify_seconds": dict(r.certify_seconds),
            "bracket": bracket(
                r.clean_acc,
                r.robust_acc,
                self.failed_at(r.eps),
                r.certified_acc,
                method,
                r.certified_note,
            ),
        }

    def _certified_display(self, r: EpsResult, digits: int = 4) -> str:
        if r.certified_acc is None and not r.certified_note:
            return "not run"
        return certified_cell(r.certified_acc, r.certified_method, r.certified_note, digits)

    def metrics(self, eps: float | None = None) -> dict[str, Any]:
        """Flat scalars at one eps (the first by default), with the threat model and the sanity
        outcome as fields: for a library user's own logging (a search reports through its
        trials' rows, `workflows/results.py`)."""
        r = self.result(eps)
        failed = sorted({f.id for f in self.failed_flags})
        return {
            "clean_acc": r.clean_acc,
            "robust_acc": r.robust_acc,
            "robust_upper_bound": bool(self.failed_at(r.eps)),
            "robust_display": robust_cell(r.robust_acc, self.failed_at(r.eps)),
            "fgsm_acc": r.fgsm_acc,
            "certified_acc": r.certified_acc,
            "certified_display": self._certified_display(r),
            "eval_norm": self.norm,
            "eval_eps": r.eps,
            "eval_suite": self.suite,
            "eval_n": self.n,
            "eval_split": self.split,
            "eval_steps_scale": self.steps_scale,
            "sanity_failed": len(failed),
            "sanity_failed_ids": ",".join(failed),
        }

    def to_markdown(self, digits: int = 4) -> str:
        """A Markdown summary: threat model, results table, sanity checks with WARNING lines, and
        what the flags mean (linked from each check, inline: the folder travels without docs/).

        Args:
            digits: decimals of the accuracies in the table. Defaults to 4 (report.html: 3).
        """
        certifying = bool(self.certify) or any(
            r.certified or r.certified_note for r in self.results
        )
        lines = [
            "# Robustness report",
            "",
            *self._preamble_lines(certifying),
            "",
            self._markdown_table(certifying, digits),
            "",
            *self._bracket_lines(),
            "",
            "## Sanity checks",
            "",
        ]
        if not self.flags:
            lines.append("- not run: sanity checks were switched off")
        for f in sorted(self.flags, key=lambda f: {False: 0, None: 1, True: 2}[f.passed]):
            prefix = "**WARNING** " if f.passed is False else ""
            lines.append(f"- {prefix}{f.summary} ({flag_link(f.id)})")
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {note}" for note in self.notes]
        explained = flags_markdown([f.id for f in self.flags])
        if explained:
            lines += ["", *explained]
        return "\n".join(lines) + "\n"

    def _markdown_table(self, certifying: bool, digits: int) -> str:
        names = [k for k in self.results[0].per_attack if k != "clean"]
        columns = ["eps", "clean", *names, "robust (worst case)"]
        if certifying:
            columns.append("certified")
        if self.suite != "fgsm":
            columns.append("fgsm (reference)")
        columns.append("seconds")
        rows = []
        for r in self.results:
            row = {
                "eps": f"{r.eps:g}",
                "clean": r.clean_acc,
                **{k: r.per_attack[k] for k in names},
                "robust (worst case)": robust_cell(r.robust_acc, self.failed_at(r.eps), digits),
                "certified": self._certified_display(r, digits),
                "fgsm (reference)": r.fgsm_acc,
                "seconds": duration(r.seconds),
            }
            rows.append(row)
        return markdown_table(rows, columns, digits)

    def _preamble_lines(self, certifying: bool) -> list[str]:
        """The threat model, the suite and what each figure means."""
        return [
            (
                f"- Threat model: {self.norm}, eps {', '.join(f'{e:g}' for e in self.eps)}, "
                "inputs in [0, 1]"
            ),
            f"- Suite {self.describe_suite()}",
            (
                "- Robust accuracy is the per-example worst case over the suite; each attack "
                "column is the accuracy after that attack (attacks run in order on the examples "
                "still robust)."
            ),
            "- FGSM is a weak reference, reported apart"
            + (
                " (here it is the suite)."
                if self.suite == "fgsm"
                else " (not part of the worst case)."
            ),
            *(
                [
                    (
                        "- Certified accuracy: proven by bound propagation "
                        f"({', '.join(self.certify)}; the per-example union) on the same examples: "
                        "no input in the eps-ball (within [0, 1]) changes the prediction. It is a "
                        "lower bound on the true robust accuracy, the attacked figure an upper "
                        "one; every certified example was checked against every attack."
                    )
                ]
                if certifying
                else []
            ),
            *(
                [
                    (
                        f"- BPDA (Athalye et al. 2018): layers {_quoted(self.bpda_layers)} have no "
                        "useful gradient; the BPDA attack took its gradients from a copy of the "
                        "model that computes them in the forward pass and the identity in the "
                        "backward pass, and its adversarial inputs were judged on the model "
                        "itself."
                    )
                ]
                if self.bpda_layers
                else []
            ),
            f"- Examples: n = {self.n} from the `{self.split}` split; seed {self.seed}",
            *([_data_line(self.data)] if self.data else []),
        ]

    def _bracket_lines(self) -> list[str]:
        """Per eps: certified <= robust <= clean, what broke, and the upper-bound warning."""
        return [
            *[f"- At eps {r.eps:g}: {self._certified_entry(r)['bracket']}" for r in self.results],
            *[
                f"- Examples broken at eps {r.eps:g}, by attack (each on those still robust): "
                + _broken(r.broken)
                for r in self.results
            ],
            *(
                [
                    (
                        "- **A robust accuracy marked `<=` is an upper bound**: a sanity check "
                        "failed (named beside it), so the attacks may have been fooled by the "
                        f"model; see [{HEADING_LINK}](#{ANCHOR})."
                    )
                ]
                if self.failed_flags
                else []
            ),
        ]

    def to_html(self) -> str:
        """report.html: `to_markdown` with three decimals, as a self-contained page."""
        return html_page(self.to_markdown(digits=3), "advtrain robustness report")

    def write(self, directory) -> tuple[Path, Path]:
        """Writes `report.json`, `report.md` and `report.html` into `directory`, each atomically.

        Returns:
            The JSON and Markdown paths (report.html lies beside them).
        """
        directory = Path(directory)
        json_path, md_path = directory / "report.json", directory / "report.md"
        write_text(json_path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        write_text(md_path, self.to_markdown())
        write_text(directory / "report.html", self.to_html())
        return json_path, md_path


def _data_line(d: dict) -> str:
    h, w, c = d["input_shape"]
    return (
        f"- Data: {d['source']}, {h}x{w}x{c} images, {d['num_classes']} classes "
        f"({d['train']} train / {d['val']} val / {d['test']} test)"
    )


def bpda_layers(attacks) -> tuple[str, ...]:
    """The layers the BPDA attacks among `attacks` (report attack dicts) approximated, in order."""
    found = (p for a in attacks if a.get("bpda") for p in a.get("bpda_layers", ()))
    return tuple(dict.fromkeys(found))


def _quoted(layers) -> str:
    return ", ".join(f"'{p}'" for p in layers)


def _broken(broken: dict[str, int]) -> str:
    return ", ".join(f"{name}: {k}" for name, k in broken.items()) or "none run"


def per_eps(d: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-eps entries of a report dict (`RobustnessReport.to_dict()` or report.json): each
    with norm, eps, split, n, suite, clean_acc, robust_acc, fgsm_acc, per_attack and seconds."""
    if not isinstance(d, dict) or d.get("schema") not in READABLE:
        found = d.get("schema") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"Not a robustness report dict (schema {SCHEMA!r}). Received: {found!r}")
    return list(d["per_eps"])


def bracket_of(entry: dict[str, Any]) -> str:
    """The bracket of a per-eps entry (`per_eps`): its `bracket`, or, in a /2 or /1 report
    (made before certification), the same line built from what the entry holds."""
    if entry.get("bracket"):
        return entry["bracket"]
    failed = entry.get("robust_flags_failed") or []
    return bracket(
        entry["clean_acc"],
        entry["robust_acc"],
        failed,
        entry.get("certified_acc"),
        entry.get("certified_by"),
        entry.get("certified_note"),
    )


def summary_lines(d: dict[str, Any]) -> list[str]:
    """Plain-text lines summarising a report dict, for the CLI: the threat model, one line per
    eps, the sanity outcome with one WARNING line per failed flag, and the notes."""
    rows = per_eps(d)
    tm = d["threat_model"]
    names = ", ".join(a["name"] for a in tm["attacks"])
    scaled = "" if tm.get("steps_scale", 1.0) == 1.0 else f", REDUCED: steps x{tm['steps_scale']:g}"
    approximated = bpda_layers(tm["attacks"])
    bpda = f"; bpda: layers {_quoted(approximated)}" if approximated else ""
    lines = [
        (
            f"Threat model: {tm['norm']} eps {', '.join(f'{e:g}' for e in tm['eps'])}; suite "
            f"{tm['suite']} ({names}{scaled}{bpda}); n={d['n']} {d['split']} examples"
        )
    ]
    for r in rows:
        attacks = "  ".join(f"{k} {v:.4f}" for k, v in r["per_attack"].items() if k != "clean")
        ref = "" if tm["suite"] == "fgsm" else f"  | fgsm (reference) {r['fgsm_acc']:.4f}"
        lines.append(
            f"eps {r['eps']:g}: {bracket_of(r)}"
            f"  | after each attack: {attacks}{ref}  ({r['seconds']:.1f}s)"
        )
        certified, by = r.get("certified") or {}, ""
        if certified:  # a note here names the methods that could not run beside those that did
            by = "  | certified by: " + ", ".join(f"{m} {a:.4f}" for m, a in certified.items())
            by += f" ({r['certified_note']})" if r.get("certified_note") else ""
        lines.append(f"  broken by: {_broken(r['broken'])}{by}")
    s = d["sanity"]
    if d["flags"]:
        lines.append(
            f"Sanity checks: {len(s['passed'])} passed, {len(s['failed'])} failed, "
            f"{len(s['not_run'])} not run"
        )
    else:
        lines.append("Sanity checks: not run (switched off)")
    failed = [f for f in d["flags"] if f["passed"] is False]
    lines += [f"WARNING: {f['summary']} (see {f['doc']})" for f in failed]
    lines += [f"note: {note}" for note in d.get("notes", [])]
    return lines
