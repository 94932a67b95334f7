"""Tests for advtrain.attacks: one contract over every attack, closed forms, strength orderings on
a trained model, determinism, batching and validation.

One small CNN is trained once per module (clean, 1 epoch on 6,000 images: ~90% clean accuracy)
and attacked on 256 test images at eps = 0.1 (linf), where the attacks are neither trivially
successful nor useless, so orderings between them are visible. Orderings allow a noise margin of
`MARGIN` (5 of 256 examples).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from advtrain import attacks, graphs
from advtrain.attacks import ATTACKS, apgd, apgd_checkpoints, fgsm, objective, pgd, run_attack
from advtrain.config import LOSSES, NORMS, TrainConfig
from advtrain.data import load_data
from advtrain.training import fit

N = 256
EPS = 0.1
MARGIN = 0.02
TOL = 1e-5
BALL = {"linf": 0.3, "l2": 2.0}


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_data():
    d = load_data()
    return np.array(d.x_test[:N]), np.array(d.y_test[:N])


@pytest.fixture(scope="module")
def trained():
    cfg = TrainConfig(
        model="cnn",
        method="clean",
        epochs=1,
        train_size=6000,
        val_size=1000,
        probe_size=64,
        probe_steps=2,
        schedule="constant",
        seed=0,
    )
    model, _, _ = fit(cfg)
    return model


def _linear(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )


@pytest.fixture(scope="module")
def linear():
    return _linear()


def _acc(model, x, y):
    return float(np.mean(np.argmax(np.asarray(model(x, training=False)), -1) == y))


def _linf(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).reshape(len(a), -1).max(axis=1)


def _l2(a, b):
    return np.sqrt(
        np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        .reshape(len(a), -1)
        .sum(axis=1)
    )


# --------------------------------------------------------------------------------------------
# The contract: every attack x norm x loss x (un)targeted
# --------------------------------------------------------------------------------------------

_BUDGET = {"fgsm": {}, "pgd": {"steps": 3}, "apgd": {"steps": 3}, "square": {"queries": 20}}
# Square minimises its own margin loss (AutoAttack's setting): it takes no `loss` argument.
_LOSSES = [
    (name, loss)
    for name in sorted(ATTACKS)
    for loss in (("margin",) if name == "square" else LOSSES)
]


def _loss_kw(name, loss):
    return {} if name == "square" else {"loss": loss}


@pytest.mark.parametrize("targeted", [False, True], ids=["untargeted", "targeted"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name, loss", _LOSSES)
def test_attack_contract_shape_dtype_ball_range(name, norm, loss, targeted, linear, test_data):
    x, y = test_data[0][:16], test_data[1][:16]
    eps = BALL[norm]
    y_target = (y + 1) % 10 if targeted else None
    x_adv = ATTACKS[name](
        linear,
        x,
        y,
        eps=eps,
        norm=norm,
        y_target=y_target,
        seed=1,
        **_loss_kw(name, loss),
        **_BUDGET[name],
    )
    assert isinstance(x_adv, tf.Tensor)
    assert tuple(x_adv.shape) == x.shape and x_adv.dtype == tf.float32
    x_adv = x_adv.numpy()
    assert not np.isnan(x_adv).any()
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    dist = _linf(x_adv, x) if norm == "linf" else _l2(x_adv, x)
    assert dist.max() <= eps + TOL
    assert dist.max() > 0.5 * eps  # it moved


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_zero_eps_returns_input(name, norm, linear, test_data):
    x, y = test_data[0][:16], test_data[1][:16]
    x_adv = ATTACKS[name](linear, x, y, eps=0.0, norm=norm, **_BUDGET[name])
    np.testing.assert_array_equal(x_adv.numpy(), x)


def test_fgsm_random_start_zero_eps_returns_input(linear, test_data):
    x, y = test_data[0][:16], test_data[1][:16]
    np.testing.assert_array_equal(fgsm(linear, x, y, eps=0.0, random_start=True).numpy(), x)


_RANDOM = [("pgd", {"steps": 3}), ("apgd", {"steps": 3}), ("fgsm", {"random_start": True})]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name, kw", _RANDOM, ids=[r[0] for r in _RANDOM])
def test_attack_same_seed_same_result_other_seed_differs(name, kw, norm, linear, test_data):
    x, y = test_data[0][:16], test_data[1][:16]
    eps = BALL[norm]
    a = ATTACKS[name](linear, x, y, eps=eps, norm=norm, seed=3, **kw).numpy()
    b = ATTACKS[name](linear, x, y, eps=eps, norm=norm, seed=3, **kw).numpy()
    c = ATTACKS[name](linear, x, y, eps=eps, norm=norm, seed=4, **kw).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# --------------------------------------------------------------------------------------------
# Closed forms on a linear model
# --------------------------------------------------------------------------------------------


def _ce_grad(model, x, y):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=model(x))
    return tape.gradient(ce, x).numpy()


def test_fgsm_linf_equals_closed_form(linear, test_data):
    x, y = test_data[0][:64], test_data[1][:64]
    grad = _ce_grad(linear, x, y)
    expected = np.clip(x + 0.1 * np.sign(grad), 0.0, 1.0)
    np.testing.assert_allclose(fgsm(linear, x, y, eps=0.1).numpy(), expected, rtol=0, atol=1e-6)


def test_fgsm_l2_equals_closed_form(linear, test_data):
    x, y = test_data[0][:64], test_data[1][:64]
    grad = _ce_grad(linear, x, y).astype(np.float64)
    norms = np.sqrt(np.square(grad).reshape(64, -1).sum(axis=1)).reshape(64, 1, 1, 1)
    expected = np.clip(x + 0.5 * grad / norms, 0.0, 1.0)
    np.testing.assert_allclose(
        fgsm(linear, x, y, eps=0.5, norm="l2").numpy(), expected, rtol=0, atol=1e-5
    )


def test_pgd_one_step_no_random_start_equals_fgsm(linear, test_data):
    x, y = test_data[0][:64], test_data[1][:64]
    # From x itself, one step of size eps is FGSM; tracking keeps it unless x was already wrong.
    x_pgd = pgd(linear, x, y, eps=0.1, steps=1, step_size=0.1, random_start=False).numpy()
    x_fgsm = fgsm(linear, x, y, eps=0.1).numpy()
    wrong = np.argmax(linear(x).numpy(), -1) != y
    np.testing.assert_allclose(x_pgd[~wrong], x_fgsm[~wrong], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(x_pgd[wrong], x[wrong])


def test_pgd_graph_last_iterate_equals_manual_loop(linear, test_data):
    # The training path (track_best=False): the plain Madry iteration, last iterate returned.
    x, y = test_data[0][:32], test_data[1][:32]
    eps, step = 0.1, 0.04
    expected = x.copy()
    for _ in range(3):
        grad = _ce_grad(linear, expected, y)
        expected = np.clip(
            expected + step * np.sign(grad), np.maximum(x - eps, 0.0), np.minimum(x + eps, 1.0)
        )
    got = tf.function(
        lambda a, b: attacks.pgd_graph(linear, a, b, eps, step, 3, random_start=False)
    )(x, y)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["pgd", "apgd"])
def test_attack_keeps_first_successful_iterate(name, linear, test_data):
    # Labels the model already gets wrong: the random start (iterate 0) succeeds for (nearly)
    # every example and must be returned as is, however many steps are allowed.
    x = test_data[0][:32]
    y_wrong = (np.argmax(linear(x).numpy(), -1) + 1) % 10
    one = ATTACKS[name](linear, x, y_wrong, eps=0.01, steps=1, seed=2).numpy()
    many = ATTACKS[name](linear, x, y_wrong, eps=0.01, steps=6, seed=2).numpy()
    fooled = np.argmax(linear(one).numpy(), -1) != y_wrong
    assert fooled.mean() > 0.9
    np.testing.assert_array_equal(many[fooled], one[fooled])


def test_objective_ce_matches_keras_and_margin_sign():
    logits = tf.constant([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.5]])
    y = tf.constant([0, 0])
    ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True).numpy()
    np.testing.assert_allclose(objective(logits, y, loss="ce").numpy(), ce, rtol=1e-6)
    np.testing.assert_allclose(objective(logits, y, loss="margin").numpy(), [-2.0, 2.0])
    # DLR: -(z_y - max_other) / (z_pi1 - z_pi3)
    np.testing.assert_allclose(
        objective(logits, y, loss="dlr").numpy(), [-2.0 / 3.0, 2.0 / 1.5], rtol=1e-6
    )


def test_apgd_checkpoints_match_paper_schedule():
    # Croce and Hein 2020: p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (x steps).
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(1000) == [220, 410, 570, 700, 800, 870, 930, 990]
    assert all(0 < c < 10 for c in apgd_checkpoints(10))


# --------------------------------------------------------------------------------------------
# Strength on the trained model (eps = 0.1 linf, 256 test images)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def accuracies(trained, test_data):
    x, y = test_data
    kw = dict(eps=EPS, batch_size=N)
    out = {"clean": _acc(trained, x, y)}
    out["fgsm"] = _acc(trained, run_attack("fgsm", trained, x, y, **kw), y)
    out["pgd5"] = _acc(trained, run_attack("pgd", trained, x, y, steps=5, **kw), y)
    out["pgd20"] = _acc(trained, run_attack("pgd", trained, x, y, steps=20, **kw), y)
    out["pgd5x3"] = _acc(trained, run_attack("pgd", trained, x, y, steps=5, restarts=3, **kw), y)
    out["apgd20"] = _acc(trained, run_attack("apgd", trained, x, y, steps=20, **kw), y)
    return out


def test_trained_model_clean_accuracy_reasonable(accuracies):
    assert accuracies["clean"] > 0.8


def test_pgd_accuracy_at_most_fgsm(accuracies):
    assert accuracies["fgsm"] < accuracies["clean"]
    assert accuracies["pgd20"] <= accuracies["fgsm"] + MARGIN
    assert accuracies["pgd20"] < accuracies["clean"] - 0.1  # the attack does something


def test_pgd_more_steps_never_raise_accuracy(accuracies):
    assert accuracies["pgd20"] <= accuracies["pgd5"] + MARGIN


def test_pgd_more_restarts_never_raise_accuracy(accuracies):
    # Restart 0 of the 3 draws the same start as the single run and examples keep their first
    # success, so this holds exactly, not just within noise.
    assert accuracies["pgd5x3"] <= accuracies["pgd5"]


def test_apgd_ce_at_most_pgd_same_budget(accuracies):
    assert accuracies["apgd20"] <= accuracies["pgd20"] + MARGIN


def test_pgd_targeted_reaches_target_large_eps(trained, test_data):
    x, y = test_data
    target = (y + 1) % 10
    x_adv = run_attack("pgd", trained, x, y, y_target=target, eps=0.3, steps=20, batch_size=N)
    pred = np.argmax(trained(x_adv).numpy(), -1)
    assert np.mean(pred == target) > 0.8
    assert _linf(x_adv, x).max() <= 0.3 + TOL


def test_apgd_dlr_targeted_reaches_target(trained, test_data):
    x, y = test_data
    target = (y + 3) % 10
    x_adv = run_attack(
        "apgd", trained, x, y, y_target=target, eps=0.3, steps=20, loss="dlr", batch_size=N
    )
    pred = np.argmax(trained(x_adv).numpy(), -1)
    assert np.mean(pred == target) > 0.8
    assert _linf(x_adv, x).max() <= 0.3 + TOL


@pytest.mark.parametrize("name", ["pgd", "apgd"])
def test_l2_attack_respects_ball_and_lowers_accuracy(name, trained, test_data):
    x, y = test_data
    x_adv = run_attack(name, trained, x, y, eps=1.0, norm="l2", steps=10, batch_size=N)
    assert _l2(x_adv, x).max() <= 1.0 + TOL
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert _acc(trained, x_adv, y) < _acc(trained, x, y) - 0.05


# --------------------------------------------------------------------------------------------
# run_attack: batching, padding, no retracing
# --------------------------------------------------------------------------------------------


def test_run_attack_pads_last_batch_single_trace(test_data):
    model = _linear(seed=5)  # fresh model: fresh compiled-function cache
    x, y = test_data[0][:100], test_data[1][:100]
    out = run_attack("pgd", model, x, y, eps=0.2, steps=3, batch_size=32)  # 32, 32, 32, 4 (+28 pad)
    assert isinstance(out, np.ndarray) and out.shape == x.shape and out.dtype == np.float32
    assert _linf(out, x).max() <= 0.2 + TOL
    key = ("pgd", "linf", "ce", True, False)
    compiled = graphs.cached(model)[key]
    assert compiled.experimental_get_tracing_count() == 1
    run_attack("pgd", model, x, y, eps=0.1, steps=5, batch_size=32)  # eps/steps are tensors
    assert compiled.experimental_get_tracing_count() == 1


def test_run_attack_padding_does_not_change_results(linear, test_data):
    x, y = test_data[0][:70], test_data[1][:70]
    kw = dict(eps=0.2, steps=3, random_start=False)
    padded = run_attack("pgd", linear, x, y, batch_size=32, **kw)  # last batch 6 + 26 padding
    whole = run_attack("pgd", linear, x, y, batch_size=70, **kw)
    np.testing.assert_allclose(padded, whole, rtol=0, atol=1e-6)


def test_run_attack_seed_reproducible(linear, test_data):
    x, y = test_data[0][:40], test_data[1][:40]
    a = run_attack("pgd", linear, x, y, eps=0.2, steps=2, batch_size=16, seed=7)
    b = run_attack("pgd", linear, x, y, eps=0.2, steps=2, batch_size=16, seed=7)
    np.testing.assert_array_equal(a, b)
    # Identical batches still draw different starts.
    x2, y2 = np.concatenate([x[:16], x[:16]]), np.concatenate([y[:16], y[:16]])
    c = run_attack("pgd", linear, x2, y2, eps=0.2, steps=2, batch_size=16, seed=7)
    assert not np.array_equal(c[:16], c[16:])


def test_run_attack_empty_input_returns_empty(linear):
    out = run_attack(
        "fgsm", linear, np.zeros((0, 28, 28, 1), np.float32), np.zeros(0, np.int32), eps=0.1
    )
    assert out.shape == (0, 28, 28, 1)


# --------------------------------------------------------------------------------------------
# Validation errors
# --------------------------------------------------------------------------------------------


_BAD_BUDGETS = [
    ({"eps": -0.1}, ValueError, r"`eps` must be in \[0.0, 1.0\]. Received: eps=-0.1"),
    ({"eps": 1.5}, ValueError, r"`eps` must be in \[0.0, 1.0\]. Received: eps=1.5"),
    (
        {"eps": 0.1, "norm": "l3"},
        ValueError,
        r"`norm` must be one of 'linf', 'l2'. Received: norm='l3'",
    ),
    (
        {"eps": 0.1, "loss": "foo"},
        ValueError,
        r"`loss` must be one of 'ce', 'margin', 'dlr'. Received: loss='foo'",
    ),
    ({"eps": 0.1, "seed": -2}, ValueError, r"`seed` must be in \[0, inf\]. Received: seed=-2"),
]


@pytest.mark.parametrize(
    "name, kw, error, match",
    [
        (name, *case)
        for name in sorted(ATTACKS)
        for case in _BAD_BUDGETS
        if not (name == "square" and "loss" in case[0])
    ],  # Square takes no loss (see _LOSSES)
)
def test_attack_bad_budget_raises(name, kw, error, match, linear, test_data):
    x, y = test_data[0][:4], test_data[1][:4]
    with pytest.raises(error, match=match):
        ATTACKS[name](linear, x, y, **kw)


@pytest.mark.parametrize("name", ["pgd", "apgd"])
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"steps": 0}, r"`steps` must be in \[1, inf\]. Received: steps=0"),
        ({"restarts": 0}, r"`restarts` must be in \[1, inf\]. Received: restarts=0"),
    ],
)
def test_iterative_attack_bad_steps_restarts_raises(name, kw, match, linear, test_data):
    x, y = test_data[0][:4], test_data[1][:4]
    with pytest.raises(ValueError, match=match):
        ATTACKS[name](linear, x, y, eps=0.1, **kw)


def test_pgd_zero_step_size_raises(linear, test_data):
    with pytest.raises(
        ValueError, match=r"`step_size` must be in \(0.0, inf\]. Received: step_size=0.0"
    ):
        pgd(linear, test_data[0][:4], test_data[1][:4], eps=0.1, step_size=0.0)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_mismatched_x_y_raises(name, linear, test_data):
    x, y = test_data[0][:4], test_data[1][:3]
    with pytest.raises(ValueError, match=r"Received: x\.shape=\(4, 28, 28, 1\), y\.shape=\(3,\)"):
        ATTACKS[name](linear, x, y, eps=0.1)


def test_attack_mismatched_y_target_raises(linear, test_data):
    x, y = test_data[0][:4], test_data[1][:4]
    with pytest.raises(ValueError, match=r"Received: y\.shape=\(4,\), y_target\.shape=\(2,\)"):
        apgd(linear, x, y, eps=0.1, y_target=y[:2])


def test_run_attack_unknown_name_raises(linear, test_data):
    with pytest.raises(
        ValueError, match=r"Unknown attack 'cw'. Expected one of: apgd, fgsm, pgd, square\."
    ):
        run_attack("cw", linear, test_data[0][:4], test_data[1][:4], eps=0.1)


@pytest.mark.parametrize("low, high", [(-0.5, 1.0), (0.0, 2.0)])
def test_run_attack_x_out_of_range_raises(low, high, linear):
    x = np.zeros((4, 28, 28, 1), np.float32)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = low, high
    with pytest.raises(
        ValueError,
        match=rf"`x` must be finite and in \[0.0, 1.0\]. Received: x in \[{low}, {high}\]",
    ):
        run_attack("pgd", linear, x, np.zeros(4, np.int32), eps=0.1)


def test_run_attack_x_nan_raises(linear):
    x = np.zeros((4, 28, 28, 1), np.float32)
    x[2, 3, 4, 0] = np.nan
    with pytest.raises(
        ValueError, match=r"`x` must be finite and in \[0.0, 1.0\]. Received: x in \[0.0, 0.0\]"
    ):
        run_attack("fgsm", linear, x, np.zeros(4, np.int32), eps=0.1)


def test_run_attack_length_mismatch_raises(linear, test_data):
    with pytest.raises(ValueError, match=r"Received: len\(x\)=4, len\(y\)=5"):
        run_attack("pgd", linear, test_data[0][:4], test_data[1][:5], eps=0.1)


@pytest.mark.parametrize(
    "batch_size, error, wording",
    [
        (0, ValueError, r"must be in \[1, inf\]"),
        (True, TypeError, "must be an integer"),
        (2.5, TypeError, "must be an integer"),
    ],
)
def test_run_attack_bad_batch_size_raises(batch_size, error, wording, linear, test_data):
    with pytest.raises(
        error, match=rf"`batch_size` {wording}. Received: batch_size={batch_size!r}"
    ):
        run_attack(
            "pgd", linear, test_data[0][:4], test_data[1][:4], eps=0.1, batch_size=batch_size
        )


def test_run_attack_y_target_length_mismatch_raises(linear, test_data):
    x, y = test_data[0][:6], test_data[1][:6]
    with pytest.raises(ValueError, match=r"Received: y\.shape=\(6,\), y_target\.shape=\(4,\)"):
        run_attack("pgd", linear, x, y, eps=0.1, y_target=y[:4], batch_size=4)


@pytest.mark.parametrize(
    "seed, error, wording",
    [
        (-1, ValueError, r"must be in \[0, inf\]"),
        (1.5, TypeError, "must be an integer"),
        (True, TypeError, "must be an integer"),
    ],
)
def test_run_attack_bad_seed_raises(seed, error, wording, linear, test_data):
    with pytest.raises(error, match=rf"`seed` {wording}. Received: seed={seed!r}"):
        run_attack("pgd", linear, test_data[0][:4], test_data[1][:4], eps=0.1, seed=seed)
