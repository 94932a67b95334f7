"""Robustness evaluation under a stated threat model, read like AutoAttack's standard evaluation.

A robust accuracy is the per-example worst case over an attack suite at a threat model (norm,
eps, suite), on n examples of a named split. `evaluate_robustness` reads top to bottom:

1. model checks (`advtrain.checks`): the output is logits (a final softmax is removed, or the
   model refused) and the model is deterministic;
2. a clean pass gives the per-example `robust` mask;
3. the suite's attacks (`advtrain.suites`), in their fixed order, each run only on the
   still-robust examples (Croce and Hein 2020, arXiv:2003.01690); after each, the accuracy and
   the number of examples it broke; every attack output is verified (in the eps-ball, in [0, 1],
   finite). The standard suite ends with Square, which needs no gradient: on a model that masks
   its gradients it is the attack that finds the true figure. Before it, on a model with layers
   without a useful gradient (quantisation, rounding, casts: `advtrain.bpda`), APGD-CE takes
   its gradients from a straight-through surrogate (BPDA, Athalye et al. 2018), its adversarial
   inputs judged on the model itself; on any other model that attack is not run;
4. FGSM as a weak reference, run on every clean-correct example and reported apart;
5. the bound methods of `config.certify` (`advtrain.certification`, `advtrain.bounds`) on the
   same examples: the certified accuracy, a proven lower bound beside the attacked upper bound,
   checked per example (a certified example that is misclassified or that any attack broke
   raises `CertificationError`); a layer the bounds cannot cover makes it "not available";
6. the sanity flags (`advtrain.flags`, DESIGN.md section 4);

and returns a `RobustnessReport` (`advtrain.robustness_report`), in which a robust accuracy
whose flags failed is marked as an upper bound wherever it is shown.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from advtrain import attacks, flags
from advtrain.bpda import bpda_surrogate
from advtrain.certification import CertificationError, certify_at
from advtrain.checks import check_model, predict_logits, verify_adversarial
from advtrain.config import EvalConfig
from advtrain.robustness_report import EpsResult, RobustnessReport
from advtrain.suites import FGSM_REFERENCE, SuiteAttack, suite_attacks

__all__ = [
    "CertificationError",
    "Progress",
    "evaluate_model_file",
    "evaluate_robustness",
    "evaluate_split",
]

log = logging.getLogger(__name__)

# progress(label, done, total): `done` of `total` examples attacked so far by the attack `label`
# (`"eps 0.3 apgd-t-100-top9 target 2/9"`); called with done=0 when an attack starts.
Progress = Callable[[str, int, int], None]


def _check_data(x, y, config: EvalConfig):
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError(
            f"`x` must be (n, ...) and `y` (n,) with the same n >= 1. "
            f"Received: x.shape={x.shape}, y.shape={y.shape}"
        )
    if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
        raise ValueError(
            f"`x` must be finite and in [0, 1]. Received: x in [{np.nanmin(x)}, {np.nanmax(x)}]"
        )
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError(
            f"`y` must hold integer labels >= 0. Received: y.dtype={y.dtype}, min={y.min()}"
        )
    given = len(x)
    if config.n is not None:
        if config.n > len(x):
            raise ValueError(
                f"`n` asks for more examples than given. Received: n={config.n}, len(x)={len(x)}"
            )
        x, y = x[: config.n], y[: config.n]
    return x, y.astype(np.int32), given


@dataclasses.dataclass(frozen=True)
class _Eval:
    """What every attack of one evaluation shares: the model, the data and the threat model."""

    model: Any
    x: np.ndarray
    y: np.ndarray
    clean_logits: np.ndarray
    norm: str
    batch_size: int
    progress: Progress | None
    surrogate: Any = None  # the straight-through model BPDA attacks take their gradients from

    def attack(self, attack: SuiteAttack, idx, eps, seed, label, y_target=None) -> np.ndarray:
        """Runs `attack` on examples `idx` and verifies its output against the threat model.
        A BPDA attack runs on the surrogate; its output is judged on the model by the caller."""
        x, y = self.x[idx], self.y[idx]
        model = self.surrogate if attack.bpda else self.model
        on_batch = None
        if self.progress is not None:
            self.progress(label, 0, len(idx))
            on_batch = lambda done: self.progress(label, done, len(idx))
        adv = attacks.run_attack(
            attack.attack,
            model,
            x,
            y,
            batch_size=self.batch_size,
            y_target=y_target,
            seed=seed,
            on_batch=on_batch,
            **attack.budget(eps, self.norm),
        )
        verify_adversarial(x, adv, eps=eps, norm=self.norm)
        return adv

    def predict(self, x) -> np.ndarray:
        return np.argmax(predict_logits(self.model, x, self.batch_size), axis=1)


def _attack_into(ev: _Eval, attack: SuiteAttack, label: str, eps, robust, adv_out, seed) -> None:
    """Runs one suite attack on the still-robust examples, updating `robust` and `adv_out`."""
    classes = ev.clean_logits.shape[1]
    rounds = min(attack.target_classes, classes - 1)
    # Targets: the highest-scoring other classes of the clean logits (AutoAttack's APGD-T).
    order = np.argsort(-ev.clean_logits, axis=1, kind="stable")
    others = np.stack([row[row != label_] for row, label_ in zip(order, ev.y, strict=True)])
    for r in range(rounds) if rounds else [None]:
        idx = np.flatnonzero(robust)
        if idx.size == 0:
            return
        target = None if r is None else others[idx, r]
        where = f"{label} target {r + 1}/{rounds}" if r is not None else label
        adv = ev.attack(attack, idx, eps, seed + (r or 0), where, y_target=target)
        fooled = ev.predict(adv) != ev.y[idx]
        robust[idx[fooled]] = False
        adv_out[idx[fooled]] = adv[fooled]


def _timed(ev: _Eval, attack: SuiteAttack, label: str, eps, robust, adv_out, seed) -> float:
    t0 = time.perf_counter()
    _attack_into(ev, attack, f"eps {eps:g} {label}", eps, robust, adv_out, seed)
    seconds = time.perf_counter() - t0
    log.info(
        "%s %s eps=%g: accuracy %.4f (%d/%d), %.1fs",
        label,
        ev.norm,
        eps,
        robust.mean(),
        int(robust.sum()),
        len(robust),
        seconds,
    )
    return seconds


@dataclasses.dataclass
class _EpsRun:
    """One eps's attacks: accuracies after each (cumulative), examples each broke, seconds,
    the still-robust mask with its worst-case inputs, and the FGSM reference's mask."""

    per_attack: dict[str, float]
    broken: dict[str, int]
    seconds: dict[str, float]
    robust: np.ndarray
    adversarial: np.ndarray
    fgsm_acc: float
    fgsm_robust: np.ndarray

    @property
    def robust_acc(self) -> float:
        return list(self.per_attack.values())[-1]


def _evaluate_eps(ev: _Eval, eps: float, suite, config: EvalConfig) -> _EpsRun:
    """Clean mask, the suite in order on still-robust examples, then the FGSM reference."""
    correct = np.argmax(ev.clean_logits, axis=1) == ev.y
    robust, adv_out = correct.copy(), ev.x.copy()
    per_attack, broken, seconds = {"clean": float(correct.mean())}, {}, {}
    for j, attack in enumerate(suite):
        before = int(robust.sum())
        seconds[attack.name] = _timed(
            ev, attack, attack.name, eps, robust, adv_out, config.seed + 97 * j
        )
        per_attack[attack.name] = float(robust.mean())
        broken[attack.name] = before - int(robust.sum())
    if config.suite == "fgsm":
        fgsm_acc, fgsm_robust = per_attack["fgsm"], robust
    else:
        fgsm_robust, label = correct.copy(), "fgsm (reference)"
        seconds[label] = _timed(
            ev, FGSM_REFERENCE, label, eps, fgsm_robust, ev.x.copy(), config.seed
        )
        fgsm_acc = float(fgsm_robust.mean())
    return _EpsRun(per_attack, broken, seconds, robust, adv_out, fgsm_acc, fgsm_robust)


def _eps_flags(ev: _Eval, eps: float, run: _EpsRun, config: EvalConfig, suite, reference):
    """The per-eps gradient-masking checks of `advtrain.flags` on one eps's attacks."""
    per_attack, fgsm_acc, robust = run.per_attack, run.fgsm_acc, run.robust
    n, bs, seed, norm = len(ev.y), ev.batch_size, config.seed, ev.norm
    m = min(n, flags.SAMPLE_SIZE)
    x, y = ev.x, ev.y
    iterative = [a for a in suite if a.attack != "fgsm"]
    first = iterative[0].name if iterative else None
    clean, rob = per_attack["clean"], list(per_attack.values())[-1]
    free = [i for i, a in enumerate(suite) if a.gradient_free]
    # Accuracy just before the first gradient-free attack: what the gradient attacks left.
    names = list(per_attack)
    before = per_attack[names[free[0]]] if free else None  # names[0] is "clean"
    return [
        flags.check_gradient_free_gap(eps, suite[free[0]].name if free else None, before, rob, n),
        flags.check_robust_le_clean(eps, clean, rob, n),
        flags.check_pgd_le_fgsm(eps, first, per_attack.get(first), rob, fgsm_acc, n),
        flags.check_more_steps(
            ev.model, x[:m], y[:m], eps=eps, norm=norm, batch_size=bs, seed=seed
        ),
        flags.check_whitebox_vs_transfer(
            ev.model,
            reference,
            x[:m],
            y[:m],
            robust[:m],
            eps=eps,
            norm=norm,
            batch_size=bs,
            seed=seed,
            verify=verify_adversarial,
        ),
        flags.check_whitebox_vs_noise(
            ev.model, x, y, robust, eps=eps, norm=norm, batch_size=bs, seed=seed
        ),
    ]


def _eps_result(
    ev: _Eval,
    eps: float,
    run: _EpsRun,
    config: EvalConfig,
    unavailable: dict[str, str],
    t0: float,
    *,
    keep_adversarial: bool,
) -> EpsResult:
    """One eps's `EpsResult`: its attacks and, on the same examples, its certificates."""
    # Every attack run here, the FGSM reference included, must leave certified examples alone.
    certified = certify_at(
        ev.model,
        ev.x,
        ev.y,
        run.robust & run.fgsm_robust,
        eps=eps,
        norm=config.norm,
        methods=config.certify,
        unavailable=unavailable,
        progress=ev.progress,
    )
    return EpsResult(
        eps=eps,
        clean_acc=run.per_attack["clean"],
        robust_acc=run.robust_acc,
        fgsm_acc=run.fgsm_acc,
        per_attack=run.per_attack,
        broken=run.broken,
        attack_seconds=run.seconds,
        seconds=time.perf_counter() - t0,
        adversarial=run.adversarial if keep_adversarial else None,
        **certified,
    )


def _sample_notes(n: int, given: int, split: str, steps_scale: float, suite: str) -> list[str]:
    first = "all" if n == given else f"the first {n} of the"
    notes = [f"{first} {given} examples given ({split} split) were evaluated"]
    if steps_scale != 1.0:
        notes.append(
            f"REDUCED SUITE: step counts scaled by {steps_scale:g}; not the "
            f"{suite!r} suite's budget, for tests only"
        )
    return notes


def _clean_logits(model, x, y, batch_size: int) -> np.ndarray:
    logits = predict_logits(model, x, batch_size)
    if int(y.max()) >= logits.shape[1]:
        raise ValueError(
            f"Labels exceed the model's {logits.shape[1]} classes. "
            f"Received: max label={int(y.max())}"
        )
    return logits


def _sweep_flags(model, x, y, results: list[EpsResult], config: EvalConfig) -> list:
    """The checks across the eps sweep: accuracy falls as eps grows, and to 0 at a huge eps."""
    m = min(len(x), flags.SAMPLE_SIZE)
    return [
        flags.check_eps_monotone([(r.eps, r.robust_acc) for r in results], len(x)),
        flags.check_large_eps(
            model, x[:m], y[:m], norm=config.norm, batch_size=config.batch_size, seed=config.seed
        ),
    ]


def evaluate_robustness(
    model,
    x,
    y,
    config: EvalConfig,
    *,
    split: str | None = None,
    reference_model=None,
    steps_scale: float = 1.0,
    keep_adversarial: bool = False,
    progress: Progress | None = None,
) -> RobustnessReport:
    """Robust accuracy of `model` under `config`'s threat model, with sanity checks and, beside
    it, the certified accuracy.

    For each eps of `config.eps` (a sweep when several): clean pass, then the suite's attacks in
    order on the still-robust examples (robust accuracy = per-example worst case; the BPDA
    attack only on a model with layers without a useful gradient, named in the report), FGSM as a
    weak reference, the bound methods of `config.certify` on the same examples (certified
    accuracy = per-example union; `certified <= robust <= clean` holds per example), and, when
    `config.sanity`, the checks of `advtrain.flags`.

    Args:
        model: a Keras model (or callable) mapping (n, H, W, C) float32 in [0, 1] to logits.
            A final softmax layer is removed (noted in the report); other probability outputs
            are refused.
        x: float32 images in [0, 1], (n, H, W, C). With `config.n` set, the first n are used.
        y: int labels, (n,).
        config: the threat model (norm, eps, suite), n, batch size, sanity switch and seed.
        split: the split x came from, as reported. Defaults to `config.split`.
        reference_model: an independently trained model for the transfer check; without one
            the check is reported as not run.
        steps_scale: factor on the suite's step counts and query budgets, in (0, 1], for tests
            only; any value below 1 is reported as a reduced suite. Defaults to `1.0`.
        keep_adversarial: keep each eps's worst-case adversarial inputs in the report's
            results (`EpsResult.adversarial`, never serialised). Defaults to `False`.
        progress: called as `progress(label, done, total)` while each attack runs (see
            `Progress`), for a progress display. Defaults to `None`.

    Returns:
        A `RobustnessReport`.

    Raises:
        ValueError: bad inputs or a model that cannot be evaluated (see `check_model`).
        AttackOutputError: an attack produced points outside the threat model.
        CertificationError: a certified example was misclassified or broken by an attack (or
            by the FGSM reference): the bound or the attack is wrong.

    Example:
        >>> report = evaluate_robustness(model, x, y, EvalConfig(eps=(0.1, 0.3), suite="quick"))
        >>> report.write("runs/eval")
    """
    if not isinstance(config, EvalConfig):
        raise TypeError(f"`config` must be an EvalConfig. Received: config={type(config).__name__}")
    split = config.split if split is None else split
    if split not in ("train", "val", "test"):
        raise ValueError(
            f"`split` must be one of 'train', 'val', 'test'. Received: split={split!r}"
        )
    suite = suite_attacks(config.suite, steps_scale)
    start = time.perf_counter()
    x, y, given = _check_data(x, y, config)
    m = min(len(x), flags.SAMPLE_SIZE)
    model, notes, grads = check_model(model, x[:m], y[:m])
    if reference_model is not None:
        reference_model, _, _ = check_model(reference_model, x[:m], y[:m])
    notes += _sample_notes(len(x), given, split, steps_scale, config.suite)
    clean_logits = _clean_logits(model, x, y, config.batch_size)
    # BPDA: only where the suite has such an attack and the model has layers without a gradient.
    bpda = bpda_surrogate(model, x[:m]) if any(a.bpda for a in suite) else None
    if bpda is not None and bpda.note:
        notes.append(bpda.note)
    surrogate = None if bpda is None else bpda.model
    suite = tuple(a for a in suite if not a.bpda or surrogate is not None)
    ev = _Eval(model, x, y, clean_logits, config.norm, config.batch_size, progress, surrogate)
    found = [flags.check_zero_gradients(grads)] if config.sanity else []
    results, unavailable = [], {}  # {bound method: why it cannot bound this model}, for every eps
    for eps in config.eps:
        t0 = time.perf_counter()
        run = _evaluate_eps(ev, eps, suite, config)
        if config.sanity:
            found += _eps_flags(ev, eps, run, config, suite, reference_model)
        results.append(
            _eps_result(ev, eps, run, config, unavailable, t0, keep_adversarial=keep_adversarial)
        )
    if config.sanity:
        found += _sweep_flags(model, x, y, results, config)
    else:
        notes.append("sanity checks were switched off (config.sanity=False)")
    return RobustnessReport(
        norm=config.norm,
        eps=tuple(config.eps),
        suite=config.suite,
        attacks=tuple(a.describe(bpda.layers if a.bpda else ()) for a in suite),
        reference_attack=FGSM_REFERENCE.describe(),
        steps_scale=float(steps_scale),
        n=len(x),
        split=split,
        seed=config.seed,
        results=tuple(results),
        flags=tuple(found),
        notes=tuple(notes),
        seconds=time.perf_counter() - start,
        certify=tuple(config.certify),
    )


def evaluate_split(model, config: EvalConfig, data, **kwargs) -> RobustnessReport:
    """Evaluates `model` on the first `config.n` examples of `config.split` of `data`.

    The first n, not a random sample: MNIST's test order is not sorted by class, and a fixed,
    documented subset makes runs compare (the AutoAttack/RobustBench convention).

    Args:
        model: see `evaluate_robustness`.
        config: the threat model and sample.
        data: an object with `split(name) -> (x, y)`, such as `advtrain.data.ImageData`.
        **kwargs: passed to `evaluate_robustness` (`reference_model`, `steps_scale`,
            `keep_adversarial`, `progress`).

    Returns:
        A `RobustnessReport`.
    """
    x, y = data.split(config.split)
    rep = evaluate_robustness(model, x, y, config, split=config.split, **kwargs)
    describe = getattr(data, "describe", None)
    return dataclasses.replace(rep, data=describe()) if describe else rep


def evaluate_model_file(
    path, config: EvalConfig, data=None, *, reference_model=None, **kwargs
) -> RobustnessReport:
    """Loads a `.keras` model (safe_mode) and evaluates it on `config.split` (`evaluate_split`).

    Args:
        path: the `.keras` file.
        config: the threat model and sample (see `evaluate_robustness`).
        data: an `advtrain.data.ImageData`; defaults to `load_data()` (bundled MNIST, default val
            split).
        reference_model: a model or a `.keras` path for the transfer check, or None.
        **kwargs: passed to `evaluate_robustness` (`steps_scale`, `progress`, ...).

    Returns:
        A `RobustnessReport`.
    """
    from advtrain.data import load_data
    from advtrain.models import load_model

    model = load_model(path)
    if isinstance(reference_model, (str, Path)):
        reference_model = load_model(reference_model)
    data = load_data() if data is None else data
    return evaluate_split(model, config, data, reference_model=reference_model, **kwargs)
