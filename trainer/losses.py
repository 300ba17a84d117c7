"""Binary cross-entropy per label, from logits, with optional per-label weights."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from trainer.config import LossConfig


def pos_weights_from_counts(label_counts, num_examples: int, cap: float) -> np.ndarray:
    """Per-label positive weight ``neg/pos`` from training counts, capped to ``[1, cap]``.

    Labels never positive get the cap (their weight does not matter for the loss, only for stability).
    """
    pos = np.asarray(label_counts, np.float64)
    ratio = np.where(pos > 0, (num_examples - pos) / np.maximum(pos, 1), cap)
    return np.clip(ratio, 1.0, cap).astype(np.float32)


class MultiLabelLoss:
    """Per-example loss: mean over labels of (weighted) sigmoid cross-entropy.

    Args:
      cfg: loss section of the config.
      num_labels: number of labels.
      label_counts, num_examples: training statistics from the manifest (for pos_weight=manifest).
    """

    def __init__(self, cfg: LossConfig, num_labels: int, label_counts=None, num_examples: int = 0):
        self.smoothing = cfg.label_smoothing
        self.pos_weight = None
        if cfg.pos_weight == "manifest":
            self.pos_weight = tf.constant(pos_weights_from_counts(label_counts, num_examples, cfg.pos_weight_cap))
        self.label_weights = None
        if cfg.label_weights is not None:
            if len(cfg.label_weights) != num_labels:
                raise ValueError(f"loss.label_weights: {len(cfg.label_weights)} weights for {num_labels} labels")
            self.label_weights = tf.constant(cfg.label_weights, tf.float32)

    def __call__(self, labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
        """Returns the [B] per-example losses (float32).

        ``logits`` is [B, L], or [B, K, L] for the K members of an ensemble in training (build_model): each
        member is scored against the same labels and the per-example loss is the mean over members, so every
        member learns on its own, as if trained alone.
        """
        logits = tf.cast(logits, tf.float32)
        members = logits.shape.rank == 3
        if members:
            labels = tf.broadcast_to(tf.cast(labels, tf.float32)[:, tf.newaxis, :], tf.shape(logits))
        if self.smoothing:
            labels = labels * (1.0 - self.smoothing) + 0.5 * self.smoothing
        if self.pos_weight is not None:
            per_label = tf.nn.weighted_cross_entropy_with_logits(labels, logits, self.pos_weight)
        else:
            per_label = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
        if self.label_weights is not None:
            per_label = per_label * self.label_weights
        return tf.reduce_mean(per_label, axis=[1, 2] if members else -1)
