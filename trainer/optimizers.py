"""The optimizer: Adam/AdamW with a warmup/decay schedule, inside a LossScaleOptimizer.

Dense gradients get Adam's update in one fused kernel. Row-sparse gradients (tf.IndexedSlices, from the
first layer over sparse features, trainer.model.SparseDense) get a lazy update: only the rows present in
the gradient change, their moments included, so a step costs O(rows used x width), not O(F x width).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from trainer.backends import tf_variable
from trainer.config import OptimizerConfig


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


class _AdamUpdates:
    """Adam's update_step, fused for dense gradients and lazy for row-sparse ones (mixed into keras Adam/AdamW).

    Dense: ``tf.raw_ops.ResourceApplyAdam``, the arithmetic of Keras' Adam in one pass over the variable
    instead of about ten element-wise ops (``m += (1-b1)(g-m)``, ``v += (1-b2)(g^2-v)``,
    ``var -= lr sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)``). amsgrad keeps the Keras code path.

    tf.IndexedSlices: duplicate rows are summed first (replicas' and workers' slices are concatenated, not
    added), then the same formula runs on the rows present only (LazyAdam): a row's moments do not decay in
    steps that do not use it, and it does not move by its remaining momentum. Keras' Adam would instead
    convert the slices to a dense [F, width] gradient and update every row.

    AdamW's decoupled weight decay, ``var -= lr * wd * var``, applies to a row-sparse variable only at the
    rows of the step's gradient, before their Adam update (the rule of TF Addons' decoupled-weight-decay
    optimizers for sparse gradients). A feature's weights thus shrink once per batch that contains it, so
    rare features are regularised less than under dense AdamW; decaying every row would be the O(F x width)
    pass this update avoids.
    """

    def update_step(self, gradient, variable, learning_rate):
        if isinstance(gradient, tf.IndexedSlices):
            return self._row_sparse_update(gradient, variable, learning_rate)
        if self.amsgrad or not hasattr(variable, "handle"):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        m, v = self._slots(variable)
        beta_1, beta_2, beta_1_power, beta_2_power = self._betas(dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=m.handle, v=v.handle, beta1_power=beta_1_power, beta2_power=beta_2_power,
            lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype))

    def _row_sparse_update(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        rows, position = tf.unique(gradient.indices)
        values = tf.cast(gradient.values, dtype)
        grad = tf.cond(tf.size(rows) < tf.size(position),
                       lambda: tf.math.unsorted_segment_sum(values, position, tf.size(rows)),
                       lambda: values)  # already one slice per row, in the order of ``rows``
        m, v = self._slots(variable)
        beta_1, beta_2, beta_1_power, beta_2_power = self._betas(dtype)
        lr = tf.cast(learning_rate, dtype)
        # 1 - beta in float64 before the cast, as Keras' Adam does (in float32, 1 - 0.999 is off by 1e-5).
        m_rows = tf.gather(m, rows) * beta_1 + tf.cast(1.0 - self.beta_1, dtype) * grad
        v_rows = tf.gather(v, rows) * beta_2 + tf.cast(1.0 - self.beta_2, dtype) * tf.square(grad)
        var_rows = tf.gather(variable, rows)
        if self.weight_decay is not None and super()._use_weight_decay(variable):
            var_rows *= 1.0 - lr * tf.cast(self.weight_decay, dtype)
        alpha = lr * tf.sqrt(1.0 - beta_2_power) / (1.0 - beta_1_power)
        var_rows -= alpha * m_rows / (tf.sqrt(v_rows) + tf.cast(self.epsilon, dtype))
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        variable.scatter_update(tf.IndexedSlices(var_rows, rows))

    def _slots(self, variable):
        index = self._get_variable_index(variable)
        return tuple(tf_variable(s[index]) for s in (self._momentums, self._velocities))

    def _betas(self, dtype):
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        return beta_1, beta_2, tf.pow(beta_1, step), tf.pow(beta_2, step)

    def _backend_apply_gradients(self, grads, trainable_variables):
        # Read while tracing: the variables with row-sparse gradients, whose weight decay update_step applies.
        self._row_sparse_keys = {self._var_key(v) for g, v in zip(grads, trainable_variables)
                                 if isinstance(g, tf.IndexedSlices)}
        super()._backend_apply_gradients(grads, trainable_variables)

    def _use_weight_decay(self, variable):
        return (self._var_key(variable) not in getattr(self, "_row_sparse_keys", ())
                and super()._use_weight_decay(variable))


class Adam(_AdamUpdates, keras.optimizers.Adam):
    """keras.optimizers.Adam with the fused dense and lazy row-sparse updates (same variables, same checkpoints)."""


class AdamW(_AdamUpdates, keras.optimizers.AdamW):
    """keras.optimizers.AdamW with the fused dense and lazy row-sparse updates (same variables, same checkpoints)."""


class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """keras' LossScaleOptimizer, checking tf.IndexedSlices gradients by their values.

    keras' check converts each gradient to a dense tensor, a [F, width] tensor for the sparse first layer.
    """

    def check_finite(self, grads):
        return super().check_finite([g.values if isinstance(g, tf.IndexedSlices) else g for g in grads])


def build_optimizer(cfg: OptimizerConfig, global_batch_size: int, total_steps: int,
                    loss_scale: bool) -> LossScaleOptimizer:
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
      A LossScaleOptimizer around Adam or AdamW.
    """
    lr = WarmupDecay(scaled_learning_rate(cfg, global_batch_size), cfg.warmup_steps, total_steps, cfg.decay,
                     cfg.min_lr_ratio)
    common = dict(learning_rate=lr, beta_1=cfg.beta_1, beta_2=cfg.beta_2, epsilon=cfg.epsilon,
                  clipnorm=cfg.clipnorm)
    inner = AdamW(weight_decay=cfg.weight_decay, **common) if cfg.name == "adamw" else Adam(**common)
    if loss_scale:
        return LossScaleOptimizer(inner)
    return LossScaleOptimizer(inner, initial_scale=1.0, dynamic_growth_steps=2**30)
