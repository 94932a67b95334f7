"""Attack suites: the one table of what each evaluation suite runs, in order, at what budget.

`standard` is AutoAttack's standard version (Croce and Hein 2020, arXiv:2003.01690): APGD-CE,
APGD-T (targeted DLR, 9 target classes) and Square (5,000 queries, gradient-free), preceded by
advtrain's PGD-100 with 5 restarts. Before Square it runs APGD-CE through a BPDA surrogate
(`advtrain.bpda`, Athalye et al. 2018) where, and only where, the model has layers without a useful
gradient (quantisation, rounding, casts). Each attack runs only on the examples its predecessors did
not break, so the cost of the later attacks is paid on the still-robust examples alone. FAB-T, the
fourth attack of AutoAttack's standard version, is not included: see docs/flags.md ("Why no
FAB-T").
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any

__all__ = ["FGSM_REFERENCE", "SUITES", "SuiteAttack", "describe_suite", "suite_attacks"]


@dataclasses.dataclass(frozen=True)
class SuiteAttack:
    """One attack of a suite, its budget relative to the threat model's norm and eps.

    Args:
        kind: short name of the method: `"fgsm"`, `"pgd"`, `"apgd-ce"`, `"apgd-t"`,
            `"apgd-ce-bpda"` or `"square"`.
        attack: key of `advtrain.attacks.ATTACKS` that runs it.
        steps: iterations, >= 1; for Square, the query budget per example. Step sizes are the
            attack's defaults: eps for FGSM, 2.5 * eps / steps for PGD, APGD's own schedule from
            2 * eps, Square's square-size schedule from p_init 0.8.
        restarts: random restarts, >= 1; each example keeps its strongest point.
        loss: `"ce"`, `"dlr"` or `"margin"` (Square's).
        target_classes: 0 for an untargeted attack; k > 0 runs the attack targeted at each of
            the k highest-scoring other classes of the clean logits in turn (APGD-T, k = 9 in
            AutoAttack's standard version).
        bpda: take the gradients from the model's straight-through surrogate
            (`advtrain.bpda`: the identity in the backward pass through its layers without a
            useful gradient), the adversarial inputs judged on the model itself. Run only on a
            model that has such layers; skipped, and absent from the report, otherwise.
    """

    kind: str
    attack: str
    steps: int = 1
    restarts: int = 1
    loss: str = "ce"
    target_classes: int = 0
    bpda: bool = False

    @property
    def name(self) -> str:
        """The label used in reports: `fgsm`, `pgd-100x5`, `apgd-ce-100`, `apgd-t-100-top9`,
        `apgd-ce-bpda-100`, `square-5000`."""
        if self.attack == "fgsm":
            return "fgsm"
        name = f"{self.kind}-{self.steps}" + (f"x{self.restarts}" if self.restarts > 1 else "")
        return name + (f"-top{self.target_classes}" if self.target_classes else "")

    @property
    def gradient_free(self) -> bool:
        """True for attacks that query only the model's outputs (immune to masked gradients)."""
        return self.attack == "square"

    def scaled(self, steps_scale: float) -> SuiteAttack:
        if self.attack == "fgsm" or steps_scale == 1.0:
            return self
        return dataclasses.replace(self, steps=max(1, round(self.steps * steps_scale)))

    def budget(self, eps: float, norm: str) -> dict[str, Any]:
        """Keyword arguments of `attacks.run_attack` for this attack at (eps, norm)."""
        if self.attack == "square":
            return {"eps": eps, "norm": norm, "queries": self.steps}
        kw: dict[str, Any] = {"eps": eps, "norm": norm, "loss": self.loss}
        if self.attack != "fgsm":
            kw.update(steps=self.steps, restarts=self.restarts)
        return kw

    def describe(self, bpda_layers: tuple[str, ...] = ()) -> dict[str, Any]:
        """The attack as the report lists it; a BPDA attack adds `bpda: True` and
        `bpda_layers`, the layers it approximated (the other attacks carry neither key)."""
        step = {
            "fgsm": "eps",
            "pgd": "2.5*eps/steps",
            "apgd": "auto (from 2*eps)",
            "square": "square size from p_init 0.8",
        }[self.attack]
        bpda = {"bpda": True, "bpda_layers": list(bpda_layers)} if self.bpda else {}
        return {
            "name": self.name,
            "attack": self.attack,
            "steps": self.steps,
            "restarts": self.restarts,
            "loss": self.loss,
            "step_size": step,
            "targeted": bool(self.target_classes),
            "target_classes": self.target_classes,
            "gradient_free": self.gradient_free,
            **bpda,
        }


FGSM_REFERENCE = SuiteAttack("fgsm", "fgsm")

# The one table of suites (DESIGN.md section 4). Never mutated: a tuple per suite, read-only map.
SUITES: MappingProxyType[str, tuple[SuiteAttack, ...]] = MappingProxyType(
    {
        "fgsm": (FGSM_REFERENCE,),
        "quick": (SuiteAttack("pgd", "pgd", steps=20),),
        "standard": (
            SuiteAttack("pgd", "pgd", steps=100, restarts=5),
            SuiteAttack("apgd-ce", "apgd", steps=100),
            SuiteAttack("apgd-t", "apgd", steps=100, loss="dlr", target_classes=9),
            # Only on a model with layers without a useful gradient (`advtrain.bpda`).
            SuiteAttack("apgd-ce-bpda", "apgd", steps=100, bpda=True),
            SuiteAttack("square", "square", steps=5000, loss="margin"),
        ),
    }
)


def suite_attacks(suite: str, steps_scale: float = 1.0) -> tuple[SuiteAttack, ...]:
    """The attacks of `suite`, with step counts multiplied by `steps_scale` (tests only).

    Args:
        suite: a key of `SUITES`.
        steps_scale: factor on every step count (and Square's query budget), in (0, 1]; 1 is the
            suite as defined. Anything else is a weaker evaluation, labelled as such in the
            report. Defaults to `1.0`.

    Raises:
        ValueError: an unknown suite or a scale out of range.
    """
    if suite not in SUITES:
        raise ValueError(f"Unknown suite {suite!r}. Expected one of: {', '.join(SUITES)}.")
    if (
        isinstance(steps_scale, bool)
        or not isinstance(steps_scale, (int, float))
        or not 0 < steps_scale <= 1
    ):
        raise ValueError(f"`steps_scale` must be in (0, 1]. Received: steps_scale={steps_scale!r}")
    return tuple(a.scaled(float(steps_scale)) for a in SUITES[suite])


def describe_suite(suite: str) -> str:
    """What `suite` runs, in one line: e.g. `pgd-100x5, apgd-ce-100, apgd-t-100-top9, square-5000`
    (APGD-CE through BPDA is left out: it runs only on a model that needs it, and the report
    names it)."""
    return ", ".join(a.name for a in SUITES[suite] if not a.bpda)
