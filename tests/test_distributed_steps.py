"""The worker set-up of `workflows.train` (strategy, input pipeline) and its argument checks,
without a Ray cluster. The Ray Train equivalences are in tests/test_ray_train.py."""

from __future__ import annotations

import numpy as np
import pytest

from advtrain import training
from advtrain.config import TrainConfig


def test_make_strategy_one_worker_auto_is_the_default_strategy():
    import tensorflow as tf

    from workflows.train import make_strategy

    assert make_strategy(1) is tf.distribute.get_strategy()


@pytest.mark.parametrize(
    "kwargs, received",
    [
        ({"strategy": "nccl"}, "strategy='nccl'"),
        ({"communication": "grpc"}, "communication='grpc'"),
        ({"bytes_per_pack": -1}, "bytes_per_pack=-1"),
    ],
)
def test_make_strategy_bad_argument_raises(kwargs, received):
    from workflows.train import make_strategy

    with pytest.raises(ValueError, match=f"Received: {received}"):
        make_strategy(2, **kwargs)


def test_build_trainer_zero_steps_per_call_raises(tmp_path):
    from workflows.train import build_trainer

    with pytest.raises(ValueError, match="Received: steps_per_call=0"):
        build_trainer(
            TrainConfig(), workers=1, storage_path=str(tmp_path), name="x", steps_per_call=0
        )


def test_shard_datasets_plain_pipeline_gives_the_batches_of_the_distributed_one():
    import tensorflow as tf

    from workflows.train import shard_datasets

    cfg = TrainConfig(batch_size=32, train_size=256, seed=2)
    strategy = tf.distribute.get_strategy()
    _, plain_for, steps, _ = shard_datasets(cfg, strategy, 1, 2)
    _, distributed_for, _, _ = shard_datasets(cfg, strategy, 1, 2, autotune=True, distributed=True)
    assert steps == 4
    plain, distributed = list(plain_for(3)), list(distributed_for(3))
    assert len(plain) == len(distributed) == steps
    for (xp, yp), (xd, yd) in zip(plain, distributed):
        np.testing.assert_array_equal(xp, xd)
        np.testing.assert_array_equal(yp, yd)
    assert plain_for(0).options().autotune.enabled is False


def test_without_autotune_turns_autotuning_off_and_keeps_the_elements():
    import tensorflow as tf

    ds = tf.data.Dataset.range(5).prefetch(tf.data.AUTOTUNE)
    quiet = training.without_autotune(ds)
    assert quiet.options().autotune.enabled is False
    assert list(quiet.as_numpy_iterator()) == [0, 1, 2, 3, 4]
