"""Adversarial training: one compiled, strategy-aware train step, the per-epoch probe and the
catastrophic-overfitting guard.

The same `AdversarialTraining` object runs in one process (the default strategy) and on Ray Train
workers (MultiWorkerMirroredStrategy): the step runs under `strategy.run`, the per-example loss is
averaged once over the global batch (`tf.nn.compute_average_loss`) and `optimizer.apply`
all-reduces the gradients. Nothing is divided by hand a second time.

One compiled call runs up to `steps_per_call` optimizer steps in a `tf.while_loop` (as Keras'
`steps_per_execution` does), so Python's dispatch of the call is paid once per call; the
all-reduce still runs once per step, and every step reads its seed and eps from
`optimizer.iterations`, so the result is the same for any `steps_per_call`.

Training datasets run with tf.data's autotuning off (`without_autotune`): deleting an epoch's
iterator waits for the autotuning thread, which cost 0 to 1 s per epoch in one process (2 CPUs,
cnn, 8 steps of ~0.2 s per epoch).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import keras
import numpy as np
import tensorflow as tf

from advtrain import attacks, bounds
from advtrain.config import (
    CERTIFIED_METHODS,
    ThreatModel,
    TrainConfig,
    check_number,
    check_steps_per_call,
)
from advtrain.files import write_json
from advtrain.models import MNIST_SHAPE, make_model, save_model

__all__ = [
    "STEPS_PER_CALL",
    "AdversarialTraining",
    "OneCycle",
    "is_catastrophic_overfitting",
    "make_optimizer",
    "without_autotune",
]

log = logging.getLogger(__name__)

# Catastrophic overfitting (Wong et al. 2020): the multi-step attack suddenly succeeds while the
# single-step one the model was trained against does not. A healthy eps=0.3 PGD-trained MNIST
# model has FGSM - PGD-10 accuracy gaps of a few points; an overfitted FGSM model shows 0.5+.
CO_GAP = 0.4
CO_DROP = 0.5
ONECYCLE_WARMUP = 0.4  # fraction of the run over which one-cycle raises the learning rate
STEPS_PER_CALL = 1  # optimizer steps per compiled call: see benchmarks/ray_overhead.py
# The per-epoch certified probe: each sound, so an example proven by either counts.
PROBE_BOUNDS = ("ibp", "crown-ibp")


@keras.saving.register_keras_serializable(package="advtrain")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Piecewise-linear one-cycle schedule: 0 -> peak at 40% of the steps -> 0 (Wong et al.
    2020)."""

    def __init__(self, peak: float, total_steps: int, warmup_fraction: float = ONECYCLE_WARMUP):
        self.peak = float(peak)
        self.total_steps = int(total_steps)
        self.warmup_fraction = float(warmup_fraction)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        total = float(max(self.total_steps, 1))
        up = max(self.warmup_fraction * total, 1.0)
        rising = self.peak * step / up
        falling = self.peak * tf.maximum(total - step, 0.0) / max(total - up, 1.0)
        return tf.where(step < up, rising, falling)

    def get_config(self) -> dict:
        return {
            "peak": self.peak,
            "total_steps": self.total_steps,
            "warmup_fraction": self.warmup_fraction,
        }


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam or SGD with momentum, with the configured learning-rate schedule over the whole run."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        lr = OneCycle(cfg.learning_rate, total)
    elif cfg.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, decay_steps=max(total, 1))
    else:
        lr = cfg.learning_rate
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
    return keras.optimizers.Adam(learning_rate=lr)


def without_autotune(dataset):
    """`dataset` with tf.data's autotuning turned off (`tf.data.Options().autotune.enabled`).

    A training epoch deletes its iterator at the end, and the deletion waits for the autotuning
    thread (in C++): measured 0 to 1 s per epoch of 8 steps in one process on 2 CPUs, and none
    with autotuning off. In-memory MNIST batches need no tuning: `prefetch(AUTOTUNE)` keeps its
    own buffer sizing, and the step times with and without autotuning were the same.

    Args:
        dataset: a `tf.data.Dataset`.

    Returns:
        The same pipeline with the option set.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def is_catastrophic_overfitting(fgsm_acc: float, pgd_acc: float, best_pgd_acc: float) -> bool:
    """True when probe PGD accuracy collapsed while FGSM accuracy stayed high.

    Either the gap FGSM - PGD exceeds `CO_GAP`, or PGD accuracy fell below `CO_DROP` of its best
    (once the best was meaningful) with FGSM still clearly above it.
    """
    gap = fgsm_acc - pgd_acc
    if gap > CO_GAP:
        return True
    return best_pgd_acc >= 0.2 and pgd_acc < CO_DROP * best_pgd_acc and gap > CO_GAP / 2


class AdversarialTraining:
    """Model, optimizer, compiled step and probe for one training run.

    Args:
        cfg: the training configuration.
        steps_per_epoch: optimizer steps per epoch (sets the LR schedule and the eps ramp).
        strategy: a `tf.distribute.Strategy`, or `None` for the default (one process).
        rank: this worker's rank, mixed into the attack seeds so replicas draw different starts.
        threat_model: the `ThreatModel` runs are compared under; the probe reports
            `val_robust_acc` as PGD accuracy at its norm and eps (a search ranks trials by it,
            whatever eps they train at). Defaults to `cfg.threat_model` (the training norm and eps).
        steps_per_call: optimizer steps per compiled call, >= 1: a loop inside the graph, so the
            Python dispatch of a call is paid once per call. Any value gives the same weights;
            the epoch's last call runs the remainder. Defaults to `STEPS_PER_CALL`.
        input_shape: (H, W, C) of the data's images. Defaults to MNIST's `(28, 28, 1)`.
        num_classes: the data's class count. Defaults to `10`.
        model_paths: folders searched first for an imported model (`cfg.model` given as
            `package.module:function`). Defaults to `()`.

    Raises:
        ValueError: `steps_per_epoch` or `steps_per_call` below 1.
        advtrain.models.ModelError: a model that does not fit the data.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        steps_per_epoch: int,
        strategy=None,
        rank: int = 0,
        threat_model: ThreatModel | None = None,
        steps_per_call: int = STEPS_PER_CALL,
        input_shape=MNIST_SHAPE,
        num_classes: int = 10,
        model_paths=(),
    ):
        try:
            check_number("steps_per_epoch", steps_per_epoch, low=1, integer=True)
        except ValueError as e:
            raise ValueError(f"{e} (is the training split smaller than one batch?)") from None
        check_steps_per_call(steps_per_call)
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.steps_per_call = steps_per_call
        self.strategy = strategy or tf.distribute.get_strategy()
        self.rank = rank
        self.threat_model = threat_model or cfg.threat_model
        # Variables must be created in the strategy's scope to be mirrored across workers.
        with self.strategy.scope():
            self.model, _notes = make_model(
                cfg.model,
                input_shape=input_shape,
                num_classes=num_classes,
                seed=cfg.seed,
                extra_paths=model_paths,
            )
            self.optimizer = make_optimizer(cfg, steps_per_epoch)
            self.optimizer.build(self.model.trainable_variables)
            self.metrics = {
                "train_loss": keras.metrics.Mean(),
                "train_clean_acc": keras.metrics.SparseCategoricalAccuracy(),
                "train_adv_acc": keras.metrics.SparseCategoricalAccuracy(),
            }
        if cfg.method in CERTIFIED_METHODS:
            bounds.check_supported(self.model)  # one line naming the layer the bounds lack
        self._train_step = self._make_train_step()

    # -- the step -------------------------------------------------------------------------

    def ramp(self, step):
        """Fraction of the eps ramp done at a step: linear from 0 to 1 over `eps_ramp_epochs`."""
        ramp_steps = self.cfg.eps_ramp_epochs * self.steps_per_epoch
        if ramp_steps == 0:
            return tf.constant(1.0, tf.float32)
        return tf.minimum(tf.cast(step + 1, tf.float32) / float(ramp_steps), 1.0)

    def current_eps(self, step):
        """Training eps at a step: linear ramp from 0 over `eps_ramp_epochs`, then constant."""
        return self.cfg.eps * self.ramp(step)

    def certified_loss(self, x, y, logits, step):
        """Certified training's per-example loss and worst-case logits (Gowal et al. 2018,
        arXiv:1810.12715; Zhang et al. 2020, arXiv:1906.06316).

        kappa CE(x) + (1 - kappa) CE(-m), where m lower-bounds the margins z_y - z_j over the
        eps-ball; kappa falls from 1 to `kappa_end` and eps rises from 0 over the ramp. For
        `crown-ibp`, m = beta m_CROWN-IBP + (1 - beta) m_IBP, beta falling from 1 to `beta_end`;
        once beta is 0 the CROWN pass is skipped.
        """
        cfg, frac = self.cfg, self.ramp(step)
        eps = self.current_eps(step)

        def ibp():
            return bounds.margins_graph(self.model, x, y, eps, cfg.norm, ("ibp",))["ibp"]

        if cfg.method != "crown-ibp":
            margins = ibp()
        else:
            beta = 1.0 - frac * (1.0 - cfg.beta_end)

            def mixed():  # both bounds from one shared IBP pass
                m = bounds.margins_graph(self.model, x, y, eps, cfg.norm, ("ibp", "crown-ibp"))
                return beta * m["crown-ibp"] + (1.0 - beta) * m["ibp"]

            margins = tf.cond(beta > 0, mixed, ibp)
        worst = bounds.worst_case_logits(margins)
        kappa = 1.0 - frac * (1.0 - cfg.kappa_end)
        ce_clean = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        ce_worst = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=worst)
        return kappa * ce_clean + (1.0 - kappa) * ce_worst, worst

    def _adversary(self, x, y, eps, seed):
        cfg = self.cfg
        if cfg.method == "fgsm":
            return attacks.fgsm_graph(
                self.model,
                x,
                y,
                eps,
                step_size=cfg.resolved_step_size() / cfg.eps * eps if cfg.eps > 0 else 0.0,
                norm=cfg.norm,
                random_start=True,
                seed=seed,
            )
        step_size = cfg.resolved_step_size() / cfg.eps * eps if cfg.eps > 0 else 0.0
        if cfg.method == "pgd":
            return attacks.pgd_graph(
                self.model, x, y, eps, step_size, cfg.steps, norm=cfg.norm, seed=seed
            )
        # TRADES (Zhang et al. 2019, arXiv:1901.08573): maximise KL(p(x) || p(x')).
        p_clean = tf.stop_gradient(tf.nn.softmax(self.model(x, training=False)))

        def kl(logits):
            return tf.reduce_sum(
                p_clean * (tf.math.log(p_clean + 1e-12) - tf.nn.log_softmax(logits)), -1
            )

        return attacks.pgd_graph(
            self.model, x, y, eps, step_size, cfg.steps, norm=cfg.norm, loss=kl, seed=seed
        )

    def replica_gradients(self, x, y):
        """One replica's loss gradients for a batch, before any all-reduce or update.

        Runs in a replica context (under `strategy.run`, or plainly with the default strategy).
        The attack's seed and eps come from `optimizer.iterations`, so they follow the step.

        Returns:
            (grads, per_example, logits, adv_logits): gradients of the globally averaged loss
            (one per trainable variable), the per-example loss (batch,), and the clean and
            adversarial logits (batch, 10).
        """
        cfg, model = self.cfg, self.model
        certified = cfg.method in CERTIFIED_METHODS
        adversarial = cfg.method != "clean" and not certified and cfg.mix > 0 and cfg.eps > 0
        step = self.optimizer.iterations
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        seed = tf.stack(
            [
                cfg.seed * 4099 + self.rank * 131 + tf.cast(replica, tf.int32),
                tf.cast(step, tf.int32),
            ]
        )
        x_adv = (
            tf.stop_gradient(self._adversary(x, y, self.current_eps(step), seed))
            if adversarial
            else x
        )
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            ce_clean = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            if certified:
                # train_adv_acc is then the share of the batch whose worst case is still correct.
                per_example, adv_logits = self.certified_loss(x, y, logits, step)
            elif not adversarial:
                adv_logits, per_example = logits, ce_clean
            elif cfg.method == "trades":
                adv_logits = model(x_adv, training=True)
                p = tf.nn.softmax(logits)
                kl = tf.reduce_sum(
                    p * (tf.nn.log_softmax(logits) - tf.nn.log_softmax(adv_logits)), -1
                )
                per_example = ce_clean + cfg.beta * kl
            else:
                adv_logits = model(x_adv, training=True)
                ce_adv = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=adv_logits)
                per_example = (
                    ce_adv if cfg.mix == 1.0 else (1.0 - cfg.mix) * ce_clean + cfg.mix * ce_adv
                )
            # Averaged once over the GLOBAL batch; optimizer.apply sums across replicas.
            loss = tf.nn.compute_average_loss(per_example)
        return tape.gradient(loss, model.trainable_variables), per_example, logits, adv_logits

    def _make_train_step(self) -> Callable:
        model, optimizer, m = self.model, self.optimizer, self.metrics

        def replica_step(x, y):
            grads, per_example, logits, adv_logits = self.replica_gradients(x, y)
            optimizer.apply(grads, model.trainable_variables)
            m["train_loss"].update_state(per_example)
            m["train_clean_acc"].update_state(y, logits)
            m["train_adv_acc"].update_state(y, adv_logits)

        @tf.function
        def train_steps(iterator, n):
            # n steps in one call. The body's stateful ops (the update, the iterator) are ordered
            # by automatic control dependencies and the loop runs one iteration at a time, so
            # step i + 1 reads the weights and optimizer.iterations that step i wrote.
            def body(i):
                self.strategy.run(replica_step, args=next(iterator))
                return (i + 1,)

            tf.while_loop(lambda i: i < n, body, (tf.constant(0),), parallel_iterations=1)

        return train_steps

    # -- epochs, probe, guard -------------------------------------------------------------

    def train_epoch(
        self, dataset, progress: Callable[[int], None] | None = None
    ) -> dict[str, float]:
        """Runs `steps_per_epoch` steps over a (distributed) dataset; returns mean metrics.

        Steps run `steps_per_call` at a time (the last call takes the remainder); `progress`
        is called after each call with the steps done so far in this epoch.
        """
        for metric in self.metrics.values():
            metric.reset_state()
        iterator = iter(dataset)
        done = 0
        while done < self.steps_per_epoch:
            n = min(self.steps_per_call, self.steps_per_epoch - done)
            self.train_steps(iterator, n)
            done += n
            if progress is not None:
                progress(done)
        return {name: float(metric.result().numpy()) for name, metric in self.metrics.items()}

    def train_steps(self, iterator, steps: int) -> None:
        """Runs `steps` optimizer steps from `iterator` in ONE compiled call (a graph loop).

        `train_epoch` calls it with `steps_per_call` steps at a time; benchmarks call it to time
        one call size against another on the same model and data.
        """
        # A tensor, so every call size shares one trace.
        self._train_step(iterator, tf.constant(steps, tf.int32))

    def probe(self, x_val: np.ndarray, y_val: np.ndarray) -> dict[str, float]:
        """Clean accuracy on the validation split; FGSM and PGD-k accuracy at the training eps
        (the overfitting guard's signal) and PGD-k accuracy under the judging threat model, on a
        fixed validation batch. Cheap enough for every epoch; never touches the test split.
        """
        cfg = self.cfg
        x, y = x_val[: cfg.probe_size], y_val[: cfg.probe_size]
        out = {"val_clean_acc": _accuracy(self.model, x_val, y_val)}

        def pgd_acc(norm, eps):
            if eps == 0:
                return _accuracy(self.model, x, y)
            x_adv = attacks.run_attack(
                "pgd",
                self.model,
                x,
                y,
                eps=eps,
                norm=norm,
                steps=cfg.probe_steps,
                seed=cfg.seed,
                batch_size=len(x),
            )
            return _accuracy(self.model, x_adv, y)

        if cfg.eps == 0:
            out["val_fgsm_acc"] = out["val_pgd_acc"] = _accuracy(self.model, x, y)
        else:
            x_fgsm = attacks.run_attack(
                "fgsm", self.model, x, y, eps=cfg.eps, norm=cfg.norm, batch_size=len(x)
            )
            out["val_fgsm_acc"] = _accuracy(self.model, x_fgsm, y)
            out["val_pgd_acc"] = pgd_acc(cfg.norm, cfg.eps)
        tm = self.threat_model
        same = (tm.norm, tm.eps) == (cfg.norm, cfg.eps)
        out["val_robust_acc"] = out["val_pgd_acc"] if same else pgd_acc(tm.norm, tm.eps)
        if cfg.method in CERTIFIED_METHODS:
            # A lower bound beside the PGD upper bound, on the same batch. Not for the other
            # methods: their models certify almost nothing, and the tracing would cost every run.
            proven = np.zeros(len(y), bool)
            for method in PROBE_BOUNDS:
                proven |= bounds.certify(
                    self.model, x, y, eps=tm.eps, norm=tm.norm, method=method, batch_size=len(x)
                )
            out["val_certified_acc"] = float(proven.mean())
        return out

    def checkpoint(self) -> tf.train.Checkpoint:
        """Model and optimizer state (step counter included) for resuming."""
        return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)


def _accuracy(model, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    correct = 0
    for lo in range(0, len(x), batch_size):
        logits = model(x[lo : lo + batch_size], training=False)
        correct += int(np.sum(np.argmax(logits, -1) == y[lo : lo + batch_size]))
    return correct / max(len(x), 1)


class _ToDict(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


def save_run(
    run_dir: str | os.PathLike,
    model: keras.Model,
    config: TrainConfig | _ToDict,
    history: list[dict],
    summary: dict[str, Any],
) -> None:
    """Writes model.keras, config.json and metrics.json into a run folder, each atomically.

    `config` is what config.json holds: the TrainConfig, or the caller's whole run
    configuration (anything with `to_dict()`, e.g. the CLI's run spec), written once.
    """
    run_dir = Path(run_dir)
    save_model(model, run_dir / "model.keras")
    write_json(run_dir / "config.json", config.to_dict())
    write_json(run_dir / "metrics.json", {"epochs": history, **summary})


def fit(
    cfg: TrainConfig,
    *,
    on_epoch: Callable[[dict], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    threat_model: ThreatModel | None = None,
    steps_per_call: int = STEPS_PER_CALL,
):
    """Trains one model in this process: data, epochs, probe, guard.

    Args:
        cfg: the training configuration.
        on_epoch: called with each epoch's metrics dict (for logging or reporting).
        progress: called as progress(epoch, step) after every compiled call (every
            `steps_per_call` steps; for a progress bar).
        threat_model: the `ThreatModel` runs are compared under (see `AdversarialTraining`).
            Defaults to the training norm and eps.
        steps_per_call: optimizer steps per compiled call (see `AdversarialTraining`).
            Defaults to `STEPS_PER_CALL`.

    Returns:
        (model, history, summary): the trained `keras.Model` (best epoch restored when the guard
        fired), the per-epoch metrics and a summary with `epochs_run`, `stopped_early`,
        `stop_reason` and `best_epoch`.
    """
    import time

    from advtrain.data import load_data, make_dataset

    data = load_data(cfg.data, val_size=cfg.val_size, seed=cfg.seed)
    x_train, y_train = data.x_train, data.y_train
    if cfg.train_size is not None:
        x_train, y_train = x_train[: cfg.train_size], y_train[: cfg.train_size]
    steps = len(x_train) // cfg.batch_size
    run = AdversarialTraining(
        cfg,
        steps_per_epoch=steps,
        threat_model=threat_model,
        steps_per_call=steps_per_call,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
    )

    def dataset_for(epoch: int):
        return without_autotune(
            make_dataset(x_train, y_train, cfg.batch_size, seed=cfg.seed * 1000 + epoch)
        )

    return run_epochs(
        run,
        dataset_for,
        data.x_val,
        data.y_val,
        on_epoch=on_epoch,
        progress=progress,
        clock=time.perf_counter,
        examples_per_epoch=steps * cfg.batch_size,
    )


def run_epochs(
    run: AdversarialTraining,
    dataset_for: Callable[[int], Any],
    x_val,
    y_val,
    *,
    start_epoch: int = 0,
    history: list[dict] | None = None,
    on_epoch=None,
    progress=None,
    clock=None,
    examples_per_epoch: int = 0,
):
    """The epoch loop shared by local and Ray training: train, probe, guard.

    `dataset_for(epoch)` returns that epoch's (distributed) dataset; seeding the shuffle by epoch
    makes a resumed run see the same batches as an uninterrupted one. `history` (the epochs
    already run, e.g. read from a checkpoint) is extended in place and returned, so `on_epoch`
    sees it whole. The guard keeps the weights of the best probe-PGD epoch in memory; when
    catastrophic overfitting is detected (judged only on epochs after the eps ramp) it restores
    them and stops.
    """
    import time

    clock = clock or time.perf_counter
    cfg = run.cfg
    history = [] if history is None else history
    guard = cfg.guard and cfg.method in ("fgsm", "pgd", "trades") and cfg.eps > 0 and cfg.mix > 0
    best = max(history, key=lambda h: h["val_pgd_acc"], default=None)
    best_weights = run.model.get_weights() if best is not None else None
    summary = {"stopped_early": False, "stop_reason": None}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = clock()
        step_cb = (lambda s, e=epoch: progress(e, s)) if progress else None
        metrics = run.train_epoch(dataset_for(epoch), step_cb)
        seconds = clock() - t0
        metrics.update(run.probe(x_val, y_val))
        metrics.update(
            epoch=epoch + 1,
            epoch_seconds=seconds,
            examples_per_second=examples_per_epoch / seconds if seconds > 0 else 0.0,
            eps=float(run.current_eps(run.optimizer.iterations.numpy() - 1)),
        )
        history.append(metrics)
        if best is None or metrics["val_pgd_acc"] >= best["val_pgd_acc"]:
            best, best_weights = metrics, run.model.get_weights()
        if on_epoch is not None:
            on_epoch(metrics)
        # While eps ramps up the model has not yet trained at the eps the probe attacks with, so
        # a large FGSM-PGD gap then means "not there yet", not catastrophic overfitting.
        ramped = epoch + 1 > cfg.eps_ramp_epochs
        if (
            guard
            and ramped
            and is_catastrophic_overfitting(
                metrics["val_fgsm_acc"], metrics["val_pgd_acc"], best["val_pgd_acc"]
            )
        ):
            log.warning(
                "Catastrophic overfitting at epoch %d (probe FGSM %.3f, PGD %.3f); restoring "
                "epoch %d",
                epoch + 1,
                metrics["val_fgsm_acc"],
                metrics["val_pgd_acc"],
                best["epoch"],
            )
            summary.update(stopped_early=True, stop_reason="catastrophic_overfitting")
            if best is not metrics:
                run.model.set_weights(best_weights)
            break
    summary.update(
        epochs_run=len(history),
        best_epoch=best["epoch"] if best else None,
        restored_epoch=best["epoch"] if summary["stopped_early"] else None,
    )
    return run.model, history, summary
