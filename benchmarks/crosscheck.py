"""Cross-check a saved model's robust accuracy with other libraries' attacks, and time them.

The issue's table: the first 500 test images, full budgets, each saved model as it is and
behind 8-level input quantisation (about 15 to 20 minutes per command on 2 quiet CPUs, see
"Cost"):

    python -m benchmarks.crosscheck benchmarks/results/time_to_robust_a.keras --eps 0.1 --n 500 \
        --attacks "ART AutoAttack,ART Square-5000"
    python -m benchmarks.crosscheck benchmarks/results/time_to_robust_a.keras --eps 0.1 --n 500 \
        --attacks "ART AutoAttack,ART Square-5000" --quantise 8
    python -m benchmarks.crosscheck benchmarks/results/time_to_robust_b.keras --eps 0.3 --n 500 \
        --attacks "ART AutoAttack,ART Square-5000"
    python -m benchmarks.crosscheck benchmarks/results/time_to_robust_b.keras --eps 0.3 --n 500 \
        --attacks "ART AutoAttack,ART Square-5000" --quantise 8

The earlier gradient-only cross-check (BENCHMARKS.md) is the same command with
--attacks "ART PGD-100x5,ART APGD-CE,Foolbox LinfPGD-100". A smoke test (reduced budgets,
marked REDUCED in the JSON, written away from the committed results):

    python -m benchmarks.crosscheck benchmarks/results/time_to_robust_a.keras --eps 0.1 --n 10 \
        --steps-scale 0.02 --attacks "ART AutoAttack,ART Square-5000" --out-dir /tmp/crosscheck

What runs. advtrain's standard suite (PGD-100x5, APGD-CE-100, APGD-T-100 on the 9 highest-scoring
other classes of the clean logits, Square-5000, each on the examples its predecessors left robust:
`advtrain.evaluation.evaluate_robustness`, sanity checks off) on the first n test images; then the
chosen attacks of ART 1.20.1 and Foolbox 3.3.4 on the same images, in the same process, one after
the other, in the order given. Each library's robust accuracy is the per-example worst case over
its attacks, recomputed here with one `model.predict`; every output of another library is checked
against the threat model (`advtrain.checks.verify_adversarial`) before it counts. A robust
accuracy of advtrain above what another library finds is an evaluation bug in advtrain, not a
result.

--attacks, comma-separated, or "all" (default: the first four, the gradient cross-check):
    "ART PGD-100x5"        ProjectedGradientDescent(max_iter=100, eps_step=2.5*eps/100,
                           num_random_init=5)
    "ART APGD-CE"          AutoProjectedGradientDescent(loss_type="cross_entropy", max_iter=100,
                           eps_step=2*eps, nb_random_init=5: ART's default)
    "ART APGD-DLR"         the same with loss_type="difference_logits_ratio" (slow, see "Cost")
    "Foolbox LinfPGD-100"  LinfPGD(steps=100, abs_stepsize=2.5*eps/100, random_start=True)
    "ART Square-5000"      SquareAttack(norm=np.inf, eps=eps, max_iter=5000, p_init=0.8,
                           nb_restarts=1), on all n images
    "ART AutoAttack"       advtrain's standard suite minus PGD, from ART's `AutoAttack` (below)

ART wraps the model in `TensorFlowV2Classifier(clip_values=(0, 1), loss_object=
SparseCategoricalCrossentropy(from_logits=True))`: advtrain's models output logits, so ART's
APGD-DLR (which refuses an estimator whose outputs look like probabilities) and Square's margin
read logits, as AutoAttack's do.

ART AutoAttack. ART's `AutoAttack(attacks=[...], targeted=True)` first runs every listed attack
untargeted, then every listed attack targeted at each of the nb_classes - 1 other classes (9 on
MNIST, the count AutoAttack's APGD-T uses), in class-index order. One AutoAttack over [APGD-CE,
APGD-DLR, Square] with targeted=True would therefore add 9 targeted APGD-CE runs and one
untargeted APGD-DLR run, and run Square before the targeted attacks (ART's SquareAttack has no
`targeted` parameter: set_params(targeted=True) raises ValueError and AutoAttack skips it with a
warning). So three AutoAttack stages are chained, each given the previous stage's output (an
example broken earlier is misclassified and not attacked again; a robust one is still its clean
image, so every eps-ball is centred on the clean image):
    1. AutoAttack(targeted=False, attacks=[AutoProjectedGradientDescent(norm=np.inf, eps=eps,
       eps_step=2*eps, max_iter=100, targeted=False, nb_random_init=1,
       loss_type="cross_entropy")])
    2. AutoAttack(targeted=True, attacks=[AutoProjectedGradientDescent(..., targeted=True,
       nb_random_init=1, loss_type="difference_logits_ratio")])
    3. AutoAttack(targeted=False, attacks=[SquareAttack(norm=np.inf, eps=eps, max_iter=5000,
       p_init=0.8, nb_restarts=1)])
(AutoAttack's own eps_step, norm, eps and batch_size are passed too; eps_step is unused when the
attacks are given.) The JSON logs every `generate` call of each stage (targeted or not, on how
many examples) and any warning of ART's AutoAttack. Where ART has no exact equivalent of the
suite, the nearest ART offers is used; the JSON lists the differences
("ART AutoAttack"."nearest_art_offers"):
- stage 2 also runs one untargeted APGD-DLR-100 pass before its 9 targeted passes: budget ART
  gets on top of advtrain's (about a tenth of stage 2's time);
- targets: all 9 other classes in class-index order, where advtrain (and AutoAttack) order them
  by clean logit. On 10 classes the set is the same; the order changes only how many examples
  the later targets still attack (cost) and the random draws;
- ART's targeted DLR is its untargeted DLR with the target in place of the label, minimised:
  -(z_t - max_{j != t} z_j) / (z_pi1 - z_pi3); AutoAttack's is -(z_y - z_t) / (z_pi1 -
  (z_pi3 + z_pi4) / 2). ART's APGD keeps only the final iterate of a run, and ART's AutoAttack
  counts a targeted run as a success only when the prediction is the target (advtrain: any
  misclassification);
- ART's SquareAttack draws one square (position, side, +-2 eps sign) per iteration, shared by the
  whole batch, where Square (and advtrain) draw one per example; the schedule of the square size
  is the paper's (p_init halved at 0.1%, 0.5%, 2%, ... 80% of max_iter), the loss the same margin
  z_y - max_{j != y} z_j; it makes three forward passes per iteration (all n images, the robust
  ones, the candidates) where one query per example suffices;
- APGD's random start, checkpoints, step halving and momentum are ART's implementation of the
  paper's, from eps_step = 2*eps; nb_random_init=1 as in AutoAttack's standard version;
- ART's AutoAttack.generate imports `multiprocess` (declared neither by ART 1.20.1 nor by
  advtrain's `bench` extra) even with parallel_pool_size=0, where it is unused: an empty stand-in
  module is registered when the package is missing (noted in the JSON).

--quantise L: the loaded model behind input quantisation to L levels,
    keras.Model(inp, model(Rescaling(1/(L-1))(Discretization(bin_boundaries=[i/L, i=1..L-1])(inp))
                           + 0.0 * inp)),
reported under its own name (crosscheck_<model>_q<L>.json). Discretization outputs integers, so
the input gradient does not exist and every gradient attack is blind: only the gradient-free
Square attack finds the model's true robustness. The `+ 0.0 * inp` path (a Lambda layer) changes
no output but makes the gradient an exact zero instead of None: ART's
TensorFlowV2Classifier.loss_gradient calls `tape.gradient(...).numpy()`, which raises
AttributeError on None. Every library attacks the same wrapped model; the JSON records the largest
absolute input gradient on the first 20 images (0.0).

Throughput: advtrain's standard suite and ART AutoAttack on the same n images in the same process;
examples/s = n / wall seconds of each, and their ratio. advtrain's wall time includes its model
checks, the tracing of its compiled attacks, PGD-100x5 and the FGSM reference, which ART
AutoAttack does not run; its seconds in the three attacks ART AutoAttack also runs
(`attack_seconds`) and the ratio on those are reported too. Every other attack reports its total
seconds. The load average at start and end is recorded: on a shared machine, compare figures
from one run only.

--steps-scale s (smoke tests only) multiplies every step count and query budget of both libraries
(advtrain's `steps_scale`; ART's and Foolbox's max_iter/steps) and marks the JSON REDUCED; the
attack names keep their full-budget labels. advtrain's public API scales its whole suite, so a
Square-only reduction is not offered.

Cost, small `cnn` on 2 CPUs (measured at batch 480, quiet machine; a loaded one is 2-3x slower):
one ART APGD-DLR iteration costs about 0.65 s (about 1.4 ms per image: ART's DLR loss loops over
the batch in Python), so stage 2 (10 runs of 100 iterations) takes about 11 minutes on ~480
robust images; ART's Square about 30 ms per iteration (3 forward passes), 2.5 to 3 minutes per
5,000 queries; APGD-CE about 80 ms per iteration; advtrain's whole suite about 2 minutes. ART's
"APGD-DLR" alone (5 starts) costs half of stage 2.

Results: <out-dir>/crosscheck_<model>[_q<L>][_autoattack].json (default out-dir
benchmarks/results; `_autoattack` when ART Square or AutoAttack ran), written atomically: model,
variant, eps, n, budgets, each library's robust accuracy, the worst case over all, the examples
broken elsewhere and not by advtrain (count, indices, per library), advtrain's
per-attack accuracy, broken counts, examples attacked and seconds, each ART attack's parameters
and seconds (per stage for AutoAttack), throughput, versions and load averages.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
import types
from pathlib import Path

from advtrain.files import write_json

RESULTS = Path(__file__).parent / "results"
ATTACKS = (
    "ART PGD-100x5",
    "ART APGD-CE",
    "ART APGD-DLR",
    "Foolbox LinfPGD-100",
    "ART Square-5000",
    "ART AutoAttack",
)
DEFAULT_ATTACKS = ATTACKS[:4]
ADVTRAIN = "advtrain standard suite"
SQUARE_QUERIES, APGD_STEPS, PGD_STEPS = 5000, 100, 100

NEAREST_ART_OFFERS = [
    (
        "Three chained art.attacks.evasion.AutoAttack stages (APGD-CE untargeted; APGD-DLR with "
        "targeted=True; Square untargeted), because one AutoAttack(targeted=True) runs every "
        "listed attack untargeted and then every listed attack targeted (it would add 9 targeted "
        "APGD-CE runs and one untargeted APGD-DLR run, run Square before the targeted attacks, "
        "and skip targeted Square: SquareAttack.set_params(targeted=True) raises ValueError)."
    ),
    (
        "Stage 2 runs one untargeted APGD-DLR pass before its 9 targeted passes (AutoAttack's "
        "untargeted phase runs every listed attack): extra budget for ART, not in advtrain's suite."
    ),
    (
        "Targets: ART's AutoAttack(targeted=True) loops over all nb_classes - 1 = 9 other classes "
        "in class-index order (the same count as AutoAttack's APGD-T); advtrain and AutoAttack "
        "take the 9 highest-scoring other classes of the clean logits in score order. Same set on "
        "10 classes; the order changes cost and random draws only."
    ),
    (
        "ART's targeted DLR loss is its untargeted DLR with the target as label, minimised: "
        "-(z_t - max_{j!=t} z_j) / (z_pi1 - z_pi3); AutoAttack's targeted DLR is "
        "-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)."
    ),
    (
        "ART's APGD keeps only the final iterate of a run; ART's AutoAttack counts a targeted run "
        "as a success only when the prediction is the target (advtrain: any misclassification)."
    ),
    (
        "ART's SquareAttack draws one square (position, side, +-2eps sign) per iteration shared "
        "by the whole batch (the paper and advtrain: one per example); same p_init=0.8 schedule "
        "(halvings at 0.1%, 0.5%, 2%, 5%, 10%, 20%, 40%, 60%, 80% of max_iter), same margin loss "
        "on logits; three forward passes per iteration (all n, the robust ones, the candidates)."
    ),
    (
        "APGD: ART's random start, checkpoints (p_1 = 0.22), step halving (rho = 0.75), momentum "
        "(alpha = 0.75), initial step eps_step = 2*eps; nb_random_init=1 as AutoAttack's standard "
        "version."
    ),
]


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:

        def git(*cmd):
            return subprocess.run(
                ["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()

        head, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: {e}"
    return (head or "unknown") + ("+uncommitted changes" if dirty else "")


def quantised_model(model, levels: int):
    """`model` behind input quantisation to `levels` levels, with an exact-zero input gradient.

    Discretization(bin_boundaries=[i/L, i = 1..L-1]) maps [0, 1] to the integers 0..L-1 and
    Rescaling(1/(L-1)) back to {0, 1/(L-1), ..., 1}. The integer output has no gradient (None);
    `+ 0.0 * inp` changes no output but makes the gradient an exact zero, which ART's
    TensorFlowV2Classifier.loss_gradient needs (it calls `.numpy()` on the gradient).
    """
    import keras

    inp = keras.Input(model.input_shape[1:], name="image")
    q = keras.layers.Discretization(
        bin_boundaries=[i / levels for i in range(1, levels)], name=f"quantise_{levels}"
    )(inp)
    q = keras.layers.Rescaling(1.0 / (levels - 1), name="dequantise")(q)
    zero = keras.layers.Lambda(lambda t: 0.0 * t, name="zero_gradient_path")(inp)
    q = keras.layers.Add(name="quantised_plus_zero")([q, zero])
    return keras.Model(inp, model(q), name=f"{model.name}_q{levels}")


def _max_input_gradient(model, x, y) -> float:
    import tensorflow as tf

    xt = tf.convert_to_tensor(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(
            tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.convert_to_tensor(y, tf.int32), logits=model(xt, training=False)
            )
        )
    g = tape.gradient(loss, xt)
    return None if g is None else float(tf.reduce_max(tf.abs(g)))


def _params(attack) -> dict:
    """An ART attack's class and its plain parameters (ART's own repr recurses on AutoAttack)."""
    out = {"class": f"{type(attack).__module__}.{type(attack).__name__}"}
    for key in attack.attack_params:
        value = getattr(attack, key, None)
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = str(value)  # norm=np.inf: "inf", strict JSON has no Infinity
        elif isinstance(value, (bool, int, float, str)):
            out[key] = value
    out["targeted"] = bool(getattr(attack, "targeted", False))
    return out


def _count_calls(attack) -> list[str]:
    """Wraps `attack.generate` (on the instance) to log each call: targeted or not, examples."""
    calls: list[str] = []
    generate = attack.generate

    def counted(x, y=None, **kwargs):
        calls.append(f"{'targeted' if attack.targeted else 'untargeted'} on {len(x)}")
        return generate(x, y=y, **kwargs)

    attack.generate = counted
    return calls


class _CollectWarnings(logging.Handler):
    """Collects a logger's warnings while in a `with` block (ART's AutoAttack logs a skipped
    attack as a warning instead of raising)."""

    def __init__(self, name: str):
        super().__init__(level=logging.WARNING)
        self.logger, self.messages = logging.getLogger(name), []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


def _ensure_multiprocess() -> str | None:
    """ART 1.20.1's AutoAttack.generate imports `multiprocess` unconditionally; it is used only
    with parallel_pool_size > 0. Registers an empty stand-in when the package is missing."""
    if importlib.util.find_spec("multiprocess") is not None:
        return None
    sys.modules["multiprocess"] = types.ModuleType("multiprocess")
    return (
        "the `multiprocess` package is not installed; an empty stand-in module was registered "
        "for ART's AutoAttack.generate, which imports it but uses it only with "
        "parallel_pool_size > 0"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", type=Path)
    p.add_argument("--eps", type=float, required=True)
    p.add_argument("--n", type=int, default=1000, help="first n test images (default 1000)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=500,
        help="attack batch of every library, advtrain included (default 500, advtrain's default)",
    )
    p.add_argument(
        "--attacks",
        default=",".join(DEFAULT_ATTACKS),
        help=f"comma-separated subset of {list(ATTACKS)}, or 'all' (default: the first four)",
    )
    p.add_argument(
        "--quantise",
        type=int,
        default=None,
        metavar="LEVELS",
        help="attack the model behind input quantisation to LEVELS levels (e.g. 8)",
    )
    p.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        help="tests only: factor in (0, 1] on every step count and query budget of both "
        "libraries; the JSON is marked REDUCED (default 1)",
    )
    p.add_argument(
        "--out-dir", type=Path, default=RESULTS, help=f"where the JSON goes (default {RESULTS})"
    )
    args = p.parse_args(argv)
    names = [a.strip() for a in args.attacks.split(",") if a.strip()]
    names = list(ATTACKS) if names == ["all"] else names
    if unknown := sorted(set(names) - set(ATTACKS)):
        p.error(f"unknown --attacks {unknown}; known: {list(ATTACKS)}")
    if not names:
        p.error("--attacks is empty")
    if not args.model.is_file():
        p.error(f"model {str(args.model)!r} does not exist")
    if not 0 < args.eps <= 1:
        p.error(f"--eps must be in (0, 1]. Received: {args.eps}")
    if not 1 <= args.n <= 10000:
        p.error(f"--n must be in [1, 10000]. Received: {args.n}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1. Received: {args.batch_size}")
    if args.quantise is not None and not 2 <= args.quantise <= 256:
        p.error(f"--quantise must be in [2, 256]. Received: {args.quantise}")
    if not 0 < args.steps_scale <= 1:
        p.error(f"--steps-scale must be in (0, 1]. Received: {args.steps_scale}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    load_start = _load()

    import keras
    import numpy as np
    import tensorflow as tf

    from advtrain.checks import verify_adversarial
    from advtrain.config import EvalConfig
    from advtrain.data import load_data
    from advtrain.evaluation import evaluate_robustness
    from advtrain.models import load_model
    from advtrain.suites import suite_attacks

    scale = args.steps_scale
    pgd_steps, apgd_steps, queries = (
        max(1, round(s * scale))  # as advtrain's SuiteAttack.scaled
        for s in (PGD_STEPS, APGD_STEPS, SQUARE_QUERIES)
    )
    bs, eps = args.batch_size, args.eps

    model = load_model(args.model)
    x, y = load_data().split("test")
    x, y = x[: args.n], y[: args.n].astype(np.int64)
    n = len(y)
    label = args.model.stem
    if args.quantise is not None:
        model = quantised_model(model, args.quantise)
        label += f"_q{args.quantise}"

    def correct(xs) -> np.ndarray:
        return np.argmax(model.predict(xs, batch_size=bs, verbose=0), axis=1) == y

    clean = correct(x)
    out = {
        "model": str(args.model),
        "model_variant": None
        if (q := args.quantise) is None
        else (
            f"input quantised to {q} levels: Rescaling(1/{q - 1})(Discretization(bin_boundaries="
            f"[i/{q}, i=1..{q - 1}])(x)) + 0.0 * x (exact-zero input gradient, for ART)"
        ),
        "quantise_levels": args.quantise,
        "input_gradient_max_abs": _max_input_gradient(model, x[:20], y[:20]),
        "norm": "linf",
        "eps": eps,
        "n": n,
        "split": "test",
        "first_n": True,
        "batch_size": bs,
        "attacks_requested": names,
        "budget": {
            "steps_scale": scale,
            "pgd_steps": pgd_steps,
            "apgd_steps": apgd_steps,
            "square_queries": queries,
            "reduced": scale != 1.0,
        },
        "clean_acc": float(clean.mean()),
        "libraries": {},
        "notes": [],
    }
    if scale != 1.0:
        out["notes"].append(
            f"REDUCED BUDGET (--steps-scale {scale:g}): PGD {pgd_steps} steps, "
            f"APGD {apgd_steps} iterations, Square {queries} queries, in both "
            f"libraries; names keep their full-budget labels. Smoke tests only."
        )
    print(f"{label}: clean {out['clean_acc']:.4f} on n={n}; load {load_start}", flush=True)

    # --- advtrain's standard suite -------------------------------------------------------------
    cfg = EvalConfig(norm="linf", eps=(eps,), suite="standard", n=n, batch_size=bs, sanity=False)
    runs: list[tuple[str, int]] = []  # (attack label, examples attacked) per run, targets apart

    def progress(what, done, total):
        if done == 0:  # what: "eps 0.3 apgd-t-100-top9 target 2/9"
            runs.append((re.sub(r" target \d+/\d+$", "", what.split(" ", 2)[2]), total))

    t0 = time.perf_counter()
    rep = evaluate_robustness(
        model, x, y, cfg, steps_scale=scale, keep_adversarial=True, progress=progress
    )
    wall = time.perf_counter() - t0
    r = rep.result(eps)
    ours = correct(r.adversarial)
    shared = [a.name for a in suite_attacks("standard", scale) if a.kind != "pgd" and not a.bpda]
    attacked, before = {}, round(r.per_attack["clean"] * n)
    for name, acc in r.per_attack.items():
        if name != "clean":
            attacked[name], before = before, round(acc * n)
    out["libraries"][ADVTRAIN] = {
        "robust_acc": float(ours.mean()),
        "robust_acc_reported": r.robust_acc,
        "seconds": wall,
        "attacks": list(rep.attacks),
        "per_attack_acc": r.per_attack,
        "broken": r.broken,
        "attacked": attacked,
        "attack_seconds": r.attack_seconds,
        "fgsm_reference_acc": r.fgsm_acc,
        "runs": {k: [t for w, t in runs if w == k] for k in r.attack_seconds},
    }
    print(f"{ADVTRAIN}: robust {ours.mean():.4f}, {wall:.1f} s, broken {r.broken}", flush=True)

    # --- other libraries -----------------------------------------------------------------------
    others: dict[str, np.ndarray] = {}

    def record(name, adv, seconds, **extra):
        verify_adversarial(x, adv, eps=eps, norm="linf")
        ok = correct(adv)
        others[name] = ok
        out["libraries"][name] = {"robust_acc": float(ok.mean()), "seconds": seconds, **extra}
        print(f"{name}: robust {ok.mean():.4f}, {seconds:.1f} s", flush=True)

    art_names = [a for a in names if a.startswith("ART ")]
    if art_names:
        from art.attacks.evasion import (
            AutoAttack,
            AutoProjectedGradientDescent,
            ProjectedGradientDescent,
            SquareAttack,
        )
        from art.estimators.classification import TensorFlowV2Classifier

        # The models output logits: from_logits=True, and APGD-DLR / Square's margin read logits.
        clf = TensorFlowV2Classifier(
            model=model,
            nb_classes=10,
            input_shape=(28, 28, 1),
            clip_values=(0.0, 1.0),
            loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        common = dict(norm=np.inf, eps=eps, batch_size=bs)

        def apgd(loss_type, targeted=False, nb_random_init=1):
            return AutoProjectedGradientDescent(
                clf,
                eps_step=2 * eps,
                max_iter=apgd_steps,
                targeted=targeted,
                nb_random_init=nb_random_init,
                loss_type=loss_type,
                verbose=False,
                **common,
            )

        def square():
            return SquareAttack(
                clf, max_iter=queries, p_init=0.8, nb_restarts=1, verbose=False, **common
            )

        single = {
            "ART PGD-100x5": lambda: ProjectedGradientDescent(
                clf,
                eps_step=2.5 * eps / pgd_steps,
                max_iter=pgd_steps,
                num_random_init=5,
                verbose=False,
                **common,
            ),
            "ART APGD-CE": lambda: apgd("cross_entropy", nb_random_init=5),
            "ART APGD-DLR": lambda: apgd("difference_logits_ratio", nb_random_init=5),
            "ART Square-5000": square,
        }

        def art_autoattack():
            if note := _ensure_multiprocess():
                out["notes"].append(note)
            stages = [
                (
                    "apgd-ce",
                    AutoAttack(
                        clf,
                        eps_step=2 * eps,
                        attacks=[apgd("cross_entropy")],
                        targeted=False,
                        **common,
                    ),
                ),
                (
                    "apgd-dlr untargeted, then targeted at each of the 9 other classes",
                    AutoAttack(
                        clf,
                        eps_step=2 * eps,
                        targeted=True,
                        **common,
                        attacks=[apgd("difference_logits_ratio", targeted=True)],
                    ),
                ),
                (
                    "square",
                    AutoAttack(clf, eps_step=2 * eps, attacks=[square()], targeted=False, **common),
                ),
            ]
            adv, robust, info = x.copy(), clean.copy(), []
            for stage, aa in stages:
                calls = _count_calls(aa.attacks[0])
                warned = _CollectWarnings("art.attacks.evasion.auto_attack")
                t0 = time.perf_counter()
                with warned:
                    adv = aa.generate(adv, y=y)
                seconds = time.perf_counter() - t0
                now = correct(adv)
                info.append(
                    {
                        "stage": stage,
                        "attacked": int(robust.sum()),
                        "broken": int((robust & ~now).sum()),
                        "seconds": seconds,
                        "acc_after": float((robust & now).mean()),
                        "runs": calls,
                        "art_warnings": warned.messages,
                        "autoattack": _params(aa),
                        "attacks": [_params(a) for a in aa.attacks],
                    }
                )
                robust &= now
                print(
                    f"  ART AutoAttack stage {stage}: broke {info[-1]['broken']} of "
                    f"{info[-1]['attacked']}, {seconds:.1f} s",
                    flush=True,
                )
            return adv, {"stages": info, "nearest_art_offers": NEAREST_ART_OFFERS}

        for name in art_names:
            np.random.seed(0)  # ART draws its random starts and squares with NumPy
            if name == "ART AutoAttack":
                t0 = time.perf_counter()
                adv, extra = art_autoattack()
            else:
                attack = single[name]()
                t0 = time.perf_counter()
                adv, extra = attack.generate(x, y=y), {"art_attack": _params(attack)}
            record(name, adv, time.perf_counter() - t0, **extra)

    if "Foolbox LinfPGD-100" in names:
        if not hasattr(np, "find_common_type"):
            # eagerpy 0.30 (under Foolbox 3.3.4) calls np.find_common_type, removed in NumPy 2.0.
            np.find_common_type = lambda array_types, scalar_types: np.result_type(
                *array_types, *scalar_types
            )
        import foolbox as fb

        fmodel = fb.TensorFlowModel(model, bounds=(0.0, 1.0))
        fb_pgd = fb.attacks.LinfPGD(
            abs_stepsize=2.5 * eps / pgd_steps, steps=pgd_steps, random_start=True
        )
        t0 = time.perf_counter()
        adv = np.concatenate(
            [
                fb_pgd(
                    fmodel, tf.constant(x[i : i + bs]), tf.constant(y[i : i + bs]), epsilons=eps
                )[1].numpy()
                for i in range(0, n, bs)
            ]
        )
        record("Foolbox LinfPGD-100", adv, time.perf_counter() - t0)

    # --- comparison ----------------------------------------------------------------------------
    union = np.logical_and.reduce(list(others.values())) if others else np.ones(n, bool)
    out["libraries"]["other libraries, worst case"] = {
        "robust_acc": float(union.mean()),
        "of": list(others),
    }
    out["all_libraries_worst_case"] = float((ours & union).mean())
    out["broken_elsewhere_not_by_advtrain"] = int(np.sum(ours & ~union))
    out["broken_by_advtrain_not_elsewhere"] = int(np.sum(~ours & union))
    out["broken_elsewhere_not_by_advtrain_indices"] = [
        int(i) for i in np.flatnonzero(ours & ~union)
    ]
    out["broken_elsewhere_not_by_advtrain_per_library"] = {
        k: int(np.sum(ours & ~v)) for k, v in others.items()
    }

    shared_s = sum(r.attack_seconds[a] for a in shared)
    tp = {
        ADVTRAIN: {
            "seconds": wall,
            "examples_per_s": n / wall,
            "attacks_art_autoattack_also_runs": shared,
            "seconds_in_attacks_art_autoattack_also_runs": shared_s,
            "examples_per_s_in_those_attacks": n / shared_s,
        }
    }
    for name in others:
        s = out["libraries"][name]["seconds"]
        tp[name] = {"seconds": s, "examples_per_s": n / s}
    if "ART AutoAttack" in tp:
        art_s = tp["ART AutoAttack"]["seconds"]
        tp["ratio_advtrain_suite_over_art_autoattack_examples_per_s"] = art_s / wall
        tp["ratio_advtrain_shared_attacks_over_art_autoattack_examples_per_s"] = art_s / shared_s
    out["throughput"] = tp

    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "advtrain_commit": _git_commit(),
    }
    for mod in ("advtrain", "art", "foolbox"):
        if mod in sys.modules:
            versions[mod] = getattr(sys.modules[mod], "__version__", "unknown")
    out["versions"] = versions
    out["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_start": load_start,
        "load_end": _load(),
    }
    out["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")

    # The gradient cross-check and the AutoAttack/Square one are separate files, so neither run
    # overwrites the other's results.
    gradient_free = {"ART Square-5000", "ART AutoAttack"} & set(names)
    path = args.out_dir / f"crosscheck_{label}{'_autoattack' if gradient_free else ''}.json"
    write_json(path, out)
    print(
        f"\n{label}: clean {out['clean_acc']:.4f} on n={n} test images, linf eps {eps}"
        + (f"  [REDUCED budget x{scale:g}]" if scale != 1.0 else "")
    )
    for name, lib in out["libraries"].items():
        print(
            f"  {name:30s} robust {lib['robust_acc']:.4f}"
            + (
                f"  {lib['seconds']:8.1f} s  {n / lib['seconds']:7.2f} ex/s"
                if "seconds" in lib
                else ""
            )
        )
    print(
        "  advtrain per attack (broken, s): "
        + ", ".join(f"{k} {r.broken.get(k, '-')} {v:.1f}" for k, v in r.attack_seconds.items())
    )
    if (ratio := tp.get("ratio_advtrain_suite_over_art_autoattack_examples_per_s")) is not None:
        shared_ratio = tp["ratio_advtrain_shared_attacks_over_art_autoattack_examples_per_s"]
        print(
            f"  throughput advtrain suite / ART AutoAttack: {ratio:.2f}x "
            f"(advtrain's APGD-CE + APGD-T + Square seconds only: {shared_ratio:.2f}x)"
        )
    print(f"  worst case over all: {out['all_libraries_worst_case']:.4f}")
    print(
        f"  examples advtrain left robust that others broke: "
        f"{out['broken_elsewhere_not_by_advtrain']}"
    )
    print(
        f"  examples advtrain broke that others left robust: "
        f"{out['broken_by_advtrain_not_elsewhere']}"
    )
    print(f"  load {load_start} -> {out['machine']['load_end']}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
