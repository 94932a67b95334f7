"""What a `.keras` file says about its model, read from the archive without TensorFlow.

A `.keras` file is a zip holding `config.json` (the architecture), `metadata.json` and the
weights. Reading the config takes milliseconds where loading the model takes seconds of
TensorFlow start-up, so a file that is no Keras model, or a model whose output does not match
the data's classes, is refused before TensorFlow loads.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["check_keras_file", "input_shape", "output_classes", "read_config", "shape_text"]

# Layers that keep the width of what they are given: the logits' width is that of the layer before.
_SAME_WIDTH = ("Activation", "Softmax", "Dropout", "ReLU", "LeakyReLU", "Identity")


def read_config(path: str | Path) -> dict[str, Any]:
    """The model config of a `.keras` file.

    Raises:
        ValueError: the file is not a zip archive, or holds no readable `config.json`.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{str(path)!r} is not a Keras .keras file: not a zip archive (save models with "
            "model.save('name.keras'))"
        )
    try:
        with zipfile.ZipFile(path) as z:
            config = json.loads(z.read("config.json"))
    except KeyError:
        raise ValueError(
            f"{str(path)!r} is not a Keras .keras file: the zip archive holds no config.json"
        ) from None
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not a readable Keras .keras file: {e}") from None
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(
            f"{str(path)!r} is not a Keras .keras file: its config.json names no model class"
        )
    return config


def check_keras_file(path: str | Path) -> dict[str, Any]:
    """`read_config`, for a path that must exist: the one-line refusal a command gives."""
    if not Path(path).is_file():
        raise ValueError(f"model must be an existing .keras file. Received: {str(path)!r}")
    return read_config(path)


def _history(layer: dict) -> str | None:
    """The name of the layer feeding `layer` (its first input), in a functional config."""
    for node in layer.get("inbound_nodes") or []:
        args = node.get("args") if isinstance(node, dict) else None
        if args and isinstance(args[0], dict):
            history = args[0].get("config", {}).get("keras_history")
            if history:
                return history[0]
    return None


def output_classes(config: dict[str, Any]) -> int | None:
    """The width of the model's output (its class count), or None when the config does not say
    plainly (a subclassed or custom model, several outputs): the loaded model is checked then."""
    inner = config.get("config") or {}
    layers = inner.get("layers") or []
    if not layers:
        return None
    if config.get("class_name") == "Sequential":
        chain = list(reversed(layers))
    else:
        outputs = inner.get("output_layers")
        if not outputs:
            return None
        if isinstance(outputs[0], list):
            if len(outputs) != 1:
                return None
            outputs = outputs[0]
        by_name = {l.get("config", {}).get("name"): l for l in layers}
        chain, name = [], outputs[0]
        while name in by_name and len(chain) < len(layers):
            chain.append(by_name[name])
            name = _history(by_name[name])
    for layer in chain:
        cls, cfg = layer.get("class_name"), layer.get("config") or {}
        if cls in _SAME_WIDTH:
            continue
        units = cfg.get("units")
        return int(units) if cls == "Dense" and isinstance(units, int) else None
    return None


def input_shape(config: dict[str, Any]) -> tuple[int | None, ...] | None:
    """The image shape the model takes (without the batch axis), or None when the config does
    not say plainly (a subclassed model, several inputs)."""
    inner = config.get("config") or {}
    layers = inner.get("layers") or []
    shape = None
    if config.get("class_name") == "Sequential":
        first = layers[0] if layers else {}
        shape = (
            (first.get("config") or {}).get("batch_shape")
            if first.get("class_name") == "InputLayer"
            else inner.get("build_input_shape")
        )
    else:
        inputs = inner.get("input_layers")
        if inputs and isinstance(inputs[0], list):
            inputs = inputs[0] if len(inputs) == 1 else None
        if inputs:
            layer = next(
                (l for l in layers if (l.get("config") or {}).get("name") == inputs[0]), {}
            )
            if layer.get("class_name") == "InputLayer":
                shape = (layer.get("config") or {}).get("batch_shape")
    if (
        not isinstance(shape, list)
        or len(shape) < 2
        or not all(d is None or isinstance(d, int) for d in shape)
    ):
        return None
    return tuple(shape[1:])


def shape_text(shape) -> str:
    """`(None, 28, 28, 1)`: a shape as the model errors print it."""
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"
