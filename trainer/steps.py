"""The training and evaluation steps, written once for every backend.

A replica step computes the loss of its share of the global batch divided by the *global* batch size (so
summing gradients over replicas gives the mean gradient), lets the backend reduce gradients where the
optimizer does not, and applies them. Statistics leave the step as sums, reduced over all replicas and
workers by the backend, so every reported number is global, never one rank's share.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from trainer.backends import Backend

# Order of the numbers a train call returns (one small vector: one all-reduce per step).
TRAIN_STATS = ("loss_sum", "examples", "non_finite_steps", "stop_requests", "save_requests")
# Requests a process makes at the start of a call; summed over processes, so every process acts on them
# together (MultiWorkerMirroredStrategy needs every worker to take part in a save).
REQUESTS = ("stop", "save")


def make_train_function(backend: Backend, model: keras.Model, optimizer, loss_fn,
                        global_batch_size: int, jit_compile: bool = False) -> Callable:
    """Builds ``train(iterator, num_steps, requests) -> tf.Tensor[len(TRAIN_STATS)]``.

    Args:
      backend: the distribution backend.
      model: the Keras model (created under backend.scope()).
      optimizer: a keras LossScaleOptimizer (scale 1 outside float16: it skips non-finite steps).
      loss_fn: (labels, logits) -> [B] per-example loss.
      global_batch_size: batch over all replicas; the loss is divided by it.
      jit_compile: XLA-compile the forward and backward pass.

    Returns:
      A tf.function running ``num_steps`` steps and returning the global sums of TRAIN_STATS; the
      ``requests`` floats (REQUESTS: 1.0 after SIGTERM, 1.0 when this process' checkpoint timer is due)
      are summed too, so all processes stop or save together.
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

    def replica_step(x, y, requests):
        grads, per_example, loss = forward_backward(x, y)
        grads = backend.sync_non_finite(backend.reduce_gradients(grads))
        optimizer.apply_gradients(zip(grads, trainable))
        return tf.stack([tf.reduce_sum(per_example), tf.cast(tf.shape(per_example)[0], tf.float32),
                         tf.cast(~tf.math.is_finite(loss), tf.float32), requests[0], requests[1]])

    @tf.function
    def train(iterator, num_steps, requests):
        totals = tf.zeros([len(TRAIN_STATS)], tf.float32)
        for i in tf.range(num_steps):
            x, y = next(iterator)
            # Only the first step of a call carries the requests, so each is counted once.
            step_requests = tf.where(i == 0, requests, tf.zeros_like(requests))
            totals += backend.reduce_sum(backend.run(replica_step, (x, y, step_requests)))
        return totals

    return train


def make_eval_function(backend: Backend, model: keras.Model, loss_fn, state_fn: Callable) -> Callable:
    """Builds ``evaluate(batch) -> dict`` of metric-state sums for one (distributed) batch.

    Args:
      backend: the distribution backend.
      model: the Keras model.
      loss_fn: per-example loss.
      state_fn: (labels, probabilities) -> dict of additive metric-state tensors.

    Returns:
      A tf.function returning the state summed over the replicas of this call (and over workers for
      tf.distribute; Horovod ranks are summed once at the end with backend.finish_reduce, because ranks
      may hold different numbers of eval batches and a per-batch allreduce would hang).
    """

    def replica_eval(x, y):
        logits = tf.cast(model(x, training=False), tf.float32)
        state = dict(state_fn(y, tf.sigmoid(logits)))
        state["loss_sum"] = tf.reduce_sum(loss_fn(y, logits))
        return state

    @tf.function
    def evaluate(batch):
        x, y = batch
        out = backend.run(replica_eval, (x, y))
        if backend.name == "horovod":
            return out
        return backend.reduce_sum(out)

    return evaluate


def make_predict_function(model: keras.Model) -> Callable:
    """Builds ``predict(x) -> probabilities`` (float32) for one device."""

    @tf.function
    def predict(x):
        return tf.sigmoid(tf.cast(model(x, training=False), tf.float32))

    return predict
