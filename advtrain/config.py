"""Frozen, validated configuration dataclasses: the one place defaults live.

Every field is checked in `__post_init__`, so a config that exists is a valid config. Errors
follow the Keras house form: the field in backticks, the allowed set or range, then
`Received: name=value`. `from_dict` rejects unknown keys by name (`check_keys`, which every section
of a run file shares, suggesting the closest key), so a typo in a YAML file is an error instead of
a silently ignored setting. Each field is an `option`: its meaning, default and range live beside
it, and docs/config.md and `advtrain config --schema` are generated from them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CERTIFY_METHODS",
    "LOSSES",
    "METHODS",
    "MODELS",
    "NORMS",
    "SCHEDULES",
    "SUITES",
    "AttackConfig",
    "EvalConfig",
    "ThreatModel",
    "TrainConfig",
    "check_bool",
    "check_choice",
    "check_eps_fits",
    "check_fields",
    "check_keys",
    "check_methods",
    "check_model_spec",
    "check_number",
    "check_steps_per_call",
    "describe_fields",
    "did_you_mean",
    "field_names",
    "load_yaml",
    "max_eps",
    "option",
    "range_text",
    "schema_of",
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
            f"`{name}` must be one of {', '.join(repr(a) for a in allowed)}. Received: "
            f"{name}={value!r}"
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
    rng = range_text(low, high, low_open)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        raise ValueError(f"`{name}` must be in {rng}. Received: {name}={value!r}")
    return int(value) if integer else float(value)


def check_steps_per_call(value: Any) -> int:
    """Checks `steps_per_call` (optimizer steps per compiled call, an integer >= 1) and returns it.

    The one check: `advtrain.training.AdversarialTraining` calls it, and so does the driver
    (`workflows.train.build_trainer`) before building a trainer, without importing TensorFlow.
    """
    return check_number("steps_per_call", value, low=1, integer=True)


def max_eps(norm: str, input_shape=None) -> float:
    """The largest useful radius: the diameter of [0, 1]^(H*W*C), 1 in linf and sqrt(H*W*C) in l2
    (28 for MNIST). Without a shape, l2 has no bound yet: `check_eps_fits` applies it once the
    data is known."""
    if norm == "linf":
        return 1.0
    return math.sqrt(math.prod(input_shape)) if input_shape is not None else math.inf


def _check_eps(value: Any, norm: str) -> float:
    """eps in [0, 1] for linf, >= 0 for l2 (checked after `norm`; `check_eps_fits` bounds l2 by
    the data)."""
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
        raise ValueError(
            f"`{name}` must be in [0.0, {high:.4g}] for {dims} images ({norm} diameter of [0, 1]^"
            f"{math.prod(input_shape)}). Received: {name}={eps!r}"
        )


def check_model_spec(value: Any) -> str:
    """A built-in model name, a `.keras` file or `package.module:function`."""
    import re

    if isinstance(value, str) and value.lower() in MODELS:
        return value.lower()
    if isinstance(value, str) and (
        value.endswith(".keras") or re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", value)
    ):
        return value
    raise ValueError(
        f"`model` must be one of {', '.join(repr(m) for m in MODELS)}, a .keras file or "
        f"package.module:function. Received: model={value!r}"
    )


def check_methods(name: str, value: Any) -> tuple[str, ...]:
    """Bound methods as a tuple of distinct names of `CERTIFY_METHODS`, in the order given.

    Accepts a list or tuple, or a string: comma-separated names, or `"none"` (and `""`) for no
    method at all.
    """
    if isinstance(value, str):
        value = (
            ()
            if value.strip().lower() in ("", "none")
            else tuple(v.strip() for v in value.split(","))
        )
    if not isinstance(value, (tuple, list)):
        raise TypeError(
            f"`{name}` must be a list of bound methods ({', '.join(CERTIFY_METHODS)}) or 'none'. "
            f"Received: {name}={value!r}"
        )
    out: list[str] = []
    for v in value:
        if not isinstance(v, str) or v.lower() not in CERTIFY_METHODS:
            raise ValueError(
                f"`{name}` must list methods among {', '.join(repr(m) for m in CERTIFY_METHODS)} "
                f"(or be 'none'). Received: {name}={v!r}"
            )
        if v.lower() not in out:
            out.append(v.lower())
    return tuple(out)


def check_bool(name: str, value: Any) -> bool:
    """Checks that `value` is a bool (YAML true/false), not a truthy string or number."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be true or false. Received: {name}={value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Fields that carry their own documentation and checks: the one source of docs/config.md, the
# JSON schema (`advtrain config --schema`) and the range checks of `__post_init__`.


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    default_factory: Any = dataclasses.MISSING,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    choices: tuple[str, ...] | None = None,
    allowed: str | None = None,
    type: str | None = None,
    schema: Mapping[str, Any] | None = None,
):
    """A config dataclass field with its meaning, range and schema in its metadata.

    Args:
        default, default_factory: as `dataclasses.field`.
        help: what the key means (one sentence, Markdown), for docs/config.md.
        low, high, low_open: the range `check_number` enforces (and the schema states).
        choices: the names `check_choice` accepts (lower-case).
        allowed: the allowed values in words, where a dedicated check decides them.
        type: the type in words, where the annotation is not a plain `int`, `float`, `bool`, `str`.
        schema: the field's JSON schema, where it is not derived from the above.
    """
    meta: dict[str, Any] = {"help": help}
    if low is not None or high is not None:
        meta["range"] = {"low": low, "high": high, "low_open": low_open}
    for key, value in (
        ("choices", choices),
        ("allowed", allowed),
        ("type", type),
        ("schema", schema),
    ):
        if value is not None:
            meta[key] = value
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def _kind(f: dataclasses.Field) -> tuple[str, bool]:
    """The base type name of a field's annotation and whether it may be None: ("int", True)."""
    parts = [p.strip() for p in str(f.type).split("|")]
    return parts[0], "None" in parts[1:]


def check_fields(obj: Any, *names: str) -> None:
    """Checks (and normalises) the named fields of `obj` against their `option` metadata: a
    choice, a bool or a number in its range; None passes where the annotation allows it."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name in names:
        f, value = fields[name], getattr(obj, name)
        kind, optional = _kind(f)
        if value is None and optional:
            continue
        if "choices" in f.metadata:
            value = check_choice(name, value, f.metadata["choices"])
        elif kind == "bool":
            value = check_bool(name, value)
        elif kind in ("int", "float"):
            value = check_number(name, value, integer=kind == "int", **f.metadata.get("range", {}))
        _set(obj, name, value)


def field_names(cls) -> list[str]:
    """The keys a config dataclass accepts, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


def did_you_mean(name: Any, known) -> str | None:
    """The known key closest to a mistyped `name` (difflib), or None."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return close[0] if close else None


def check_keys(
    data: Mapping[str, Any],
    known,
    what: str = "Unknown key(s)",
    *,
    known_label: str = "Known keys",
    sort: bool = True,
) -> None:
    """The one unknown-key check of every section: refuses keys of `data` not in `known`, naming
    them, listing the known ones and suggesting the closest: one line,
    `{what}: learnig_rate. Known keys: ...; did you mean `learning_rate`?`.

    Raises:
        ValueError: `data` has a key outside `known`.
    """
    known = [str(k) for k in known]
    unknown = sorted({str(k) for k in data} - set(known))
    if not unknown:
        return
    hints = {u: m for u in unknown if (m := did_you_mean(u, known)) is not None}
    if len(unknown) == 1 and hints:
        hint = f"; did you mean `{hints[unknown[0]]}`?"
    elif hints:
        hint = "; did you mean " + ", ".join(f"`{m}` for `{u}`" for u, m in hints.items()) + "?"
    else:
        hint = "."
    listed = sorted(known) if sort else known
    raise ValueError(f"{what}: {', '.join(unknown)}. {known_label}: {', '.join(listed)}{hint}")


def range_text(low: float | None = None, high: float | None = None, low_open: bool = False) -> str:
    """`[1, inf]`, `(0.0, 10.0]`: a range as `check_number` words it."""
    return (
        f"{'(' if low_open else '['}{low if low is not None else '-inf'}, "
        f"{high if high is not None else 'inf'}]"
    )


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def plain(value: Any) -> Any:
    """A default as YAML and JSON hold it: tuples as lists."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


_TYPE_WORDS = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}


def describe_fields(cls) -> list[dict[str, Any]]:
    """One row per key of a config dataclass: name, type, default, allowed values and meaning,
    from its `option` metadata (docs/config.md is these rows)."""
    rows = []
    for f in dataclasses.fields(cls):
        meta, (kind, optional) = f.metadata, _kind(f)
        type_ = meta.get("type") or _TYPE_WORDS.get(kind, kind)
        if optional and "null" not in type_:
            type_ += " or null"
        if "allowed" in meta:
            allowed = meta["allowed"]
        elif "choices" in meta:
            allowed = ", ".join(f"`{c}`" for c in meta["choices"])
        elif "range" in meta:
            allowed = range_text(**meta["range"])
        elif kind == "bool":
            allowed = "`true`, `false`"
        else:
            allowed = ""
        rows.append(
            {
                "key": f.name,
                "type": type_,
                "default": plain(_default(f)),
                "allowed": allowed,
                "help": meta.get("help", ""),
            }
        )
    return rows


def schema_of(cls, description: str | None = None) -> dict[str, Any]:
    """The JSON schema of a config dataclass as a YAML section: an object of its keys only."""
    props = {}
    for f in dataclasses.fields(cls):
        meta, (kind, optional) = f.metadata, _kind(f)
        if "schema" in meta:
            s = dict(meta["schema"])
        else:
            s = {
                "type": {
                    "int": "integer",
                    "float": "number",
                    "bool": "boolean",
                    "str": "string",
                }.get(kind, "object")
            }
            if "choices" in meta:
                s["enum"] = list(meta["choices"])
            rng = meta.get("range", {})
            if rng.get("low") is not None:
                s["exclusiveMinimum" if rng.get("low_open") else "minimum"] = rng["low"]
            if rng.get("high") is not None:
                s["maximum"] = rng["high"]
        if optional:
            s = {"anyOf": [s, {"type": "null"}]}
        s["description"] = meta.get("help", "")
        s["default"] = plain(_default(f))
        props[f.name] = s
    doc = description or (cls.__doc__ or "").strip().split("\n\n")[0]
    return {
        "type": ["object", "null"],
        "description": " ".join(doc.split()),
        "properties": props,
        "additionalProperties": False,
    }


class _Config:
    """Shared dict round trip for the frozen config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__} expects a mapping. Received: {data!r}")
        check_keys(data, field_names(cls), f"Unknown {cls.__name__} key(s)")
        return cls(**dict(data))

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


_EPS_RANGE = "[0, 1] (linf); [0, sqrt(H*W*C)] (l2: 28 on MNIST)"
_EPS_SCHEMA = {"type": "number", "minimum": 0}
_SEED = "seed of the random start, so the same seed gives the same result"


@dataclasses.dataclass(frozen=True)
class AttackConfig(_Config):
    """One attack at one budget: the unit of a threat model.

    Each field's type, default, range and meaning is its `option` (docs/config.md).
    """

    name: str = option("pgd", choices=ATTACK_NAMES, help="the attack; `square` is gradient-free")
    eps: float = option(
        0.3,
        allowed=_EPS_RANGE,
        schema=_EPS_SCHEMA,
        help="radius of the perturbation ball (pixels are in [0, 1])",
    )
    steps: int = option(
        40, low=1, help="gradient steps (FGSM always takes one; for square, queries per image)"
    )
    step_size: float | None = option(
        None,
        low=0.0,
        low_open=True,
        help="step length; null means 2.5 * eps / steps (Madry et al. 2018)",
    )
    norm: str = option("linf", choices=NORMS, help="threat norm")
    random_start: bool = option(True, help="start uniformly inside the eps-ball")
    restarts: int = option(
        1, low=1, help="independent random starts; each example keeps its strongest"
    )
    loss: str = option(
        "ce",
        choices=LOSSES,
        help="loss the attack ascends: cross-entropy, `margin` (Carlini-Wagner) or `dlr` (Croce "
        "and Hein 2020)",
    )
    seed: int = option(0, low=0, help=_SEED)

    def __post_init__(self) -> None:
        check_fields(self, "name", "norm")
        _set(self, "eps", _check_eps(self.eps, self.norm))
        check_fields(self, "steps", "step_size", "random_start", "restarts", "loss", "seed")

    def resolved_step_size(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Config):
    """Adversarial training of one model: method, attack, optimisation and data (the `train`
    section of a run file).

    Each field's type, default, range and meaning is its `option` (docs/config.md).
    """

    model: str = option(
        "cnn",
        type="string",
        allowed=f"{', '.join(f'`{m}`' for m in MODELS)}, a `.keras` file, "
        "`package.module:function`",
        help="a built-in model, a `.keras` file to fine-tune, or `package.module:function` "
        "returning an uncompiled Keras model",
    )
    method: str = option(
        "pgd",
        choices=METHODS,
        help="`clean`, `fgsm` (FGSM-RS, Wong et al. 2020), `pgd` (Madry et al. 2018), `trades` "
        "(Zhang et al. 2019), or certified training: `ibp` (Gowal et al. 2018) and `crown-ibp` "
        "(Zhang et al. 2020), whose loss bounds the worst case over the eps-ball instead of "
        "attacking it",
    )
    eps: float = option(
        0.3, allowed=_EPS_RANGE, schema=_EPS_SCHEMA, help="training perturbation radius"
    )
    steps: int = option(
        10, low=1, high=1000, help="PGD steps in training (ignored by `clean` and `fgsm`)"
    )
    step_size: float | None = option(
        None,
        low=0.0,
        low_open=True,
        help="PGD step; null means 2.5 * eps / steps (FGSM-RS uses 1.25 * eps)",
    )
    norm: str = option("linf", choices=NORMS, help="threat norm of training")
    mix: float = option(
        1.0,
        low=0.0,
        high=1.0,
        help="weight of the adversarial loss: loss = (1 - mix) CE(x) + mix CE(x_adv); 1 is Madry "
        "training, 0.5 is Goodfellow et al. 2015",
    )
    beta: float = option(6.0, low=0.0, help="TRADES trade-off")
    kappa_end: float = option(
        0.5,
        low=0.0,
        high=1.0,
        help="certified training (`ibp`, `crown-ibp`): weight of the natural loss at the end of "
        "the eps ramp; it falls linearly from 1 over `eps_ramp_epochs`: loss = kappa CE(x) + (1 - "
        "kappa) CE(worst-case logits) (Gowal et al. 2018)",
    )
    beta_end: float = option(
        0.0,
        low=0.0,
        high=1.0,
        help="`crown-ibp` only: weight of the CROWN-IBP bound at the end of the eps ramp; it "
        "falls linearly from 1, the rest of the bound being IBP's (Zhang et al. 2020 end at 0, "
        "pure IBP)",
    )
    epochs: int = option(5, low=1, high=10000, help="passes over the training split")
    batch_size: int = option(128, low=1, high=65536, help="examples per step on each worker")
    learning_rate: float = option(
        1e-3, low=0.0, high=10.0, low_open=True, help="peak learning rate"
    )
    optimizer: str = option("adam", choices=OPTIMIZERS, help="`adam`, or `sgd` with momentum 0.9")
    schedule: str = option("onecycle", choices=SCHEDULES, help="learning-rate schedule")
    eps_ramp_epochs: int = option(
        0,
        low=0,
        help="epochs over which eps grows linearly from 0; at least 1 for `ibp` and `crown-ibp` "
        "at eps > 0, whose kappa and beta follow the same ramp",
    )
    val_size: int = option(
        5000,
        low=1,
        help="validation examples held out of the training split (data without its "
        "own validation split)",
    )
    train_size: int | None = option(
        None,
        low=1,
        help="use only the first n training examples (after the validation split); null for all",
    )
    probe_size: int = option(
        500,
        low=1,
        help="validation examples attacked by the per-epoch PGD probe (`val_robust_acc`)",
    )
    probe_steps: int = option(10, low=1, help="PGD steps of the per-epoch probe")
    guard: bool = option(
        True,
        help="stop and restore the best epoch on catastrophic overfitting (the probe's "
        "robust accuracy collapsing)",
    )
    data: str = option(
        "bundled",
        schema={"type": "string", "minLength": 1},
        allowed="a non-empty string",
        help="the dataset, a source of `advtrain.data.load_data`: `bundled` (MNIST), "
        "`keras:fashion_mnist`, `keras:cifar10`, an .npz, a folder, or a file dataset (folder or "
        "URI) streamed to Ray Train workers by Ray Data",
    )
    seed: int = option(0, low=0, help="seed of initialisation, shuffling and attacks")

    def __post_init__(self) -> None:
        _set(self, "model", check_model_spec(self.model))
        check_fields(self, "method", "norm")
        _set(self, "eps", _check_eps(self.eps, self.norm))
        check_fields(
            self,
            "steps",
            "step_size",
            "mix",
            "beta",
            "kappa_end",
            "beta_end",
            "epochs",
            "batch_size",
            "learning_rate",
            "optimizer",
            "schedule",
            "eps_ramp_epochs",
        )
        if self.method in CERTIFIED_METHODS and self.eps > 0 and self.eps_ramp_epochs < 1:
            # The bound loss at full eps from the first step drives the model to a constant
            # (Gowal et al. 2018 ramp eps from 0); kappa and beta follow the same ramp.
            raise ValueError(
                f"`eps_ramp_epochs` must be >= 1 for method {self.method!r} (eps, kappa and beta "
                "ramp over it; e.g. half the epochs). Received: "
                f"eps_ramp_epochs={self.eps_ramp_epochs}"
            )
        check_fields(self, "val_size", "train_size", "probe_size", "probe_steps", "guard")
        if not isinstance(self.data, str) or not self.data:
            raise TypeError(f"`data` must be a non-empty string. Received: data={self.data!r}")
        check_fields(self, "seed")

    def resolved_step_size(self) -> float:
        if self.step_size is not None:
            return self.step_size
        if self.method == "fgsm":
            return 1.25 * self.eps
        return 2.5 * self.eps / self.steps

    @property
    def threat_model(self) -> ThreatModel:
        """The threat model of a run given no other: its own training norm and eps (a search
        passes `EvalConfig.threat_model` instead, so every trial is judged alike)."""
        return ThreatModel(norm=self.norm, eps=self.eps)


@dataclasses.dataclass(frozen=True)
class EvalConfig(_Config):
    """The evaluation a robustness number comes from (the `eval` section of a run file): the
    eps sweep, suite and examples; its judged point is `threat_model`.

    Each field's type, default, range and meaning is its `option` (docs/config.md).
    """

    norm: str = option("linf", choices=NORMS, help="threat norm")
    eps: tuple[float, ...] = option(
        (0.3,),
        type="number or list of numbers",
        allowed=f"each in {_EPS_RANGE}",
        schema={"anyOf": [_EPS_SCHEMA, {"type": "array", "items": _EPS_SCHEMA, "minItems": 1}]},
        help="radius (or radii, a sweep) judged; the largest is the search's fixed threat model",
    )
    suite: str = option(
        "standard",
        choices=SUITES,
        help="`fgsm` (weak reference), `quick` (PGD-20) or `standard` (PGD-100 x 5 restarts, then "
        "AutoAttack's APGD-CE, APGD-T and Square)",
    )
    n: int | None = option(
        None, low=1, help="examples evaluated (the first n of the split); null for the whole split"
    )
    split: str = option("test", choices=SPLITS, help="which split is evaluated")
    batch_size: int = option(
        500, low=1, high=65536, help="examples per attack batch (the last one is padded)"
    )
    sanity: bool = option(True, help="run the gradient-masking sanity checks")
    seed: int = option(0, low=0, help="seed of random starts and sample choice")
    certify: tuple[str, ...] = option(
        ("ibp", "crown-ibp"),
        type="list of strings, or string",
        allowed=f"any of {', '.join(f'`{m}`' for m in CERTIFY_METHODS)}; `none` or `[]` for none",
        schema={
            "anyOf": [
                {"type": "array", "items": {"enum": list(CERTIFY_METHODS)}},
                {"type": "string"},
            ]
        },
        help="bound methods run beside the attacks at every eps, on the same examples; the "
        "certified accuracy is the per-example union; a comma-separated string is split",
    )

    def __post_init__(self) -> None:
        check_fields(self, "norm")
        eps = self.eps
        if isinstance(eps, (int, float)) and not isinstance(eps, bool):
            eps = (eps,)
        if not isinstance(eps, (tuple, list)) or not eps:
            raise ValueError(
                f"`eps` must be a number or a non-empty list of numbers. Received: eps={self.eps!r}"
            )
        _set(self, "eps", tuple(_check_eps(e, self.norm) for e in eps))
        check_fields(self, "suite", "n", "split", "batch_size", "sanity", "seed")
        _set(self, "certify", check_methods("certify", self.certify))

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["eps"] = list(self.eps)
        d["certify"] = list(self.certify)
        return d

    @property
    def threat_model(self) -> ThreatModel:
        """The judged point of this evaluation: its norm at the largest eps of the sweep."""
        return ThreatModel(
            norm=self.norm, eps=max(self.eps), suite=self.suite, n=self.n, split=self.split
        )


@dataclasses.dataclass(frozen=True)
class ThreatModel(_Config):
    """The one threat model every trial of a search is judged under, fixed for the whole search.

    It travels from the run file to every trial's per-epoch probe (PGD on the validation split at
    `norm`, `eps`), the final evaluation (`suite` on the first `n` examples of `split`) and the
    reports, so trials compare. `EvalConfig.threat_model` derives it: the largest eps of the
    evaluated sweep, so its fields mean what `EvalConfig`'s do.
    """

    norm: str = option("linf", choices=NORMS, help="threat norm")
    eps: float = option(0.3, allowed=_EPS_RANGE, schema=_EPS_SCHEMA, help="the judged radius")
    suite: str = option("standard", choices=SUITES, help="the final evaluation's suite")
    n: int | None = option(
        None, low=1, help="examples of the final evaluation; null for the whole split"
    )
    split: str = option("test", choices=SPLITS, help="the final evaluation's split")

    def __post_init__(self) -> None:
        check_fields(self, "norm")
        _set(self, "eps", _check_eps(self.eps, self.norm))
        check_fields(self, "suite", "n", "split")

    def describe(self) -> str:
        """One line: `linf eps=0.3, standard suite, test split, n=1000`."""
        return (
            f"{self.norm} eps={self.eps:g}, {self.suite} suite, {self.split} split, "
            f"n={self.n or 'all'}"
        )


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
        raise ValueError(
            f"Config file {str(path)!r} must hold a mapping at the top level. Received: "
            f"{type(data).__name__}"
        )
    return data
