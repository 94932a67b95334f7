"""Cross-check a saved model's robust accuracy with other libraries' attacks.

    python -m benchmarks.crosscheck benchmarks/results/time_to_robust_b.keras --eps 0.3 [--n 1000]

advtrain's standard suite (PGD-100x5, APGD-CE, targeted APGD-DLR) runs on the first n test
images; then ART 1.20.1 (PGD-100 with 5 random restarts; APGD-CE and APGD-DLR with ART's default
5 random starts, where advtrain's suite runs APGD once, as AutoAttack's standard version does) and
Foolbox 3.3.4 (LinfPGD-100) attack the same images. Reported: each library's robust accuracy (per-example worst
case over its attacks) and how many examples another library broke that advtrain's suite left
correctly classified. A robust accuracy above what another library finds would be an evaluation
bug in advtrain, not a result. Results: benchmarks/results/crosscheck_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ATTACKS = ("ART PGD-100x5", "ART APGD-CE", "ART APGD-DLR", "Foolbox LinfPGD-100")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--eps", type=float, required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--attacks", default=",".join(ATTACKS),
                   help=f"comma-separated subset of {list(ATTACKS)} (ART's APGD-DLR is slow: ~2 s per image on 2 CPUs)")
    args = p.parse_args(argv)
    names = args.attacks.split(",")
    if unknown := sorted(set(names) - set(ATTACKS)):
        p.error(f"unknown --attacks {unknown}; known: {list(ATTACKS)}")
    if not args.model.is_file():
        p.error(f"model {str(args.model)!r} does not exist")
    if not 0 < args.eps <= 1:
        p.error(f"--eps must be in (0, 1]. Received: {args.eps}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import keras
    import numpy as np
    import tensorflow as tf

    from advtrain.config import EvalConfig
    from advtrain.data import load_mnist
    from advtrain.evaluation import evaluate_robustness
    from advtrain.models import load_model

    model = load_model(args.model)
    x, y = load_mnist().split("test")
    x, y = x[: args.n], y[: args.n].astype(np.int64)

    def correct(xs) -> np.ndarray:
        return np.argmax(model.predict(xs, batch_size=args.batch_size, verbose=0), axis=1) == y

    out = {"model": str(args.model), "eps": args.eps, "n": len(y), "split": "test", "libraries": {}}
    t0 = time.perf_counter()
    rep = evaluate_robustness(model, x, y, EvalConfig(norm="linf", eps=(args.eps,), suite="standard", n=len(y),
                                                      sanity=False), keep_adversarial=True)
    ours = correct(rep.result(args.eps).adversarial)
    out["clean_acc"] = float(correct(x).mean())
    out["libraries"]["advtrain standard suite"] = {"robust_acc": float(ours.mean()),
                                                   "seconds": time.perf_counter() - t0}

    from art.attacks.evasion import AutoProjectedGradientDescent, ProjectedGradientDescent
    from art.estimators.classification import TensorFlowV2Classifier

    clf = TensorFlowV2Classifier(model=model, nb_classes=10, input_shape=(28, 28, 1), clip_values=(0.0, 1.0),
                                 loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    np.random.seed(0)  # ART draws its random starts with NumPy
    art_attacks = {
        "ART PGD-100x5": ProjectedGradientDescent(clf, norm=np.inf, eps=args.eps, eps_step=2.5 * args.eps / 100,
                                                  max_iter=100, num_random_init=5, batch_size=args.batch_size,
                                                  verbose=False),
        "ART APGD-CE": AutoProjectedGradientDescent(clf, norm=np.inf, eps=args.eps, eps_step=2 * args.eps, max_iter=100,
                                                    loss_type="cross_entropy", batch_size=args.batch_size,
                                                    verbose=False),
        "ART APGD-DLR": AutoProjectedGradientDescent(clf, norm=np.inf, eps=args.eps, eps_step=2 * args.eps,
                                                     max_iter=100, loss_type="difference_logits_ratio",
                                                     batch_size=args.batch_size, verbose=False),
    }
    others = {}
    for name, attack in art_attacks.items():
        if name not in names:
            continue
        t0 = time.perf_counter()
        ok = correct(attack.generate(x, y=y))
        others[name] = ok
        out["libraries"][name] = {"robust_acc": float(ok.mean()), "seconds": time.perf_counter() - t0}
        print(name, out["libraries"][name], flush=True)

    if "Foolbox LinfPGD-100" in names:
        if not hasattr(np, "find_common_type"):
            # eagerpy 0.30 (under Foolbox 3.3.4) calls np.find_common_type, removed in NumPy 2.0.
            np.find_common_type = lambda array_types, scalar_types: np.result_type(*array_types, *scalar_types)
        import foolbox as fb

        fmodel = fb.TensorFlowModel(model, bounds=(0.0, 1.0))
        fb_pgd = fb.attacks.LinfPGD(abs_stepsize=2.5 * args.eps / 100, steps=100, random_start=True)
        t0 = time.perf_counter()
        b = args.batch_size
        adv = np.concatenate([fb_pgd(fmodel, tf.constant(x[i:i + b]), tf.constant(y[i:i + b]), epsilons=args.eps)[1]
                              .numpy() for i in range(0, len(y), b)])
        others["Foolbox LinfPGD-100"] = correct(adv)
        out["libraries"]["Foolbox LinfPGD-100"] = {"robust_acc": float(others["Foolbox LinfPGD-100"].mean()),
                                                   "seconds": time.perf_counter() - t0}

    union = np.logical_and.reduce(list(others.values()))
    out["libraries"]["ART + Foolbox, worst case"] = {"robust_acc": float(union.mean())}
    out["broken_elsewhere_not_by_advtrain"] = int(np.sum(ours & ~union))
    out["broken_by_advtrain_not_elsewhere"] = int(np.sum(~ours & union))
    out["all_libraries_worst_case"] = float((ours & union).mean())
    out["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"crosscheck_{args.model.stem}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)
    print(f"clean {out['clean_acc']:.4f} on n={len(y)} test images, linf eps {args.eps}")
    for name, r in out["libraries"].items():
        print(f"  {name:32s} robust {r['robust_acc']:.4f}" + (f"  ({r['seconds']:.0f} s)" if "seconds" in r else ""))
    print(f"  examples advtrain left robust that ART/Foolbox broke: {out['broken_elsewhere_not_by_advtrain']}")
    print(f"  examples advtrain broke that ART/Foolbox left robust: {out['broken_by_advtrain_not_elsewhere']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
