"""The `advtrain` command: bad input is one line on stderr, exit status 2, nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from workflows.cli import build_parser, main

TINY = """
train: {model: mlp, method: pgd, eps: 0.1, steps: 2, epochs: 1, batch_size: 128, \
train_size: 1024, probe_size: 64}
eval: {norm: linf, eps: [0.1], suite: quick, n: 64, batch_size: 64}
"""


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.fixture()
def tiny_config(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY)
    return p


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eps", "2"], r"`eps` must be in \[0.0, 1.0\]. Received: eps=2.0"),
        (["--steps", "0"], r"`steps` must be in \[1, 1000\]. Received: steps=0"),
        (["--mix", "1.5"], r"`mix` must be in \[0.0, 1.0\]. Received: mix=1.5"),
        (
            ["--learning-rate", "-1"],
            r"`learning_rate` must be in \(0.0, 10.0\]. Received: learning_rate=-1.0",
        ),
        (
            ["--model", "resnet50"],
            (
                r"`model` must be one of 'mlp', 'cnn', 'madry', 'resnet', a .keras file or "
                r"package.module:function. Received: model='resnet50'"
            ),
        ),
        (["--method", "free"], r"`--method` must be one of .* Received: --method='free'"),
        (
            ["--steps", "three"],
            r"^advtrain train: error: `--steps` must be an integer. Received: --steps='three'$",
        ),
    ],
)
def test_train_bad_override_exits_2_with_one_line_and_writes_nothing(
    extra, message, tiny_config, tmp_path, capsys
):
    out = tmp_path / "run"
    code, err = _run(
        ["train", "--local", "--config", str(tiny_config), "--out", str(out), *extra], capsys
    )
    assert code == 2
    assert len(err) == 1, err
    assert __import__("re").search(message, err[0]), err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("train: {epsilon: 0.3}\n", r"Unknown key\(s\) in `train`: epsilon. Known keys: .*eps"),
        (
            "trian: {eps: 0.3}\n",
            r"Unknown section\(s\) .*: trian. Known sections: train, eval, search, scaling",
        ),
        ("train: [1, 2]\n", r"Section `train` must be a mapping"),
        (
            "eval: {suite: strong}\n",
            r"`suite` must be one of 'fgsm', 'quick', 'standard'. Received: suite='strong'",
        ),
        ("train: {eps: 0.3\n", r"is not valid YAML"),
    ],
)
def test_train_bad_config_file_exits_2(yaml_text, message, tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml_text)
    out = tmp_path / "run"
    code, err = _run(["train", "--local", "--config", str(p), "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1, err
    assert __import__("re").search(message, err[0]), err[0]
    assert not out.exists()


def test_train_missing_config_file_exits_2(tmp_path, capsys):
    code, err = _run(["train", "--local", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and len(err) == 1 and "Cannot read config file" in err[0]


def test_train_existing_nonempty_out_exits_2(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, err = _run(["train", "--local", "--config", str(tiny_config), "--out", str(out)], capsys)
    assert code == 2 and "exists and is not empty" in err[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_evaluate_missing_model_exits_2(tmp_path, capsys):
    code, err = _run(["evaluate", str(tmp_path / "m.keras")], capsys)
    assert code == 2 and len(err) == 1 and "must be an existing .keras file" in err[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["evaluate", "m.keras", "--eps", "0.1,x"],
            (
                r"^advtrain evaluate: error: `--eps` must be comma-separated numbers. Received: "
                r"--eps='0.1,x'$"
            ),
        ),
        (
            ["attack", "m.keras", "--eps", "-1", "--out", "a.npz"],
            r"`eps` must be in \[0.0, 1.0\]. Received: eps=-1.0",
        ),
        (
            ["attack", "m.keras", "--eps", "0.1", "--norm", "l3", "--out", "a.npz"],
            r"`--norm` must be one of 'linf', 'l2'. Received: --norm='l3'",
        ),
        (
            ["attack", "m.keras", "--eps", "0.1", "--method", "cw", "--out", "a.npz"],
            r"`--method` must be one of 'fgsm', 'pgd', 'apgd', 'square'. Received: --method='cw'",
        ),
        (["attack", "m.keras", "--eps", "0.1", "--out", "a.txt"], r"--out must end in .npz"),
        (
            ["evaluate", "m.keras", "--certify", "ibp,deeppoly"],
            (
                r"`certify` must list methods among 'ibp', "
                r"'crown-ibp', 'crown' \(or be 'none'\). Received: "
                r"certify='deeppoly'"
            ),
        ),
        (
            ["certify", "m.keras", "--method", "deeppoly"],
            (
                r"`method` must list methods among .* Received: "
                r"method='deeppoly'"
            ),
        ),
        (
            ["certify", "m.keras", "--method", "none"],
            r"--method needs at least one of ibp, crown-ibp, crown",
        ),
        (
            ["certify", "m.keras", "--eps", "1.5"],
            r"`eps` must be in \[0.0, 1.0\]. Received: eps=1.5",
        ),
        (
            ["certify", "m.keras"],
            r"^advtrain certify: error: model must be an existing .keras file",
        ),
        (
            ["frobnicate"],
            (
                r"^advtrain: error: `command` must be one of 'train', .* Received: "
                r"command='frobnicate'$"
            ),
        ),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _run(argv, capsys)
    assert code == 2 and len(err) == 1, err
    assert __import__("re").search(message, err[0]), err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "space, message",
    [
        (
            "{eps: {uniform: [-0.1, 0.3]}}",
            r"search.space.eps: `eps` must be in \[0.0, 1.0\]. Received: eps=-0.1",
        ),
        (
            "{mix: {choice: [0.5, 1.2]}}",
            r"search.space.mix: `mix` must be in \[0.0, 1.0\]. Received: mix=1.2",
        ),
        (
            "{steps: {choice: [0, 3]}}",
            r"search.space.steps: `steps` must be in \[1, 1000\]. Received: steps=0",
        ),
        ("{epsilon: {choice: [0.1]}}", r"Unknown or unsearchable key 'epsilon' in `search.space`"),
        ("{eps: {choice: []}}", r"`search.space.eps.choice` must be a non-empty list"),
        (
            "{eps: {normal: [0.1, 0.2]}}",
            r"must be one of 'choice', 'grid', 'uniform', 'loguniform', 'randint'",
        ),
        ("{val_size: {choice: [100]}}", r"Unknown or unsearchable key 'val_size'"),
    ],
)
def test_tune_invalid_search_space_fails_before_any_trial(space, message, tmp_path, capsys):
    p = tmp_path / "s.yaml"
    p.write_text(TINY + f"search: {{samples: 2, space: {space}}}\n")
    out = tmp_path / "exp"
    code, err = _run(["tune", "--config", str(p), "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1, err
    assert __import__("re").search(message, err[0]), err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "search, message",
    [
        (
            "{callbacks: [tensorboard, mlfow]}",
            (
                r"^advtrain tune: error: `search.callbacks` must be one of 'tensorboard', "
                r"'mlflow', 'wandb'. Received: search.callbacks='mlfow'$"
            ),
        ),
        (
            "{callbacks: mlflow}",
            (
                r"`search.callbacks` must be a list of tensorboard, mlflow, wandb. "
                r"Received: callbacks='mlflow'"
            ),
        ),
    ],
)
def test_tune_bad_callback_is_one_line_exit_2(search, message, tmp_path, capsys):
    p = tmp_path / "s.yaml"
    p.write_text(TINY + f"search: {search}\n")
    code, err = _run(["tune", "--config", str(p), "--out", str(tmp_path / "exp")], capsys)
    assert code == 2 and len(err) == 1, err
    assert __import__("re").search(message, err[0]), err[0]
    assert not (tmp_path / "exp").exists()


def test_tune_callback_without_its_package_names_the_extra(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed: the missing-package line cannot show")
    p = tmp_path / "s.yaml"
    p.write_text(TINY + "search: {callbacks: [wandb]}\n")
    code, err = _run(["tune", "--config", str(p), "--out", str(tmp_path / "exp")], capsys)
    assert code == 2 and len(err) == 1, err
    assert (
        "`search.callbacks: wandb` needs the wandb package: pip install 'advtrain[wandb]'" in err[0]
    )


def test_tune_mlflow_uri_implies_the_mlflow_callback():
    from workflows.tune import SearchSpec

    args = build_parser().parse_args(
        ["tune", "--config", "c.yaml", "--mlflow-uri", "sqlite:///m.db"]
    )
    search = SearchSpec.from_dict({"callbacks": ["tensorboard"]}, mlflow_uri=args.mlflow_uri)
    assert search.callbacks == ("tensorboard", "mlflow") and search.mlflow_uri == "sqlite:///m.db"
    assert SearchSpec.from_dict(search.to_dict()) == search  # as spec.json stores it, for --resume


def test_tune_optuna_multi_with_asha_is_refused(tmp_path, capsys):
    p = tmp_path / "s.yaml"
    p.write_text(TINY + "search: {searcher: optuna-multi, scheduler: asha}\n")
    code, err = _run(["tune", "--config", str(p), "--out", str(tmp_path / "exp")], capsys)
    assert code == 2 and "Use `scheduler: fifo`" in err[0]


def test_build_parser_accepts_documented_tune_flags():
    args = build_parser().parse_args(
        [
            "tune",
            "--config",
            "c.yaml",
            "--address",
            "auto",
            "--gpu",
            "--samples",
            "4",
            "--workers",
            "2",
            "--storage",
            "s3://b/p",
        ]
    )
    assert (args.command, args.address, args.gpu, args.samples, args.workers) == (
        "tune",
        "auto",
        True,
        4,
        2,
    )


def test_report_corrupt_results_is_unexpected_exit_1_traceback_in_log(tmp_path, capsys):
    (tmp_path / "trials.json").write_text("{")  # our own file, damaged: not the user's input
    code, err = _run(["report", str(tmp_path)], capsys)
    assert code == 1 and len(err) == 1
    assert err[0].startswith("advtrain report: error: unexpected JSONDecodeError: ")
    log = Path(err[0].split("traceback in ")[1].split(";")[0])
    assert log.read_text().startswith("Traceback (most recent call last):")
    assert "JSONDecodeError" in log.read_text()
    log.unlink()


def test_unexpected_error_with_verbose_prints_traceback(tmp_path, capsys):
    (tmp_path / "trials.json").write_text("{")
    code = main(["-v", "report", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback (most recent call last):" in err and "json/decoder.py" in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("advtrain report: error: unexpected JSONDecodeError")
    )


@pytest.mark.parametrize(
    "raised, name",
    [
        (
            lambda: np.reshape(np.arange(3), (2, 2)),
            "ValueError",
        ),  # numpy's ValueError, not a config error
        (lambda: {}["missing"], "KeyError"),  # a bug
    ],
)
def test_error_from_a_library_or_a_bug_exits_1_not_2(raised, name, tmp_path, capsys, monkeypatch):
    from advtrain.models import build_model, save_model
    from workflows import commands

    model = tmp_path / "m.keras"
    save_model(build_model("mlp", seed=0), model)
    monkeypatch.setattr(commands, "evaluate", lambda *a, **k: raised())
    code, err = _run(["evaluate", str(model), "--suite", "fgsm", "--n", "8"], capsys)
    assert code == 1 and err[-1].startswith(f"advtrain evaluate: error: unexpected {name}")
    Path(err[-1].split("traceback in ")[1].split(";")[0]).unlink()


@pytest.mark.slow
def test_train_local_writes_run_folder_and_report(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--local", "--config", str(tiny_config), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "metrics.json",
        "model.keras",
        "report.json",
        "report.md",
        "accuracy_vs_eps.png",
        "examples.png",
    } <= names
    assert not [n for n in names if "tmp" in n]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1 and metrics["epochs_run"] == 1
    assert json.loads((out / "config.json").read_text())["train"]["model"] == "mlp"
    assert "epoch 1:" in err
    # The final evaluation brackets the attacked figure: certified (ibp, crown-ibp) <= robust <=
    # clean.
    entry = json.loads((out / "report.json").read_text())["per_eps"][0]
    assert (
        set(entry["certified"]) == {"ibp", "crown-ibp"}
        and entry["certified_acc"] <= entry["robust_acc"]
    )
    assert f"eps 0.1: {entry['bracket']}" in err and entry["bracket"].startswith("certified ")
    # The epoch's metrics as TensorBoard scalars (`tensorboard --logdir <run folder>`).
    import tensorflow as tf

    scalars = {}
    for events in (out / "tensorboard").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for v in event.summary.value:
                scalars[(v.tag, event.step)] = float(tf.make_ndarray(v.tensor))
    epoch = metrics["epochs"][0]
    for key in ("train_loss", "val_clean_acc", "val_pgd_acc"):
        assert scalars[(key, 1)] == pytest.approx(epoch[key], rel=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pgd", "square"])
def test_attack_writes_npz_within_ball(method, tiny_config, tmp_path, capsys):
    from advtrain.models import build_model, save_model

    model_path = tmp_path / "m.keras"
    save_model(build_model("mlp", seed=0), model_path)
    out = tmp_path / "adv.npz"
    code = main(
        [
            "attack",
            str(model_path),
            "--method",
            method,
            "--eps",
            "0.2",
            "--steps",
            "5",
            "--n",
            "32",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    with np.load(out) as f:
        assert f["x_adv"].shape == (32, 28, 28, 1)
        assert np.abs(f["x_adv"] - f["x"]).max() <= 0.2 + 1e-6
        assert f["x_adv"].min() >= 0.0 and f["x_adv"].max() <= 1.0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_evaluate_quantised_input_model_shows_square_and_upper_bound(tmp_path, capsys):
    """The issue's case: a Keras `Discretization` layer (8 grey levels) in front of a clean CNN.
    Its input gradient is zero, so plain gradient attacks break nothing; APGD through BPDA (the
    identity in the backward pass at that layer) and Square do, and the headline is an upper
    bound."""
    import keras

    from advtrain.config import TrainConfig
    from advtrain.models import save_model
    from advtrain.training import fit

    clean, _, _ = fit(
        TrainConfig(
            model="cnn",
            method="clean",
            epochs=1,
            train_size=4000,
            batch_size=64,
            learning_rate=3e-3,
            probe_size=64,
            probe_steps=1,
            seed=1,
        )
    )
    inp = keras.Input((28, 28, 1))
    levels = keras.layers.Discretization(bin_boundaries=[i / 8 for i in range(1, 8)])(inp)
    model = keras.Model(inp, clean(keras.layers.Rescaling(1 / 7)(levels)))
    path = tmp_path / "quantised.keras"
    save_model(model, path)
    code = main(
        [
            "evaluate",
            str(path),
            "--eps",
            "0.3",
            "--suite",
            "standard",
            "--n",
            "100",
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    entry = report["per_eps"][0]
    broken = entry["broken"]
    # The plain gradient attacks break only what their random start happens to (zero gradients);
    # BPDA and Square, which need no gradient through the layer, break the rest.
    masked_proof = broken["apgd-ce-bpda-100"] + broken["square-5000"]
    assert masked_proof >= 50 and masked_proof > 5 * (sum(broken.values()) - masked_proof)
    assert broken["apgd-ce-bpda-100"] >= 50  # measured: 84 of the 84 left, Square then none
    bpda = [a for a in report["threat_model"]["attacks"] if a.get("bpda")]
    assert [a["name"] for a in bpda] == ["apgd-ce-bpda-100"]
    (layer,) = bpda[0]["bpda_layers"]
    assert layer.startswith("discretization")  # Keras may number it: discretization_1
    assert entry["robust_acc"] <= 0.2 and entry["robust_upper_bound"] is True
    assert entry["robust_display"].startswith("<= ")
    assert (
        f"robust <= {entry['robust_acc']:.3f} (upper bound: " in entry["bracket"]
        and entry["bracket"] in err
    )
    assert (
        f"apgd-ce-bpda-100: {broken['apgd-ce-bpda-100']}, square-5000: {broken['square-5000']}"
        in err
    )
    assert f"square-5000; bpda: layers '{layer}'); n=100" in err  # the threat-model line
    assert "eps 0.3 apgd-ce-bpda-100" in err  # the per-attack progress bar
    assert "WARNING: zero-gradients FAILED" in err


@pytest.mark.timeout(120)  # a hang guard: the point is that it never waits silently
def test_train_address_without_cluster_fails_with_one_line(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _run(
        [
            "train",
            "--workers",
            "2",
            "--address",
            "127.0.0.1:9",
            "--config",
            str(tiny_config),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 1 and len(err) == 1, err
    assert "127.0.0.1:9" in err[0]


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_train_more_workers_than_cluster_cpus_fails_with_one_line(
    ray_cluster, tiny_config, tmp_path, capsys
):
    import ray

    out = tmp_path / "run"
    try:
        code, err = _run(
            [
                "train",
                "--workers",
                "64",
                "--address",
                ray_cluster.address,
                "--config",
                str(tiny_config),
                "--out",
                str(out),
            ],
            capsys,
        )
    finally:
        ray.shutdown()  # the CLI connected this test process; later tests connect their own way
    assert code == 2 and len(err) == 1, err
    assert (
        "64 worker(s) x {CPU: 1} (in all {CPU: 64}) do not fit the cluster's nodes ({CPU: 2};"
        in err[0]
    )
    assert not out.exists()


# -- advtrain certify ---------------------------------------------------------------------------

COMMITTED = (
    Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "time_to_robust_a.keras"
)  # a PGD CNN


def test_evaluate_certify_flag_reaches_the_eval_config(tmp_path, capsys, monkeypatch):
    from workflows import commands

    seen = []
    monkeypatch.setattr(
        commands, "evaluate", lambda model, cfg, out, data, **kw: seen.append(cfg.certify) or 0
    )
    for flag, want in (
        (["--certify", "none"], ()),
        (["--certify", "crown"], ("crown",)),
        ([], ("ibp", "crown-ibp")),
    ):
        assert main(["evaluate", "m.keras", *flag]) == 0
        assert seen.pop() == want


def test_certify_unsupported_layer_refused_in_one_line_exit_2_nothing_written(tmp_path, capsys):
    import keras

    inp = keras.Input((28, 28, 1))
    h = keras.layers.LSTM(4, name="lstm")(keras.layers.Reshape((28, 28))(inp))
    path = tmp_path / "lstm.keras"
    keras.Model(inp, keras.layers.Dense(10)(h)).save(path)
    code, err = _run(["certify", str(path), "--eps", "0.1", "--n", "10"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(
        "advtrain certify: error: lstm.keras: layer 'lstm' (LSTM) cannot be bounded"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["lstm.keras"]


def test_error_after_tensorflow_loads_is_still_one_line_on_stderr(tmp_path):
    """As a user types it, in a fresh process: TensorFlow's C++ start-up lines (printed before
    absl's logging starts, so TF_CPP_MIN_LOG_LEVEL cannot stop them) stay off the terminal; -v
    shows them."""
    import subprocess
    import sys

    import keras

    inp = keras.Input((28, 28, 1))
    h = keras.layers.LSTM(4, name="lstm")(keras.layers.Reshape((28, 28))(inp))
    path = tmp_path / "lstm.keras"
    keras.Model(inp, keras.layers.Dense(10)(h)).save(path)
    unset = ("TF_CPP_MIN_LOG_LEVEL", "ADVTRAIN_VERBOSE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    argv = [
        sys.executable,
        "-m",
        "workflows.cli",
        "certify",
        str(path),
        "--eps",
        "0.1",
        "--n",
        "10",
    ]
    quiet = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2
    assert quiet.stderr.splitlines() == [quiet.stderr.strip()], quiet.stderr  # exactly one line
    assert "layer 'lstm' (LSTM) cannot be bounded" in quiet.stderr
    loud = subprocess.run(
        [*argv[:3], "-v", *argv[3:]], env=env, capture_output=True, text=True, timeout=120
    )
    assert loud.returncode == 2 and quiet.stderr.strip() in loud.stderr
    assert len(loud.stderr.splitlines()) > 1, loud.stderr  # TensorFlow's own lines, with -v


@pytest.mark.slow
def test_certify_committed_model_one_line_per_eps_report_and_attacked_figure(tmp_path, capsys):
    import re
    import shutil

    from advtrain.certification import mask_from_hex

    model = tmp_path / "m.keras"
    shutil.copyfile(COMMITTED, model)
    code, err = _run(
        ["certify", str(model), "--eps", "0.01,0.1", "--n", "100", "--method", "ibp,crown-ibp"],
        capsys,
    )
    assert code == 0, err
    line = (
        r"eps {}: certified \d\.\d{{3}} \((crown-ibp|ibp) \d\.\d{{3}}, "
        r"(crown-ibp|ibp) \d\.\d{{3}}\)  clean \d\.\d{{3}}$"
    )
    assert re.match(line.format("0.01"), err[0]) and re.match(line.format("0.1"), err[1]), err
    # Without --out the report goes beside the model, as evaluate's goes to eval-<model name>/.
    d = json.loads((tmp_path / "certify-m" / "report.json").read_text())
    assert d["schema"] == "advtrain.certify_report/1" and d["methods"] == ["ibp", "crown-ibp"]
    assert (d["n"], d["split"], d["threat_model"]["norm"], d["threat_model"]["eps"]) == (
        100,
        "test",
        "linf",
        [0.01, 0.1],
    )
    assert d["data"]["input_shape"] == [28, 28, 1] and d["seconds"] > 0
    low = d["per_eps"][0]
    masks = {m: mask_from_hex(v["certified_mask"], 100) for m, v in low["methods"].items()}
    assert len(low["methods"]["ibp"]["certified_mask"]) == 26  # 100 bits, 13 bytes
    assert (
        low["methods"]["ibp"]["certified_acc"] == masks["ibp"].mean() > 0.5
    )  # the issue: IBP ~86% at eps 0.01
    np.testing.assert_array_equal(
        mask_from_hex(low["certified_mask"], 100), masks["ibp"] | masks["crown-ibp"]
    )
    assert err[0].startswith(f"eps 0.01: certified {low['certified_acc']:.3f} ")
    # An `advtrain evaluate` report beside the model at the same eps, norm and n: its attacked
    # figure too.
    code, _ = _run(
        ["evaluate", str(model), "--eps", "0.01", "--suite", "fgsm", "--n", "100"], capsys
    )
    assert code == 0
    robust = json.loads((tmp_path / "eval-m" / "report.json").read_text())["per_eps"][0][
        "robust_acc"
    ]
    out = tmp_path / "cert"
    code, err = _run(
        ["certify", str(model), "--eps", "0.01,0.1", "--n", "100", "--out", str(out)], capsys
    )
    assert code == 0, err
    assert err[0].endswith(f"clean {low['clean_acc']:.3f}  robust <= {robust:.3f}")
    assert "robust" not in err[1]  # not evaluated at eps 0.1
    assert json.loads((out / "report.json").read_text())["per_eps"][0]["robust_acc"] == robust
    # A certified figure above the attacked one is a bug: exit 1, never reported.
    rep = json.loads((tmp_path / "eval-m" / "report.json").read_text())
    rep["per_eps"][0]["robust_acc"] = 0.0
    (tmp_path / "eval-m" / "report.json").write_text(json.dumps(rep))
    code, err = _run(
        ["certify", str(model), "--eps", "0.01", "--n", "100", "--out", str(tmp_path / "bad")],
        capsys,
    )
    assert (
        code == 1 and "CertificationError: certified " in err[-1] and "> robust 0.0000" in err[-1]
    )
    assert not (tmp_path / "bad").exists()
    Path(err[-1].split("traceback in ")[1].split(";")[0]).unlink()
    # An evaluation's report.json is never replaced by certify's.
    code, err = _run(
        ["certify", str(model), "--eps", "0.01", "--n", "10", "--out", str(tmp_path / "eval-m")],
        capsys,
    )
    assert code == 2 and len(err) == 1 and "is not a certify report" in err[0]


@pytest.mark.parametrize(
    "name, methods",
    [
        ("mlp", "ibp,crown-ibp,crown"),
        ("cnn", "ibp,crown-ibp,crown"),
        ("madry", "ibp,crown-ibp"),
        ("resnet", "ibp,crown-ibp"),
    ],
)
def test_certify_every_built_in_model(name, methods, tmp_path, capsys):
    """Each built-in model, saved as a user's `.keras` file, certified by the bounds. At eps 0 every
    bound is the exact margin, so each method certifies exactly the clean-correct images. Full
    CROWN takes about a minute an image on madry and resnet at 28x28 (BENCHMARKS.md): its layers
    are covered on small nets in test_bounds, and on madry by benchmarks/bounds.py."""
    from advtrain.certification import mask_from_hex
    from advtrain.data import load_data
    from advtrain.models import build_model

    model = build_model(name, seed=0)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    n = 3
    code, err = _run(
        ["certify", str(path), "--eps", "0,0.001", "--n", str(n), "--method", methods], capsys
    )
    assert code == 0, err
    # (TensorFlow may warn of retracing here: this process has certified other models before.)
    assert [line.split(":")[0] for line in err if line.startswith("eps ")] == [
        "eps 0",
        "eps 0.001",
    ], err
    d = json.loads((tmp_path / f"certify-{name}" / "report.json").read_text())
    x, y = load_data().split("test")
    correct = np.argmax(model.predict(x[:n], verbose=0), -1) == y[:n]
    exact, small = d["per_eps"]
    for method in methods.split(","):
        np.testing.assert_array_equal(
            mask_from_hex(exact["methods"][method]["certified_mask"], n), correct
        )
        proven = mask_from_hex(small["methods"][method]["certified_mask"], n)
        assert not np.any(proven & ~correct), method  # a certified image is classified right
    assert exact["certified_acc"] == exact["clean_acc"] == correct.mean()


@pytest.mark.slow
def test_readme_certify_command_typed_as_written(tmp_path, capsys, monkeypatch):
    """README's `advtrain certify` line, as written, on a committed model in the folder it names."""
    import re
    import shutil

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    usage = re.search(r"## Usage\n\n```bash\n(.*?)```", readme, re.DOTALL).group(1)
    typed = [
        line.split("#")[0].split()
        for line in usage.splitlines()
        if line.startswith("advtrain certify ")
    ]
    assert len(typed) == 1
    argv = typed[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "quick").mkdir(parents=True)
    shutil.copyfile(COMMITTED, tmp_path / argv[2])
    code, err = _run(argv[1:], capsys)
    assert code == 0, err
    eps = argv[argv.index("--eps") + 1].split(",")
    assert [line.split(":")[0] for line in err[:-1]] == [f"eps {e}" for e in eps]
    d = json.loads((tmp_path / "runs" / "quick" / "certify-best_model" / "report.json").read_text())
    assert d["n"] == int(argv[argv.index("--n") + 1]) and d["methods"] == argv[
        argv.index("--method") + 1
    ].split(",")


def test_epoch_line_shows_the_certified_probe_only_when_run():
    from workflows.commands import _epoch_line

    m = {
        "epoch": 3,
        "train_loss": 0.5,
        "train_adv_acc": 0.8,
        "val_clean_acc": 0.97,
        "val_fgsm_acc": 0.9,
        "val_pgd_acc": 0.88,
        "eps": 0.1,
        "examples_per_second": 1234.0,
        "epoch_seconds": 44.4,
    }
    assert "certified" not in _epoch_line(m)
    line = _epoch_line({**m, "val_certified_acc": 0.8125, "val_robust_acc": 0.85})
    assert "val PGD 0.880  val certified 0.812 <= robust 0.850  eps 0.100" in line


# Each typed as a user would; all are refused before TensorFlow (or Ray) is imported, in one line
# that starts with the command's prefix, and nothing is written.
CHEAP_REFUSALS = [
    (["report", "nonexistent"], "advtrain report: error: 'nonexistent' holds no trials.json"),
    (
        ["evaluate", "notes.txt"],
        "advtrain evaluate: error: model must be a .keras file. Received: 'notes.txt'",
    ),
    (
        ["evaluate", "notzip.keras"],
        "advtrain evaluate: error: 'notzip.keras' is not a Keras .keras file: not a zip",
    ),
    (
        ["attack", "notzip.keras", "--eps", "0.3", "--out", "a.npz"],
        "advtrain attack: error: 'notzip.keras' is not a",
    ),
    (
        ["certify", "notzip.keras"],
        "advtrain certify: error: 'notzip.keras' is not a Keras .keras file",
    ),
    (
        ["train", "--local", "--config", "tiny.yaml", "--model", "notzip.keras"],
        "advtrain train: error: '{cwd}/notzip.keras' is not a Keras .keras file: not a zip archive",
    ),
    (
        [
            "train",
            "--local",
            "--config",
            "tiny.yaml",
            "--model",
            "m.keras",
            "--data",
            "three_classes.npz",
            "--train-size",
            "400",
            "--val-size",
            "100",
        ],
        (
            "advtrain train: error: model '{cwd}/m.keras' outputs 10 logits but the data "
            "({cwd}/three_classes.npz) has 3 classes: expected one logit per class"
        ),
    ),
    (
        ["evaluate", "m.keras", "--data", "three_classes.npz", "--overwrite"],
        (
            "advtrain evaluate: error: model 'm.keras' outputs 10 logits but the data "
            "(three_classes.npz) has 3 classes"
        ),
    ),
    (
        ["evaluate", "m.keras", "--n", "-5"],
        "advtrain evaluate: error: `n` must be in [1, inf]. Received: n=-5",
    ),
    (
        ["attack", "m.keras", "--eps", "0.3", "--n", "-5", "--out", "a.npz"],
        "advtrain attack: error: `n` must be in [1, inf]. Received: n=-5",
    ),
    (
        ["evaluate", "m.keras", "--norm", "l3"],
        "advtrain evaluate: error: `--norm` must be one of 'linf', 'l2'. Received: --norm='l3'",
    ),
    (
        ["evaluate", "m.keras", "-v", "-q"],
        "advtrain evaluate: error: -v/--verbose and -q/--quiet contradict",
    ),
    (
        ["evaluate", "m.keras"],
        (
            "advtrain evaluate: error: eval-m/report.json exists (an earlier evaluation): pass "
            "--overwrite to replace it"
        ),
    ),
    (
        ["evalute", "m.keras"],
        "advtrain: error: `command` must be one of 'train', 'tune', 'evaluate',",
    ),
]

_REFUSE_ALL = """
import contextlib, io, json, sys
from workflows.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    out.append([code, err.getvalue().splitlines(), \
sorted(m for m in ("tensorflow", "ray") if m in sys.modules)])
print(json.dumps(out))
"""


def test_bad_inputs_are_one_line_before_tensorflow_loads(tmp_path):
    import subprocess
    import sys

    from advtrain.models import build_model, save_model

    save_model(build_model("mlp", seed=0), tmp_path / "m.keras")  # 10 classes, MNIST's images
    (tmp_path / "notzip.keras").write_text("not a zip\n")
    (tmp_path / "notes.txt").write_text("notes\n")
    (tmp_path / "tiny.yaml").write_text(TINY)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (600, 28, 28, 1), np.uint8), rng.integers(0, 3, 600)
    np.savez(tmp_path / "three_classes.npz", x_train=x, y_train=y, x_test=x[:100], y_test=y[:100])
    (tmp_path / "eval-m").mkdir()
    (tmp_path / "eval-m" / "report.json").write_text('{"kept": true}')
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argvs = [argv for argv, _ in CHEAP_REFUSALS]
    done = subprocess.run(
        [sys.executable, "-c", _REFUSE_ALL, json.dumps(argvs)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for (argv, want), (code, err, loaded) in zip(
        CHEAP_REFUSALS, json.loads(done.stdout.splitlines()[-1])
    ):
        assert code == 2 and len(err) == 1, (argv, err)
        assert err[0].startswith(want.format(cwd=tmp_path)), (argv, err[0])
        assert loaded == [], (argv, f"{loaded} imported before the refusal")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert json.loads((tmp_path / "eval-m" / "report.json").read_text()) == {"kept": True}


def test_version_and_log_flags_before_or_after_the_command(capsys):
    from advtrain import __version__

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"advtrain {__version__}"
    parse = build_parser().parse_args
    assert (
        parse(["evaluate", "m.keras", "-v"]).verbose,
        parse(["-v", "evaluate", "m.keras"]).verbose,
    ) == (True, True)
    assert (
        parse(["evaluate", "m.keras", "-q"]).quiet,
        parse(["-q", "evaluate", "m.keras"]).quiet,
    ) == (True, True)
    assert (parse(["evaluate", "m.keras"]).verbose, parse(["evaluate", "m.keras"]).quiet) == (
        False,
        False,
    )


def _actions(parser):
    import argparse

    for action in parser._actions:  # argparse keeps no public list of them
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {flag}", a, sub) for flag, a, _ in _actions(sub))
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield "/".join(action.option_strings) or action.dest, action, parser


def test_every_flag_has_help_and_its_default_in_help():
    import argparse

    seen = 0
    for flag, action, parser in _actions(build_parser()):
        assert action.help, f"{flag} has no help text"
        text = parser.format_help()
        if action.option_strings and not any(
            action.default is d for d in (None, False, argparse.SUPPRESS)
        ):
            shown = parser._get_formatter()._expand_help(action) if action.help else ""
            assert "default" in shown, f"{flag}: default {action.default!r} not shown in --help"
        if action.choices and action.option_strings:
            assert "{" + ",".join(action.choices) + "}" in text, f"{flag}: choices not in --help"
        seen += 1
    assert seen > 60
