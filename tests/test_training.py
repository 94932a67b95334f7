"""Adversarial training in one process: methods, mix, eps ramp, schedule, guard, saving."""

from __future__ import annotations

import json

import numpy as np
import pytest

from advtrain import attacks, training
from advtrain.config import ThreatModel, TrainConfig
from advtrain.data import load_data
from advtrain.models import load_model

EPS = 0.1
# ~200 optimizer steps per run: enough for adversarial training to show, small enough for CI.
BASE = dict(
    model="cnn",
    eps=EPS,
    steps=3,
    epochs=2,
    batch_size=128,
    train_size=12800,
    learning_rate=0.003,
    probe_size=200,
    seed=1,
)


def _pgd_accuracy(model, n=500):
    return float(np.mean(_pgd_correct(model, n)))


@pytest.fixture(scope="module")
def clean_run():
    model, history, summary = training.fit(TrainConfig(method="clean", **BASE))
    return model, history, summary, _pgd_accuracy(model)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fgsm", "pgd", "trades"])
def test_fit_adversarial_method_beats_clean_training_in_robust_accuracy(method, clean_run):
    model, history, summary = training.fit(TrainConfig(method=method, **BASE))
    robust = _pgd_accuracy(model)
    clean_robust = clean_run[3]
    assert robust > clean_robust + 0.15, (
        f"{method}: PGD acc {robust:.3f} vs clean training {clean_robust:.3f}"
    )
    assert summary["epochs_run"] == BASE["epochs"]
    assert history[-1]["val_clean_acc"] > 0.85


def _pgd_correct(model, n=500):
    data = load_data()
    x, y = data.x_val[-n:], data.y_val[-n:]  # not the probe batch (first probe_size of val)
    x_adv = attacks.run_attack("pgd", model, x, y, eps=EPS, steps=10, batch_size=n, seed=3)
    return np.argmax(model(x_adv), -1) == y


def _certified(model, n=500):
    from advtrain import bounds

    data = load_data()
    x, y = data.x_val[-n:], data.y_val[-n:]
    return bounds.certify(model, x, y, eps=EPS, norm="linf", method="crown-ibp", batch_size=n)


@pytest.mark.slow
def test_fit_ibp_certifies_far_more_than_pgd_training_on_the_same_budget():
    # The same examples, epochs and eps ramp; an IBP step costs about what a PGD-3 step does.
    budget = {**BASE, "train_size": 6400, "eps_ramp_epochs": 2}
    pgd, _, _ = training.fit(TrainConfig(method="pgd", **budget))
    ibp, history, _ = training.fit(TrainConfig(method="ibp", **budget))
    proven = _certified(ibp)
    cert_ibp, cert_pgd = float(proven.mean()), float(_certified(pgd).mean())
    assert cert_ibp > cert_pgd + 0.3, f"certified: ibp {cert_ibp:.3f} vs pgd {cert_pgd:.3f}"
    # The bracket holds per example: no image proven is broken by PGD.
    assert not np.any(proven & ~_pgd_correct(ibp))
    assert history[-1]["val_certified_acc"] > history[0]["val_certified_acc"]
    assert history[-1]["val_clean_acc"] > 0.8


def test_certified_training_refuses_a_model_the_bounds_do_not_cover(tmp_path):
    import keras

    from advtrain.bounds import UnsupportedLayerError

    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="tanh", name="squash"),
            keras.layers.Dense(10),
        ]
    )
    path = tmp_path / "squash.keras"
    model.save(path)
    cfg = TrainConfig(
        model=str(path),
        method="ibp",
        eps=0.1,
        eps_ramp_epochs=1,
        epochs=1,
        train_size=256,
        probe_size=32,
    )
    with pytest.raises(UnsupportedLayerError, match="squash"):
        training.AdversarialTraining(cfg, steps_per_epoch=2)
    # PGD training of the same model runs, without a certified probe (never a made-up 0).
    run = training.AdversarialTraining(cfg.replace(method="pgd"), steps_per_epoch=2)
    data = load_data()
    assert "val_certified_acc" not in run.probe(data.x_val[:32], data.y_val[:32])


def test_fit_mix_zero_gives_exactly_clean_training():
    small = {**BASE, "epochs": 1, "train_size": 2560}
    a, _, _ = training.fit(TrainConfig(method="pgd", mix=0.0, **small))
    b, _, _ = training.fit(TrainConfig(method="clean", **small))
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


@pytest.mark.slow
def test_guard_forced_catastrophic_overfitting_stops_and_restores_best_epoch():
    # FGSM-RS on the mlp with an oversized step at eps 0.3: FGSM accuracy climbs while PGD
    # accuracy sits near zero, the signature of catastrophic overfitting.
    cfg = TrainConfig(
        model="mlp",
        method="fgsm",
        eps=0.3,
        step_size=0.6,
        epochs=5,
        eps_ramp_epochs=1,
        train_size=12800,
        learning_rate=0.002,
        schedule="constant",
        probe_size=300,
        seed=0,
    )
    seen = []
    _model, history, summary = training.fit(cfg, on_epoch=seen.append)
    assert summary["stopped_early"] is True
    assert summary["stop_reason"] == "catastrophic_overfitting"
    assert summary["epochs_run"] < cfg.epochs
    last = history[-1]
    assert last["val_fgsm_acc"] - last["val_pgd_acc"] > training.CO_GAP
    best = max(history, key=lambda h: h["val_pgd_acc"])
    assert summary["restored_epoch"] == best["epoch"]


class _ScriptedRun:
    """Stands in for AdversarialTraining in `run_epochs`: each epoch's probe returns the next
    scripted (FGSM, PGD) accuracy pair, so the guard's decision is tested without training."""

    def __init__(self, cfg, probes):
        self.cfg, self.probes, self.epoch = cfg, list(probes), 0
        self.model = self
        iterations = type("Step", (), {"numpy": lambda _: 0})()
        self.optimizer = type("Opt", (), {"iterations": iterations})()

    def get_weights(self):
        return [np.array(self.epoch)]

    def set_weights(self, weights):
        self.restored = int(weights[0])

    def current_eps(self, step):
        return self.cfg.eps

    def train_epoch(self, dataset, progress):
        self.epoch += 1
        return {"train_loss": 0.0}

    def probe(self, x, y):
        fgsm, pgd = self.probes[self.epoch - 1]
        return {
            "val_clean_acc": 0.99,
            "val_fgsm_acc": fgsm,
            "val_pgd_acc": pgd,
            "val_robust_acc": pgd,
        }


@pytest.mark.parametrize("ramp, stopped_at", [(0, 2), (2, 4), (3, 4), (4, None)])
def test_guard_ignores_the_fgsm_pgd_gap_while_eps_ramps_up(ramp, stopped_at):
    # Epoch 2 looks like catastrophic overfitting (gap 0.64) but, within a ramp, it is a model
    # not yet trained at the probe's eps; the collapse at epoch 4 after the ramp is real.
    cfg = TrainConfig(method="pgd", eps=0.3, epochs=5, eps_ramp_epochs=ramp)
    run = _ScriptedRun(cfg, [(0.3, 0.0), (0.7, 0.06), (0.8, 0.6), (0.95, 0.05), (0.9, 0.7)])
    _, _history, summary = training.run_epochs(run, lambda epoch: None, None, None)
    if stopped_at is None:
        assert summary["stopped_early"] is False and summary["epochs_run"] == 5
    else:
        assert (
            summary["stop_reason"] == "catastrophic_overfitting"
            and summary["epochs_run"] == stopped_at
        )


def test_guard_healthy_pgd_run_does_not_fire(clean_run):
    _model, _history, summary = training.fit(
        TrainConfig(method="pgd", **{**BASE, "epochs": 1, "train_size": 6400})
    )
    assert summary["stopped_early"] is False
    assert summary["stop_reason"] is None


@pytest.mark.parametrize(
    "fgsm_acc, pgd_acc, best, expected",
    [
        (0.9, 0.02, 0.3, True),
        (0.65, 0.3, 0.3, False),
        (0.6, 0.1, 0.5, True),
        (0.3, 0.2, 0.25, False),
        (0.1, 0.1, 0.1, False),
    ],
)
def test_is_catastrophic_overfitting_thresholds(fgsm_acc, pgd_acc, best, expected):
    assert training.is_catastrophic_overfitting(fgsm_acc, pgd_acc, best) is expected


def test_one_cycle_rises_to_peak_then_falls_to_zero():
    s = training.OneCycle(0.01, 100)
    values = [float(s(i)) for i in (0, 20, 40, 70, 100)]
    assert values[0] == 0.0
    assert values[1] == pytest.approx(0.005)
    assert values[2] == pytest.approx(0.01)
    assert values[3] == pytest.approx(0.005)
    assert values[4] == 0.0


def test_current_eps_ramps_linearly_then_holds():
    cfg = TrainConfig(
        method="pgd", eps=0.3, eps_ramp_epochs=2, epochs=3, train_size=1280, batch_size=128
    )
    run = training.AdversarialTraining(cfg, steps_per_epoch=10)
    assert float(run.current_eps(0)) == pytest.approx(0.3 / 20)
    assert float(run.current_eps(9)) == pytest.approx(0.15)
    assert float(run.current_eps(19)) == pytest.approx(0.3)
    assert float(run.current_eps(25)) == pytest.approx(0.3)


def test_adversarial_training_zero_steps_per_epoch_raises():
    with pytest.raises(
        ValueError,
        match=r"`steps_per_epoch` must be in \[1, inf\]. Received: steps_per_epoch=0 \(is the "
        "training split smaller than one batch\\?\\)",
    ):
        training.AdversarialTraining(TrainConfig(), steps_per_epoch=0)


def test_save_run_round_trip_gives_identical_outputs(tmp_path, clean_run):
    model, history, summary, _ = clean_run
    cfg = TrainConfig(method="clean", **BASE)
    training.save_run(tmp_path, model, cfg, history, summary)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "metrics.json",
        "model.keras",
    ]
    assert TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs"] == history and metrics["epochs_run"] == summary["epochs_run"]
    x = load_data().x_test[:64]
    np.testing.assert_allclose(load_model(tmp_path / "model.keras")(x), model(x), atol=1e-6)


def test_probe_reports_threat_model_separately():
    cfg = TrainConfig(
        method="pgd", eps=0.2, epochs=1, train_size=1280, batch_size=128, probe_size=64
    )
    run = training.AdversarialTraining(cfg, steps_per_epoch=10, threat_model=ThreatModel(eps=0.0))
    data = load_data()
    out = run.probe(data.x_val[:256], data.y_val[:256])
    # At eps 0 the threat model's "robust" accuracy is the clean accuracy of the probe batch.
    clean_probe = float(np.mean(np.argmax(run.model(data.x_val[:64]), -1) == data.y_val[:64]))
    assert out["val_robust_acc"] == pytest.approx(clean_probe)
    assert set(out) == {"val_clean_acc", "val_fgsm_acc", "val_pgd_acc", "val_robust_acc"}


def test_certified_training_probe_adds_the_certified_accuracy():
    cfg = TrainConfig(
        method="ibp",
        eps=0.2,
        eps_ramp_epochs=1,
        epochs=1,
        train_size=1280,
        batch_size=128,
        probe_size=64,
    )
    run = training.AdversarialTraining(cfg, steps_per_epoch=10, threat_model=ThreatModel(eps=0.0))
    data = load_data()
    out = run.probe(data.x_val[:256], data.y_val[:256])
    # At eps 0 the bounds are exact: the certified probe is the clean accuracy of the batch.
    clean_probe = float(np.mean(np.argmax(run.model(data.x_val[:64]), -1) == data.y_val[:64]))
    assert out["val_certified_acc"] == pytest.approx(clean_probe) == out["val_robust_acc"]


def _train_one_epoch(cfg, steps_per_call, x, y, progress=None):
    from advtrain.data import make_dataset

    steps = len(x) // cfg.batch_size
    run = training.AdversarialTraining(cfg, steps_per_epoch=steps, steps_per_call=steps_per_call)
    metrics = run.train_epoch(make_dataset(x, y, cfg.batch_size, seed=11), progress)
    return run, metrics


@pytest.mark.parametrize("steps_per_call", [3, 8])
def test_train_epoch_several_steps_per_call_gives_the_weights_of_one_step_per_call(steps_per_call):
    # 7 steps: 3 per call leaves a remainder of 1; 8 per call runs the whole epoch in one call.
    # PGD's seed and the eps ramp read optimizer.iterations inside the loop: a stale counter
    # would change the attack, so equal weights show every step saw its own step number.
    # SGD (not Adam) so a step applied twice or skipped would show in the weights.
    cfg = TrainConfig(
        model="mlp",
        method="pgd",
        eps=0.3,
        steps=2,
        epochs=1,
        eps_ramp_epochs=1,
        batch_size=32,
        optimizer="sgd",
        learning_rate=0.1,
        schedule="constant",
        seed=4,
    )
    data = load_data()
    x, y = data.x_train[: 7 * 32], data.y_train[: 7 * 32]
    reference, ref_metrics = _train_one_epoch(cfg, 1, x, y)
    calls = []
    looped, metrics = _train_one_epoch(cfg, steps_per_call, x, y, calls.append)
    assert calls == ([3, 6, 7] if steps_per_call == 3 else [7])
    assert (
        int(looped.optimizer.iterations.numpy()) == int(reference.optimizer.iterations.numpy()) == 7
    )
    for wl, wr in zip(looped.model.get_weights(), reference.model.get_weights()):
        np.testing.assert_allclose(wl, wr, rtol=0, atol=1e-6)
    assert metrics == pytest.approx(ref_metrics, abs=1e-6)


def test_adversarial_training_zero_steps_per_call_raises():
    with pytest.raises(ValueError, match="Received: steps_per_call=0"):
        training.AdversarialTraining(TrainConfig(), steps_per_epoch=10, steps_per_call=0)
