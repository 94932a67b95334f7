"""The `advtrain` command: train, tune, evaluate, certify, attack, report, cluster.

Bad input is one line on stderr and exit status 2, checked before anything is written; anything
unexpected is exit status 1 with its traceback (see `main`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import difflib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from advtrain.config import (
    ATTACK_NAMES,
    LOSSES,
    METHODS,
    NORMS,
    OPTIMIZERS,
    SCHEDULES,
    SPLITS,
    SUITES,
)
from workflows import quiet

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit status 2."""


def _flag(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest


class _Parser(argparse.ArgumentParser):
    """argparse with advtrain's one-line errors, worded as the config checks word theirs:
    the value in backticks, what it must be, then `Received:`."""

    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(message)

    def _check_value(self, action, value):
        if action.choices is not None and value not in action.choices:
            flag = _flag(action)
            close = difflib.get_close_matches(str(value), [str(c) for c in action.choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise argparse.ArgumentError(
                None,
                f"`{flag}` must be one of {', '.join(repr(c) for c in action.choices)}"
                f"{hint}. Received: {flag}={value!r}",
            )

    def _get_value(self, action, arg_string):
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as e:
            flag = _flag(action)
            kind = {int: "an integer", float: "a number"}.get(action.type)
            what = f"must be {kind}" if kind else e.message
            raise argparse.ArgumentError(
                None, f"`{flag}` {what}. Received: {flag}={arg_string!r}"
            ) from None


class _HelpFormatter(argparse.HelpFormatter):
    """Every default in plain sight: appended to the help of each option that has one and does
    not say it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or not action.option_strings
            or any(default is d for d in (None, False, argparse.SUPPRESS))
            or isinstance(action, argparse._VersionAction)
        ):
            return text
        return f"{text} (default: %(default)s)"


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("must be comma-separated numbers") from None
    if not values:
        raise argparse.ArgumentTypeError("must be at least one number")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be in [1, inf]")
    return value


def _add_train_overrides(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "training overrides (on top of --config's `train` section; defaults: docs/config.md)"
    )
    g.add_argument(
        "--model",
        help="mlp, cnn, madry, resnet, a .keras file to fine-tune, or package.module:function",
    )
    g.add_argument(
        "--data",
        help="bundled (MNIST), keras:fashion_mnist, keras:cifar10, an .npz, a folder, or a file "
        "dataset (folder or URI with train/ val/ test/)",
    )
    g.add_argument("--method", type=str.lower, choices=METHODS, help="training method")
    g.add_argument("--eps", type=float, help="training eps, in [0, 1] for linf")
    g.add_argument("--steps", type=int, help="PGD steps in training, in [1, inf]")
    g.add_argument("--step-size", type=float, help="PGD step, in (0, inf]; default 2.5*eps/steps")
    g.add_argument("--norm", type=str.lower, choices=NORMS, help="threat norm of training")
    g.add_argument("--mix", type=float, help="adversarial loss weight, in [0, 1]")
    g.add_argument("--beta", type=float, help="TRADES beta, in [0, inf]")
    g.add_argument("--epochs", type=int, help="passes over the training split, in [1, inf]")
    g.add_argument("--batch-size", type=int, help="examples per step on each worker, in [1, inf]")
    g.add_argument("--learning-rate", type=float, help="peak learning rate, in (0, inf]")
    g.add_argument("--optimizer", type=str.lower, choices=OPTIMIZERS, help="optimizer")
    g.add_argument("--schedule", type=str.lower, choices=SCHEDULES, help="learning-rate schedule")
    g.add_argument(
        "--eps-ramp-epochs", type=int, help="epochs over which eps grows from 0, in [0, inf]"
    )
    g.add_argument("--train-size", type=int, help="train on the first N examples only")
    g.add_argument(
        "--val-size",
        type=int,
        help="validation examples held out of train (data without its own val split)",
    )
    g.add_argument("--seed", type=int, help="seed of initialisation, shuffling and attacks")


def _add_ray_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray")
    g.add_argument(
        "--workers",
        type=int,
        help="Ray Train workers per run (default: the config's scaling.workers)",
    )
    g.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    g.add_argument(
        "--address",
        help="Ray cluster to join ('auto' inside `ray job submit`); default: start Ray locally",
    )
    g.add_argument(
        "--storage",
        default=os.environ.get("ADVTRAIN_STORAGE"),
        help="where the run lives: a path or a pyarrow.fs URI (s3://bucket/prefix, gs://..., "
        "file://...); everything goes under {storage}/{run name}, the --out folder's name (or "
        "<command>-<time>). Default $ADVTRAIN_STORAGE, else the --out folder itself",
    )


def _add_data_options(p: argparse.ArgumentParser, *, batch_size: int) -> None:
    p.add_argument(
        "--n",
        type=int,
        help="the first N examples of the split, in [1, inf] (default: the whole split)",
    )
    p.add_argument("--split", type=str.lower, choices=SPLITS, default="test", help="which split")
    p.add_argument("--batch-size", type=int, default=batch_size, help="examples per compiled call")
    p.add_argument(
        "--data",
        default="bundled",
        help="the images: bundled (MNIST), keras:NAME, an .npz, a folder or a file dataset",
    )


def _log_options(defaults: bool) -> argparse.ArgumentParser:
    """-v/-q, accepted before and after the command: the subcommands' copies default to
    SUPPRESS so that `advtrain -v evaluate M` is not reset by the subcommand's own default."""
    p = argparse.ArgumentParser(add_help=False)
    default = False if defaults else argparse.SUPPRESS
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="everything: TensorFlow's and Ray's own log lines, tracebacks on stderr",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="results and errors only: no progress bars, no Tune status table",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    from advtrain import __version__

    parser = _Parser(
        prog="advtrain",
        description="Distributed adversarial training and robustness evaluation.",
        parents=[_log_options(True)],
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"advtrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = {"parents": [_log_options(False)], "formatter_class": _HelpFormatter}

    _add_train_command(sub, common)
    _add_tune_command(sub, common)
    _add_evaluate_command(sub, common)
    _add_certify_command(sub, common)
    _add_attack_command(sub, common)
    _add_report_command(sub, common)
    _add_cluster_command(sub, common)
    _add_config_command(sub, common)
    return parser


def _add_train_command(sub, common: dict) -> None:
    p = sub.add_parser(
        "train",
        help="adversarial training, in one process (--local) or on Ray Train workers",
        **common,
    )
    p.add_argument(
        "--config", help="run file (YAML); see configs/ and docs/config.md (default: every default)"
    )
    p.add_argument("--local", action="store_true", help="train in this process, without Ray")
    p.add_argument(
        "--out",
        help="run folder (default runs/train-<time>); must not exist or be empty. With "
        "--storage: the local staging folder, and its name is the run's name",
    )
    p.add_argument("--max-failures", type=int, help="worker-group restarts tolerated (Ray)")
    _add_ray_options(p)
    _add_train_overrides(p)


def _add_tune_command(sub, common: dict) -> None:
    p = sub.add_parser(
        "tune", help="Ray Tune search over training eps, PGD steps and mix", **common
    )
    p.add_argument(
        "--config", help="run file (YAML) with a `search` section (default: every default)"
    )
    p.add_argument("--samples", type=int, help="trials (default: the config's search.samples)")
    p.add_argument(
        "--out",
        help="experiment folder (default runs/tune-<time>). With --storage: the local staging "
        "folder, and its name is the search's name",
    )
    p.add_argument(
        "--resume",
        metavar="DIR|URI",
        help="continue an interrupted search: its folder, or its location "
        "in storage ({storage}/{name})",
    )
    p.add_argument(
        "--mlflow-uri",
        metavar="URI",
        help="log every trial to MLflow at this tracking URI (e.g. sqlite:///mlflow.db or "
        "http://host:5000), in the experiment named as the search: params, per-epoch metrics, "
        "final test figures. Implies search.callbacks: [mlflow]; needs pip install "
        "'advtrain[mlflow]'",
    )
    _add_ray_options(p)


def _add_evaluate_command(sub, common: dict) -> None:
    p = sub.add_parser(
        "evaluate", help="robust accuracy of a .keras model under a threat model", **common
    )
    p.add_argument("model", help="a .keras model file or its storage URI (loaded with safe_mode)")
    p.add_argument(
        "--eps", type=_floats, default="0.3", help="comma-separated eps values, e.g. 0.1,0.2,0.3"
    )
    p.add_argument("--norm", type=str.lower, choices=NORMS, default="linf", help="threat norm")
    p.add_argument(
        "--suite",
        type=str.lower,
        choices=SUITES,
        default="standard",
        help="attacks: fgsm (seconds), quick (PGD-20), standard (PGD with restarts, APGD-CE, "
        "APGD-DLR targeted, Square)",
    )
    _add_data_options(p, batch_size=500)
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")
    p.add_argument(
        "--certify",
        help="bound methods run beside the attacks, comma-separated (ibp, crown-ibp, crown), "
        "or none (default: ibp,crown-ibp)",
    )
    p.add_argument(
        "--out",
        help="folder or storage URI for report.json, report.md and plots "
        "(default: eval-<model name> beside the model)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier report in the --out folder"
    )


def _add_certify_command(sub, common: dict) -> None:
    p = sub.add_parser(
        "certify",
        help="certified accuracy of a .keras model: proven by bound propagation (IBP, CROWN)",
        **common,
    )
    p.add_argument("model", help="a .keras model file or its storage URI (loaded with safe_mode)")
    p.add_argument(
        "--eps", type=_floats, default="0.3", help="comma-separated eps values, e.g. 0.1,0.3"
    )
    p.add_argument(
        "--method",
        default="ibp,crown-ibp",
        help="bound methods, comma-separated: ibp, crown-ibp, crown",
    )
    p.add_argument("--norm", type=str.lower, choices=NORMS, default="linf", help="threat norm")
    _add_data_options(p, batch_size=256)
    p.add_argument(
        "--out",
        help="folder or storage URI for report.json (default: certify-<model name> beside the "
        "model)",
    )


def _add_attack_command(sub, common: dict) -> None:
    p = sub.add_parser("attack", help="adversarial examples for given images", **common)
    p.add_argument("model", help="a .keras model file")
    p.add_argument(
        "--method",
        type=str.lower,
        choices=ATTACK_NAMES,
        default="pgd",
        help="the attack (square: gradient-free)",
    )
    p.add_argument(
        "--eps", type=float, required=True, help="perturbation radius, in [0, 1] for linf"
    )
    p.add_argument(
        "--steps", type=int, default=40, help="iterations; for square, queries per image"
    )
    p.add_argument("--step-size", type=float, help="PGD step (default: 2.5*eps/steps)")
    p.add_argument("--norm", type=str.lower, choices=NORMS, default="linf", help="threat norm")
    p.add_argument("--restarts", type=int, default=1, help="random restarts (pgd, apgd)")
    p.add_argument(
        "--loss", type=str.lower, choices=LOSSES, default="ce", help="loss the attack ascends"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random starts")
    p.add_argument(
        "--input",
        help=".npz with x (N, H, W[, C]) in [0, 1] (or uint8) and y; default: --data's --split",
    )
    p.add_argument("--data", default="bundled", help="dataset the images come from without --input")
    p.add_argument(
        "--n", type=int, default=100, help="images from --split when no --input, in [1, inf]"
    )
    p.add_argument(
        "--split",
        type=str.lower,
        choices=SPLITS,
        default="test",
        help="which split, without --input",
    )
    p.add_argument("--out", required=True, help="output .npz (x, y, x_adv, pred, pred_adv)")


def _add_report_command(sub, common: dict) -> None:
    p = sub.add_parser(
        "report",
        help="rebuild the report of a search from its folder or storage location",
        **common,
    )
    p.add_argument("dir", metavar="DIR|URI", help="the search's folder, or its location in storage")


def _add_cluster_command(sub, common: dict) -> None:
    p = sub.add_parser(
        "cluster",
        help="start, stop or inspect a local Ray cluster (127.0.0.1, token auth)",
        description="Local Ray cluster on 127.0.0.1 with token auth. --local is required.",
        **common,
    )
    p.add_argument(
        "action", choices=("up", "down", "status"), help="start, stop, or report on the cluster"
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="a cluster on this machine, on 127.0.0.1 with token auth (required: the only kind "
        "supported)",
    )
    p.add_argument(
        "--root",
        metavar="DIR",
        default="~/.advtrain/cluster",
        help="cluster folder: token, temp dir, cluster.json",
    )
    p.add_argument(
        "--num-cpus",
        metavar="N",
        type=_positive_int,
        default=None,
        help="CPUs of the head node (default: all)",
    )
    p.add_argument(
        "--add-node", action="store_true", help="also start a second 1-CPU node on this machine"
    )


def _add_config_command(sub, common: dict) -> None:
    p = sub.add_parser(
        "config",
        help="the run file's keys: its effective config, JSON schema or reference",
        description="Every key of a run file, from the config classes (docs/config.md). Reads no "
        "data and imports neither TensorFlow nor Ray.",
        **common,
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--show",
        action="store_true",
        help="print the effective, validated config as YAML: every key, defaults filled in (the "
        "default)",
    )
    g.add_argument("--schema", action="store_true", help="print the JSON schema of a run file")
    g.add_argument(
        "--markdown", action="store_true", help="print the key reference (docs/config.md)"
    )
    p.add_argument("--config", help="run file (YAML) for --show (default: every default)")


# ---------------------------------------------------------------------------------------------


def _run_folder(out: str | None, kind: str, storage: str | None):
    """The new run's folder, claimed for this driver: named after --out (refused when taken), or
    `<kind>-<time>` (with `-2`, `-3`, ... when another run took that second's name)."""
    from workflows.storage import FolderTaken, RunFolder

    if out:
        try:
            return RunFolder.create(out, Path(out).name, storage)
        except FolderTaken as e:
            raise UsageError(str(e)) from None
    stamp = f"{kind}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 100):
        try:
            return RunFolder.create(None, stamp if n == 1 else f"{stamp}-{n}", storage)
        except FolderTaken:
            continue
    raise UsageError(f"99 runs named {stamp}[-n] exist already; give --out a name")


def _train_overrides(args) -> dict[str, Any]:
    """The `train` keys given on the command line: the flags named as TrainConfig's fields."""
    import dataclasses

    from advtrain.config import TrainConfig

    names = (f.name for f in dataclasses.fields(TrainConfig))
    return {k: v for k in names if (v := getattr(args, k, None)) is not None}


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

    spec = with_absolute_paths(
        load_spec(args.config, train=_train_overrides(args), scaling=_scaling_overrides(args))
    )
    if args.local and (args.workers not in (None, 1) or args.gpu or args.address):
        raise UsageError("--local runs one process; drop --workers/--gpu/--address or --local")
    folder = _run_folder(args.out, "train", args.storage)
    from workflows import commands

    try:
        return commands.train(spec, folder, local=args.local, address=args.address)
    finally:
        folder.release()


def _cmd_tune(args) -> int:
    if args.resume and (args.config or args.out or args.mlflow_uri):
        raise UsageError(
            "--resume DIR takes the config stored in DIR; drop --config/--out/--mlflow-uri"
        )
    from workflows import commands, tune

    if args.resume:
        return commands.resume(args.resume, address=args.address, storage=args.storage)
    from workflows.spec import load_spec, with_absolute_paths

    spec = with_absolute_paths(load_spec(args.config, scaling=_scaling_overrides(args)))
    search = tune.SearchSpec.from_dict(
        spec.search, base=spec.train.to_dict(), samples=args.samples, mlflow_uri=args.mlflow_uri
    )
    folder = _run_folder(args.out, "tune", args.storage)
    try:
        return commands.tune(spec, search, folder, address=args.address)
    finally:
        folder.release()


def _given(args, *fields: str) -> dict:
    """The flags named as a config's fields that the command line set (an unset flag keeps the
    config's default, e.g. --certify)."""
    return {f: getattr(args, f) for f in fields if getattr(args, f) is not None}


def _cmd_evaluate(args) -> int:
    from advtrain.config import EvalConfig

    cfg = EvalConfig(
        **_given(args, "norm", "eps", "suite", "n", "split", "batch_size", "seed", "certify")
    )
    from workflows import commands

    return commands.evaluate(args.model, cfg, args.out, args.data, overwrite=args.overwrite)


def _cmd_certify(args) -> int:
    from advtrain.config import EvalConfig, check_methods, check_number

    methods = check_methods("method", args.method)
    if not methods:
        raise UsageError(
            f"--method needs at least one of ibp, crown-ibp, crown. Received: {args.method!r}"
        )
    batch_size = check_number("batch_size", args.batch_size, low=1, high=65536, integer=True)
    cfg = EvalConfig(norm=args.norm, eps=args.eps, n=args.n, split=args.split, certify=methods)
    from workflows import commands

    return commands.certify(args.model, cfg, args.out, args.data, batch_size=batch_size)


def _cmd_attack(args) -> int:
    from advtrain.config import AttackConfig

    cfg = AttackConfig(
        name=args.method,
        **_given(args, "eps", "steps", "step_size", "norm", "restarts", "loss", "seed"),
    )
    if not args.out.endswith(".npz"):
        raise UsageError(f"--out must end in .npz. Received: {args.out!r}")
    from workflows import commands

    return commands.attack(
        Path(args.model), cfg, args.input, args.n, args.split, Path(args.out), args.data
    )


def _cmd_report(args) -> int:
    from workflows import commands

    return commands.report(args.dir)


def _cmd_cluster(args) -> int:
    from workflows import commands

    if not args.local:
        raise UsageError("--local is required (only a local cluster is supported for now)")
    return commands.cluster(args.action, args.root, num_cpus=args.num_cpus, add_node=args.add_node)


def _cmd_config(args) -> int:
    from workflows import configdoc

    if args.config and (args.schema or args.markdown):
        raise UsageError(
            "--config goes with --show; --schema and --markdown describe every run file"
        )
    if args.schema:
        import json

        text = json.dumps(configdoc.json_schema(), indent=2) + "\n"
    elif args.markdown:
        text = configdoc.markdown()
    else:
        text = configdoc.show(args.config)
    sys.stdout.write(text)
    return 0


COMMANDS = {
    "train": _cmd_train,
    "tune": _cmd_tune,
    "evaluate": _cmd_evaluate,
    "certify": _cmd_certify,
    "attack": _cmd_attack,
    "report": _cmd_report,
    "cluster": _cmd_cluster,
    "config": _cmd_config,
}


_OWN_CODE = tuple(
    str(Path(__file__).resolve().parents[1] / name) for name in ("advtrain", "workflows")
)


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


def _unexpected(e: BaseException, prefix: str, verbose: bool) -> int:
    """Exit 1 with the traceback: on stderr with -v, else in a log file the one line names."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(e))
    if verbose:
        print(text, file=sys.stderr, end="")
        print(f"{prefix}: error: unexpected {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    fd, path = tempfile.mkstemp(prefix="advtrain-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    first = str(e).splitlines()[0] if str(e) else ""
    print(
        f"{prefix}: error: unexpected {type(e).__name__}: {first} (traceback in {path}; "
        "run with -v to print it)",
        file=sys.stderr,
    )
    return 1


def _command_of(argv: Sequence[str] | None) -> str | None:
    """The subcommand named on the command line, for the error prefix of a line that argparse
    refused before it could say."""
    words = list(sys.argv[1:] if argv is None else argv)
    return next((w for w in words if w in COMMANDS), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `advtrain` console script; returns the exit status.

    Exit status: 0 done; 2 a usage, config or data error (one line on stderr, nothing written);
    1 no cluster, or storage unreachable for longer than the run waits (one line), or anything
    unexpected (an error from Ray, TensorFlow or pyarrow, or a bug), with its traceback;
    130 interrupted. Every error line starts `advtrain <command>: error: `.
    """
    # Ray folds log lines that differ only in numbers into "[repeated Nx across cluster]": that
    # would hide all but one of the workers' placement lines (rank, node, GPU ids).
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    parser = build_parser()
    command = _command_of(argv)
    prefix = f"advtrain {command}" if command else "advtrain"
    verbose = False
    try:
        args = parser.parse_args(argv)
        if args.verbose and args.quiet:
            raise UsageError("-v/--verbose and -q/--quiet contradict each other: give one")
        verbose = args.verbose
        # Before TensorFlow loads (lazily, after the cheap checks): its C++ start-up lines would
        # bury the one line a user needs. Ray workers get the same through connect's setup hook.
        quiet.install(verbose, quiet=args.quiet)
        quiet.tame_ray_notices()
        logging.basicConfig(
            level=logging.INFO if verbose else logging.ERROR if args.quiet else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - any failure of the command becomes one line and a log
        from workflows.connect import ClusterError
        from workflows.outages import StorageUnreachable

        if _is_usage_error(e):
            # Config/data validation errors: one line naming the value and the allowed range.
            print(f"{prefix}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(e, (ClusterError, StorageUnreachable)):
            # No cluster at the address, it refused our token, or the run's storage stopped
            # answering for longer than the run waits: say so in one line.
            print(f"{prefix}: error: {e}", file=sys.stderr)
            return 1
        return _unexpected(e, prefix, verbose)


if __name__ == "__main__":
    sys.exit(main())
