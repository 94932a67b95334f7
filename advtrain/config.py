"""Frozen, validated configuration dataclasses: the one place defaults live.

Every field is checked in `__post_init__`, so a config that exists is a valid config. Errors
follow the Keras house form: the field in backticks, the allowed set or range, then
`Received: name=value`. `from_dict` rejects unknown keys by name, so a typo in a YAML file is an
error instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "NORMS",
    "LOSSES",
    "METHODS",
    "MODELS",
    "SCHEDULES",
    "SUITES",
    "CERTIFY_METHODS",
    "AttackConfig",
    "TrainConfig",
    "EvalConfig",
    "ThreatModel",
    "check_bool",
    "check_methods",
    "check_eps_fits",
    "check_model_spec",
    "max_eps",
    "check_choice",
    "check_number",
    "load_yaml",
]

NORMS = ("linf", "l2")
LOSSES = ("ce", "margin", "dlr")
ATTACK_NAMES = ("fgsm", "pgd", "apgd", "square")
METHODS = ("clean", "fgsm", "pgd", "trades", "ibp", "crown-ibp")
CERTIFIED_METHODS = ("ibp", "crown-ibp")
MODELS = ("mlp", "cnn", "madry", "resnet")
SCHEDULES = ("constant", "cosine", "onecycle")
OPTIMIZERS = ("adam", "sgd")
SUITES = ("fgsm", "quick", "standard")
SPLITS = ("val", "test")
# The bound methods of `advtrain.bounds` (its METHODS equals this tuple; kept here so that config
# imports no TensorFlow): interval bounds, CROWN-IBP (IBP inside, CROWN from the margin back) and
# CROWN (backward linear relaxation at every layer).
CERTIFY_METHODS = ("ibp", "crown-ibp", "crown")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """Checks that `value` is one of `allowed` (case-insensitive) and returns it lower-cased."""
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ValueError(
            f"`{name}` must be one of {', '.join(repr(a) for a in allowed)}. Received: {name}={value!r}"
        )
    return value.lower()


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    integer: bool = False,
) -> float | int:
    """Checks a number against a range and returns it, typed.

    Bools are refused (True is an int in Python, never a sensible epsilon or step count).
    """
    kind = "an integer" if integer else "a number"
    ok_type = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        raise TypeError(f"`{name}` must be {kind}. Received: {name}={value!r}")
    if not integer and not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite. Received: {name}={value!r}")
    lo_bracket = "(" if low_open else "["
    rng = f"{lo_bracket}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        raise ValueError(f"`{name}` must be in {rng}. Received: {name}={value!r}")
    return int(value) if integer else float(value)


def max_eps(norm: str, input_shape=None) -> float:
    """The largest useful radius: the diameter of [0, 1]^(H*W*C), 1 in linf and sqrt(H*W*C) in l2
    (28 for MNIST). Without a shape, l2 has no bound yet: `check_eps_fits` applies it once the
    data is known."""
    if norm == "linf":
        return 1.0
    return math.sqrt(math.prod(input_shape)) if input_shape is not None else math.inf


def _check_eps(value: Any, norm: str) -> float:
    """eps in [0, 1] for linf, >= 0 for l2 (checked after `norm`; `check_eps_fits` bounds l2 by the data)."""
    high = max_eps(norm) if norm in NORMS else 1.0
    return check_number("eps", value, low=0.0, high=None if math.isinf(high) else high)


def check_eps_fits(name: str, eps: float, norm: str, input_shape) -> None:
    """Refuses an eps beyond the diameter of the data's image space, naming the bound.

    Raises:
        ValueError: `eps` larger than `max_eps(norm, input_shape)`.
    """
    high = max_eps(norm, input_shape)
    if eps > high + 1e-9:
        dims = "x".join(str(d) for d in input_shape)
        raise ValueError(f"`{name}` must be in [0.0, {high:.4g}] for {dims} images ({norm} diameter of [0, 1]^"
                         f"{math.prod(input_shape)}). Received: {name}={eps!r}")


def check_model_spec(value: Any) -> str:
    """A built-in model name, a `.keras` file or `package.module:function`."""
    import re

    if isinstance(value, str) and value.lower() in MODELS:
        return value.lower()
    if isinstance(value, str) and (value.endswith(".keras") or re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", value)):
        return value
    raise ValueError(f"`model` must be one of {', '.join(repr(m) for m in MODELS)}, a .keras file or "
                     f"package.module:function. Received: model={value!r}")


def check_methods(name: str, value: Any) -> tuple[str, ...]:
    """Bound methods as a tuple of distinct names of `CERTIFY_METHODS`, in the order given.

    Accepts a list or tuple, or a string: comma-separated names, or `"none"` (and `""`) for no
    method at all.
    """
    if isinstance(value, str):
        value = () if value.strip().lower() in ("", "none") else tuple(v.strip() for v in value.split(","))
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"`{name}` must be a list of bound methods ({', '.join(CERTIFY_METHODS)}) or 'none'. "
                        f"Received: {name}={value!r}")
    out: list[str] = []
    for v in value:
        if not isinstance(v, str) or v.lower() not in CERTIFY_METHODS:
            raise ValueError(f"`{name}` must list methods among {', '.join(repr(m) for m in CERTIFY_METHODS)} "
                             f"(or be 'none'). Received: {name}={v!r}")
        if v.lower() not in out:
            out.append(v.lower())
    return tuple(out)


def check_bool(name: str, value: Any) -> bool:
    """Checks that `value` is a bool (YAML true/false), not a truthy string or number."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be true or false. Received: {name}={value!r}")
    return value


class _Config:
    """Shared dict round trip for the frozen config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__} expects a mapping. Received: {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown {cls.__name__} key(s): {', '.join(unknown)}. "
                f"Known keys: {', '.join(sorted(known))}."
            )
        return cls(**dict(data))

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


@dataclasses.dataclass(frozen=True)
class AttackConfig(_Config):
    """One attack at one budget: the unit of a threat model.

    Args:
        name: `"fgsm"`, `"pgd"` or `"apgd"`. Defaults to `"pgd"`.
        eps: radius of the perturbation ball, in [0, 1] for linf, [0, sqrt(H*W*C)] for l2 (28 on MNIST) (pixels are in
            [0, 1]). Defaults to `0.3`.
        steps: gradient steps, >= 1 (FGSM always takes one). Defaults to `40`.
        step_size: step length, > 0; `None` means 2.5 * eps / steps (Madry et al. 2018).
        norm: `"linf"` or `"l2"`. Defaults to `"linf"`.
        random_start: start uniformly inside the eps-ball. Defaults to `True`.
        restarts: independent random starts, >= 1; each example keeps its strongest. Defaults to `1`.
        loss: `"ce"`, `"margin"` (Carlini-Wagner) or `"dlr"` (Croce and Hein 2020). Defaults to `"ce"`.
        seed: seed of the random start, so the same seed gives the same result. Defaults to `0`.
    """

    name: str = "pgd"
    eps: float = 0.3
    steps: int = 40
    step_size: float | None = None
    norm: str = "linf"
    random_start: bool = True
    restarts: int = 1
    loss: str = "ce"
    seed: int = 0

    def __post_init__(self) -> None:
        _set(self, "name", check_choice("name", self.name, ATTACK_NAMES))
        _set(self, "norm", check_choice("norm", self.norm, NORMS))
        _set(self, "eps", _check_eps(self.eps, self.norm))
        _set(self, "steps", check_number("steps", self.steps, low=1, integer=True))
        if self.step_size is not None:
            _set(self, "step_size", check_number("step_size", self.step_size, low=0.0, low_open=True))
        check_bool("random_start", self.random_start)
        _set(self, "restarts", check_number("restarts", self.restarts, low=1, integer=True))
        _set(self, "loss", check_choice("loss", self.loss, LOSSES))
        _set(self, "seed", check_number("seed", self.seed, low=0, integer=True))

    def resolved_step_size(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Config):
    """Adversarial training of one model: method, attack, optimisation and data.

    Args:
        model: a built-in model (`"mlp"`, `"cnn"`, `"madry"`, `"resnet"`), a `.keras` file to
            fine-tune, or `package.module:function` returning an uncompiled Keras model.
            Defaults to `"cnn"`.
        method: `"clean"`, `"fgsm"` (FGSM-RS, Wong et al. 2020), `"pgd"` (Madry et al. 2018),
            `"trades"` (Zhang et al. 2019), or certified training: `"ibp"` (Gowal et al. 2018) and
            `"crown-ibp"` (Zhang et al. 2020), whose loss bounds the worst case over the eps-ball
            instead of attacking it. Defaults to `"pgd"`.
        eps: training perturbation radius, in [0, 1] (linf) or [0, sqrt(H*W*C)] (l2, 28 on MNIST). Defaults to `0.3`.
        steps: PGD steps in training, >= 1 (ignored by `clean` and `fgsm`). Defaults to `10`.
        step_size: PGD step, > 0; `None` = 2.5 * eps / steps (FGSM-RS uses 1.25 * eps).
        norm: `"linf"` or `"l2"`. Defaults to `"linf"`.
        mix: weight of the adversarial loss, in [0, 1]: loss = (1 - mix) CE(x) + mix CE(x_adv).
            1 is Madry training, 0.5 is Goodfellow et al. 2015. Defaults to `1.0`.
        beta: TRADES trade-off, >= 0. Defaults to `6.0`.
        kappa_end: certified training (`ibp`, `crown-ibp`): weight of the natural loss at the end
            of the eps ramp, in [0, 1]; it falls linearly from 1 over `eps_ramp_epochs`:
            loss = kappa CE(x) + (1 - kappa) CE(worst-case logits). Defaults to `0.5` (Gowal et al.).
        beta_end: `crown-ibp` only: weight of the CROWN-IBP bound at the end of the eps ramp, in
            [0, 1]; it falls linearly from 1, the rest of the bound being IBP's (Zhang et al.
            2020 end at 0, pure IBP). Defaults to `0.0`.
        epochs: passes over the training split, >= 1. Defaults to `5`.
        batch_size: examples per step on each worker, >= 1. Defaults to `128`.
        learning_rate: peak learning rate, > 0. Defaults to `1e-3`.
        optimizer: `"adam"` or `"sgd"` (momentum 0.9). Defaults to `"adam"`.
        schedule: `"constant"`, `"cosine"` or `"onecycle"`. Defaults to `"onecycle"`.
        eps_ramp_epochs: epochs over which eps grows linearly from 0, >= 0 (>= 1 for `ibp` and
            `crown-ibp`, whose kappa and beta follow the same ramp). Defaults to `0`.
        val_size: validation examples held out of the training split, >= 1. Defaults to `5000`.
        train_size: use only the first n training examples (after the validation split), or
            `None` for all. Defaults to `None`.
        probe_size: validation examples attacked by the per-epoch probe. Defaults to `500`.
        probe_steps: PGD steps of the probe. Defaults to `10`.
        guard: stop and restore the best epoch on catastrophic overfitting. Defaults to `True`.
        data: the dataset, a source of `advtrain.data.load_data`: `"bundled"` (MNIST),
            `"keras:fashion_mnist"`, `"keras:cifar10"`, an .npz, a folder, or a file dataset
            (folder or URI) streamed to Ray Train workers by Ray Data. Defaults to `"bundled"`.
        seed: seed of initialisation, shuffling and attacks. Defaults to `0`.
    """

    model: str = "cnn"
    method: str = "pgd"
    eps: float = 0.3
    steps: int = 10
    step_size: float | None = None
    norm: str = "linf"
    mix: float = 1.0
    beta: float = 6.0
    kappa_end: float = 0.5
    beta_end: float = 0.0
    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    schedule: str = "onecycle"
    eps_ramp_epochs: int = 0
    val_size: int = 5000
    train_size: int | None = None
    probe_size: int = 500
    probe_steps: int = 10
    guard: bool = True
    data: str = "bundled"
    seed: int = 0

    def __post_init__(self) -> None:
        _set(self, "model", check_model_spec(self.model))
        _set(self, "method", check_choice("method", self.method, METHODS))
        _set(self, "norm", check_choice("norm", self.norm, NORMS))
        _set(self, "eps", _check_eps(self.eps, self.norm))
        _set(self, "steps", check_number("steps", self.steps, low=1, high=1000, integer=True))
        if self.step_size is not None:
            _set(self, "step_size", check_number("step_size", self.step_size, low=0.0, low_open=True))
        _set(self, "mix", check_number("mix", self.mix, low=0.0, high=1.0))
        _set(self, "beta", check_number("beta", self.beta, low=0.0))
        _set(self, "kappa_end", check_number("kappa_end", self.kappa_end, low=0.0, high=1.0))
        _set(self, "beta_end", check_number("beta_end", self.beta_end, low=0.0, high=1.0))
        _set(self, "epochs", check_number("epochs", self.epochs, low=1, high=10000, integer=True))
        _set(self, "batch_size", check_number("batch_size", self.batch_size, low=1, high=65536, integer=True))
        _set(
            self,
            "learning_rate",
            check_number("learning_rate", self.learning_rate, low=0.0, high=10.0, low_open=True),
        )
        _set(self, "optimizer", check_choice("optimizer", self.optimizer, OPTIMIZERS))
        _set(self, "schedule", check_choice("schedule", self.schedule, SCHEDULES))
        _set(self, "eps_ramp_epochs", check_number("eps_ramp_epochs", self.eps_ramp_epochs, low=0, integer=True))
        if self.method in CERTIFIED_METHODS and self.eps > 0 and self.eps_ramp_epochs < 1:
            # The bound loss at full eps from the first step drives the model to a constant
            # (Gowal et al. 2018 ramp eps from 0); kappa and beta follow the same ramp.
            raise ValueError(f"`eps_ramp_epochs` must be >= 1 for method {self.method!r} (eps, kappa and beta ramp "
                             f"over it; e.g. half the epochs). Received: eps_ramp_epochs={self.eps_ramp_epochs}")
        _set(self, "val_size", check_number("val_size", self.val_size, low=1, integer=True))
        if self.train_size is not None:
            _set(self, "train_size", check_number("train_size", self.train_size, low=1, integer=True))
        _set(self, "probe_size", check_number("probe_size", self.probe_size, low=1, integer=True))
        _set(self, "probe_steps", check_number("probe_steps", self.probe_steps, low=1, integer=True))
        check_bool("guard", self.guard)
        if not isinstance(self.data, str) or not self.data:
            raise TypeError(f"`data` must be a non-empty string. Received: data={self.data!r}")
        _set(self, "seed", check_number("seed", self.seed, low=0, integer=True))

    def resolved_step_size(self) -> float:
        if self.step_size is not None:
            return self.step_size
        if self.method == "fgsm":
            return 1.25 * self.eps
        return 2.5 * self.eps / self.steps


@dataclasses.dataclass(frozen=True)
class EvalConfig(_Config):
    """The threat model a robustness number is stated under.

    Args:
        norm: `"linf"` or `"l2"`. Defaults to `"linf"`.
        eps: radius (or radii, a sweep) judged, each in [0, 1] (linf) or [0, sqrt(H*W*C)] (l2, 28 on MNIST).
            Defaults to `(0.3,)`.
        suite: `"fgsm"` (weak reference), `"quick"` (PGD-20) or `"standard"` (PGD-100 x 5
            restarts, then AutoAttack's APGD-CE, APGD-T and Square). Defaults to `"standard"`.
        n: examples evaluated, >= 1, or `None` for the whole split. Defaults to `None`.
        split: `"test"` or `"val"`. Defaults to `"test"`.
        batch_size: examples per attack batch (the last one is padded). Defaults to `500`.
        sanity: run the gradient-masking sanity checks. Defaults to `True`.
        seed: seed of random starts and sample choice. Defaults to `0`.
        certify: bound methods (`"ibp"`, `"crown-ibp"`, `"crown"`) run beside the attacks at
            every eps, on the same examples; the certified accuracy is the per-example union.
            `()` (or `"none"`) turns certification off; a comma-separated string is split.
            Defaults to `("ibp", "crown-ibp")`.
    """

    norm: str = "linf"
    eps: tuple[float, ...] = (0.3,)
    suite: str = "standard"
    n: int | None = None
    split: str = "test"
    batch_size: int = 500
    sanity: bool = True
    seed: int = 0
    certify: tuple[str, ...] = ("ibp", "crown-ibp")

    def __post_init__(self) -> None:
        _set(self, "norm", check_choice("norm", self.norm, NORMS))
        eps = self.eps
        if isinstance(eps, (int, float)) and not isinstance(eps, bool):
            eps = (eps,)
        if not isinstance(eps, (tuple, list)) or not eps:
            raise ValueError(f"`eps` must be a number or a non-empty list of numbers. Received: eps={self.eps!r}")
        _set(self, "eps", tuple(_check_eps(e, self.norm) for e in eps))
        _set(self, "suite", check_choice("suite", self.suite, SUITES))
        if self.n is not None:
            _set(self, "n", check_number("n", self.n, low=1, integer=True))
        _set(self, "split", check_choice("split", self.split, SPLITS))
        _set(self, "batch_size", check_number("batch_size", self.batch_size, low=1, high=65536, integer=True))
        check_bool("sanity", self.sanity)
        _set(self, "seed", check_number("seed", self.seed, low=0, integer=True))
        _set(self, "certify", check_methods("certify", self.certify))

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["eps"] = list(self.eps)
        d["certify"] = list(self.certify)
        return d

    @property
    def threat_model(self) -> ThreatModel:
        """The judged point of this evaluation: its norm at the largest eps of the sweep."""
        return ThreatModel(norm=self.norm, eps=max(self.eps), suite=self.suite, n=self.n,
                           split=self.split)


@dataclasses.dataclass(frozen=True)
class ThreatModel(_Config):
    """The one threat model every trial of a search is judged under, fixed for the whole search.

    It travels from the run file to every trial's per-epoch probe (PGD on the validation split at
    `norm`, `eps`), the final evaluation (`suite` on the first `n` examples of `split`) and the
    reports, so trials compare. `EvalConfig.threat_model` derives it: the largest eps of the
    evaluated sweep.

    Args:
        norm: `"linf"` or `"l2"`. Defaults to `"linf"`.
        eps: the judged radius, in [0, 1] (linf) or [0, sqrt(H*W*C)] (l2, 28 on MNIST). Defaults to `0.3`.
        suite: the final evaluation's suite (`"fgsm"`, `"quick"`, `"standard"`). Defaults to
            `"standard"`.
        n: examples of the final evaluation, >= 1, or `None` for the whole split.
        split: the final evaluation's split, `"test"` or `"val"`. Defaults to `"test"`.
    """

    norm: str = "linf"
    eps: float = 0.3
    suite: str = "standard"
    n: int | None = None
    split: str = "test"

    def __post_init__(self) -> None:
        _set(self, "norm", check_choice("norm", self.norm, NORMS))
        _set(self, "eps", _check_eps(self.eps, self.norm))
        _set(self, "suite", check_choice("suite", self.suite, SUITES))
        if self.n is not None:
            _set(self, "n", check_number("n", self.n, low=1, integer=True))
        _set(self, "split", check_choice("split", self.split, SPLITS))

    def describe(self) -> str:
        """One line: `linf eps=0.3, standard suite, test split, n=1000`."""
        return (f"{self.norm} eps={self.eps:g}, {self.suite} suite, {self.split} split, "
                f"n={self.n or 'all'}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping, with an error that names the file when it is missing or malformed."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"Cannot read config file {str(path)!r}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"Config file {str(path)!r} is not valid YAML: {problem}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"Config file {str(path)!r} must hold a mapping at the top level. Received: {type(data).__name__}")
    return data
