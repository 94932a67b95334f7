"""workflows.storage on a real S3-compatible server (moto's, on 127.0.0.1) and on local folders:
a run folder published through pyarrow.fs, read back, and the commands that take a storage URI
(`advtrain report URI`, `advtrain evaluate URI/model.keras`) working from the bucket alone."""

from __future__ import annotations

import json

import pytest

from workflows import storage
from workflows.cli import main
from workflows.storage import RunFolder

pytest.importorskip("moto")


THREAT = {"norm": "linf", "eps": 0.3, "suite": "quick", "n": 100, "split": "test"}


def _trial(trial_id, val_robust, test_clean, test_robust):
    return {
        "trial_id": trial_id,
        "config": {"eps": 0.3},
        "val_clean_acc": 0.98,
        "val_robust_acc": val_robust,
        "test_clean_acc": test_clean,
        "test_robust_acc": test_robust,
        "test_flags_failed": [],
        "epochs_run": 2,
        "stopped": "no",
        "wall_s": 10.0,
        "rank": 1,
    }


def test_join_parent_basename_keep_a_uri_query():
    uri = "s3://bkt/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert (
        storage.join(uri, "tune-1", "train")
        == "s3://bkt/runs/tune-1/train?endpoint_override=127.0.0.1:9000&scheme=http"
    )
    assert storage.basename(storage.join(uri, "tune-1")) == "tune-1"
    assert storage.parent(storage.join(uri, "tune-1")) == uri
    assert storage.join("/data/runs/", "x") == "/data/runs/x"
    assert (
        storage.is_uri("gs://b/p")
        and storage.is_uri("file:///tmp/x")
        and not storage.is_uri("runs/x")
    )


def test_unknown_scheme_is_one_clear_error():
    with pytest.raises(
        ValueError, match=r"storage 'nosuch://b/p' is not a location pyarrow.fs can open"
    ):
        storage.filesystem("nosuch://b/p")


def test_publish_and_open_round_trip_through_the_bucket(s3_bucket, tmp_path):
    local = tmp_path / "stage"
    (local / "trials" / "t1").mkdir(parents=True)
    (local / "spec.json").write_text('{"a": 1}')
    (local / "trials" / "t1" / "report.json").write_text("{}")
    (local / "tune").mkdir()
    (local / "tune" / "experiment_state.json").write_text("ray's own")  # Ray writes these itself
    folder = RunFolder(local, storage.join(s3_bucket, "advtrain", "tune-x"))
    assert folder.name == "tune-x" and folder.location == f"{s3_bucket}/advtrain/tune-x"
    assert folder.publish() == ["spec.json", "trials/t1/report.json"]
    assert storage.list_files(folder.remote) == ["spec.json", "trials/t1/report.json"]
    back = RunFolder.open(folder.remote)
    assert back.remote == folder.remote and back.local != local
    assert json.loads((back.local / "spec.json").read_text()) == {"a": 1}
    assert (back.local / "trials" / "t1" / "report.json").is_file()


def test_create_refuses_a_location_that_exists(s3_bucket, tmp_path):
    folder = RunFolder.create(None, "run-1", s3_bucket)
    assert folder.remote == f"{s3_bucket}/run-1" and folder.local.is_dir()
    (folder.local / "x.txt").write_text("x")
    folder.publish()
    with pytest.raises(ValueError, match=f"'{s3_bucket}/run-1' already exists in storage"):
        RunFolder.create(None, "run-1", s3_bucket)
    with pytest.raises(ValueError, match="holds no advtrain run"):
        RunFolder.open(f"{s3_bucket}/nothing-here")


def test_local_storage_path_is_written_atomically(tmp_path):
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "a.json").write_text("{}")
    folder = RunFolder(tmp_path / "stage", str(tmp_path / "shared" / "run"))
    assert folder.publish() == ["a.json"]
    assert [p.name for p in (tmp_path / "shared" / "run").iterdir()] == [
        "a.json"
    ]  # no temporary left


def test_report_rebuilds_from_the_bucket_alone(s3_bucket, tmp_path, capsys):
    stage = tmp_path / "stage"
    stage.mkdir()
    rows = [_trial("t1", 0.8, 0.98, 0.85), _trial("t2", 0.7, 0.99, 0.75)]
    (stage / "trials.json").write_text(
        json.dumps({"threat_model": THREAT, "trials": rows, "best_trial": "t1"})
    )
    uri = storage.join(s3_bucket, "tune-done")
    RunFolder(stage, uri).publish()
    assert main(["report", uri]) == 0
    err = capsys.readouterr().err
    assert f"in {uri}" in err
    keys = storage.list_files(uri)
    for name in (
        "results.csv",
        "results.md",
        "report.md",
        "report.html",
        "pareto.png",
        "trials.json",
    ):
        assert name in keys, keys


def test_report_of_an_empty_location_exits_2(s3_bucket, capsys):
    assert main(["report", f"{s3_bucket}/missing"]) == 2
    assert "holds no advtrain run" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_a_model_in_the_bucket_writes_its_report_beside_it(s3_bucket, tmp_path, capsys):
    from advtrain.models import build_model, save_model

    model = tmp_path / "best_model.keras"
    save_model(build_model("mlp", seed=0), model)
    run = storage.join(s3_bucket, "tune-1")
    RunFolder(tmp_path, run).publish()
    code = main(
        [
            "evaluate",
            storage.join(run, "best_model.keras"),
            "--suite",
            "fgsm",
            "--eps",
            "0.1",
            "--n",
            "32",
        ]
    )
    assert code == 0, capsys.readouterr().err
    keys = storage.list_files(run)
    assert "eval-best_model/report.json" in keys and "eval-best_model/report.md" in keys
    assert main(["evaluate", storage.join(run, "missing.keras"), "--suite", "fgsm"]) == 2
    assert "no file at" in capsys.readouterr().err


@pytest.mark.slow
def test_scheduler_stopped_trial_is_evaluated_from_its_checkpoint_in_the_bucket(
    s3_bucket, tmp_path
):
    # Tune's report hands the driver the Train checkpoint's path without its scheme
    # ("bucket/key"): read with the storage's filesystem, not as a local path or a bare URI.
    from types import SimpleNamespace

    from advtrain.models import build_model, save_model
    from workflows import results
    from workflows.spec import load_spec

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_model(build_model("mlp", seed=0), ckpt / "model.keras")
    location = storage.join(s3_bucket, "tune-1", "train", "train_t1", "checkpoint_000000")
    RunFolder(ckpt, location).publish()
    fs, path = storage.filesystem(location)
    assert not storage.is_uri(path)
    spec = load_spec(
        None, eval={"norm": "linf", "eps": (0.1,), "suite": "fgsm", "n": 16, "batch_size": 16}
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.json").write_text(
        json.dumps({"search": {"space": {"eps": {"choice": [0.1]}}, "scheduler": "asha"}})
    )
    stopped = SimpleNamespace(
        metrics={
            "trial_id": "t1",
            "val_robust_acc": 0.5,
            "val_clean_acc": 0.9,
            "epoch": 1,
            "checkpoint_path": path,
        },
        config={"eps": 0.1},
        error=None,
        path="tune/run_trial_t1",
        checkpoint=None,
    )
    rows = results.collect([stopped], run_dir, spec, filesystem=fs)
    assert rows[0]["stopped"] == "asha" and rows[0]["evaluated_by"] == "driver (last checkpoint)"
    assert rows[0]["test_robust_acc"] is not None
    assert (run_dir / "best_model.keras").is_file()


def _race(out, storage_base, name):
    """Two drivers creating the same run folder at the same instant (threads at a barrier)."""
    import threading

    barrier = threading.Barrier(2)
    got: list = [None, None]

    def driver(i):
        barrier.wait()
        try:
            got[i] = RunFolder.create(out, name, storage_base)
        except storage.FolderTaken as e:
            got[i] = e

    threads = [threading.Thread(target=driver, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [g for g in got if isinstance(g, RunFolder)], [
        g for g in got if not isinstance(g, RunFolder)
    ]


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_two_drivers_creating_one_run_folder_at_once_never_both_go_on(where, s3_bucket, tmp_path):
    wins = 0
    for round_ in range(8):
        name = f"run-{round_}"
        if where == "bucket":
            folders, refused = _race(None, s3_bucket, name)
        else:
            folders, refused = _race(str(tmp_path / name), None, name)
        assert len(folders) <= 1, folders  # never two drivers writing one location
        assert all("choose another --out" in str(e) for e in refused), refused
        wins += len(folders)
        for folder in folders:
            # The winner's claim keeps a later driver out for as long as it runs.
            with pytest.raises(storage.FolderTaken):
                RunFolder.create(
                    None if where == "bucket" else str(tmp_path / name),
                    name,
                    s3_bucket if where == "bucket" else None,
                )
            folder.release()
    assert wins >= 4  # a dead heat refuses both; it cannot be the rule


def test_a_run_that_writes_nothing_leaves_no_folder_and_its_name_free(s3_bucket, tmp_path):
    local = RunFolder.create(str(tmp_path / "runs" / "quick"), "quick", None)
    assert [p.name.startswith(storage.CLAIM_PREFIX) for p in local.local.iterdir()] == [True]
    local.release()
    assert list(tmp_path.iterdir()) == []  # runs/ too: it was made for this run
    remote = RunFolder.create(None, "quick", s3_bucket)
    remote.release()
    assert not storage.exists(f"{s3_bucket}/quick")
    again = RunFolder.create(None, "quick", s3_bucket)
    (again.local / "spec.json").write_text("{}")
    assert again.publish() == ["spec.json"]
    again.release()
    assert storage.list_files(again.remote) == ["spec.json"]  # the claim goes, the run stays


def test_default_names_in_the_same_second_get_distinct_folders(s3_bucket, monkeypatch):
    import datetime as dt

    from workflows import cli

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 4, 13, 0, 0)

    monkeypatch.setattr(cli._dt, "datetime", Frozen)
    first = cli._run_folder(None, "tune", s3_bucket)
    second = cli._run_folder(None, "tune", s3_bucket)
    assert (first.name, second.name) == ("tune-20261204-130000", "tune-20261204-130000-2")
    with pytest.raises(cli.UsageError, match="'.*tune-20261204-130000' already exists in storage"):
        cli._run_folder("tune-20261204-130000", "tune", s3_bucket)
    first.release()
    second.release()
