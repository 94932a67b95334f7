"""The `advtrain` command: train, tune, evaluate, certify, attack, report, cluster.

Bad input is one line on stderr and exit status 2, checked before anything is written; anything
unexpected is exit status 1 with its traceback (see `main`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from workflows import quiet

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: {message}")


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one number, got {text!r}")
    return values


def _add_train_overrides(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training overrides (on top of --config's `train` section)")
    g.add_argument("--model", help="mlp, cnn, madry, resnet, a .keras file to fine-tune, or package.module:function")
    g.add_argument("--data", help="bundled (MNIST), keras:fashion_mnist, keras:cifar10, an .npz, a folder, or a file "
                                  "dataset (folder or URI with train/ val/ test/)")
    g.add_argument("--method", help="clean, fgsm, pgd or trades")
    g.add_argument("--eps", type=float, help="training eps in [0, 1]")
    g.add_argument("--steps", type=int, help="PGD steps in training (>= 1)")
    g.add_argument("--step-size", type=float, help="PGD step (> 0); default 2.5*eps/steps")
    g.add_argument("--norm", help="linf or l2")
    g.add_argument("--mix", type=float, help="adversarial loss weight in [0, 1]")
    g.add_argument("--beta", type=float, help="TRADES beta (>= 0)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="per-worker batch")
    g.add_argument("--learning-rate", type=float)
    g.add_argument("--optimizer", help="adam or sgd")
    g.add_argument("--schedule", help="constant, cosine or onecycle")
    g.add_argument("--eps-ramp-epochs", type=int)
    g.add_argument("--train-size", type=int, help="train on the first N examples only")
    g.add_argument("--val-size", type=int, help="validation examples held out of train (data without its own val split)")
    g.add_argument("--seed", type=int)


TRAIN_KEYS = ("model", "data", "method", "eps", "steps", "step_size", "norm", "mix", "beta", "epochs", "batch_size",
              "learning_rate", "optimizer", "schedule", "eps_ramp_epochs", "train_size", "val_size", "seed")


def _add_ray_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray")
    g.add_argument("--workers", type=int, help="Ray Train workers per run (default: the config's scaling.workers)")
    g.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    g.add_argument("--address", help="Ray cluster to join ('auto' inside `ray job submit`); default: start Ray locally")
    g.add_argument("--storage", default=os.environ.get("ADVTRAIN_STORAGE"),
                   help="where the run lives: a path or a pyarrow.fs URI (s3://bucket/prefix, gs://..., file://...); "
                        "everything goes under {storage}/{run name}, the --out folder's name (or <command>-<time>). "
                        "Default $ADVTRAIN_STORAGE, else the --out folder itself")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="advtrain", description="Distributed adversarial training and robustness evaluation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="adversarial training, in one process (--local) or on Ray Train workers")
    p.add_argument("--config", help="run file (YAML); see configs/")
    p.add_argument("--local", action="store_true", help="train in this process, without Ray")
    p.add_argument("--out", help="run folder (default runs/train-<time>); must not exist or be empty. With "
                                 "--storage: the local staging folder, and its name is the run's name")
    p.add_argument("--max-failures", type=int, help="worker-group restarts tolerated (Ray)")
    _add_ray_options(p)
    _add_train_overrides(p)

    p = sub.add_parser("tune", help="Ray Tune search over training eps, PGD steps and mix")
    p.add_argument("--config", help="run file (YAML) with a `search` section")
    p.add_argument("--samples", type=int, help="trials (default: the config's search.samples)")
    p.add_argument("--out", help="experiment folder (default runs/tune-<time>). With --storage: the local staging "
                                 "folder, and its name is the search's name")
    p.add_argument("--resume", metavar="DIR|URI", help="continue an interrupted search: its folder, or its location "
                                                       "in storage ({storage}/{name})")
    _add_ray_options(p)

    p = sub.add_parser("evaluate", help="robust accuracy of a .keras model under a threat model")
    p.add_argument("model", help="a .keras model file or its storage URI (loaded with safe_mode)")
    p.add_argument("--eps", type=_floats, default=(0.3,), help="comma-separated eps values, e.g. 0.1,0.2,0.3")
    p.add_argument("--norm", default="linf")
    p.add_argument("--suite", default="standard", help="fgsm, quick or standard")
    p.add_argument("--n", type=int, help="examples (default: the whole split)")
    p.add_argument("--split", default="test", help="test or val")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="bundled",
                   help="the images: bundled (MNIST), keras:NAME, an .npz, a folder or a file dataset (default: bundled)")
    p.add_argument("--certify", help="bound methods run beside the attacks, comma-separated (ibp, crown-ibp, crown), "
                                     "or none (default: ibp,crown-ibp)")
    p.add_argument("--out", help="folder or storage URI for report.json, report.md and plots (default: beside the model)")

    p = sub.add_parser("certify", help="certified accuracy of a .keras model: proven by bound propagation (IBP, CROWN)")
    p.add_argument("model", help="a .keras model file or its storage URI (loaded with safe_mode)")
    p.add_argument("--eps", type=_floats, default=(0.3,), help="comma-separated eps values, e.g. 0.1,0.3")
    p.add_argument("--method", default="ibp,crown-ibp",
                   help="bound methods, comma-separated: ibp, crown-ibp, crown (default: ibp,crown-ibp)")
    p.add_argument("--norm", default="linf")
    p.add_argument("--n", type=int, help="the first N images (default: the whole split)")
    p.add_argument("--split", default="test", help="test or val")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data", default="bundled",
                   help="the images: bundled (MNIST), keras:NAME, an .npz, a folder or a file dataset (default: bundled)")
    p.add_argument("--out", help="folder or storage URI for report.json (default: certify-<model name> beside the model)")

    p = sub.add_parser("attack", help="adversarial examples for given images")
    p.add_argument("model", help="a .keras model file")
    p.add_argument("--method", default="pgd", help="fgsm, pgd, apgd or square (gradient-free)")
    p.add_argument("--eps", type=float, required=True)
    p.add_argument("--steps", type=int, default=40, help="iterations; for square, queries per image")
    p.add_argument("--step-size", type=float)
    p.add_argument("--norm", default="linf")
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--loss", default="ce", help="ce, margin or dlr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input", help=".npz with x (N, H, W[, C]) in [0, 1] (or uint8) and y; default: --data's --split")
    p.add_argument("--data", default="bundled", help="dataset the images come from without --input (default: bundled)")
    p.add_argument("--n", type=int, default=100, help="images from --split when no --input")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, help="output .npz (x, y, x_adv, pred, pred_adv)")

    p = sub.add_parser("report", help="rebuild the report of a search from its folder or storage location")
    p.add_argument("dir", metavar="DIR|URI")

    p = sub.add_parser("cluster", help="start, stop or inspect a local Ray cluster (127.0.0.1, token auth)",
                       description="Local Ray cluster on 127.0.0.1 with token auth. --local is required.")
    p.add_argument("action", choices=("up", "down", "status"), help="start, stop, or report on the cluster")
    p.add_argument("--local", action="store_true",
                   help="a cluster on this machine, on 127.0.0.1 with token auth (required: the only kind supported)")
    p.add_argument("--root", metavar="DIR", default="~/.advtrain/cluster",
                   help="cluster folder: token, temp dir, cluster.json (default: %(default)s)")
    p.add_argument("--num-cpus", metavar="N", type=_positive_int, default=None, help="CPUs of the head node (default: all)")
    p.add_argument("--add-node", action="store_true", help="also start a second 1-CPU node on this machine")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1. Received: {text!r}")
    return value


# ---------------------------------------------------------------------------------------------


def _run_folder(out: str | None, kind: str, storage: str | None):
    """The new run's folder: named after --out, or `<kind>-<time>`; in storage when given."""
    from workflows.storage import RunFolder

    name = Path(out).name if out else f"{kind}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    try:
        return RunFolder.create(out, name, storage)
    except ValueError as e:
        raise UsageError(f"advtrain {kind}: {e}") from None


def _train_overrides(args) -> dict[str, Any]:
    return {k: getattr(args, k) for k in TRAIN_KEYS if getattr(args, k, None) is not None}


def _scaling_overrides(args) -> dict[str, Any]:
    out = {}
    if args.workers is not None:
        out["workers"] = args.workers
    if args.gpu:
        out["gpu"] = True
    if getattr(args, "max_failures", None) is not None:
        out["max_failures"] = args.max_failures
    return out


def _cmd_train(args) -> int:
    from workflows.spec import load_spec, with_absolute_paths

    spec = with_absolute_paths(load_spec(args.config, train=_train_overrides(args), scaling=_scaling_overrides(args)))
    if args.local and (args.workers not in (None, 1) or args.gpu or args.address):
        raise UsageError("advtrain train: --local runs one process; drop --workers/--gpu/--address or --local")
    folder = _run_folder(args.out, "train", args.storage)
    from workflows import commands

    return commands.train(spec, folder, local=args.local, address=args.address)


def _cmd_tune(args) -> int:
    from workflows import commands, tune

    if args.resume:
        if args.config or args.out:
            raise UsageError("advtrain tune: --resume DIR takes the config stored in DIR; drop --config/--out")
        return commands.resume(args.resume, address=args.address, storage_base=args.storage)
    from workflows.spec import load_spec, with_absolute_paths

    spec = with_absolute_paths(load_spec(args.config, scaling=_scaling_overrides(args)))
    search = tune.SearchSpec.from_dict(spec.search, base=spec.train.to_dict(), samples=args.samples)
    folder = _run_folder(args.out, "tune", args.storage)
    return commands.tune(spec, search, folder, address=args.address, storage_base=args.storage)


def _cmd_evaluate(args) -> int:
    from advtrain.config import EvalConfig

    certify = {} if args.certify is None else {"certify": args.certify}
    cfg = EvalConfig(norm=args.norm, eps=args.eps, suite=args.suite, n=args.n, split=args.split,
                     batch_size=args.batch_size, seed=args.seed, **certify)
    from workflows import commands

    return commands.evaluate(args.model, cfg, args.out, args.data)


def _cmd_certify(args) -> int:
    from advtrain.config import EvalConfig, check_methods, check_number

    methods = check_methods("method", args.method)
    if not methods:
        raise UsageError(f"advtrain certify: --method needs at least one of ibp, crown-ibp, crown. "
                         f"Received: {args.method!r}")
    batch_size = check_number("batch_size", args.batch_size, low=1, high=65536, integer=True)
    cfg = EvalConfig(norm=args.norm, eps=args.eps, n=args.n, split=args.split, certify=methods)
    from workflows import commands

    return commands.certify(args.model, cfg, args.out, args.data, batch_size=batch_size)


def _cmd_attack(args) -> int:
    from advtrain.config import AttackConfig

    cfg = AttackConfig(name=args.method, eps=args.eps, steps=args.steps, step_size=args.step_size, norm=args.norm,
                       restarts=args.restarts, loss=args.loss, seed=args.seed)
    if not args.out.endswith(".npz"):
        raise UsageError(f"advtrain attack: --out must end in .npz. Received: {args.out!r}")
    from workflows import commands

    return commands.attack(Path(args.model), cfg, args.input, args.n, args.split, Path(args.out), args.data)


def _cmd_report(args) -> int:
    from workflows import commands

    return commands.report(args.dir)


def _cmd_cluster(args) -> int:
    from workflows import commands

    if not args.local:
        raise UsageError("advtrain cluster: --local is required (only a local cluster is supported for now)")
    return commands.cluster(args.action, args.root, num_cpus=args.num_cpus, add_node=args.add_node)


COMMANDS = {"train": _cmd_train, "tune": _cmd_tune, "evaluate": _cmd_evaluate, "certify": _cmd_certify,
            "attack": _cmd_attack, "report": _cmd_report, "cluster": _cmd_cluster}


_OWN_CODE = tuple(str(Path(__file__).resolve().parents[1] / name) for name in ("advtrain", "workflows"))


def _is_usage_error(e: BaseException) -> bool:
    """A config, data or argument error: a ValueError or TypeError raised by advtrain's own checks.

    The same types raised inside Ray, TensorFlow, pyarrow or numpy (an `ArrowInvalid` is a
    ValueError, a `RayTaskError` may be one too) are not the user's input being refused: they are
    unexpected, and their traceback must not be hidden behind a one-line usage message.
    """
    if isinstance(e, UsageError):
        return True
    if not isinstance(e, (ValueError, TypeError)) or e.__traceback__ is None:
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.startswith(_OWN_CODE)


def _unexpected(e: BaseException, verbose: bool) -> int:
    """Exit 1 with the traceback: on stderr with -v, else in a log file the one line names."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(e))
    if verbose:
        print(text, file=sys.stderr, end="")
        print(f"advtrain: unexpected error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    fd, path = tempfile.mkstemp(prefix="advtrain-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    first = str(e).splitlines()[0] if str(e) else ""
    print(f"advtrain: unexpected error: {type(e).__name__}: {first} (traceback in {path}; "
          "run with -v to print it)", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `advtrain` console script; returns the exit status.

    Exit status: 0 done; 2 a usage, config or data error (one line on stderr, nothing written);
    1 anything unexpected (an error from Ray, TensorFlow or pyarrow, or a bug), with its traceback;
    130 interrupted.
    """
    # Ray folds log lines that differ only in numbers into "[repeated Nx across cluster]": that
    # would hide all but one of the workers' placement lines (rank, node, GPU ids).
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    parser = build_parser()
    verbose = False
    try:
        args = parser.parse_args(argv)
        verbose = args.verbose
        # Before TensorFlow loads (lazily, after the cheap checks): its C++ start-up lines would
        # bury the one line a user needs. Ray workers get the same through connect's setup hook.
        quiet.install(verbose)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("advtrain: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from workflows.connect import ClusterError

        if isinstance(e, UsageError):
            print(str(e), file=sys.stderr)
            return EXIT_USAGE
        if _is_usage_error(e):
            # Config/data validation errors: one line naming the value and the allowed range.
            print(f"advtrain: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(e, ClusterError):
            # No cluster at the address, or it refused our token: say so in one line.
            print(f"advtrain: error: {e}", file=sys.stderr)
            return 1
        return _unexpected(e, verbose)


if __name__ == "__main__":
    sys.exit(main())
