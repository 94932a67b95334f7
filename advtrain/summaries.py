"""TensorBoard event files of a training run: one scalar per epoch metric.

`advtrain train --local` writes them to `<run folder>/tensorboard/`; open them with
`tensorboard --logdir <run folder>` (`pip install 'advtrain[tensorboard]'` for the viewer).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["EpochSummaries"]


class EpochSummaries:
    """Writes each epoch's numeric metrics as TensorBoard scalars at step `epoch`.

    The writer is made at the first epoch, so nothing is written for a run that fails before one.
    Use as `on_epoch` (or from it), then `close()`.

    Args:
        logdir: the event files' folder (created when the first epoch ends).
    """

    def __init__(self, logdir: Path | str) -> None:
        self.logdir = str(logdir)
        self._writer = None

    def __call__(self, metrics: Mapping[str, Any]) -> None:
        import tensorflow as tf
        from tensorflow.core.framework.summary_pb2 import SummaryMetadata

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.logdir)
        # tf.summary.scalar is TensorBoard's (not installed with TensorFlow 2.21): its summary is
        # a float32 scalar tagged for the scalars plugin, which tf.summary.write makes without it.
        scalar = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="scalars"))
        step = int(metrics["epoch"])
        with self._writer.as_default():
            for key, value in metrics.items():
                if (
                    key != "epoch"
                    and isinstance(value, numbers.Real)
                    and not isinstance(value, bool)
                ):
                    tf.summary.write(
                        key, tf.constant(float(value), tf.float32), step=step, metadata=scalar
                    )
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
