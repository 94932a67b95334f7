"""What the CLI commands do, as functions: train a run folder, evaluate a model, attack images.

The run folder of `advtrain train`:
    config.json   the validated run spec (train, eval, scaling)
    metrics.json  per-epoch metrics and the summary (epochs run, early stop, restored epoch)
    model.keras   the trained model (best epoch restored if the overfitting guard fired)
    report.json / report.md / accuracy_vs_eps.png / examples.png   the final evaluation
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np

from advtrain.config import AttackConfig, EvalConfig
from workflows.spec import RunSpec

__all__ = ["train_and_report", "evaluate_and_report", "attack_to_file", "write_evaluation"]

log = logging.getLogger(__name__)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _epoch_line(m: dict) -> str:
    return (f"epoch {m['epoch']}: loss {m['train_loss']:.3f}  train adv acc {m['train_adv_acc']:.3f}  "
            f"val clean {m['val_clean_acc']:.3f}  val FGSM {m['val_fgsm_acc']:.3f}  val PGD {m['val_pgd_acc']:.3f}  "
            f"eps {m['eps']:.3f}  {m['examples_per_second']:.0f} ex/s  {m['epoch_seconds']:.1f}s")


class _AttackProgress:
    """One tqdm bar per attack on stderr: the attack, examples done of those left to attack
    (the still-robust ones), and the elapsed time."""

    def __init__(self) -> None:
        self.bar = None
        self.label = None

    def __call__(self, label: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if label != self.label:
            self.close()
            self.label = label
            self.bar = tqdm(total=total, desc=label, unit="ex", leave=False, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = self.label = None


def write_evaluation(model, cfg: EvalConfig, out: Path, data=None) -> dict:
    """Evaluates `model` under `cfg` on its split and writes report.json/.md and plots into `out`."""
    from advtrain import attacks, evaluation, report
    from advtrain.data import load_mnist

    data = data or load_mnist()
    progress = _AttackProgress()
    try:
        rep = evaluation.evaluate_split(model, cfg, data, progress=progress)
    finally:
        progress.close()
    rep.write(out)
    d = rep.to_dict()
    report.plot_accuracy_vs_eps(d, out / "accuracy_vs_eps.png")
    x, y = data.split(cfg.split)
    k = min(16, len(x), cfg.n or len(x))
    x_adv = attacks.run_attack("pgd", model, x[:k], y[:k], eps=cfg.threat_model.eps, norm=cfg.norm, steps=40, batch_size=k)
    report.plot_adversarial_grid(x[:k], x_adv, y[:k], np.argmax(model(x[:k]), -1), np.argmax(model(x_adv), -1),
                                 out / "examples.png", n=k)
    return d


def train_and_report(spec: RunSpec, run_dir: Path, *, local: bool, address: str | None, storage: str | None) -> int:
    """`advtrain train`: trains (locally or on Ray Train), saves the run folder, evaluates."""
    from advtrain.models import load_model
    from advtrain.files import write_json
    from advtrain.training import fit, save_run

    t0 = time.perf_counter()
    if local:
        from tqdm import tqdm

        bars: dict[int, tqdm] = {}

        def progress(epoch: int, step: int) -> None:
            bar = bars.get(epoch)
            if bar is None:
                bar = bars[epoch] = tqdm(total=None, desc=f"epoch {epoch + 1}/{spec.train.epochs}", unit="step",
                                         leave=False, file=sys.stderr)
            bar.update(1)

        def on_epoch(m: dict) -> None:
            bar = bars.pop(m["epoch"] - 1, None)
            if bar is not None:
                bar.close()
            _say(_epoch_line(m))

        model, history, summary = fit(spec.train, on_epoch=on_epoch, progress=progress, threat_model=spec.threat_model)
    else:
        from workflows import cluster
        from workflows.train import check_resources, fit_distributed, read_final

        cluster.connect(address)
        check_resources(spec.scaling.workers, spec.scaling.cpus_per_worker, spec.scaling.gpu)
        storage_path = storage or str((run_dir / "ray").resolve())
        _say(f"Ray Train: {spec.scaling.workers} worker(s), gpu={spec.scaling.gpu}, storage {storage_path}")
        result = fit_distributed(spec.train, workers=spec.scaling.workers, gpu=spec.scaling.gpu,
                                 cpus_per_worker=spec.scaling.cpus_per_worker, max_failures=spec.scaling.max_failures,
                                 storage_path=storage_path, name=run_dir.name, threat_model=spec.threat_model,
                                 placement_strategy=spec.scaling.placement_strategy)
        if result.error is not None:
            raise RuntimeError(f"Ray Train run failed: {result.error}")
        model_path, history, summary = read_final(result)
        model = load_model(model_path)
        for m in history:
            _say(_epoch_line(m))
    summary = {**summary, "train_seconds": time.perf_counter() - t0, "mode": "local" if local else "ray",
               "workers": 1 if local else spec.scaling.workers}
    save_run(run_dir, model, spec.train, history, summary)
    write_json(run_dir / "config.json", spec.to_dict())
    if summary.get("stopped_early"):
        _say(f"WARNING: {summary['stop_reason']}: stopped after epoch {summary['epochs_run']}, "
             f"restored epoch {summary['restored_epoch']}")
    _say(f"Evaluating ({spec.eval.suite} suite, {spec.eval.norm} eps {list(spec.eval.eps)}, split {spec.eval.split}) ...")
    d = write_evaluation(model, spec.eval, run_dir)
    _print_report_summary(d)
    _say(f"Run folder: {run_dir}")
    return 0


def _print_report_summary(d: dict) -> None:
    from advtrain.robustness_report import summary_lines

    for line in summary_lines(d):
        _say(line)


def evaluate_and_report(model_path: Path, cfg: EvalConfig, out: Path) -> int:
    """`advtrain evaluate`: loads with safe_mode, evaluates, writes the report folder."""
    from advtrain.models import load_model

    model = load_model(model_path)
    d = write_evaluation(model, cfg, out)
    _print_report_summary(d)
    _say(f"Report: {out / 'report.md'}")
    return 0


def attack_to_file(model_path: Path, cfg: AttackConfig, input_path: str | None, n: int, split: str, out: Path) -> int:
    """`advtrain attack`: adversarial examples for given images, saved atomically as .npz."""
    from advtrain import attacks
    from advtrain.data import DataError, _check_arrays, load_mnist
    from advtrain.files import write_atomic
    from advtrain.models import load_model

    if input_path is None:
        if n < 1:
            raise ValueError(f"`n` must be >= 1. Received: n={n}")
        x, y = load_mnist().split(split)
        x, y = x[:n], y[:n]
    else:
        try:
            with np.load(input_path, allow_pickle=False) as f:
                if "x" not in f.files or "y" not in f.files:
                    raise DataError(f"{input_path}: needs arrays 'x' and 'y' (found: {', '.join(f.files) or 'none'})")
                x, y = _check_arrays(f["x"], f["y"], input_path, "input")
        except OSError as e:
            raise DataError(f"{input_path}: cannot be read as .npz ({e})") from None
    model = load_model(model_path)
    kw = dict(eps=cfg.eps, norm=cfg.norm, seed=cfg.seed)
    if cfg.name == "square":
        kw.update(queries=cfg.steps)
    else:
        kw.update(loss=cfg.loss)
    if cfg.name in ("pgd", "apgd"):
        kw.update(steps=cfg.steps, restarts=cfg.restarts)
    if cfg.name == "pgd":
        kw.update(step_size=cfg.step_size)
    x_adv = attacks.run_attack(cfg.name, model, x, y, batch_size=min(256, len(x)), **kw)
    pred = np.argmax(model.predict(x, verbose=0), -1)
    pred_adv = np.argmax(model.predict(x_adv, verbose=0), -1)
    write_atomic(out, lambda tmp: np.savez_compressed(tmp, x=x, y=y, x_adv=x_adv, pred=pred,
                                                      pred_adv=pred_adv, attack=str(cfg)))
    _say(f"{cfg.name} {cfg.norm} eps={cfg.eps}: accuracy {np.mean(pred == y):.3f} -> {np.mean(pred_adv == y):.3f} "
         f"on {len(x)} images; wrote {out}")
    return 0
