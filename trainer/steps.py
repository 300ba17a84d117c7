"""The training and evaluation steps and the prediction function, written once for every backend.

A replica step computes the loss of its share of the global batch divided by the *global* batch size (so
summing gradients over replicas gives the mean gradient), lets the backend reduce gradients where the
optimizer does not, and applies them. Statistics leave the step as sums, reduced over all replicas and
workers by the backend, so every reported number is global, never one rank's share.

How a replica gets its (x, y) from what the call's iterator handed it is the training input's
``replica_batch`` (trainer/inputs.py), passed in by the caller: the batch itself when it was read on the host,
or a batch index when the data sits on the replica's device and the rows are gathered there, inside the step.
Features may be dense tensors or tf.SparseTensors, which the step passes to the model as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import tensorflow as tf

from trainer.backends import Backend


@dataclasses.dataclass(frozen=True)
class CallStats:
    """What one train call reports: global sums over its steps, replicas and workers."""

    loss_sum: float  # sum of per-example losses (regularisation not included)
    examples: float
    non_finite_steps: float  # steps whose loss was NaN/Inf (the optimizer skipped their update)

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.examples, 1.0)


_CALL_STATS = tuple(f.name for f in dataclasses.fields(CallStats))


def inference_logits(model: keras.Model, x) -> tf.Tensor:
    """The model's float32 logits for prediction (no dropout; an ensemble's mean-probability logits)."""
    return tf.cast(model(x, training=False), tf.float32)


def probabilities(model: keras.Model, x) -> tf.Tensor:
    """The model's per-label probabilities: what evaluation, ``predict`` and the serving export return."""
    return tf.sigmoid(inference_logits(model, x))


def float32_features(x):
    """Features in float32, cast inside the replica step: half-precision data (packed float16 / bfloat16) travels
    to the device in its stored dtype, half the bytes, and the device casts it (exact either way)."""
    if isinstance(x, tf.SparseTensor):
        return x if x.values.dtype == tf.float32 else tf.SparseTensor(x.indices, tf.cast(x.values, tf.float32),
                                                                       x.dense_shape)
    return tf.cast(x, tf.float32)


def batch_as_given(element):
    """The (features, labels) of an element that is the batch itself."""
    x, y = element
    return x, y


def make_train_function(backend: Backend, model: keras.Model, optimizer, loss_fn, global_batch_size: int,
                        jit_compile: bool = False, replica_batch: Callable = batch_as_given
                        ) -> Callable[..., CallStats]:
    """Builds ``train_call(iterator, num_steps) -> CallStats``.

    Args:
      backend: the distribution backend.
      model: the Keras model (created under backend.scope()).
      optimizer: a keras LossScaleOptimizer (scale 1 outside float16: it skips non-finite steps).
      loss_fn: (labels, logits) -> [B] per-example loss.
      global_batch_size: batch over all replicas; the loss is divided by it.
      jit_compile: XLA-compile the forward and backward pass.
      replica_batch: element of the iterator -> (features, labels), run in the replica step (see module
        docstring).

    Returns:
      A function running ``num_steps`` steps, each on the next element of ``iterator`` (from
      backend.distribute_dataset), and returning their global statistics. The statistics of a step travel
      as one small vector (one all-reduce); they are named only here, when the call returns.
    """
    trainable = model.trainable_variables

    def forward_backward(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            per_example = loss_fn(y, logits)
            loss = tf.reduce_sum(per_example) / global_batch_size
            if model.losses:  # Regularisation: each replica adds its 1/num_replicas share.
                loss += tf.add_n(model.losses) / backend.num_replicas
            scaled = optimizer.scale_loss(loss)
        return tape.gradient(scaled, trainable), per_example, loss

    if jit_compile:
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def replica_step(element):
        x, y = replica_batch(element)
        x = float32_features(x)
        grads, per_example, loss = forward_backward(x, y)
        grads = backend.sync_non_finite(backend.reduce_gradients(grads))
        optimizer.apply_gradients(zip(grads, trainable))
        stats = {"loss_sum": tf.reduce_sum(per_example), "examples": tf.cast(tf.shape(per_example)[0], tf.float32),
                 "non_finite_steps": tf.cast(~tf.math.is_finite(loss), tf.float32)}
        return tf.stack([stats[name] for name in _CALL_STATS])

    @tf.function
    def train_steps(iterator, num_steps):
        totals = tf.zeros([len(_CALL_STATS)], tf.float32)
        for _ in tf.range(num_steps):
            stats = backend.run(replica_step, (next(iterator),))
            # Each step's sum starts after the previous one's: loop iterations may overlap, and Horovod fails when
            # a collective of one name starts again while the last one still waits for the other ranks.
            with tf.control_dependencies([totals]):
                totals += backend.reduce_sum(stats)
        return totals

    def train_call(iterator, num_steps: int) -> CallStats:
        totals = train_steps(iterator, tf.constant(num_steps)).numpy().tolist()
        return CallStats(**dict(zip(_CALL_STATS, totals)))

    return train_call


def make_eval_function(backend: Backend, model: keras.Model, loss_fn, state_fn: Callable) -> Callable:
    """Builds ``evaluate(batch) -> dict`` of metric-state sums for one (distributed) batch.

    Args:
      backend: the distribution backend.
      model: the Keras model.
      loss_fn: per-example loss.
      state_fn: (labels, probabilities) -> dict of additive metric-state tensors.

    Returns:
      A tf.function returning the state of one batch plus ``loss_sum``, summed by
      backend.reduce_eval_batch (the caller completes the sum with backend.reduce_eval_total).
    """

    def replica_eval(x, y):
        logits = inference_logits(model, x)  # once for both: the probabilities and the loss
        state = dict(state_fn(y, tf.sigmoid(logits)))
        state["loss_sum"] = tf.reduce_sum(loss_fn(y, logits))
        return state

    @tf.function
    def evaluate(batch):
        return backend.reduce_eval_batch(backend.run(replica_eval, batch))

    return evaluate
