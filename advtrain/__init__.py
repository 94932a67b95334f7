"""advtrain: adversarial training and robustness evaluation for TensorFlow/Keras models.

This package never imports Ray; `workflows/` composes it with Ray Train and Ray Tune.
"""

__version__ = "0.1.0"
