"""Models for the certified-training benchmarks (BENCHMARKS.md, "Certified robustness").

    advtrain train --local --config configs/certified-ibp-mnist-linf-0.3.yaml \
        --model benchmarks.certified_models:cnn_wide

`cnn_wide` is the built-in `cnn` (Wong et al. 2020) at twice the channels and 2.5x the dense
width: about 4x its compute, still far below Gowal et al.'s "large" network. Certified training
needs the capacity more than attack training does: the bound, not one attacked point, must stay
on the right side of every margin.
"""

import keras


def cnn_wide(input_shape=(28, 28, 1), num_classes=10) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(32, 4, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2D(64, 4, strides=2, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(num_classes, name="logits"),
        ],
        name="cnn_wide",
    )
