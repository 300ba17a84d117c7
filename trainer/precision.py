"""Mixed-precision policy: float32, mixed_float16 (with loss scaling) or mixed_bfloat16."""

from __future__ import annotations

import logging

import keras
import tensorflow as tf

log = logging.getLogger(__name__)


def resolve(name: str) -> str:
    """Resolves ``auto``: mixed_float16 on GPUs with tensor cores (compute capability >= 7.0), else float32."""
    if name != "auto":
        return name
    for gpu in tf.config.list_physical_devices("GPU"):
        cc = tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
        if cc >= (7, 0):
            return "mixed_float16"
    return "float32"


def apply_policy(name: str) -> str:
    """Sets the global Keras dtype policy; returns the resolved name.

    Layers created afterwards compute in float16/bfloat16 with float32 variables; the model's output layer
    is forced to float32 (trainer/model.py), so logits and the loss stay float32.
    """
    resolved = resolve(name)
    keras.mixed_precision.set_global_policy(resolved)
    return resolved
