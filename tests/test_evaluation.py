"""Tests of advtrain.evaluation (with advtrain.suites, advtrain.checks, advtrain.flags and
advtrain.robustness_report).

One small PGD-trained CNN (and one clean reference model) are trained once for the module; the
evaluations use 100-200 test images, the `quick` suite, and the `standard` suite with its step
counts scaled down through the explicit `steps_scale` argument (reported as a reduced suite).
"""

from __future__ import annotations

import itertools
import json
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from advtrain import flags, training
from advtrain.attacks import run_attack
from advtrain.bpda import bpda_surrogate
from advtrain.checks import AttackOutputError, check_model, verify_adversarial
from advtrain.config import EvalConfig, TrainConfig
from advtrain.data import load_data
from advtrain.evaluation import evaluate_model_file, evaluate_robustness
from advtrain.models import save_model
from advtrain.robustness_report import per_eps, summary_lines
from advtrain.suites import SUITES, suite_attacks

N = 200
CONTEXT = ("norm", "eps", "split", "n", "suite")


@pytest.fixture(scope="module")
def data():
    return load_data()


@pytest.fixture(scope="module")
def xy(data):
    return data.x_test[:N], data.y_test[:N]


@pytest.fixture(scope="module")
def trained():
    # An eps ramp over the first epoch: PGD training at eps 0.3 from scratch collapses otherwise.
    cfg = TrainConfig(
        model="cnn",
        method="pgd",
        eps=0.3,
        steps=5,
        epochs=2,
        train_size=8000,
        eps_ramp_epochs=1,
        batch_size=64,
        learning_rate=3e-3,
        probe_size=200,
        probe_steps=5,
        seed=0,
    )
    model, _, _ = training.fit(cfg)
    return model


@pytest.fixture(scope="module")
def reference():
    """An independently trained (clean, different seed) model for the transfer check."""
    cfg = TrainConfig(
        model="cnn",
        method="clean",
        epochs=1,
        train_size=4000,
        batch_size=64,
        learning_rate=3e-3,
        probe_size=100,
        probe_steps=1,
        seed=1,
    )
    model, _, _ = training.fit(cfg)
    return model


@pytest.fixture(scope="module")
def quick_report(trained, reference, xy):
    x, y = xy
    return evaluate_robustness(
        trained, x, y, EvalConfig(eps=(0.1, 0.3), suite="quick"), reference_model=reference
    )


@pytest.fixture(scope="module")
def standard_report(trained, xy):
    x, y = xy
    cfg = EvalConfig(eps=(0.3,), suite="standard", n=100, sanity=False)
    return evaluate_robustness(trained, x, y, cfg, steps_scale=0.1, keep_adversarial=True)


class ScaledLogits(keras.layers.Layer):
    """Multiplies logits by 1e4: float32 cross-entropy saturates, input gradients vanish."""

    def call(self, z):
        return z * 1e4


class RoundInput(keras.layers.Layer):
    """Quantizes the input to `levels` gray levels; `keep_path` adds 0 * x so the gradient is an
    exact zero instead of missing (tf.round has no gradient)."""

    def __init__(self, levels=4, keep_path=True, **kwargs):
        super().__init__(**kwargs)
        self.levels, self.keep_path = levels, keep_path

    def call(self, x):
        q = tf.round(x * self.levels) / self.levels
        return q + 0.0 * x if self.keep_path else q


class NoisyLogits(keras.layers.Layer):
    def call(self, z):
        return z + tf.random.normal(tf.shape(z))


def _wrap(model, *layers_before, after=()):
    return keras.Sequential([keras.Input((28, 28, 1)), *layers_before, model, *after])


def _flags(report):
    return {(f.id, f.eps): f for f in report.flags}


# -- suites ---------------------------------------------------------------------------------


def test_suites_table_assignment_raises():
    with pytest.raises(TypeError):
        SUITES["quick"] = ()
    with pytest.raises(AttributeError):
        SUITES["quick"][0].steps = 1


def test_suites_table_defaults_are_the_design_suites():
    assert [a.name for a in SUITES["fgsm"]] == ["fgsm"]
    assert [a.name for a in SUITES["quick"]] == ["pgd-20"]
    assert [a.name for a in SUITES["standard"]] == [
        "pgd-100x5",
        "apgd-ce-100",
        "apgd-t-100-top9",
        "apgd-ce-bpda-100",
        "square-5000",
    ]
    assert [a.gradient_free for a in SUITES["standard"]] == [False, False, False, False, True]
    assert [a.bpda for a in SUITES["standard"]] == [False, False, False, True, False]


def test_suite_attacks_steps_scale_relabels_without_touching_table():
    scaled = suite_attacks("standard", steps_scale=0.1)
    assert [a.name for a in scaled] == [
        "pgd-10x5",
        "apgd-ce-10",
        "apgd-t-10-top9",
        "apgd-ce-bpda-10",
        "square-500",
    ]
    assert SUITES["standard"][0].steps == 100


@pytest.mark.parametrize("scale", [0, 1.5, True])
def test_suite_attacks_bad_steps_scale_raises(scale):
    with pytest.raises(ValueError, match=f"Received: steps_scale={scale!r}"):
        suite_attacks("quick", steps_scale=scale)


def test_suite_attacks_unknown_suite_raises():
    with pytest.raises(ValueError, match="Unknown suite 'strong'"):
        suite_attacks("strong")


# -- output verification --------------------------------------------------------------------


def test_verify_adversarial_inside_ball_passes():
    x = np.full((3, 28, 28, 1), 0.5, np.float32)
    verify_adversarial(x, x + 0.3, eps=0.3, norm="linf")
    delta = np.zeros_like(x)
    delta[:, 0, 0, 0] = 2.0**-0.5 * 0.4
    delta[:, 0, 1, 0] = 2.0**-0.5 * 0.4
    verify_adversarial(x, x + delta, eps=0.4, norm="l2")


@pytest.mark.parametrize("norm, eps", [("linf", 0.3), ("l2", 1.0)])
def test_verify_adversarial_outside_ball_raises(norm, eps):
    x = np.full((4, 28, 28, 1), 0.5, np.float32)
    bad = x.copy()
    if norm == "linf":
        bad[2, 5, 5, 0] += 0.301  # one pixel 1e-3 beyond the ball
    else:
        bad[2] += 0.04  # l2 norm 0.04 * 28 = 1.12
    with pytest.raises(AttackOutputError, match=f"leaves the {norm} ball.* on 1 of 4 examples"):
        verify_adversarial(x, bad, eps=eps, norm=norm)


def test_verify_adversarial_nan_raises():
    x = np.zeros((2, 28, 28, 1), np.float32)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(AttackOutputError, match="NaN"):
        verify_adversarial(x, bad, eps=0.3, norm="linf")


def test_verify_adversarial_out_of_range_raises():
    x = np.zeros((2, 28, 28, 1), np.float32)
    with pytest.raises(AttackOutputError, match=r"outside \[0.0, 1.0\]"):
        verify_adversarial(x, x - 0.1, eps=0.3, norm="linf")


# -- evaluation results ---------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_robustness_quick_sweep_robust_le_clean_and_attacks(quick_report):
    r = quick_report
    assert (r.n, r.split, r.norm, r.suite) == (N, "test", "linf", "quick")
    assert [res.eps for res in r.results] == [0.1, 0.3]
    for res in r.results:
        accs = list(res.per_attack.values())
        assert list(res.per_attack) == ["clean", "pgd-20"]
        assert res.robust_acc == accs[-1] <= min(accs)
        assert res.robust_acc <= res.clean_acc
        assert 0.0 <= res.robust_acc <= 1.0
    # A PGD-trained model keeps most of its accuracy at eps 0.1 and loses some at 0.3.
    assert r.results[0].clean_acc > 0.9
    assert r.results[0].robust_acc >= r.results[1].robust_acc


@pytest.mark.slow
def test_evaluate_robustness_certifies_beside_the_attacks_union_le_robust(quick_report):
    from advtrain.certification import mask_from_hex

    assert quick_report.certify == ("ibp", "crown-ibp")
    for res, entry in zip(quick_report.results, quick_report.to_dict()["per_eps"], strict=True):
        assert list(res.certified) == ["ibp", "crown-ibp"] and res.certified_note is None
        masks = {m: mask_from_hex(h, N) for m, h in res.certified_masks.items()}
        union = masks["ibp"] | masks["crown-ibp"]
        assert res.certified_acc == pytest.approx(union.mean())
        assert res.certified_acc <= res.robust_acc  # checked per example inside the evaluation
        assert all(res.certified[m] == pytest.approx(masks[m].mean()) for m in masks)
        np.testing.assert_array_equal(mask_from_hex(entry["certified_mask"], N), union)
        assert entry["bracket"].startswith(f"certified {res.certified_acc:.3f} (") and entry[
            "bracket"
        ].endswith(f"<= robust {res.robust_acc:.3f} <= clean {res.clean_acc:.3f}")
        assert set(res.certify_seconds) == {"ibp", "crown-ibp"}
    assert quick_report.metrics(0.1)["certified_acc"] == quick_report.result(0.1).certified_acc


@pytest.mark.slow
def test_evaluate_robustness_standard_suite_worst_case_le_each_attack(standard_report, trained, xy):
    res = standard_report.result(0.3)
    # No layer without a gradient: no BPDA attack, and nothing about it in the report.
    assert list(res.per_attack) == [
        "clean",
        "pgd-10x5",
        "apgd-ce-10",
        "apgd-t-10-top9",
        "square-500",
    ]
    assert standard_report.bpda_layers == () and "BPDA" not in standard_report.to_markdown()
    assert not any("bpda" in a for a in standard_report.to_dict()["threat_model"]["attacks"])
    assert list(res.broken) == list(res.per_attack)[1:]
    # Each attack's count is the drop in correct examples it caused, on the still-robust ones.
    accs = list(res.per_attack.values())
    assert [round((a - b) * 100) for a, b in itertools.pairwise(accs)] == list(res.broken.values())
    accs = list(res.per_attack.values())
    assert all(a >= b for a, b in itertools.pairwise(accs))  # cumulative: never rises
    assert res.robust_acc == accs[-1] <= res.clean_acc
    assert any("REDUCED SUITE" in note for note in standard_report.notes)
    # The kept worst-case inputs reproduce the robust accuracy exactly.
    x, y = xy
    pred = np.argmax(trained(res.adversarial), axis=1)
    assert np.mean(pred == y[:100]) == pytest.approx(res.robust_acc)
    verify_adversarial(x[:100], res.adversarial, eps=0.3, norm="linf")


@pytest.mark.slow
def test_report_to_dict_every_number_has_context(quick_report, standard_report):
    for report in (quick_report, standard_report):
        d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
        assert d["threat_model"]["norm"] == "linf" and d["n"] == report.n and d["split"] == "test"
        for row in d["results"] + d["per_eps"]:
            assert all(k in row for k in CONTEXT), row
            assert (row["norm"], row["split"], row["n"]) == ("linf", "test", report.n)
        for row in d["results"]:
            assert isinstance(row["attack"], str) and 0.0 <= row["accuracy"] <= 1.0
        for flag in d["flags"]:
            assert all(
                k in flag
                for k in ("id", "passed", "status", "message", "norm", "split", "n", "doc")
            )
    kinds = {(r["attack"], r["kind"]) for r in quick_report.to_dict()["results"]}
    assert {
        ("clean", "clean"),
        ("pgd-20", "cumulative"),
        ("worst-case", "robust"),
        ("fgsm", "reference"),
    } <= kinds
    attacks = standard_report.to_dict()["threat_model"]["attacks"]
    assert attacks[2]["target_classes"] == 9 and attacks[0]["restarts"] == 5
    assert standard_report.to_dict()["threat_model"]["steps_scale"] == 0.1


@pytest.mark.slow
def test_report_markdown_has_table_and_flags_section(quick_report, standard_report):
    md = quick_report.to_markdown()
    assert "## Sanity checks" in md and "| eps | clean | pgd-20 |" in md
    assert "n = 200 from the `test` split" in md
    assert "docs/flags.md#large-eps" in md and "WARNING" not in md
    assert "not run: sanity checks were switched off" in standard_report.to_markdown()


@pytest.mark.slow
def test_report_write_json_md_atomic_no_temp_files(quick_report, tmp_path):
    json_path, md_path = quick_report.write(tmp_path / "eval")
    assert json.loads(json_path.read_text())["schema"] == "advtrain.robustness_report/3"
    assert md_path.read_text().startswith("# Robustness report")
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "report.html",
        "report.json",
        "report.md",
    ]


@pytest.mark.slow
def test_report_metrics_carry_threat_model_and_sanity(quick_report):
    m = quick_report.metrics(0.3)
    assert m["eval_eps"] == 0.3 and m["eval_suite"] == "quick" and m["eval_n"] == N
    assert m["robust_acc"] == quick_report.result(0.3).robust_acc
    assert m["sanity_failed"] == 0 and m["sanity_failed_ids"] == ""
    with pytest.raises(ValueError, match="Received: eps=0.2"):
        quick_report.result(0.2)


@pytest.mark.slow
def test_summary_lines_threat_model_eps_and_sanity(quick_report):
    lines = summary_lines(json.loads(json.dumps(quick_report.to_dict())))
    assert lines[0].startswith("Threat model: linf eps 0.1, 0.3; suite quick (pgd-20)")
    assert "n=200 test examples" in lines[0]
    # The bracket leads each eps line: certified <= robust <= clean.
    assert lines[3].startswith("eps 0.3: certified ") and " <= clean 0.9" in lines[3]
    assert "fgsm (reference)" in lines[3]
    assert lines[2].startswith("  broken by: pgd-20: ") and lines[4].startswith(
        "  broken by: pgd-20: "
    )
    # The quick suite has no gradient-free attack: that check says so instead of passing.
    assert "Sanity checks: 13 passed, 0 failed, 2 not run" in lines
    assert not any(line.startswith("WARNING") for line in lines)


@pytest.mark.slow
def test_per_eps_report_dict_entries_and_bad_dict_raises(quick_report):
    entries = per_eps(quick_report.to_dict())
    assert {e["eps"]: e["robust_acc"] for e in entries}[0.3] == quick_report.result(0.3).robust_acc
    with pytest.raises(ValueError, match="Not a robustness report dict"):
        per_eps({"results": []})


# -- sanity flags ---------------------------------------------------------------------------


@pytest.mark.slow
def test_flags_trained_model_passes_every_check_that_ran(quick_report):
    found = quick_report.flags
    assert {f.id for f in found} == set(flags.FLAG_IDS)
    assert [f.summary for f in found if f.passed is False] == []
    not_run = {(f.id, f.eps) for f in found if f.passed is None}
    assert not_run == {("gradient-free-gap", 0.1), ("gradient-free-gap", 0.3)}
    assert all(f.passed for f in found if f.id != "gradient-free-gap")
    assert quick_report.sanity_passed is True


@pytest.mark.slow
def test_flags_scaled_logits_model_fail(trained, xy, caplog):
    x, y = xy
    masked = _wrap(trained, after=[ScaledLogits()])
    with caplog.at_level(logging.WARNING, logger="advtrain.flags"):
        # The unmasked original as the reference: transfer from it is the real white-box attack.
        report = evaluate_robustness(
            masked, x, y, EvalConfig(eps=(0.3,), suite="quick"), reference_model=trained
        )
    flags = _flags(report)
    assert flags[("zero-gradients", None)].passed is False
    assert flags[("large-eps", None)].passed is False
    assert flags[("whitebox-vs-transfer", 0.3)].passed is False
    assert report.sanity_passed is False and report.metrics()["sanity_failed"] >= 3
    lines = summary_lines(report.to_dict())
    assert any(line.startswith("WARNING: zero-gradients FAILED") for line in lines)
    assert "**WARNING** zero-gradients FAILED" in report.to_markdown()
    assert any("WARNING sanity check zero-gradients" in r.message for r in caplog.records)


@pytest.mark.slow
def test_flags_rounding_input_layer_fail(trained, xy):
    x, y = xy
    quantized = _wrap(trained, RoundInput(levels=4))
    report = evaluate_robustness(quantized, x[:100], y[:100], EvalConfig(eps=(0.3,), suite="quick"))
    flags = _flags(report)
    assert flags[("zero-gradients", None)].passed is False
    assert flags[("zero-gradients", None)].values["fraction"] == 1.0
    assert flags[("large-eps", None)].passed is False


def test_check_whitebox_vs_transfer_without_reference_not_run():
    flag = flags.check_whitebox_vs_transfer(
        None,
        None,
        np.zeros((3, 28, 28, 1)),
        np.zeros(3),
        np.ones(3, bool),
        eps=0.3,
        norm="linf",
        batch_size=8,
        seed=0,
        verify=None,
    )
    assert flag.passed is None and flag.status == "not run"
    assert flag.summary == "whitebox-vs-transfer at eps=0.3 not run: no reference model"


def test_check_eps_monotone_rise_beyond_noise_fails():
    assert flags.check_eps_monotone([(0.1, 0.9), (0.3, 0.5)], n=200).passed is True
    assert flags.check_eps_monotone([(0.1, 0.5), (0.3, 0.52)], n=200).passed is True  # noise
    assert flags.check_eps_monotone([(0.1, 0.5), (0.3, 0.7)], n=200).passed is False
    assert flags.check_eps_monotone([(0.3, 0.5)], n=200).passed is None


# -- model checks ---------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_robustness_softmax_layer_removed_same_numbers(trained, xy):
    x, y = xy
    cfg = EvalConfig(eps=(0.3,), suite="fgsm", n=100, sanity=False)
    plain = evaluate_robustness(trained, x, y, cfg)
    probs = _wrap(trained, after=[keras.layers.Softmax()])
    stripped = evaluate_robustness(probs, x, y, cfg)
    assert any("softmax" in note and "removed" in note for note in stripped.notes)
    assert stripped.results[0].per_attack == plain.results[0].per_attack


@pytest.mark.slow
def test_check_model_dense_softmax_activation_becomes_linear(trained, xy):
    x, y = xy
    probs = keras.models.clone_model(trained)
    probs.set_weights(trained.get_weights())
    probs.layers[-1].activation = keras.activations.softmax
    logits_model, notes, grads = check_model(probs, x[:50], y[:50])
    assert notes and "logits" in notes[0]
    np.testing.assert_allclose(logits_model(x[:50]), trained(x[:50]), atol=1e-4)
    assert probs.layers[-1].activation is keras.activations.softmax  # the input model is untouched
    assert grads.shape == (50, 28, 28, 1)


@pytest.mark.slow
def test_check_model_probabilities_without_softmax_layer_raises(trained, xy):
    x, y = xy
    probs = _wrap(trained, after=[keras.layers.Lambda(keras.ops.softmax)])
    with pytest.raises(ValueError, match="outputs probabilities.*Received: last layer="):
        check_model(probs, x[:20], y[:20])


@pytest.mark.slow
def test_check_model_randomized_model_raises(trained, xy):
    x, y = xy
    with pytest.raises(ValueError, match="randomized"):
        check_model(_wrap(trained, after=[NoisyLogits()]), x[:20], y[:20])


@pytest.mark.slow
def test_check_model_no_input_gradient_gives_zero_gradients(trained, xy):
    x, y = xy
    _, _, grads = check_model(_wrap(trained, RoundInput(keep_path=False)), x[:20], y[:20])
    assert grads.shape == (20, 28, 28, 1) and not grads.any()


# -- masked models: the gradient-free attack finds the truth, the report marks the number ----

MASKS = {
    # Input quantised to 8 grey levels, with a 0 * x path: the input gradient is an exact zero.
    "quantised-input": lambda m: _wrap(m, RoundInput(levels=8)),
    # The same rounding with no path at all: TensorFlow has no gradient for tf.round.
    "rounding-no-gradient": lambda m: _wrap(m, RoundInput(levels=8, keep_path=False)),
    # Logits x 1e4: the float32 cross-entropy saturates and its gradient vanishes.
    "scaled-logits": lambda m: _wrap(m, after=[ScaledLogits()]),
}


def layer_name(masked):
    return masked.layers[0].name  # the rounding layer (Keras may number it: round_input_1)


@pytest.mark.slow
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_standard_suite_on_masked_model_matches_gradient_free_attack_and_is_marked(
    mask, reference, xy
):
    x, y = xy[0][:100], xy[1][:100]
    masked, eps = MASKS[mask](reference), 0.1
    rep = evaluate_robustness(
        masked, x, y, EvalConfig(eps=(eps,), suite="standard"), steps_scale=0.1
    )
    res = rep.result(eps)
    # An independent gradient-free attack with the same budget and another seed.
    adv = run_attack("square", masked, x, y, eps=eps, queries=500, seed=12345, batch_size=100)
    square_acc = float(np.mean(np.argmax(masked(adv), -1) == y))
    clean = float(np.mean(np.argmax(masked(x), -1) == y))
    assert square_acc < clean - 0.2  # the masked model is not robust at all
    assert res.robust_acc <= square_acc + 2 * flags.tolerance(square_acc, len(y))
    # The report shows which attack broke it, and the number only as an upper bound.
    assert sum(res.broken.values()) == round((res.clean_acc - res.robust_acc) * len(y))
    rounding = mask != "scaled-logits"
    if rounding:  # gradient attacks cannot move; BPDA through the rounding layer and Square can
        assert res.broken["apgd-ce-bpda-10"] + res.broken["square-500"] > 0.5 * sum(
            res.broken.values()
        )
        assert rep.bpda_layers == (layer_name(masked),)
    else:  # the scale-free DLR can; the scaling layer has a gradient, so no BPDA
        assert "apgd-ce-bpda-10" not in res.broken and rep.bpda_layers == ()
    assert "zero-gradients" in rep.failed_at(eps)  # BPDA or not, the masking flags stay
    d = rep.to_dict()
    entry = d["per_eps"][0]
    assert entry["robust_upper_bound"] is True and "zero-gradients" in entry["robust_flags_failed"]
    assert entry["robust_display"].startswith(f"<= {res.robust_acc:.4f} (upper bound: ")
    lines = summary_lines(d)
    assert any(
        line.startswith(f"eps 0.1: {entry['bracket']}")
        and f"robust <= {res.robust_acc:.3f} (upper bound: " in line
        and line.split("  |")[0].endswith(f"<= clean {res.clean_acc:.3f}")
        for line in lines
    )
    assert any(
        line.strip().startswith("broken by: pgd-10x5: ") and "square-500: " in line
        for line in lines
    )
    if rounding:  # the layers approximated, named in the CLI's threat-model line and report.md
        assert f"; bpda: layers '{rep.bpda_layers[0]}');" in lines[0]
        assert "apgd-ce-bpda-10: " in lines[2]
        assert f"BPDA (Athalye et al. 2018): layers '{rep.bpda_layers[0]}'" in rep.to_markdown()
    assert f"<= {res.robust_acc:.4f} (upper bound: " in rep.to_markdown()
    # A custom layer the bounds cannot cover: certified "not available", never 0.
    layer = (
        "scaled_logits" if mask == "scaled-logits" else "round_input"
    )  # Keras may number it: round_input_1
    assert res.certified_acc is None and res.certified_note.startswith(
        f"not available (layer '{layer}"
    )
    assert entry["bracket"].startswith(f"certified {res.certified_note}; robust <= ")
    metrics = rep.metrics(eps)
    assert metrics["robust_upper_bound"] is True and metrics["robust_display"].startswith("<= ")


@pytest.mark.slow
def test_bpda_on_quantised_input_model_breaks_at_least_plain_apgd_judged_on_model(reference, xy):
    x, y = xy[0][:100], xy[1][:100]
    masked = MASKS["quantised-input"](reference)
    found = bpda_surrogate(masked, x)
    assert found.layers == (layer_name(masked),) and found.note is None
    budget = dict(eps=0.1, steps=10, batch_size=100, seed=3)
    plain = run_attack("apgd", masked, x, y, **budget)
    bpda = run_attack("apgd", found.model, x, y, **budget)
    verify_adversarial(x, bpda, eps=0.1, norm="linf")

    def acc(adv):  # judged on the real model
        return float(np.mean(np.argmax(masked(adv), -1) == y))

    assert acc(bpda) <= acc(plain) and acc(bpda) < acc(x) - 0.2  # measured: 0.89 -> 0.3


# -- inputs and files -----------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_robustness_n_above_given_raises(trained, xy):
    x, y = xy
    with pytest.raises(ValueError, match="Received: n=500, len\\(x\\)=200"):
        evaluate_robustness(trained, x, y, EvalConfig(n=500, suite="fgsm"))


@pytest.mark.slow
def test_evaluate_robustness_out_of_range_input_raises(trained, xy):
    x, y = xy
    with pytest.raises(ValueError, match=r"finite and in \[0, 1\]"):
        evaluate_robustness(trained, x * 2.0, y, EvalConfig(suite="fgsm"))


@pytest.mark.slow
def test_evaluate_robustness_config_dict_raises(trained, xy):
    x, y = xy
    with pytest.raises(TypeError, match="Received: config=dict"):
        evaluate_robustness(trained, x, y, {"suite": "fgsm"})


@pytest.mark.slow
def test_evaluate_model_file_first_n_examples(trained, data, tmp_path, xy):
    path = tmp_path / "model.keras"
    save_model(trained, path)
    cfg = EvalConfig(eps=(0.3,), suite="fgsm", n=50, split="test", sanity=False)
    report = evaluate_model_file(path, cfg, data=data)
    assert (report.n, report.split) == (50, "test")
    assert any("first 50 of the 10000" in note for note in report.notes)
    direct = evaluate_robustness(trained, *xy, cfg)
    assert report.results[0].per_attack == direct.results[0].per_attack
