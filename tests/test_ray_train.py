"""Ray Train on a real local cluster: sharding and gradient arithmetic across workers (a worker
killed mid-search, and its resume from checkpoint: tests/test_tune.py's worker killer)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from advtrain import training
from advtrain.config import TrainConfig
from advtrain.data import shard
from advtrain.models import build_model, load_model

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ray = pytest.importorskip("ray")


class _RecordReports:
    """A Train V2 callback that appends every rank's metrics of every report to a JSON-lines file.

    Only rank 0's metrics reach `Result`; the controller sees all ranks.
    """

    def __new__(cls, path):
        from ray.train.v2.api.callback import UserCallback

        class Recorder(UserCallback):
            def __init__(self, path):
                self.path = str(path)

            def after_report(self, run_context, metrics, checkpoint):
                with open(self.path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")

        return Recorder(path)


@pytest.fixture(scope="module")
def ray_client(ray_cluster):
    ray.init(address=ray_cluster.address, logging_level="ERROR", log_to_driver=False)
    yield ray_cluster
    ray.shutdown()


def _trainer(
    cfg,
    tmp_path,
    name,
    workers=2,
    callbacks=None,
    max_failures=0,
    placement_strategy="PACK",
    steps_per_call=None,
):
    from workflows.train import build_trainer

    return build_trainer(
        cfg,
        workers=workers,
        storage_path=str(tmp_path),
        name=name,
        callbacks=callbacks,
        max_failures=max_failures,
        placement_strategy=placement_strategy,
        steps_per_call=steps_per_call,
    )


def test_two_nodes_spread_workers_shards_are_disjoint_covering_and_reported(ray_client, tmp_path):
    from workflows.train import read_final

    assert len([n for n in ray.nodes() if n["Alive"]]) >= 2, (
        "the test cluster has a head and a second node"
    )
    cfg = TrainConfig(
        model="mlp",
        method="pgd",
        eps=0.1,
        steps=2,
        epochs=1,
        batch_size=64,
        train_size=2048,
        probe_size=64,
        seed=3,
    )
    log = tmp_path / "reports.jsonl"
    # One worker per node (STRICT_SPREAD), storage on a path both nodes share (the same disk here).
    result = _trainer(
        cfg,
        tmp_path / "shared",
        "shards",
        callbacks=[_RecordReports(log)],
        placement_strategy="STRICT_SPREAD",
    ).fit()
    assert result.error is None
    reports = [json.loads(line) for line in log.read_text().splitlines()]
    first = reports[0]
    assert [m["rank"] for m in first] == [0, 1]
    assert len({m["node_id"] for m in first}) == 2, "both workers ran on the same node"
    expected = [shard(2048, r, 2, seed=3) for r in (0, 1)]
    assert not set(expected[0]) & set(expected[1])
    assert sorted(np.concatenate(expected)) == list(range(2048))
    from workflows.train import _digest

    assert [m["shard_digest"] for m in first] == [_digest(e) for e in expected]
    assert all(m["global_batch"] == 128 and m["world_size"] == 2 for m in first)
    model_path, history, summary = read_final(result)
    assert len(history) == 1 and summary["epochs_run"] == 1
    assert load_model(model_path).output_shape == (None, 10)


@pytest.mark.parametrize("method", ["clean", "crown-ibp"])
def test_one_step_two_workers_equals_one_process_double_batch(ray_client, tmp_path, method):
    from workflows.train import read_final

    b = 64
    # SGD (not Adam, whose first step is scale-free) so a gradient scaled twice would show.
    # crown-ibp halfway up a 2-step eps ramp: kappa and beta at 0.75 and 0.5, so the natural loss,
    # the IBP bound and the CROWN-IBP bound all enter the gradient.
    certified = {"eps": 0.1, "eps_ramp_epochs": 2} if method == "crown-ibp" else {}
    cfg = TrainConfig(
        model="cnn",
        method=method,
        epochs=1,
        batch_size=b,
        train_size=2 * b,
        optimizer="sgd",
        learning_rate=0.5,
        schedule="constant",
        probe_size=32,
        seed=5,
        **certified,
    )
    result = _trainer(cfg, tmp_path, f"equiv_{method}").fit()
    assert result.error is None
    model_path, _, _ = read_final(result)
    distributed = load_model(model_path).get_weights()
    single, _, _ = training.fit(cfg.replace(batch_size=2 * b))
    moved = 0.0
    init = build_model("cnn", seed=5).get_weights()
    for wd, ws, w0 in zip(distributed, single.get_weights(), init):
        np.testing.assert_allclose(wd, ws, atol=1e-5, rtol=0)
        moved = max(moved, float(np.abs(ws - w0).max()))
    assert moved > 1e-3, "the step must change the weights for the comparison to mean anything"


def _global_batches(cfg, world):
    """The global batches a `world`-worker run trains on, step by step: every rank's batch of
    that step (`workflows.train.shard_datasets`, epoch 0), concatenated in rank order.

    Call it after building the model: `build_model(seed=...)` sets TensorFlow's global seed,
    which the shuffle's seed is combined with, as it is in a worker.
    """
    import tensorflow as tf

    from workflows.train import shard_datasets

    per_rank = []
    for rank in range(world):
        _, dataset_for, steps, _ = shard_datasets(cfg, tf.distribute.get_strategy(), rank, world)
        per_rank.append([(x.numpy(), y.numpy()) for x, y in dataset_for(0)])
        assert len(per_rank[-1]) == steps
    xs = np.stack([np.concatenate([batches[s][0] for batches in per_rank]) for s in range(steps)])
    ys = np.stack([np.concatenate([batches[s][1] for batches in per_rank]) for s in range(steps)])
    return xs, ys


@pytest.mark.parametrize("workers", [1, 2])
def test_steps_per_call_workers_match_one_process_over_the_same_global_batches(
    ray_client, tmp_path, workers
):
    import tensorflow as tf

    from workflows.train import read_final

    # 3 steps per worker, 2 per compiled call: one full call and the remainder. Clean training
    # (PGD's random start is seeded by rank and replica, so only the gradient aggregation is
    # compared); SGD with momentum, so a gradient scaled, dropped or applied twice would show.
    # With 1 worker the run uses the default strategy, with 2 MultiWorkerMirroredStrategy.
    b, steps = 32, 3
    cfg = TrainConfig(
        model="cnn",
        method="clean",
        epochs=1,
        batch_size=b,
        train_size=workers * steps * b,
        optimizer="sgd",
        learning_rate=0.1,
        schedule="constant",
        probe_size=32,
        seed=5,
    )
    result = _trainer(
        cfg, tmp_path, f"steps_per_call_{workers}", workers=workers, steps_per_call=2
    ).fit()
    assert result.error is None
    model_path, _, _ = read_final(result)
    distributed = load_model(model_path).get_weights()

    def one_process(order):
        run = training.AdversarialTraining(
            cfg.replace(batch_size=workers * b), steps_per_epoch=steps
        )
        xs, ys = _global_batches(cfg, workers)
        run.train_epoch(tf.data.Dataset.from_tensor_slices((xs[order], ys[order])))
        return run.model.get_weights()

    single = one_process([0, 1, 2])
    init = build_model("cnn", seed=5).get_weights()
    for wd, ws in zip(distributed, single):
        np.testing.assert_allclose(wd, ws, atol=1e-5, rtol=0)
    moved = max(float(np.abs(ws - w0).max()) for ws, w0 in zip(single, init))
    assert moved > 1e-3, "the steps must change the weights for the comparison to mean anything"
    # The comparison sees which examples each step used: the same batches in another order differ.
    reordered = one_process([2, 1, 0])
    assert max(float(np.abs(wr - wd).max()) for wr, wd in zip(reordered, distributed)) > 1e-4
