"""The sanity flags of a robustness evaluation: each check returns a `Flag` with an id documented
in docs/flags.md.

Carlini et al. 2019 ("On Evaluating Adversarial Robustness", arXiv:1902.06705) and AutoAttack's
flags (Croce and Hein 2020) list the symptoms of a broken evaluation or a gradient-masking model:
robust accuracy above clean, a multi-step attack weaker than one step, more iterations raising
accuracy, accuracy that does not reach zero for a huge eps, white-box attacks beaten by transfer
or by random noise, and input gradients that are zero or NaN. `advtrain.evaluation` runs these
functions; each returns one `Flag`: `passed` is True, False, or None when the check did not run
(the message says why, and a skipped check never reads as a pass).

Accuracies are compared with a noise tolerance (`tolerance`): 1.5 binomial standard deviations
of the larger accuracy on the examples used, and at least one example.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from types import MappingProxyType
from typing import Any

import numpy as np
import tensorflow as tf

from advtrain import attacks
from advtrain.checks import predict_logits

__all__ = [
    "FLAG_IDS",
    "Flag",
    "check_eps_monotone",
    "check_gradient_free_gap",
    "check_large_eps",
    "check_more_steps",
    "check_pgd_le_fgsm",
    "check_robust_le_clean",
    "check_whitebox_vs_noise",
    "check_whitebox_vs_transfer",
    "check_zero_gradients",
    "tolerance",
]

log = logging.getLogger(__name__)

FLAG_IDS = (
    "robust-le-clean",
    "pgd-le-fgsm",
    "more-steps",
    "eps-monotone",
    "large-eps",
    "whitebox-vs-transfer",
    "whitebox-vs-noise",
    "gradient-free-gap",
    "zero-gradients",
)
DOCS = "docs/flags.md"

# Budgets of the checks: fixed, documented in docs/flags.md, never scaled for speed.
SAMPLE_SIZE = 200  # examples (the first ones) used by the subsample checks
STEPS_CHECK = (10, 40)  # PGD-k against PGD-4k
RESTARTS_CHECK = 4  # PGD-k x 4 restarts against PGD-k
LARGE_EPS = MappingProxyType({"linf": 0.5, "l2": 6.0})
LARGE_EPS_STEPS = 50
LARGE_EPS_MAX_ACC = 0.05
TRANSFER_STEPS = 20
NOISE_DRAWS = 10
ZERO_GRAD_MAX_FRACTION = 0.01


@dataclasses.dataclass(frozen=True)
class Flag:
    """The outcome of one sanity check.

    Args:
        id: one of `FLAG_IDS`; its docs entry is `docs/flags.md#<id>`.
        passed: True (passed), False (failed: a warning) or None (not run, see `message`).
        message: what was measured and what it means (for a check not run: why).
        eps: the radius the check ran at, or None for checks of the whole evaluation.
        n: examples the check used.
        values: the numbers compared (accuracies, tolerance, budgets).
    """

    id: str
    passed: bool | None
    message: str
    eps: float | None = None
    n: int = 0
    values: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def status(self) -> str:
        return {True: "passed", False: "failed", None: "not run"}[self.passed]

    @property
    def summary(self) -> str:
        """One line: `id at eps=E STATUS: message`."""
        where = f" at eps={self.eps:g}" if self.eps is not None else ""
        status = "FAILED" if self.passed is False else self.status
        return f"{self.id}{where} {status}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "passed": self.passed,
            "status": self.status,
            "message": self.message,
            "summary": self.summary,
            "eps": self.eps,
            "n": self.n,
            "values": dict(self.values),
            "doc": f"{DOCS}#{self.id}",
        }


def _flag(id_: str, passed: bool | None, message: str, *, eps=None, n=0, **values) -> Flag:
    flag = Flag(id_, passed, message, eps, int(n), {k: _plain(v) for k, v in values.items()})
    if passed is False:
        log.warning("WARNING sanity check %s (see %s#%s)", flag.summary, DOCS, id_)
    return flag


def _plain(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def tolerance(p: float, n: int) -> float:
    """Noise allowance for an accuracy p measured on n examples: max(1.5 * sqrt(p(1-p)/n), 1/n)."""
    n = max(int(n), 1)
    return max(1.5 * math.sqrt(max(p * (1.0 - p), 0.0) / n), 1.0 / n)


def _correct(model, x, y, batch_size) -> np.ndarray:
    return np.argmax(predict_logits(model, x, batch_size), axis=-1) == y


def check_robust_le_clean(eps: float, clean: float, robust: float, n: int) -> Flag:
    """Robust accuracy can never exceed clean accuracy: a bookkeeping check of the evaluation."""
    ok = robust <= clean + 1e-12
    return _flag(
        "robust-le-clean",
        ok,
        f"robust {robust:.4f} vs clean {clean:.4f}",
        eps=eps,
        n=n,
        clean_acc=clean,
        robust_acc=robust,
    )


def check_pgd_le_fgsm(
    eps: float, first: str | None, first_acc: float | None, robust: float, fgsm_acc: float, n: int
) -> Flag:
    """The suite's first iterative attack (run on every clean-correct example, so its number is
    standalone) and the worst case must not be weaker than one FGSM step, beyond noise."""
    if first is None:
        return _flag("pgd-le-fgsm", None, "the suite has no iterative attack", eps=eps, n=n)
    tol = tolerance(fgsm_acc, n)
    ok = first_acc <= fgsm_acc + tol and robust <= fgsm_acc + tol
    why = "" if ok else " (the iterative attack is weaker than one step: broken attack or masking)"
    msg = (
        f"{first} {first_acc:.4f}, worst case {robust:.4f}, FGSM {fgsm_acc:.4f}, "
        f"tolerance {tol:.4f}{why}"
    )
    return _flag(
        "pgd-le-fgsm",
        ok,
        msg,
        eps=eps,
        n=n,
        attack=first,
        attack_acc=first_acc,
        robust_acc=robust,
        fgsm_acc=fgsm_acc,
        tolerance=tol,
    )


def check_more_steps(model, x, y, *, eps: float, norm: str, batch_size: int, seed: int) -> Flag:
    """PGD-4k and PGD-k with restarts must not leave more accuracy than PGD-k (beyond noise)."""
    k, k4 = STEPS_CHECK
    runs = {
        f"pgd-{k}": dict(steps=k),
        f"pgd-{k4}": dict(steps=k4),
        f"pgd-{k}x{RESTARTS_CHECK}": dict(steps=k, restarts=RESTARTS_CHECK),
    }
    acc = {}
    for i, (name, budget) in enumerate(runs.items()):
        adv = attacks.run_attack(
            "pgd", model, x, y, eps=eps, norm=norm, batch_size=batch_size, seed=seed + i, **budget
        )
        acc[name] = _mean(_correct(model, adv, y, batch_size))
    base, more = next(iter(acc.values())), list(acc.values())[1:]
    tol = tolerance(base, len(x))
    ok = all(a <= base + tol for a in more)
    msg = ", ".join(f"{name.replace('pgd', 'PGD')} {a:.4f}" for name, a in acc.items())
    msg += f", tolerance {tol:.4f}" + ("" if ok else " (more effort raised accuracy)")
    return _flag("more-steps", ok, msg, eps=eps, n=len(x), tolerance=tol, **acc)


def check_eps_monotone(points: list[tuple[float, float]], n: int) -> Flag:
    """Robust accuracy must not rise as eps grows (beyond noise) over a sweep."""
    if len(points) < 2:
        return _flag("eps-monotone", None, "a single eps (no sweep)", n=n)
    points = sorted(points)
    pairs = itertools.pairwise(points)
    bad = [(e0, a0, e1, a1) for (e0, a0), (e1, a1) in pairs if a1 > a0 + tolerance(a0, n)]
    msg = ", ".join(f"eps {e:g}: {a:.4f}" for e, a in points)
    if bad:
        e0, a0, e1, a1 = bad[0]
        msg += f" (accuracy rose from {a0:.4f} at eps {e0:g} to {a1:.4f} at eps {e1:g})"
    return _flag(
        "eps-monotone",
        not bad,
        msg,
        n=n,
        eps_values=[e for e, _ in points],
        robust_acc=[a for _, a in points],
    )


def _pgd_any_eps(model, x, y, *, eps: float, norm: str, steps: int, seed: int) -> np.ndarray:
    """PGD through the graph-level function: the validated wrappers cap eps at 1, too small for
    the l2 check. Same algorithm (random start, 2.5 * eps / steps, best iterate kept)."""

    @tf.function
    def run(xb, yb):
        return attacks.pgd_graph(
            model, xb, yb, eps, 2.5 * eps / steps, steps, norm=norm, seed=(seed, 0), track_best=True
        )

    return run(tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(y, tf.int32)).numpy()


def check_large_eps(model, x, y, *, norm: str, batch_size: int, seed: int) -> Flag:
    """At eps 0.5 (linf) or 6.0 (l2) PGD must drive accuracy to about zero."""
    eps, steps = LARGE_EPS[norm], LARGE_EPS_STEPS
    adv = np.concatenate(
        [
            _pgd_any_eps(
                model,
                x[lo : lo + batch_size],
                y[lo : lo + batch_size],
                eps=eps,
                norm=norm,
                steps=steps,
                seed=seed,
            )
            for lo in range(0, len(x), batch_size)
        ]
    )
    acc = _mean(_correct(model, adv, y, batch_size))
    ok = acc <= LARGE_EPS_MAX_ACC
    msg = (
        f"PGD-{steps} at {norm} eps {eps:g} leaves {acc:.4f} accuracy "
        f"(limit {LARGE_EPS_MAX_ACC})" + ("" if ok else ": gradients are likely masked")
    )
    return _flag(
        "large-eps",
        ok,
        msg,
        n=len(x),
        norm=norm,
        large_eps=eps,
        steps=steps,
        accuracy=acc,
        limit=LARGE_EPS_MAX_ACC,
    )


def check_whitebox_vs_transfer(
    model,
    reference,
    x,
    y,
    whitebox_robust: np.ndarray,
    *,
    eps: float,
    norm: str,
    batch_size: int,
    seed: int,
    verify,
) -> Flag:
    """PGD crafted on an independent `reference` model must not beat the white-box suite.

    `verify(x, x_adv, eps=, norm=)` checks the transferred points against the threat model."""
    n = len(x)
    if reference is None:
        return _flag("whitebox-vs-transfer", None, "no reference model", eps=eps, n=n)
    adv = attacks.run_attack(
        "pgd",
        reference,
        x,
        y,
        eps=eps,
        norm=norm,
        steps=TRANSFER_STEPS,
        batch_size=batch_size,
        seed=seed,
    )
    verify(x, adv, eps=eps, norm=norm)
    transfer = _mean(_correct(model, x, y, batch_size) & _correct(model, adv, y, batch_size))
    white = _mean(whitebox_robust)
    tol = tolerance(transfer, n)
    ok = white <= transfer + tol
    msg = (
        f"white-box {white:.4f}, transfer PGD-{TRANSFER_STEPS} from the reference "
        f"{transfer:.4f}, tolerance {tol:.4f}"
        + ("" if ok else " (transfer beats white-box: gradients are likely masked)")
    )
    return _flag(
        "whitebox-vs-transfer",
        ok,
        msg,
        eps=eps,
        n=n,
        whitebox_acc=white,
        transfer_acc=transfer,
        tolerance=tol,
        transfer_steps=TRANSFER_STEPS,
    )


def _noise(shape, eps: float, norm: str, rng: np.random.Generator) -> np.ndarray:
    """Uniform in the linf cube, or uniform in the l2 ball (Gaussian direction, eps u^(1/d))."""
    if norm == "linf":
        return rng.uniform(-eps, eps, shape).astype(np.float32)
    flat = rng.standard_normal(shape).reshape(shape[0], -1)
    r = eps * rng.uniform(size=shape[0]) ** (1.0 / flat.shape[1])
    flat = flat / np.linalg.norm(flat, axis=1, keepdims=True) * r[:, None]
    return flat.reshape(shape).astype(np.float32)


def check_whitebox_vs_noise(
    model, x, y, whitebox_robust: np.ndarray, *, eps: float, norm: str, batch_size: int, seed: int
) -> Flag:
    """Uniform noise in the eps-ball (NOISE_DRAWS draws, worst case per example) must leave at
    least the white-box accuracy, beyond noise."""
    rng = np.random.default_rng(seed)
    ok_all = _correct(model, x, y, batch_size)
    for _ in range(NOISE_DRAWS):
        noisy = np.clip(x + _noise(x.shape, eps, norm, rng), 0.0, 1.0)
        ok_all &= _correct(model, noisy, y, batch_size)
    noise, white = _mean(ok_all), _mean(whitebox_robust)
    tol = tolerance(white, len(x))
    ok = noise >= white - tol
    msg = (
        f"white-box {white:.4f}, uniform noise ({NOISE_DRAWS} draws) {noise:.4f}, "
        f"tolerance {tol:.4f}"
        + ("" if ok else " (noise beats the attack: gradients are likely masked)")
    )
    return _flag(
        "whitebox-vs-noise",
        ok,
        msg,
        eps=eps,
        n=len(x),
        whitebox_acc=white,
        noise_acc=noise,
        tolerance=tol,
        draws=NOISE_DRAWS,
    )


def check_gradient_free_gap(
    eps: float, attack: str | None, before: float | None, after: float | None, n: int
) -> Flag:
    """The gradient-free attack, run last on the examples every gradient attack left robust, must
    break no more of them than noise allows: where it does, the gradient attacks were fooled."""
    if attack is None:
        return _flag(
            "gradient-free-gap", None, "the suite has no gradient-free attack", eps=eps, n=n
        )
    tol = tolerance(before, n)
    ok = before - after <= tol
    msg = (
        f"after the gradient attacks {before:.4f}, after {attack} {after:.4f}, tolerance {tol:.4f}"
        + (
            ""
            if ok
            else " (a gradient-free attack found what the gradient attacks missed: "
            "gradients are likely masked)"
        )
    )
    return _flag(
        "gradient-free-gap",
        ok,
        msg,
        eps=eps,
        n=n,
        attack=attack,
        before_acc=before,
        after_acc=after,
        tolerance=tol,
    )


def check_zero_gradients(grads: np.ndarray) -> Flag:
    """At most ZERO_GRAD_MAX_FRACTION of the examples may have an all-zero or non-finite input
    gradient of the cross-entropy."""
    flat = grads.reshape(len(grads), -1)
    bad = ~np.all(np.isfinite(flat), axis=1) | np.all(flat == 0, axis=1)
    frac = _mean(bad)
    ok = frac <= ZERO_GRAD_MAX_FRACTION
    msg = (
        f"{int(bad.sum())}/{len(flat)} examples have an all-zero or non-finite input "
        f"gradient (limit {ZERO_GRAD_MAX_FRACTION:.0%})"
        + ("" if ok else ": gradient attacks cannot move them")
    )
    return _flag(
        "zero-gradients", ok, msg, n=len(flat), fraction=frac, limit=ZERO_GRAD_MAX_FRACTION
    )


def _mean(mask: np.ndarray) -> float:
    return float(np.mean(mask)) if len(mask) else 0.0
