"""Tests of advtrain.certification and the certified parts of advtrain.robustness_report: the hex
masks, the per-example check against the attacks, "not available" for a layer the bounds cannot
cover, the bracket in the report, and the `advtrain certify` report's helpers.

Reports here are built by hand (no attack runs) or on a tiny MLP fitted in about a second; the
bounds themselves are tested in tests/test_bounds.py.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from advtrain.certification import (
    CertificationError,
    attacked_figure,
    certified_by,
    certify_at,
    certify_lines,
    check_certified,
    mask_from_hex,
    mask_hex,
)
from advtrain.robustness_report import (
    EpsResult,
    RobustnessReport,
    bracket_of,
    per_eps,
    summary_lines,
)

N = 60


@pytest.fixture(scope="module")
def xy():
    from advtrain.data import load_data

    d = load_data()
    return d.x_test[:N], d.y_test[:N].astype(np.int32)


@pytest.fixture(scope="module")
def mlp():
    """A small Dense/ReLU net fitted for a second: it certifies most images at eps 0.01."""
    from advtrain.data import load_data

    d = load_data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(d.x_train[:2000], d.y_train[:2000], epochs=2, batch_size=100, verbose=0)
    return model


def _lstm():
    inp = keras.Input((28, 28, 1))
    h = keras.layers.LSTM(4, name="lstm")(keras.layers.Reshape((28, 28))(inp))
    return keras.Model(inp, keras.layers.Dense(10)(h))


def _result(eps=0.1, clean=0.99, robust=0.934, **certified):
    return EpsResult(
        eps=eps,
        clean_acc=clean,
        robust_acc=robust,
        fgsm_acc=0.95,
        per_attack={"clean": clean, "pgd-20": robust},
        broken={"pgd-20": 6},
        attack_seconds={"pgd-20": 1.0},
        seconds=2.0,
        **certified,
    )


def _report(*results, certify=("ibp", "crown-ibp"), flags=()):
    return RobustnessReport(
        norm="linf",
        eps=tuple(r.eps for r in results),
        suite="quick",
        attacks=(
            {
                "name": "pgd-20",
                "attack": "pgd",
                "steps": 20,
                "restarts": 1,
                "loss": "ce",
                "step_size": "2.5*eps/steps",
                "targeted": False,
                "target_classes": 0,
            },
        ),
        reference_attack={"name": "fgsm"},
        steps_scale=1.0,
        n=8,
        split="test",
        seed=0,
        results=results,
        flags=flags,
        certify=certify,
    )


# -- masks ------------------------------------------------------------------------------------


def test_mask_hex_bit_i_most_significant_first_round_trips():
    mask = np.array([True, False, True, True, False, False, False, False, True])
    assert mask_hex(mask) == "b080" == np.packbits(mask).tobytes().hex()
    np.testing.assert_array_equal(mask_from_hex("b080", 9), mask)
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 100, 1001):
        m = rng.random(n) < 0.5
        np.testing.assert_array_equal(mask_from_hex(mask_hex(m), n), m)


def test_mask_from_hex_too_short_or_not_hex_raises():
    with pytest.raises(ValueError, match=r"holds 8 bits, fewer than n=9. Received: mask='ff'"):
        mask_from_hex("ff", 9)
    with pytest.raises(ValueError, match=r"must be a hex string. Received: mask='zz'"):
        mask_from_hex("zz", 4)


def test_certified_by_names_the_best_method_and_methods_adding_to_the_union():
    a, b = mask_hex([1, 1, 0, 0]), mask_hex([1, 0, 0, 0])
    assert certified_by({"ibp": 0.25, "crown-ibp": 0.5}, {"ibp": b, "crown-ibp": a}) == "crown-ibp"
    c = mask_hex([0, 0, 0, 1])
    assert (
        certified_by({"ibp": 0.25, "crown-ibp": 0.5}, {"ibp": c, "crown-ibp": a})
        == "crown-ibp + ibp"
    )
    assert certified_by({"ibp": 0.0, "crown-ibp": 0.0}) == "ibp"  # the first of equals
    assert certified_by({}) is None


# -- the per-example check --------------------------------------------------------------------


def test_check_certified_subset_of_robust_passes():
    check_certified(
        np.array([True, False, False]), np.array([True, True, False]), eps=0.1, method="ibp"
    )


def test_check_certified_broken_certified_example_raises_naming_count_indices_eps_method():
    certified = np.zeros(20, bool)
    certified[[2, 3, 5, 8, 11, 13, 17]] = True
    robust = np.ones(20, bool)
    robust[[3, 5, 8, 11, 13, 17]] = False
    with pytest.raises(
        CertificationError,
        match=r"^6 example\(s\) certified by crown-ibp at eps 0.3 were "
        r"misclassified or broken by an attack \(indices 3, 5, 8, 11, 13, "
        r"\.\.\.\)",
    ):
        check_certified(certified, robust, eps=0.3, method="crown-ibp")
    assert issubclass(CertificationError, RuntimeError)  # exit 1 from the CLI, never a usage error


def test_certify_at_certified_but_attacked_example_raises(mlp, xy):
    x, y = xy
    with pytest.raises(CertificationError, match=r"certified by ibp at eps 0.01 "):
        certify_at(
            mlp,
            x,
            y,
            np.zeros(len(y), bool),
            eps=0.01,
            norm="linf",
            methods=("ibp",),
            unavailable={},
        )


def test_certify_at_union_of_methods_and_masks(mlp, xy):
    x, y = xy
    correct = np.argmax(mlp.predict(x, verbose=0), 1) == y
    out = certify_at(
        mlp, x, y, correct, eps=0.01, norm="linf", methods=("ibp", "crown-ibp"), unavailable={}
    )
    masks = {m: mask_from_hex(h, len(y)) for m, h in out["certified_masks"].items()}
    assert set(masks) == {"ibp", "crown-ibp"} and out["certified_note"] is None
    union = masks["ibp"] | masks["crown-ibp"]
    assert out["certified_acc"] == pytest.approx(union.mean()) and out["certified_acc"] > 0.5
    assert not np.any(union & ~correct)
    assert out["certified"]["crown-ibp"] == pytest.approx(masks["crown-ibp"].mean())
    assert set(out["certify_seconds"]) == {"ibp", "crown-ibp"}


def test_certify_at_unsupported_layer_is_not_available_never_zero(xy):
    x, y = xy
    unavailable = {}
    out = certify_at(
        _lstm(),
        x[:8],
        y[:8],
        np.ones(8, bool),
        eps=0.1,
        norm="linf",
        methods=("ibp", "crown-ibp"),
        unavailable=unavailable,
    )
    assert out["certified_acc"] is None and out["certified"] == {} and out["certified_masks"] == {}
    assert out["certified_note"] == "not available (layer 'lstm')"
    assert unavailable == {
        "ibp": "layer 'lstm'",
        "crown-ibp": "layer 'lstm'",
    }  # not tried again at the next eps


def test_certify_at_no_methods_is_not_run():
    out = certify_at(
        None,
        np.zeros((2, 4, 4, 1), np.float32),
        np.zeros(2, np.int32),
        np.ones(2, bool),
        eps=0.1,
        norm="linf",
        methods=(),
        unavailable={},
    )
    assert out["certified_acc"] is None and out["certified_note"] is None


# -- the report ---------------------------------------------------------------------------------


def test_report_bracket_and_certified_entries_in_json_md_and_summary():
    ibp, crown = np.zeros(8, bool), np.zeros(8, bool)
    ibp[:3], crown[:6], crown[7] = True, True, True
    r = _result(
        certified_acc=0.875,
        certified={"ibp": 0.375, "crown-ibp": 0.875},
        certified_masks={"ibp": mask_hex(ibp), "crown-ibp": mask_hex(crown)},
        certify_seconds={"ibp": 0.1, "crown-ibp": 0.2},
    )
    rep = _report(r)
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["schema"] == "advtrain.robustness_report/3" and d["threat_model"]["certify"] == [
        "ibp",
        "crown-ibp",
    ]
    e = d["per_eps"][0]
    assert e["bracket"] == "certified 0.875 (crown-ibp) <= robust 0.934 <= clean 0.990"
    assert e["certified_acc"] == 0.875 and e["certified"] == {"ibp": 0.375, "crown-ibp": 0.875}
    assert e["certified_mask"] == mask_hex(ibp | crown) == "fd"
    assert e["certified_masks"] == {"ibp": "e0", "crown-ibp": "fd"}
    assert e["certified_display"] == "0.8750 (crown-ibp)" and e["certified_note"] is None
    md = rep.to_markdown()
    assert "| robust (worst case) | certified |" in md and "| 0.8750 (crown-ibp) |" in md
    assert "- At eps 0.1: certified 0.875 (crown-ibp) <= robust 0.934 <= clean 0.990" in md
    lines = summary_lines(d)
    assert lines[1].startswith(
        "eps 0.1: certified 0.875 (crown-ibp) <= robust 0.934 <= clean 0.990  | after each"
    )
    assert lines[2] == "  broken by: pgd-20: 6  | certified by: ibp 0.3750, crown-ibp 0.8750"
    assert rep.metrics()["certified_acc"] == 0.875


def test_report_failed_flag_makes_robust_an_upper_bound_inside_the_bracket():
    from advtrain.flags import Flag

    flag = Flag(id="zero-gradients", passed=False, message="input gradients are zero")
    r = _result(certified_acc=0.5, certified={"ibp": 0.5}, certified_masks={"ibp": "f0"})
    e = _report(r, flags=(flag,)).to_dict()["per_eps"][0]
    assert (
        e["bracket"]
        == "certified 0.500 (ibp) <= robust <= 0.934 (upper bound: zero-gradients) <= clean 0.990"
    )


def test_report_unsupported_layer_shows_not_available_never_zero():
    r = _result(certified_note="not available (layer 'lstm')")
    rep = _report(r)
    e = rep.to_dict()["per_eps"][0]
    assert e["certified_acc"] is None and e["certified_mask"] is None
    assert e["certified_display"] == "not available (layer 'lstm')"
    assert e["bracket"] == "certified not available (layer 'lstm'); robust 0.934 <= clean 0.990"
    assert "| not available (layer 'lstm') |" in rep.to_markdown()
    assert rep.metrics()["certified_acc"] is None


def test_report_certification_off_bracket_is_robust_le_clean():
    rep = _report(_result(), certify=())
    e = rep.to_dict()["per_eps"][0]
    assert e["bracket"] == "robust 0.934 <= clean 0.990" and e["certified_display"] == "not run"
    assert "certified" not in rep.to_markdown().split("## Sanity")[0].split("|---")[0]


def test_summary_lines_reads_schema_2_reports_without_certification():
    d = _report(_result(), certify=()).to_dict()
    d["schema"] = "advtrain.robustness_report/2"
    for e in d["per_eps"]:
        for k in [k for k in e if k.startswith("certif") or k == "bracket"]:
            del e[k]
    assert per_eps(d)[0]["robust_acc"] == 0.934
    assert bracket_of(d["per_eps"][0]) == "robust 0.934 <= clean 0.990"
    assert summary_lines(d)[1].startswith(
        "eps 0.1: robust 0.934 <= clean 0.990  | after each attack"
    )


# -- the `advtrain certify` report -------------------------------------------------------------


def test_attacked_figure_needs_the_same_norm_eps_n_split_and_data():
    d = _report(_result(eps=0.1), _result(eps=0.3, robust=0.5)).to_dict()
    d["data"] = {"source": "bundled"}
    assert attacked_figure(d, eps=0.3, norm="linf", n=8, split="test")["robust_acc"] == 0.5
    assert attacked_figure(d, eps=0.2, norm="linf", n=8, split="test") is None
    assert attacked_figure(d, eps=0.3, norm="l2", n=8, split="test") is None
    assert attacked_figure(d, eps=0.3, norm="linf", n=9, split="test") is None
    assert attacked_figure(d, eps=0.3, norm="linf", n=8, split="val") is None
    assert (
        attacked_figure(d, eps=0.3, norm="linf", n=8, split="test", data={"source": "other"})
        is None
    )
    assert (
        attacked_figure(
            {"schema": "advtrain.certify_report/1"}, eps=0.3, norm="linf", n=8, split="test"
        )
        is None
    )


def test_certify_lines_one_line_per_eps_best_method_first_and_attacked_figure():
    d = {
        "per_eps": [
            {
                "eps": 0.1,
                "clean_acc": 0.991,
                "certified_acc": 0.912,
                "robust_acc": 0.934,
                "methods": {"ibp": {"certified_acc": 0.85}, "crown-ibp": {"certified_acc": 0.912}},
            },
            {
                "eps": 0.3,
                "clean_acc": 0.991,
                "certified_acc": 0.0,
                "robust_acc": 0.5,
                "robust_flags_failed": ["large-eps"],
                "methods": {"ibp": {"certified_acc": 0.0}},
            },
            {
                "eps": 0.4,
                "clean_acc": 0.991,
                "certified_acc": 0.0,
                "methods": {"ibp": {"certified_acc": 0.0}},
            },
        ]
    }
    assert certify_lines(d) == [
        "eps 0.1: certified 0.912 (crown-ibp 0.912, ibp 0.850)  clean 0.991  robust <= 0.934",
        (
            "eps 0.3: certified 0.000 (ibp 0.000)  clean 0.991  robust <= 0.500 (upper bound: "
            "large-eps)"
        ),
        "eps 0.4: certified 0.000 (ibp 0.000)  clean 0.991",
    ]
