"""PGD-40 throughput: advtrain against the gradient bound, CleverHans, ART and Foolbox.

    python -m benchmarks.attacks [--quick] [--reps 3] [--threads 2]

One process, one Keras model at a time, the same test images, batch 256 and attack budget for
every library: PGD-40, linf, eps 0.3, step 0.01 (Madry et al. 2018's MNIST setting), one random
start, true labels. Methods run interleaved batch by batch, in an order rotated at every batch,
so load from other processes on the machine falls on all of them alike; each cell reports the
median and the min-max over repetitions (one repetition = all n images).

The bound: a compiled tf.function computing the input gradient of the cross-entropy (one forward
and one backward pass) on a batch of 256, called 40 times per batch; PGD-40 cannot beat
grad_throughput / 40 (DESIGN.md section 6). `bound_loop` is a stricter reference: the same 40
gradients chained inside one compiled while_loop (no per-call dispatch).

Models are trained once with advtrain and cached under benchmarks/results/models/ (the cached
file is reused while its config matches). Results go to benchmarks/results/attacks.json
(written atomically) and a Markdown table is printed.

The comparison libraries are imported here only: advtrain never depends on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from advtrain.files import write_json

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS = Path(__file__).resolve().parent / "results"
EPS, STEP, STEPS, BATCH = 0.3, 0.01, 40, 256

# Light adversarial training on the full training split: realistic (non-masked) gradients and a
# robust accuracy away from 0, so the libraries' accuracies can be compared, not just their speed.
TRAIN = {
    "cnn": dict(
        model="cnn", method="pgd", eps=0.3, steps=5, epochs=3, eps_ramp_epochs=1, guard=False
    ),
    "madry": dict(
        model="madry", method="pgd", eps=0.3, steps=3, epochs=2, eps_ramp_epochs=1, guard=False
    ),
}
# Repetitions: the cnn is cheap (seconds per method), so more of them tame the machine's noise.
REPS = {"cnn": 7, "madry": 3}
QUICK_TRAIN = {"epochs": 1, "eps_ramp_epochs": 0, "train_size": 6000, "method": "clean"}


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def get_model(name: str, quick: bool, log):
    """The cached trained model, or trains and caches it."""
    from advtrain.config import TrainConfig
    from advtrain.models import load_model, save_model
    from advtrain.training import fit

    cfg = TrainConfig(**{**TRAIN[name], **(QUICK_TRAIN if quick else {})})
    path = RESULTS / "models" / f"{name}{'-quick' if quick else ''}.keras"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("config") == cfg.to_dict():
            log(f"{name}: cached model {path}")
            return load_model(path), meta
    log(f"{name}: training {cfg}")
    t0 = time.perf_counter()
    model, history, summary = fit(cfg)
    meta = {
        "config": cfg.to_dict(),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "last_epoch": history[-1],
        "summary": summary,
    }
    save_model(model, path)
    write_json(meta_path, meta)
    log(f"{name}: trained in {meta['train_seconds']}s, last epoch {history[-1]}")
    return model, meta


# --------------------------------------------------------------------------------------------
# The methods: each maps one batch (xb, yb, seed) of 256 images -> x_adv (numpy), or None for
# the bounds. Timing interleaves methods batch by batch (see bench_model).
# --------------------------------------------------------------------------------------------


def make_methods(model, tf, np):
    from advtrain.attacks import run_attack

    methods = {}

    @tf.function
    def grad_fn(x, y):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(x)
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=y, logits=model(x, training=False)
            )
            total = tf.reduce_sum(ce)
        return tape.gradient(total, x)

    def bound(xb, yb, seed):
        xb, yb = tf.constant(xb), tf.constant(yb)
        for _ in range(STEPS):
            g = grad_fn(xb, yb)
        g.numpy()

    @tf.function
    def grad_loop(x, y):
        def body(i, z):
            return i + 1, grad_fn(z, y)

        return tf.while_loop(
            lambda i, _: i < STEPS, body, (tf.constant(0), x), parallel_iterations=1
        )[1]

    def bound_loop(xb, yb, seed):
        grad_loop(tf.constant(xb), tf.constant(yb)).numpy()

    def advtrain_pgd(xb, yb, seed):
        return run_attack(
            "pgd", model, xb, yb, eps=EPS, steps=STEPS, step_size=STEP, batch_size=BATCH, seed=seed
        )

    methods["bound"] = bound
    methods["bound_loop"] = bound_loop
    methods["advtrain"] = advtrain_pgd

    # CleverHans 4.0.0, TF2 API, as shipped: a Python loop whose per-step gradient is a tf.function.
    try:
        from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

        def ch_batch(xb, yb):
            return projected_gradient_descent(
                model,
                xb,
                EPS,
                STEP,
                STEPS,
                np.inf,
                clip_min=0.0,
                clip_max=1.0,
                y=yb,
                rand_init=True,
                sanity_checks=False,
            )

        ch_compiled = tf.function(ch_batch)
        methods["cleverhans"] = lambda xb, yb, seed: ch_batch(
            tf.constant(xb), tf.constant(yb)
        ).numpy()
        # Not the shipped usage: the whole attack traced into one graph by the caller.
        methods["cleverhans_tf_function"] = lambda xb, yb, seed: ch_compiled(
            tf.constant(xb), tf.constant(yb)
        ).numpy()
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        methods["cleverhans"] = e

    # ART 1.20.1: TensorFlowV2Classifier + ProjectedGradientDescent (TF2 implementation).
    try:
        import keras
        from art.attacks.evasion import ProjectedGradientDescent
        from art.estimators.classification import TensorFlowV2Classifier

        clf = TensorFlowV2Classifier(
            model=model,
            nb_classes=10,
            input_shape=(28, 28, 1),
            clip_values=(0.0, 1.0),
            loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        art_pgd = ProjectedGradientDescent(
            clf,
            norm=np.inf,
            eps=EPS,
            eps_step=STEP,
            max_iter=STEPS,
            targeted=False,
            num_random_init=1,
            batch_size=BATCH,
            verbose=False,
        )

        def art(xb, yb, seed):
            np.random.seed(seed)  # ART draws its random start with NumPy
            return art_pgd.generate(xb, y=yb)

        methods["art"] = art
    except Exception as e:  # noqa: BLE001
        methods["art"] = e

    # Foolbox 3.3.4: LinfPGD on a TensorFlowModel.
    try:
        if not hasattr(np, "find_common_type"):
            # Shim: eagerpy 0.30 (under Foolbox 3.3.4) calls np.find_common_type(dtypes, []),
            # removed in NumPy 2.0; with no scalar types it is np.result_type(*dtypes).
            np.find_common_type = lambda array_types, scalar_types: np.result_type(
                *array_types, *scalar_types
            )
        import foolbox as fb

        fmodel = fb.TensorFlowModel(model, bounds=(0.0, 1.0))
        fb_pgd = fb.attacks.LinfPGD(abs_stepsize=STEP, steps=STEPS, random_start=True)

        def foolbox(xb, yb, seed):
            _, clipped, _ = fb_pgd(fmodel, tf.constant(xb), tf.constant(yb), epsilons=EPS)
            return clipped.numpy()

        methods["foolbox"] = foolbox
    except Exception as e:  # noqa: BLE001
        methods["foolbox"] = e
    return methods


LABELS = {
    "bound": "gradient bound (grad fn x 40 calls)",
    "bound_loop": "gradient bound, 40 grads in one graph",
    "advtrain": "advtrain `pgd` (run_attack)",
    "cleverhans": "CleverHans 4.0.0 `projected_gradient_descent`",
    "cleverhans_tf_function": "CleverHans, whole call in tf.function (not shipped usage)",
    "art": "ART 1.20.1 `ProjectedGradientDescent`",
    "foolbox": "Foolbox 3.3.4 `LinfPGD`",
}


def bench_model(name, model, x, y, reps, tf, np, log):
    """Times every method on all n images, `reps` times.

    Interleaved batch by batch: for each repetition and each batch of 256, every method runs
    on that batch, in an order rotated at every batch. A burst of load from other processes
    then falls on all methods alike instead of on whichever ran during it.
    """
    methods = make_methods(model, tf, np)
    failed = {k: f"{type(v).__name__}: {v}" for k, v in methods.items() if isinstance(v, Exception)}
    runnable = {k: v for k, v in methods.items() if not isinstance(v, Exception)}
    # Warm-up on one batch: traces every compiled function, excluded from timing.
    for k, fn in list(runnable.items()):
        try:
            fn(x[:BATCH], y[:BATCH], 10_000)
        except Exception as e:  # noqa: BLE001
            failed[k] = f"{type(e).__name__}: {e}"
            del runnable[k]
            log(f"  {k} failed: {failed[k]}")
    order = list(runnable)
    n, batches = len(x), range(0, len(x), BATCH)
    wall = {k: [0.0] * reps for k in order}
    cpu = {k: [0.0] * reps for k in order}
    adv = {k: [np.empty_like(x) for _ in range(reps)] for k in order}
    loads = []
    turn = 0
    for rep in range(reps):
        for b, lo in enumerate(batches):
            xb, yb = x[lo : lo + BATCH], y[lo : lo + BATCH]
            rot = turn % len(order)
            turn += 1
            for k in order[rot:] + order[:rot]:
                loads.append(_load()[0])
                t0, c0 = time.perf_counter(), time.process_time()
                out = runnable[k](xb, yb, rep * 1000 + b)
                wall[k][rep] += time.perf_counter() - t0
                cpu[k][rep] += time.process_time() - c0
                if out is None:
                    adv[k] = None
                else:
                    adv[k][rep][lo : lo + BATCH] = np.asarray(out, np.float32)
        log(
            f"  rep {rep}: "
            + ", ".join(f"{k} {n / wall[k][rep]:.1f}" for k in order)
            + f" img/s; load {_load()}"
        )
    accs, dist = {}, {}
    for k in order:
        if adv[k] is None:
            continue
        accs[k], dist[k] = [], 0.0
        for a in adv[k]:
            pred = np.concatenate(
                [
                    np.argmax(model(a[lo : lo + 1024], training=False), -1)
                    for lo in range(0, n, 1024)
                ]
            )
            accs[k].append(float(np.mean(pred == y)))
            dist[k] = max(dist[k], float(np.abs(a - x).max()))
            if a.min() < 0.0 or a.max() > 1.0:
                failed[k + "_range"] = f"output outside [0, 1]: [{a.min()}, {a.max()}]"
        log(f"  {k}: robust accuracy per rep {accs[k]}, max linf distance {dist[k]:.6f}")
    bound_med = statistics.median(n / t for t in wall["bound"])
    rows = {}
    for k in order:
        ips = [n / t for t in wall[k]]
        rows[k] = {
            "label": LABELS[k],
            "images_per_s": {
                "median": statistics.median(ips),
                "min": min(ips),
                "max": max(ips),
                "all": ips,
            },
            "fraction_of_bound": statistics.median(ips) / bound_med,
            "fraction_of_bound_per_rep": [tb / t for t, tb in zip(wall[k], wall["bound"])],
            "cpu_seconds": cpu[k],
            "robust_acc": {"median": statistics.median(accs[k]), "all": accs[k]}
            if k in accs
            else None,
            "max_linf": dist.get(k),
        }
    clean = float(np.mean(np.argmax(model(x, training=False), -1) == y))
    return {
        "model": name,
        "n": n,
        "clean_acc": clean,
        "rows": rows,
        "failed": failed,
        "load_during": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
    }


def table(result) -> str:
    n = result["n"]
    lines = [
        (
            f"**{result['model']}** (n = {n}, clean accuracy {result['clean_acc']:.4f}, "
            f"{result.get('reps', '?')} reps, load average during the run "
            f"{result['load_during']['min']}-{result['load_during']['max']})"
        ),
        "",
        (
            "| method | images/s median (min-max) | fraction of bound | robust acc "
            "| CPU s per 1,000 images, median | fraction of bound by CPU time |"
        ),
        "|---|---|---|---|---|---|",
    ]
    bound_cpu = statistics.median(result["rows"]["bound"]["cpu_seconds"])
    for k, r in result["rows"].items():
        ips = r["images_per_s"]
        acc = f"{r['robust_acc']['median']:.4f}" if r["robust_acc"] else "-"
        cpu = statistics.median(r["cpu_seconds"])
        lines.append(
            f"| {r['label']} | {ips['median']:.1f} ({ips['min']:.1f}-{ips['max']:.1f}) | "
            f"{r['fraction_of_bound']:.3f} | {acc} | {cpu * 1000 / n:.1f} | {bound_cpu / cpu:.3f} |"
        )
    for k, why in result["failed"].items():
        lines.append(
            f"| {LABELS.get(k, k)} | failed: {why.splitlines()[0][:120]} | - | - | - | - |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="256 images, quickly trained models (smoke run)"
    )
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help=f"interleaved repetitions, >= 3 (default per model: {REPS})",
    )
    p.add_argument(
        "--n", type=int, default=None, help="test images (default 1024 = 4 full batches; quick 256)"
    )
    p.add_argument(
        "--threads", type=int, default=2, help="TF intra- and inter-op threads, for every library"
    )
    p.add_argument("--models", default="cnn,madry")
    p.add_argument("--out", default=str(RESULTS / "attacks.json"))
    p.add_argument(
        "--table", metavar="JSON", help="only print the tables of an earlier results file"
    )
    args = p.parse_args(argv)
    if args.table:
        for res in json.loads(Path(args.table).read_text())["models"].values():
            print(table(res) + "\n")
        return 0
    n = args.n or (BATCH if args.quick else 4 * BATCH)
    if args.reps is not None and args.reps < 3:
        p.error(f"--reps must be >= 3 (a median and a spread need three). Received: {args.reps}")
    if n % BATCH:
        p.error(
            f"--n must be a multiple of {BATCH} (full batches for every library). Received: {n}"
        )

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    # Seeded once: CleverHans and Foolbox draw their random starts from TF's global generator.
    # Never reseeded between calls: after tf.random.set_seed the next call of CleverHans' PGD in a
    # tf.function ran 2-3x slower (measured), which would bias the timings.
    tf.random.set_seed(0)
    import keras

    from advtrain.data import load_data

    data = load_data()
    x, y = np.array(data.x_test[:n]), np.array(data.y_test[:n])
    versions = {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
    }
    for mod in ("art", "cleverhans", "foolbox", "eagerpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            versions[mod] = f"unavailable: {e}"
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    out = {
        "command": "python -m benchmarks.attacks" + (" --quick" if args.quick else ""),
        "setup": {
            "attack": "PGD-40 linf",
            "eps": EPS,
            "step_size": STEP,
            "steps": STEPS,
            "batch": BATCH,
            "n": n,
            "random_start": True,
            "labels": "true labels",
            "threads": args.threads,
        },
        "machine": {"cpus": os.cpu_count(), "cpu": cpu, "load_start": _load()},
        "versions": versions,
        "models": {},
    }
    # A run of a subset of models (--models cnn) replaces only those entries of an earlier file.
    previous = Path(args.out)
    if previous.is_file():
        try:
            kept = json.loads(previous.read_text()).get("models", {})
            out["models"].update({k: v for k, v in kept.items() if k not in args.models.split(",")})
        except (OSError, ValueError):
            pass
    for name in args.models.split(","):
        model, meta = get_model(name, args.quick, log)
        reps = args.reps or REPS.get(name, 3)
        log(f"{name}: benchmarking on {n} images, {reps} reps")
        res = bench_model(name, model, x, y, reps, tf, np, log)
        res["reps"] = reps
        res["training"] = meta
        res["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        out["models"][name] = res
        print(table(res) + "\n", flush=True)
    out["machine"]["load_end"] = _load()
    write_json(Path(args.out), out)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
