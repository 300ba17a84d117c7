"""The model and the optimizer: an MLP with one independent sigmoid output per label.

The network returns logits (float32 whatever the mixed-precision policy); probabilities are
``sigmoid(logits)``, applied by the loss (from logits, numerically stable) and by the serving signature.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from trainer.config import ModelConfig, OptimizerConfig


class InputTransform(keras.layers.Layer):
    """Fixed input scaling for bag-of-words style features (no trainable state).

    log1p dampens large counts; l2_normalize makes documents of different length comparable: together
    they give TF-IDF-like inputs without needing corpus statistics.
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, x):
        if self.mode in ("log1p", "log1p_l2"):
            x = tf.math.log1p(tf.maximum(x, 0.0)) * tf.sign(x)
        if self.mode in ("l2_normalize", "log1p_l2"):
            x = tf.math.l2_normalize(x, axis=-1, epsilon=1e-6)
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def build_model(num_features: int, num_labels: int, cfg: ModelConfig, seed: int = 0) -> keras.Model:
    """Builds the MLP.

    Args:
      num_features: input width.
      num_labels: number of independent binary outputs.
      cfg: widths, activation, dropout, L2, input transform.
      seed: seed of the dropout layers.

    Returns:
      A Keras model mapping [B, F] float32 features to [B, L] float32 logits.
    """
    reg = keras.regularizers.L2(cfg.l2) if cfg.l2 > 0 else None
    inputs = keras.Input(shape=(num_features,), dtype="float32", name="features")
    x = inputs
    if cfg.input_transform != "none":
        x = InputTransform(cfg.input_transform, name="input_transform")(x)
    if cfg.input_dropout > 0:
        x = keras.layers.Dropout(cfg.input_dropout, seed=seed, name="input_dropout")(x)
    for i, width in enumerate(cfg.hidden):
        x = keras.layers.Dense(width, activation=cfg.activation, kernel_regularizer=reg, name=f"hidden_{i}")(x)
        if cfg.dropout > 0:
            x = keras.layers.Dropout(cfg.dropout, seed=seed + i + 1, name=f"dropout_{i}")(x)
    # float32 output layer: logits and the loss stay float32 under mixed_float16 / mixed_bfloat16.
    logits = keras.layers.Dense(num_labels, dtype="float32", kernel_regularizer=reg, name="logits")(x)
    return keras.Model(inputs, logits, name="multilabel_mlp")


def model_flops_per_example(num_features: int, num_labels: int, hidden: list[int]) -> float:
    """Training FLOPs per example (forward + backward ~ 3x forward, 2 FLOPs per multiply-add)."""
    widths = [num_features, *hidden, num_labels]
    return 6.0 * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def scaled_learning_rate(cfg: OptimizerConfig, global_batch_size: int) -> float:
    """Peak learning rate for the global batch.

    Rule: ``lr = learning_rate * (global_batch / base_batch_size)`` for linear scaling, the square root
    of that ratio for sqrt scaling, unchanged for none. The global batch already counts every replica and
    worker, so adding GPUs at a fixed per-replica batch raises the learning rate in proportion.
    """
    ratio = global_batch_size / cfg.base_batch_size
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[cfg.lr_scaling]
    return cfg.learning_rate * factor


class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine or linear decay to ``peak*min_ratio``."""

    def __init__(self, peak: float, warmup: int, total: int, decay: str, min_ratio: float):
        self.peak, self.warmup, self.total, self.decay, self.min_ratio = peak, warmup, total, decay, min_ratio

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = tf.minimum(1.0, (step + 1.0) / max(self.warmup, 1)) if self.warmup else tf.constant(1.0)
        frac = tf.clip_by_value((step - self.warmup) / max(self.total - self.warmup, 1), 0.0, 1.0)
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + tf.cos(np.pi * frac))
        elif self.decay == "linear":
            shape = 1.0 - frac
        else:
            shape = tf.constant(1.0)
        return self.peak * warm * (self.min_ratio + (1.0 - self.min_ratio) * shape)

    def get_config(self):
        return {"peak": self.peak, "warmup": self.warmup, "total": self.total, "decay": self.decay,
                "min_ratio": self.min_ratio}


def build_optimizer(cfg: OptimizerConfig, global_batch_size: int, total_steps: int,
                    loss_scale: bool) -> keras.optimizers.Optimizer:
    """Builds Adam/AdamW with the warmup/decay schedule, wrapped in a LossScaleOptimizer.

    The LossScaleOptimizer is used for every precision: for float16 it is dynamic loss scaling; for
    float32/bfloat16 it starts at scale 1 and its job is to skip any step whose gradients are not finite,
    so a NaN loss never reaches the weights and the last checkpoint stays the last good step.

    Args:
      cfg: optimizer section of the config.
      global_batch_size: batch over all replicas (for learning-rate scaling).
      total_steps: steps of the whole run (for the decay).
      loss_scale: True for float16 (dynamic loss scaling).

    Returns:
      A keras.optimizers.LossScaleOptimizer.
    """
    lr = WarmupDecay(scaled_learning_rate(cfg, global_batch_size), cfg.warmup_steps, total_steps, cfg.decay,
                     cfg.min_lr_ratio)
    common = dict(learning_rate=lr, beta_1=cfg.beta_1, beta_2=cfg.beta_2, epsilon=cfg.epsilon,
                  clipnorm=cfg.clipnorm)
    if cfg.name == "adamw":
        inner = keras.optimizers.AdamW(weight_decay=cfg.weight_decay, **common)
    else:
        inner = keras.optimizers.Adam(**common)
    if loss_scale:
        return keras.optimizers.LossScaleOptimizer(inner)
    return keras.optimizers.LossScaleOptimizer(inner, initial_scale=1.0, dynamic_growth_steps=2**30)
