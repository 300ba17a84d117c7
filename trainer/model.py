"""The model: an MLP with one independent sigmoid output per label, over dense or sparse features.

The network returns logits (float32 whatever the mixed-precision policy); probabilities are
``sigmoid(logits)``, applied by the loss (from logits, numerically stable) and by the serving signature.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from trainer.config import ConfigError, ModelConfig


class InputTransform(keras.layers.Layer):
    """Fixed input scaling for bag-of-words style features (no trainable state), dense or tf.SparseTensor.

    log1p dampens large counts; l2_normalize makes documents of different length comparable: together
    they give TF-IDF-like inputs without needing corpus statistics. On a SparseTensor only the stored values
    change (both transforms map 0 to 0), with the same result as on the dense form.
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, x):
        if isinstance(x, tf.SparseTensor):
            return x.with_values(self._transform(x.values, rows=x.indices[:, 0], num_rows=x.dense_shape[0]))
        return self._transform(x)

    def _transform(self, x, rows=None, num_rows=None):
        """``x`` is [B, F] dense, or the values of a SparseTensor with their row ids ``rows``."""
        if self.mode in ("log1p", "log1p_l2"):
            # Odd in x (sign(x) log(1 + |x|)): negative features (e.g. standardised ones) keep their sign and
            # order instead of collapsing to 0.
            x = tf.math.log1p(tf.abs(x)) * tf.sign(x)
        if self.mode in ("l2_normalize", "log1p_l2"):
            if rows is None:
                x = tf.math.l2_normalize(x, axis=-1, epsilon=1e-6)
            else:  # tf.math.l2_normalize's formula, with the row sums taken over the stored values.
                square_sum = tf.math.unsorted_segment_sum(tf.square(x), rows, num_rows)
                x = x * tf.gather(tf.math.rsqrt(tf.maximum(square_sum, 1e-6)), rows)
        return x

    def compute_output_spec(self, x):
        return keras.KerasTensor(x.shape, dtype=self.compute_dtype, sparse=x.sparse)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


class SparseDense(keras.layers.Layer):
    """``activation(x @ kernel + bias)`` for a tf.SparseTensor ``x`` [B, F] of float32 feature values.

    Gathers only the kernel rows of the features present in the batch and multiplies the batch, re-indexed
    onto those rows, by them (tf.sparse.sparse_dense_matmul): the gradient of the kernel is then a
    tf.IndexedSlices over those rows, which the row-sparse optimizer update (trainer.optimizers) applies
    without touching the others. Never reads the kernel whole: a dense read of a variable that gather and
    scatter ops also use copies all of it. Computes in float32 under any policy: its FLOPs (non-zeros x
    units) are few, and casting the [F, units] kernel to float16 would itself be a full pass.
    """

    def __init__(self, units: int, activation=None, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", **kwargs):
        super().__init__(**{**kwargs, "dtype": "float32"})
        self.units = units
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        # Tracked as ``_kernel`` like keras.layers.Dense's, so that a checkpoint of either layer restores the other.
        self._kernel = self.add_weight(name="kernel", shape=(input_shape[-1], self.units),
                                       initializer=self.kernel_initializer)
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer=self.bias_initializer)

    @property
    def kernel(self):
        return self._kernel

    def call(self, x):
        rows, column = tf.unique(x.indices[:, 1])
        local = tf.SparseTensor(tf.stack([x.indices[:, 0], tf.cast(column, tf.int64)], axis=1), x.values,
                                tf.stack([x.dense_shape[0], tf.cast(tf.size(rows), tf.int64)]))
        kernel_rows = tf.gather(self.kernel.value, rows)  # the tf.Variable: a gather reads only those rows
        return self.activation(tf.sparse.sparse_dense_matmul(local, kernel_rows) + self.bias)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units,
                "activation": keras.activations.serialize(self.activation),
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer)}


class SparseDropout(keras.layers.Layer):
    """Dropout of the stored values of a tf.SparseTensor (training only).

    Dropout zeroes features that are zero already to no effect, so dropping only the stored values draws
    the same distribution of inputs as dense dropout.
    """

    def __init__(self, rate: float, seed=None, **kwargs):
        super().__init__(**{**kwargs, "dtype": "float32"})
        self.rate, self.seed = rate, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training:
            return x
        return x.with_values(keras.random.dropout(x.values, self.rate, seed=self.seed_generator))

    def compute_output_spec(self, x, training=None):
        return keras.KerasTensor(x.shape, dtype=self.compute_dtype, sparse=True)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


# model.sparse_input=auto takes the sparse path for sparse-encoded data from this many features on: below it the
# densified path was as fast or faster (bench/README.md, "Sparse or dense input").
SPARSE_INPUT_MIN_FEATURES = 4096


def uses_sparse_input(setting: str, features_sparse: bool, num_features: int) -> bool:
    """Whether a model is fed sparse features (a tf.SparseTensor into a SparseDense first layer) or dense ones:
    the one decision every call site makes with it (training, its evaluations, ``evaluate``, ``predict``).

    Args:
      setting: model.sparse_input: "true", "false" or "auto" (sparse from SPARSE_INPUT_MIN_FEATURES on).
      features_sparse: the input is stored sparse (a sparse-encoded dataset, a LIBSVM file).
      num_features: F.

    Dense input always takes the dense path (preflight refuses "true" for a dense-encoded training set);
    weights are the same either way, so a model trained on one path predicts on the other.
    """
    if not features_sparse or setting == "false":
        return False
    return setting == "true" or num_features >= SPARSE_INPUT_MIN_FEATURES


def prior_log_odds(label_counts, num_examples: int) -> np.ndarray:
    """Per-label log-odds of the training frequency, ``log(p / (1 - p))`` with ``p = (count + 0.5) / (n + 1)``."""
    p = (np.asarray(label_counts, np.float64) + 0.5) / (max(num_examples, 0) + 1.0)
    return np.log(p / (1.0 - p)).astype(np.float32)


def build_model(num_features: int, num_labels: int, cfg: ModelConfig, seed: int = 0,
                output_bias=None, sparse_features: bool = False) -> keras.Model:
    """Builds the MLP, or an ensemble of ``cfg.ensemble`` MLPs over the same input.

    Args:
      num_features: input width F.
      num_labels: number of independent binary outputs.
      cfg: widths, activation, dropout, L2, input transform, ensemble members.
      seed: seed of the dropout layers.
      output_bias: initial [L] output biases (e.g. prior_log_odds of the training labels), zeros if None.
        Starting every sigmoid at its label's frequency skips the first phase of training in which a
        zero-bias model (p = 0.5 everywhere, with 1-2 % positives) only learns to say "no" to every label.
      sparse_features: the input is a tf.SparseTensor [B, F] of float32 values (int64 indices, at most one
        value per (example, feature)) instead of a dense [B, F] tensor. The first layer of every member is
        then a SparseDense, whose kernel gradient is row-sparse (tf.IndexedSlices); input transforms and
        input dropout act on the stored values.

    Returns:
      A Keras model mapping the features to [B, L] float32 logits. With ``cfg.ensemble`` K > 1 the members
      are independent MLPs (own weights, own dropout masks): called with ``training=True`` the model
      returns their [B, K, L] logits, so each member is trained on its own loss (MultiLabelLoss averages
      them); otherwise the logits of the members' mean probability (what evaluation, prediction and the
      export see). Averaging probabilities, not logits, is the usual ensemble and keeps calibration.

    Raises:
      ConfigError: model.l2 with sparse features (an L2 penalty on the first layer would read and write
        its whole [F, width] kernel every step; optimizer.weight_decay regularises it row by row).
    """
    if sparse_features and cfg.l2 > 0:
        raise ConfigError("model.l2: not available with sparse features (it would update every row of the "
                          "first layer each step); use optimizer.name=adamw with optimizer.weight_decay")
    reg = keras.regularizers.L2(cfg.l2) if cfg.l2 > 0 else None

    def dense(units, sparse_input, **kwargs):
        return SparseDense(units, **kwargs) if sparse_input else keras.layers.Dense(units, kernel_regularizer=reg,
                                                                                     **kwargs)

    # With sparse features the layers before the first Dense compute in float32 (see SparseDense).
    sparse_dtype = {"dtype": "float32"} if sparse_features else {}
    inputs = keras.Input(shape=(num_features,), sparse=sparse_features, dtype="float32", name="features")
    x = inputs
    if cfg.input_transform != "none":
        x = InputTransform(cfg.input_transform, name="input_transform", **sparse_dtype)(x)
    bias_init = "zeros" if output_bias is None else keras.initializers.Constant(np.asarray(output_bias, np.float32))
    members = []
    for m in range(cfg.ensemble):
        # One member keeps the layer names of a plain MLP; members of an ensemble are prefixed.
        prefix = f"member_{m}_" if cfg.ensemble > 1 else ""
        h = x
        if cfg.input_dropout > 0:
            dropout = SparseDropout if sparse_features else keras.layers.Dropout
            h = dropout(cfg.input_dropout, seed=seed + 1000 * m, name=f"{prefix}input_dropout")(h)
        for i, width in enumerate(cfg.hidden):
            h = dense(width, sparse_features and i == 0, activation=cfg.activation, name=f"{prefix}hidden_{i}")(h)
            if cfg.dropout > 0:
                h = keras.layers.Dropout(cfg.dropout, seed=seed + 1000 * m + i + 1, name=f"{prefix}dropout_{i}")(h)
        # float32 output layer: logits and the loss stay float32 under mixed_float16 / mixed_bfloat16.
        members.append(dense(num_labels, sparse_features and not cfg.hidden, dtype="float32",
                             bias_initializer=bias_init, name=f"{prefix}logits")(h))
    logits = members[0] if cfg.ensemble == 1 else EnsembleLogits(name="ensemble")(members)
    return keras.Model(inputs, logits, name="multilabel_mlp" if cfg.ensemble == 1 else "multilabel_mlp_ensemble")


def mean_probability_logits(member_logits: tf.Tensor, axis: int = 1) -> tf.Tensor:
    """Logits of the mean of ``sigmoid(member_logits)`` over ``axis``, computed in log space.

    ``log p = logsumexp(log sigmoid(z)) - log K`` and ``log(1 - p) = logsumexp(log sigmoid(-z)) - log K``, so
    the logit ``log p - log(1 - p)`` needs no probability near 0 or 1 to be represented (no inf, no 0/0).
    """
    z = tf.cast(member_logits, tf.float32)
    return (tf.reduce_logsumexp(tf.math.log_sigmoid(z), axis=axis)
            - tf.reduce_logsumexp(tf.math.log_sigmoid(-z), axis=axis))


class EnsembleLogits(keras.layers.Layer):
    """Stacks member logits [B, K, L] for training; otherwise returns the logits of their mean probability."""

    def __init__(self, **kwargs):
        super().__init__(dtype="float32", **kwargs)

    def call(self, member_logits, training=None):
        stacked = tf.stack(member_logits, axis=1)  # the members' logits layers are float32 already
        return stacked if training else mean_probability_logits(stacked)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])


def model_flops_per_example(num_features: int, num_labels: int, hidden: list[int], ensemble: int = 1) -> float:
    """Training FLOPs per example (forward + backward ~ 3x forward, 2 FLOPs per multiply-add), all members."""
    widths = [num_features, *hidden, num_labels]
    return 6.0 * ensemble * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
