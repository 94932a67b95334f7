"""Your model and your data: import-path and `.keras` models, .npz and file datasets, any H x W x C.

The data is generated here: 16x16 colour images of 4 classes (each class lights one quadrant,
under noise), so a small model learns it in an epoch. The user's models live in a module written
beside the run file, found from the working folder as the README tells users.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from advtrain.data import DataError, load_data
from advtrain.models import ModelError, load_model, make_model, save_model
from workflows.cli import main

SHAPE = (16, 16, 3)
CLASSES = 4
MODULE = "advtrain_user_models"
USER_MODELS = """
import keras


def small_cnn(input_shape, num_classes):
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    # A final softmax, as most Keras classifiers end: advtrain trains and attacks its logits.
    return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))


def mnist_mlp():
    return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), \
keras.layers.Dense(10)])


def wrong_classes(input_shape, num_classes):
    return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(), \
keras.layers.Dense(num_classes + 3)])


def probabilities(input_shape, num_classes):
    inputs = keras.Input(input_shape)
    x = keras.layers.Dense(num_classes)(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, keras.layers.Lambda(lambda t: keras.ops.softmax(t))(x))


def not_a_model():
    return 3
"""


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    x = rng.integers(0, 90, (n, *SHAPE)).astype(np.uint8)
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, r * 8 : r * 8 + 8, q * 8 : q * 8 + 8, c % 3] += 150
    return x, y.astype(np.int64)


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """A user's project folder: the model module, an .npz and the run file."""
    d = tmp_path_factory.mktemp("project")
    (d / f"{MODULE}.py").write_text(USER_MODELS)
    x_train, y_train = make_images(384, 0)
    x_test, y_test = make_images(64, 1)
    np.savez(d / "shapes.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    (d / "run.yaml").write_text(
        textwrap.dedent(f"""
        train: {{data: shapes.npz, model: "{MODULE}:small_cnn", method: pgd, eps: 0.03, \
steps: 2, epochs: 2,
                batch_size: 32, val_size: 64, probe_size: 32, learning_rate: 0.01, \
schedule: constant}}
        eval: {{norm: linf, eps: [0.03], suite: quick, n: 32, batch_size: 32}}
        search: {{samples: 1, scheduler: fifo, space: {{mix: {{grid: [0.5, 1.0]}}}}}}
        """)
    )
    return d


@pytest.fixture()
def in_project(user_dir, monkeypatch):
    monkeypatch.chdir(user_dir)
    return user_dir


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


# ----------------------------------------------------------------------------- models


def test_import_path_model_is_built_for_the_data_with_its_softmax_removed(in_project):
    model, notes = make_model(f"{MODULE}:small_cnn", input_shape=SHAPE, num_classes=CLASSES, seed=0)
    assert model.input_shape == (None, *SHAPE) and model.output_shape == (None, CLASSES)
    assert len(notes) == 1 and notes[0].startswith("the final softmax (layer 'dense")
    assert notes[0].endswith("was removed; training and attacks use its logits")
    z = np.asarray(model(np.random.default_rng(0).uniform(size=(4, *SHAPE)).astype("float32")))
    assert not np.allclose(z.sum(axis=1), 1.0)  # logits, not probabilities


def test_keras_file_model_starts_from_its_weights(in_project, tmp_path):
    model, _ = make_model(f"{MODULE}:small_cnn", input_shape=SHAPE, num_classes=CLASSES, seed=3)
    path = tmp_path / "pretrained.keras"
    save_model(model, path)
    again, notes = make_model(str(path), input_shape=SHAPE, num_classes=CLASSES, seed=0)
    for a, b in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert notes == []


@pytest.mark.parametrize(
    "model, message",
    [
        (
            f"{MODULE}:mnist_mlp",
            (
                r"model 'advtrain_user_models:mnist_mlp' expects inputs \(28, 28, 1\) but the "
                r"data's images are \(16, 16, 3\)"
            ),
        ),
        (
            f"{MODULE}:wrong_classes",
            r"outputs \(None, 7\) but the data has 4 classes: expected \(None, 4\) logits",
        ),
        (
            f"{MODULE}:probabilities",
            (
                r"outputs probabilities \(rows summing to 1\) and its last layer is not a "
                r"softmax that can be removed"
            ),
        ),
        (f"{MODULE}:not_a_model", r"returned int, expected a keras.Model"),
        (f"{MODULE}:missing", r"advtrain_user_models has no function 'missing'"),
        ("no_such_module:build", r"no module named 'no_such_module'"),
        ("mnist.keras", r"expects inputs \(28, 28, 1\) but the data's images are \(16, 16, 3\)"),
    ],
)
def test_model_that_does_not_fit_the_data_exits_2_with_one_line_and_writes_nothing(
    model, message, in_project, tmp_path, capsys
):
    import re

    from advtrain.models import build_model

    if model.endswith(".keras") and not Path(model).exists():
        save_model(build_model("mlp", seed=0), in_project / model)
    out = tmp_path / "run"
    code, err = _run(
        ["train", "--local", "--config", "run.yaml", "--model", model, "--out", out], capsys
    )
    assert code == 2 and len(err) == 1, err
    assert re.search(message, err[0]), err[0]
    assert not out.exists()


def test_make_model_refuses_what_is_no_model_spec():
    with pytest.raises(
        ModelError,
        match=r"`model` must be one of mlp, cnn, madry, resnet, a .keras file or "
        r"package.module:function. Received: model='cnn.h5'",
    ):
        make_model("cnn.h5", input_shape=SHAPE, num_classes=CLASSES)


def test_l2_eps_beyond_the_image_space_diameter_exits_2(in_project, tmp_path, capsys):
    code, err = _run(
        [
            "train",
            "--local",
            "--config",
            "run.yaml",
            "--norm",
            "l2",
            "--eps",
            "30",
            "--out",
            tmp_path / "run",
        ],
        capsys,
    )
    # 16x16x3 images: the l2 diameter of [0, 1]^768 is sqrt(768) = 27.7.
    assert code == 2 and err == [
        (
            "advtrain train: error: `eps` must be in [0.0, 27.71] for 16x16x3 images (l2 diameter "
            "of [0, 1]^768). Received: eps=30.0"
        )
    ], err


def test_tune_refuses_a_search_space_l2_eps_beyond_the_image_space_diameter(
    in_project, tmp_path, capsys
):
    (in_project / "l2.yaml").write_text(
        textwrap.dedent("""
        train: {data: shapes.npz, model: mlp, norm: l2, eps: 1.0, epochs: 1, val_size: 64}
        eval: {norm: l2, eps: [1.0], suite: quick, n: 32}
        search: {samples: 2, space: {eps: {uniform: [0.5, 30.0]}}}
        """)
    )
    code, err = _run(["tune", "--config", "l2.yaml", "--out", tmp_path / "search"], capsys)
    assert code == 2 and err[-1:] == [
        (
            "advtrain tune: error: `search.space.eps` must be in [0.0, 27.71] for 16x16x3 images "
            "(l2 diameter of [0, 1]^768). Received: search.space.eps=30.0"
        )
    ], err
    assert not (tmp_path / "search").exists()


# ----------------------------------------------------------------------------- data


def write_file_dataset(
    root: Path, fmt: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], files: int = 3
) -> Path:
    """A file dataset in `fmt` (parquet, npz or images), each split cut into `files` files."""
    from PIL import Image

    from advtrain.file_dataset import write_file_dataset as write

    if fmt != "images":
        return write(
            root,
            splits,
            fmt=fmt,
            rows_per_file=-(-max(len(x) for x, _ in splits.values()) // files),
        )
    for split, (x, y) in splits.items():
        for i in range(len(x)):
            (root / split / f"class{y[i]}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(root / split / f"class{y[i]}" / f"{i:05d}.png")
    return root


def _sorted_rows(x, y):
    keys = [hash(xi.tobytes()) for xi in x]
    order = np.argsort(keys)
    return x[order], y[order]


@pytest.mark.parametrize("fmt", ["parquet", "npz", "images"])
def test_file_dataset_reads_whole_in_memory_for_every_format(fmt, tmp_path):
    splits = {"train": make_images(60, 0), "val": make_images(12, 1), "test": make_images(16, 2)}
    root = write_file_dataset(tmp_path / fmt, fmt, splits)
    data = load_data(str(root))
    assert data.input_shape == SHAPE and data.num_classes == CLASSES and data.n_train == 60
    for split, (x, y) in splits.items():
        got_x, got_y = data.split(split)
        want_x, want_y = _sorted_rows((x / 255.0).astype(np.float32), y)
        got_x, got_y = _sorted_rows(got_x, got_y)
        np.testing.assert_allclose(got_x, want_x, atol=1e-6)
        np.testing.assert_array_equal(got_y, want_y)
    only_eval = load_data(str(root), include_train=False)
    # What a Ray Data run's driver and workers load: the training split is counted, not read.
    assert len(only_eval.y_train) == 0 and only_eval.n_train == 60 and len(only_eval.y_val) == 12


def test_file_dataset_errors_name_the_folder_and_the_problem(tmp_path):
    splits = {"train": make_images(8, 0), "val": make_images(8, 2), "test": make_images(8, 1)}
    root = write_file_dataset(tmp_path / "noval", "npz", splits, files=1)
    import shutil

    shutil.rmtree(root / "val")
    with pytest.raises(
        DataError, match=r"noval/val: missing \(a file dataset needs train/, val/ and test/ folders"
    ):
        load_data(str(root))
    (root / "val").mkdir()
    with pytest.raises(DataError, match=r"noval/val: empty"):
        load_data(str(root))
    (root / "val" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"noval/val: unexpected file 'notes.txt'"):
        load_data(str(root))
    (root / "val" / "notes.txt").unlink()
    np.savez(root / "val" / "a.npz", x=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match=r"the splits' images differ in shape"):
        load_data(str(root))


def test_data_error_in_a_run_exits_2_naming_the_file(in_project, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(
        bad,
        x_train=np.zeros((10, 16, 16, 3), np.float32) + 2.0,
        y_train=np.zeros(10),
        x_test=np.zeros((4, 16, 16, 3)),
        y_test=np.zeros(4),
    )
    code, err = _run(
        ["train", "--local", "--config", "run.yaml", "--data", bad, "--out", tmp_path / "run"],
        capsys,
    )
    assert (
        code == 2
        and len(err) == 1
        and f"{bad}: x_train values span [2.0, 2.0], expected [0, 1] (or uint8)" in err[0]
    )


def test_every_shipped_config_validates():
    from workflows.spec import load_spec
    from workflows.tune import SearchSpec

    configs = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
    assert {p.name for p in configs} >= {
        "quick.yaml",
        "fashion-mnist-linf-0.1.yaml",
        "cifar10-linf-8.yaml",
    }
    for path in configs:
        spec = load_spec(path)
        SearchSpec.from_dict(spec.search, base=spec.train.to_dict())


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_local_evaluate_and_fine_tune_a_user_model_on_user_data(in_project, tmp_path, capsys):
    run = tmp_path / "run"
    code, err = _run(["train", "--local", "--config", "run.yaml", "--out", run], capsys)
    assert code == 0, err
    rep = json.loads((run / "report.json").read_text())
    assert rep["data"]["input_shape"] == [16, 16, 3] and rep["data"]["num_classes"] == CLASSES
    assert rep["data"]["train"] == 320 and rep["data"]["val"] == 64
    assert "Data: " in (run / "report.md").read_text() and (run / "examples.png").stat().st_size > 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"][-1]["val_clean_acc"] > 0.5  # 4 classes: chance is 0.25
    model = load_model(run / "model.keras")
    assert model.output_shape == (None, CLASSES)

    code, err = _run(
        [
            "evaluate",
            run / "model.keras",
            "--data",
            "shapes.npz",
            "--eps",
            "0.03",
            "--suite",
            "fgsm",
            "--n",
            "32",
            "--out",
            tmp_path / "eval",
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["data"]["input_shape"] == [
        16,
        16,
        3,
    ]

    # Adversarial fine-tuning starts from the saved weights: the first epoch's clean accuracy is
    # already that of the trained model, not chance.
    tuned = tmp_path / "tuned"
    code, err = _run(
        [
            "train",
            "--local",
            "--config",
            "run.yaml",
            "--model",
            run / "model.keras",
            "--epochs",
            "1",
            "--learning-rate",
            "0.0001",
            "--out",
            tuned,
        ],
        capsys,
    )
    assert code == 0, err
    first = json.loads((tuned / "metrics.json").read_text())["epochs"][0]
    assert first["val_clean_acc"] >= metrics["epochs"][-1]["val_clean_acc"] - 0.1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_two_workers_fine_tunes_a_keras_model_on_user_data(
    ray_cluster, in_project, tmp_path, capsys
):
    import ray

    from advtrain.models import build_model

    start = in_project / "start.keras"
    save_model(build_model("cnn", input_shape=SHAPE, num_classes=CLASSES, seed=0), start)
    run = tmp_path / "run"
    try:
        code, err = _run(
            [
                "train",
                "--workers",
                "2",
                "--address",
                ray_cluster.address,
                "--config",
                "run.yaml",
                "--model",
                "start.keras",
                "--epochs",
                "1",
                "--out",
                run,
            ],
            capsys,
        )
    finally:
        ray.shutdown()
    assert code == 0, err[-3:]
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 1
    assert json.loads((run / "report.json").read_text())["data"]["input_shape"] == [16, 16, 3]
    cfg = json.loads((run / "config.json").read_text())["train"]
    assert cfg["model"] == str(start) and cfg["data"] == str(
        in_project / "shapes.npz"
    )  # made absolute where typed


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_streams_a_parquet_dataset_with_ray_data(ray_cluster, in_project, tmp_path, capsys):
    import ray

    splits = {"train": make_images(256, 0), "val": make_images(32, 1), "test": make_images(32, 2)}
    write_file_dataset(in_project / "parquet_data", "parquet", splits, files=4)
    base = [
        "train",
        "--address",
        ray_cluster.address,
        "--config",
        "run.yaml",
        "--data",
        "parquet_data",
        "--epochs",
        "2",
    ]
    try:
        # The fixture cluster has 2 CPUs: 2 one-CPU workers would leave none for Ray Data's reads.
        code, err = _run([*base, "--workers", "2", "--out", tmp_path / "refused"], capsys)
        assert code == 2 and err[-1:] == [
            (
                "advtrain train: error: a file dataset streams through Ray Data, whose tasks need "
                "1 CPU beside the Train workers: 2 worker(s) x {CPU: 1} leave 0 of the "
                "cluster's 2 CPUs. Use fewer workers, or in-memory data (an .npz). Received: "
                "workers=2"
            )
        ], err
        assert not (tmp_path / "refused").exists()
        ray.shutdown()  # the refused run connected this process
        code, err = _run([*base, "--workers", "1", "--out", tmp_path / "run"], capsys)
    finally:
        ray.shutdown()
    assert code == 0, err[-3:]
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1, 2]
    # 256 rows, one worker, batch 32: 8 steps of 32 per epoch, all from the stream.
    assert all(h["examples_per_second"] > 0 for h in history)
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert (
        rep["data"]["train"] == 256
        and rep["data"]["val"] == 32
        and rep["data"]["input_shape"] == [16, 16, 3]
    )


def _error_lines(err: list[str], command: str) -> list[str]:
    """What follows `advtrain <command>: error: ` on each stderr line holding it, terminal escapes
    (Ray's progress bars share the terminal) taken out."""
    import re

    mark = f"advtrain {command}: error: "
    plain = (re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line) for line in err)
    return [line.split(mark, 1)[1] for line in plain if mark in line]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_bad_file_in_a_streamed_split_exits_2_naming_it_in_train_and_tune(
    ray_cluster, in_project, tmp_path, capsys
):
    import ray

    splits = {"train": make_images(64, 0), "val": make_images(32, 1), "test": make_images(32, 2)}
    root = write_file_dataset(in_project / "bad_images", "images", splits)
    # A PNG signature and nothing readable after it, sorted last in its split: counting the
    # split's files finds nothing wrong, only the Ray Data task that decodes it during an epoch.
    bad = max((root / "train").iterdir()) / "zz-bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    common = ["--address", ray_cluster.address, "--config", "run.yaml", "--data", "bad_images"]
    try:
        code, err = _run(
            ["train", *common, "--max-failures", "0", "--epochs", "1", "--out", tmp_path / "run"],
            capsys,
        )
        # Ray forwards its Train controller's log of the worker's failure and Ray Data's progress
        # bars (cursor escapes included) around it; advtrain's own part is one error line.
        errors = _error_lines(err, "train")
        assert code == 2 and len(errors) == 1, err[-5:]
        assert errors[0].startswith(f"{bad}: cannot be read as an image ("), errors
        assert not (tmp_path / "run" / "model.keras").exists()
        ray.shutdown()

        # `tune` takes its data from the run file alone.
        run_file = (in_project / "run.yaml").read_text().replace("shapes.npz", "bad_images")
        (tmp_path / "bad.yaml").write_text(run_file)
        tune_args = ["--address", ray_cluster.address, "--config", tmp_path / "bad.yaml"]
        code, err = _run(["tune", *tune_args, "--out", tmp_path / "search"], capsys)
        errors = _error_lines(err, "tune")
        assert code == 2 and len(errors) == 1, err[-5:]
        assert errors[0].startswith(f"{bad}: cannot be read as an image ("), errors
        # Every trial reads the same split: the first trial's data error stops the search, which
        # keeps its state to resume once the file is fixed.
        assert errors[0].endswith(f"advtrain tune --resume {tmp_path / 'search'}"), errors
        assert not (tmp_path / "search" / "trials.json").exists()
        assert len(list((tmp_path / "search" / "tune").glob("*/error.pkl"))) == 1
        ray.shutdown()

        # The command the line gives, once the file is fixed: both trials run to the end.
        bad.unlink()
        code, err = _run(["tune", "--resume", tmp_path / "search", *tune_args[:2]], capsys)
        assert code == 0, err[-5:]
        trials = json.loads((tmp_path / "search" / "trials.json").read_text())["trials"]
        assert sorted(t["config"]["mix"] for t in trials) == [0.5, 1.0], trials
        assert all(t["test_clean_acc"] is not None for t in trials), trials
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tune_searches_a_user_model_on_user_data(ray_cluster, in_project, tmp_path, capsys):
    import ray

    out = tmp_path / "search"
    try:
        code, err = _run(
            ["tune", "--address", ray_cluster.address, "--config", "run.yaml", "--out", out], capsys
        )
    finally:
        ray.shutdown()
    assert code == 0, err
    trials = json.loads((out / "trials.json").read_text())["trials"]
    assert len(trials) == 2 and all(t["test_clean_acc"] is not None for t in trials)
    assert sorted(t["config"]["mix"] for t in trials) == [0.5, 1.0]
    train = json.loads((out / "spec.json").read_text())["spec"]["train"]
    assert train["model"] == f"{MODULE}:small_cnn" and train["data"] == str(
        in_project / "shapes.npz"
    )
    best = load_model(out / "best_model.keras")
    assert best.input_shape == (None, *SHAPE) and best.output_shape == (None, CLASSES)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_own_model_and_data_commands(tmp_path, monkeypatch, capsys):
    """README's "Your model and your data" commands, typed as written, in order, with README's own
    mymodels.py, an .npz and a Parquet file dataset of generated images. The Ray commands start
    Ray locally, as on a user's machine. Not typed: the CIFAR-10 search (Keras downloads the data
    from the internet, and it is sized for GPUs)."""
    import re
    import shutil

    import ray

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Your model and your data") :]
    commands = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1).splitlines()
    module = re.search(r"```python\n# mymodels.py.*?\n(.*?)```", section, re.DOTALL).group(1)
    (tmp_path / "configs").mkdir()
    shutil.copy(root / "configs" / "quick.yaml", tmp_path / "configs" / "quick.yaml")
    (tmp_path / "mymodels.py").write_text(module)
    x_train, y_train = make_images(3000, 0)
    x_test, y_test = make_images(500, 1)  # quick.yaml evaluates the first 500
    np.savez(
        tmp_path / "mydata.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test
    )
    write_file_dataset(
        tmp_path / "mydata",
        "parquet",
        {
            "train": (x_train[1000:], y_train[1000:]),
            "val": (x_train[:1000], y_train[:1000]),
            "test": (x_test, y_test),
        },
    )
    monkeypatch.chdir(tmp_path)
    typed = [
        c.split("#")[0].split()
        for c in commands
        if c.startswith("advtrain ") and "cifar10" not in c
    ]
    assert [c[1] for c in typed] == ["train", "train", "train", "evaluate"]
    for argv in typed:
        try:
            code, err = _run(argv[1:], capsys)
        finally:
            ray.shutdown()
        assert code == 0, (argv, err[-3:])
    for run in ("runs/mine", "runs/mine-ft", "runs/mine-streamed"):
        rep = json.loads((tmp_path / run / "report.json").read_text())
        assert rep["data"]["input_shape"] == [16, 16, 3] and rep["data"]["val"] == 1000, run
    assert json.loads((tmp_path / "runs/mine-ft/config.json").read_text())["train"]["model"] == str(
        tmp_path / "runs/mine/model.keras"
    )
    assert json.loads((tmp_path / "runs/mine/eval-model/report.json").read_text())["n"] == 100


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_file_dataset_in_a_bucket_reads_in_memory_and_streams_with_ray_data(
    ray_cluster, s3_server, s3_bucket, tmp_path
):
    """A file dataset on the cluster's storage (a real S3-compatible server): `load_data` reads its
    val and test splits through pyarrow.fs, and Ray Data streams the same training rows."""
    import ray

    from workflows import storage, stream

    splits = {"train": make_images(48, 0), "val": make_images(8, 1), "test": make_images(8, 2)}
    local = write_file_dataset(tmp_path / "data", "parquet", splits, files=3)
    uri = f"{s3_bucket}/datasets/shapes"
    assert len(storage.upload(local, uri, skip=())) == 5  # train/ in 3 files, val/ and test/ in 1
    data = load_data(uri, include_train=False)
    assert data.n_train == 48 and data.input_shape == SHAPE and data.num_classes == CLASSES
    np.testing.assert_allclose(data.x_val, load_data(str(local)).x_val)
    # The nodes read the bucket with the credentials and endpoint of their environment, as in
    # production; here the job's runtime environment carries the test server's.
    ray.init(address=ray_cluster.address, runtime_env={"env_vars": dict(s3_server)})
    try:
        rows = stream.read_split(uri, "train").take_all()
    finally:
        ray.shutdown()
    got = np.stack([r["image"] for r in rows])
    want = splits["train"][0]
    assert sorted(hash(x.tobytes()) for x in got) == sorted(hash(x.tobytes()) for x in want)
