"""Model registry: small MNIST classifiers that all output logits (never a softmax)."""

from __future__ import annotations

from typing import Callable

import keras

__all__ = ["MODEL_BUILDERS", "build_model", "load_model", "save_model"]

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def _mlp() -> list:
    return [
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(NUM_CLASSES, name="logits"),
    ]


def _cnn() -> list:
    # Wong et al. 2020 ("Fast is better than free"), MNIST: strided convolutions, no pooling.
    return [
        keras.layers.Conv2D(16, 4, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 4, strides=2, padding="same", activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(100, activation="relu"),
        keras.layers.Dense(NUM_CLASSES, name="logits"),
    ]


def _madry() -> list:
    # Madry et al. 2018, mnist_challenge model.
    return [
        keras.layers.Conv2D(32, 5, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(64, 5, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(1024, activation="relu"),
        keras.layers.Dense(NUM_CLASSES, name="logits"),
    ]


MODEL_BUILDERS: dict[str, Callable[[], list]] = {"mlp": _mlp, "cnn": _cnn, "madry": _madry}


def build_model(name: str, *, seed: int | None = None) -> keras.Model:
    """Builds a registered model for (28, 28, 1) float32 inputs in [0, 1].

    Args:
        name: `"mlp"` (784-128-10), `"cnn"` (Wong et al. 2020) or `"madry"` (Madry et al. 2018).
        seed: seed of the weight initialisation, or `None` to leave Keras' global state alone.

    Returns:
        A built `keras.Sequential` whose output is the 10 class logits.

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    if name not in MODEL_BUILDERS:
        raise ValueError(f"Unknown model {name!r}. Expected one of: {', '.join(MODEL_BUILDERS)}.")
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input(INPUT_SHAPE), *MODEL_BUILDERS[name]()], name=name)


def save_model(model: keras.Model, path) -> None:
    """Saves in the `.keras` format, atomically: a reader never sees a half-written file."""
    from pathlib import Path

    from advtrain.files import write_atomic

    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"Model files use the `.keras` format. Received: path={str(path)!r}")
    write_atomic(path, model.save)


def load_model(path) -> keras.Model:
    """Loads a `.keras` model with safe_mode on: a model file cannot run arbitrary code."""
    from pathlib import Path

    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"Model files use the `.keras` format. Received: path={str(path)!r}")
    if not path.is_file():
        raise ValueError(f"Model file not found: {str(path)!r}")
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except ValueError:
        raise
    except Exception as e:  # keras raises assorted errors on damaged zips
        raise ValueError(f"Cannot load model {str(path)!r}: {e}") from None
