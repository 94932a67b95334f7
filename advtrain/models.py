"""Models: the built-in classifiers, and the user's own (a `.keras` file or an import path).

Every model advtrain trains or attacks outputs logits, one per class. `make_model` builds or loads
one for the data's (H, W, C) and class count and `fit_to_data` refuses, in one line naming both
shapes, a model that does not fit them; a final softmax is removed, never trained through.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from advtrain.keras_file import shape_text

__all__ = [
    "MODEL_BUILDERS",
    "ModelError",
    "build_model",
    "check_input",
    "fit_to_data",
    "import_model_module",
    "is_import_path",
    "load_model",
    "make_model",
    "save_model",
    "strip_softmax",
]

MNIST_SHAPE = (28, 28, 1)
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ModelError(ValueError):
    """A model that does not fit the data (input shape, class count) or outputs probabilities."""


def _mlp(classes: int) -> list:
    return [
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(classes, name="logits"),
    ]


def _cnn(classes: int) -> list:
    # Wong et al. 2020 ("Fast is better than free"), MNIST: strided convolutions, no pooling.
    return [
        keras.layers.Conv2D(16, 4, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 4, strides=2, padding="same", activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(100, activation="relu"),
        keras.layers.Dense(classes, name="logits"),
    ]


def _madry(classes: int) -> list:
    # Madry et al. 2018, mnist_challenge model.
    return [
        keras.layers.Conv2D(32, 5, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(64, 5, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(1024, activation="relu"),
        keras.layers.Dense(classes, name="logits"),
    ]


def _resnet(inputs, classes: int):
    # A small pre-activation ResNet (He et al. 2016) for 32x32 colour images: three stages of
    # one residual block (16, 32, 64 filters), ~80 k parameters, so a CPU can train it
    # adversarially.
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    for filters, stride in ((16, 1), (32, 2), (64, 2)):
        h = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
        shortcut = (
            x
            if stride == 1 and x.shape[-1] == filters
            else keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False)(h)
        )
        h = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(h)
        h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
        h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        x = keras.layers.Add()([shortcut, h])
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.layers.Dense(classes, name="logits")(x)


MODEL_BUILDERS: dict[str, Callable] = {"mlp": _mlp, "cnn": _cnn, "madry": _madry, "resnet": _resnet}


def build_model(
    name: str, *, input_shape=MNIST_SHAPE, num_classes: int = 10, seed: int | None = None
) -> keras.Model:
    """Builds a built-in model for float32 inputs in [0, 1].

    Args:
        name: `"mlp"` (flatten-128-classes), `"cnn"` (Wong et al. 2020), `"madry"` (Madry et al.
            2018) or `"resnet"` (a small pre-activation ResNet for 32x32 colour images).
        input_shape: (H, W, C) of the images. Defaults to MNIST's `(28, 28, 1)`.
        num_classes: logits the model outputs, >= 2. Defaults to `10`.
        seed: seed of the weight initialisation, or `None` to leave Keras' global state alone.

    Returns:
        A built `keras.Model` whose output is the class logits.

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    if name not in MODEL_BUILDERS:
        raise ValueError(f"Unknown model {name!r}. Expected one of: {', '.join(MODEL_BUILDERS)}.")
    if seed is not None:
        keras.utils.set_random_seed(seed)
    inputs = keras.Input(tuple(input_shape))
    if name == "resnet":
        return keras.Model(inputs, _resnet(inputs, num_classes), name=name)
    return keras.Sequential([inputs, *MODEL_BUILDERS[name](num_classes)], name=name)


def is_import_path(spec: str) -> bool:
    """True for `package.module:function`."""
    return bool(IMPORT_PATH.match(spec))


def import_model_module(spec: str, extra_paths=()):
    """Imports the module of `package.module:function` and returns the function.

    The current directory (and `extra_paths`, e.g. the driver's directory in a Ray worker) come
    first on sys.path, as uvicorn and gunicorn resolve an app path: a user's `models.py` beside
    the run file is found. Importing also registers the module's custom Keras objects, so its
    saved models load.
    """
    module_name, func_name = spec.split(":", 1)
    for p in (*extra_paths, os.getcwd()):
        if p and p not in sys.path:
            sys.path.insert(0, p)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ModelError(
                f"model {spec!r}: no module named {e.name!r} (looked in {os.getcwd()} and the "
                "installed packages)"
            ) from None
        raise
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ModelError(f"model {spec!r}: {module_name} has no function {func_name!r}")
    return func


def _call_builder(func, spec: str, input_shape, num_classes: int):
    params = inspect.signature(func).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {
        k: v
        for k, v in (("input_shape", tuple(input_shape)), ("num_classes", num_classes))
        if k in params or takes_kwargs
    }
    model = func(**kwargs)
    if not isinstance(model, keras.Model):
        raise ModelError(f"model {spec!r} returned {type(model).__name__}, expected a keras.Model")
    return model


def make_model(
    spec: str, *, input_shape, num_classes: int, seed: int | None = None, extra_paths=()
) -> tuple[keras.Model, list[str]]:
    """The model a run trains: built-in, loaded from `.keras` (fine-tuning) or imported.

    Args:
        spec: a built-in name (`MODEL_BUILDERS`), a `.keras` file (its weights are the starting
            point) or `package.module:function` returning an uncompiled Keras model (called with
            `input_shape=` and `num_classes=` when it takes them).
        input_shape: (H, W, C) of the data.
        num_classes: the data's class count.
        seed: seed of the initialisation (built-in and imported models). Defaults to `None`.
        extra_paths: folders put on sys.path before importing. Defaults to `()`.

    Returns:
        (model, notes): a model fitted to the data by `fit_to_data`, and what was changed.

    Raises:
        ModelError: a model that does not fit the data, or cannot be found, one line each.
    """
    if spec in MODEL_BUILDERS:
        return build_model(spec, input_shape=input_shape, num_classes=num_classes, seed=seed), []
    if seed is not None:
        keras.utils.set_random_seed(seed)
    if spec.endswith(".keras"):
        model = load_model(spec)
    elif is_import_path(spec):
        model = _call_builder(
            import_model_module(spec, extra_paths), spec, input_shape, num_classes
        )
    else:
        raise ModelError(
            f"`model` must be one of {', '.join(MODEL_BUILDERS)}, a .keras file or "
            f"package.module:function. Received: model={spec!r}"
        )
    return fit_to_data(model, spec, input_shape, num_classes)


def strip_softmax(model: keras.Model) -> tuple[keras.Model, str] | None:
    """A model with the same weights whose output is the logits of `model`'s final softmax, and
    the removed layer's name; `None` when the last layer is no softmax.

    Raises:
        ModelError: a final softmax that cannot be removed (a subclassed model, a custom layer).
    """
    layers = getattr(model, "layers", None)
    if not layers:
        return None
    last = layers[-1]
    is_softmax_act = getattr(getattr(last, "activation", None), "__name__", "") == "softmax"
    if not is_softmax_act and not isinstance(last, keras.layers.Softmax):
        return None

    def linear_last(layer):
        cfg = layer.get_config()
        if layer is last:
            cfg["activation"] = "linear"
        return layer.__class__.from_config(cfg)

    try:
        if isinstance(last, (keras.layers.Softmax, keras.layers.Activation)):
            logits = keras.Model(
                model.inputs, last.input, name=model.name
            )  # the same layers, minus the last
        else:  # e.g. Dense(10, activation="softmax"): a copy whose last layer is linear
            logits = keras.models.clone_model(model, clone_function=linear_last)
            logits.set_weights(model.get_weights())
    except Exception as e:  # noqa: BLE001 - subclassed models, custom layers: keras raises assorted errors
        raise ModelError(
            f"the model's final softmax (layer {last.name!r}) cannot be removed ({e}); "
            "attacks and training need logits: return the model without it"
        ) from None
    return logits, last.name


def check_input(model: keras.Model, spec: str, input_shape) -> None:
    """Checks that `model` takes (batch, *input_shape) images.

    Raises:
        ModelError: one line naming the model's input shape and the data's.
    """
    input_shape = tuple(int(d) for d in input_shape)
    try:
        expected = model.input_shape
    except (AttributeError, ValueError):  # a subclassed model not yet called has no input shape
        expected = None
    if isinstance(expected, list):
        raise ModelError(
            f"model {spec!r} takes {len(expected)} inputs; advtrain feeds one image batch"
        )
    if expected is not None:
        want = tuple(expected[1:])
        if len(want) != len(input_shape) or any(
            w is not None and w != d for w, d in zip(want, input_shape)
        ):
            raise ModelError(
                f"model {spec!r} expects inputs {shape_text(want)} but the data's images are "
                f"{shape_text(input_shape)}"
            )
    try:
        model(np.zeros((1, *input_shape), np.float32), training=False)
    except Exception as e:  # noqa: BLE001 - a subclassed model rejecting the shape: keras raises assorted errors
        raise ModelError(
            f"model {spec!r} cannot take the data's images {shape_text(input_shape)}: "
            f"{str(e).splitlines()[0]}"
        ) from None


def fit_to_data(
    model: keras.Model, spec: str, input_shape, num_classes: int
) -> tuple[keras.Model, list[str]]:
    """Checks that `model` takes the data's images and outputs one logit per class.

    A final softmax layer is removed (noted); a model whose output still looks like
    probabilities is refused.

    Returns:
        (model, notes).

    Raises:
        ModelError: one line naming the model's shape and the data's.
    """
    input_shape = tuple(int(d) for d in input_shape)
    check_input(model, spec, input_shape)
    out_shape = tuple(model(np.zeros((2, *input_shape), np.float32), training=False).shape)
    if len(out_shape) != 2 or out_shape[1] != num_classes:
        raise ModelError(
            f"model {spec!r} outputs {shape_text((None, *out_shape[1:]))} but the data has "
            f"{num_classes} classes: expected (None, {num_classes}) logits"
        )
    notes = []
    stripped = strip_softmax(model)
    if stripped is not None:
        model, layer = stripped
        notes.append(
            f"the final softmax (layer {layer!r}) was removed; training and attacks use its logits"
        )
    probe = np.random.default_rng(0).uniform(0, 1, (8, *input_shape)).astype(np.float32)
    z = np.asarray(model(probe, training=False))
    if np.all(z >= 0) and np.allclose(z.sum(axis=1), 1.0, atol=1e-4):
        raise ModelError(
            f"model {spec!r} outputs probabilities (rows summing to 1) and its last layer is not a "
            "softmax that can be removed: return logits (no final softmax)"
        )
    return model, notes


def save_model(model: keras.Model, path) -> None:
    """Saves in the `.keras` format, atomically: a reader never sees a half-written file."""
    from advtrain.files import write_atomic

    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"Model files use the `.keras` format. Received: path={str(path)!r}")
    write_atomic(path, model.save)


def load_model(path) -> keras.Model:
    """Loads a `.keras` model with safe_mode on: a model file cannot run arbitrary code."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"Model files use the `.keras` format. Received: path={str(path)!r}")
    if not path.is_file():
        raise ModelError(f"Model file not found: {str(path)!r}")
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - keras raises assorted errors on damaged zips
        raise ValueError(f"Cannot load model {str(path)!r}: {e}") from None
