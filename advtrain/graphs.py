"""The compiled-graph cache the attacks share: one `tf.function` per model and static options.

Tensors (eps, steps, queries, seeds) are arguments of the cached graph, so sweeping them never
retraces; Python-level options that change the graph (norm, loss, targeted) are part of the key.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import tensorflow as tf

__all__ = ["cached", "compiled"]

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(model, key: tuple, build: Callable[[], Callable]) -> Callable:
    """The cached `tf.function(build())` of `model` under `key`, built on first use.

    The cache holds models weakly: a model that is garbage-collected takes its graphs with it.
    """
    try:
        per_model = _COMPILED.setdefault(model, {})
    except TypeError:  # a plain function as model: some callables cannot be weakly referenced
        per_model = {}
    if key not in per_model:
        per_model[key] = tf.function(build(), reduce_retracing=True)
    return per_model[key]


def cached(model) -> dict[tuple, Callable]:
    """The graphs built so far for `model`, by key (to inspect, e.g. their tracing counts)."""
    return dict(_COMPILED.get(model, {}))
