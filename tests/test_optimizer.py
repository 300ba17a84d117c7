"""The fused Adam/AdamW update (trainer.model.FusedAdam/FusedAdamW) against Keras' own optimizers."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import mirrored_backend
from trainer.config import OptimizerConfig
from trainer.model import FusedAdam, FusedAdamW, build_optimizer


@pytest.mark.parametrize("fused_cls, keras_cls, kwargs", [
    (FusedAdamW, keras.optimizers.AdamW, {"weight_decay": 0.05}),
    (FusedAdam, keras.optimizers.Adam, {}),
])
def test_fused_update_matches_keras(fused_cls, keras_cls, kwargs):
    rng = np.random.default_rng(0)
    shapes = [(7, 5), (5,)]
    init = [rng.normal(size=s).astype(np.float32) for s in shapes]
    ours, theirs = [keras.Variable(x) for x in init], [keras.Variable(x) for x in init]
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, 10, 0.5)
    opt_ours = fused_cls(learning_rate=schedule, epsilon=1e-6, **kwargs)
    opt_theirs = keras_cls(learning_rate=schedule, epsilon=1e-6, **kwargs)

    @tf.function
    def step(grads):
        opt_ours.apply_gradients(zip(grads, ours))
        opt_theirs.apply_gradients(zip(grads, theirs))

    for _ in range(25):
        step([tf.constant(rng.normal(size=s).astype(np.float32)) for s in shapes])
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert int(opt_ours.iterations.numpy()) == 25


def test_built_optimizer_is_fused_and_still_skips_non_finite_steps():
    opt = build_optimizer(OptimizerConfig(name="adamw"), global_batch_size=256, total_steps=100, loss_scale=False)
    assert isinstance(opt.inner_optimizer, FusedAdamW)
    var = keras.Variable(np.ones(3, np.float32))
    opt.build([var])
    opt.apply_gradients([(tf.constant([1.0, np.nan, 1.0]), var)])
    np.testing.assert_array_equal(var.numpy(), np.ones(3, np.float32))
    opt.apply_gradients([(tf.constant([1.0, 1.0, 1.0]), var)])
    assert np.all(var.numpy() < 1.0)


def test_fused_update_under_mirrored_strategy():
    """Each replica's copy gets the same update (the raw op writes the local component of each variable)."""
    # The process-wide strategy of the trainer's mirrored backend: a second MirroredStrategy in one process
    # would reuse its collective keys and break later mirrored tests.
    strategy = mirrored_backend().strategy
    with strategy.scope():
        var = keras.Variable(np.ones((4,), np.float32))
        opt = FusedAdamW(learning_rate=0.1, weight_decay=0.0)
        opt.build([var])
    ref = keras.Variable(np.ones((4,), np.float32))
    ref_opt = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.0)
    ref_opt.build([ref])
    grad = tf.constant([0.5, -1.0, 2.0, 0.0])

    @tf.function
    def step():
        strategy.run(lambda: opt.apply_gradients([(grad / 2.0, var)]))  # summed over the 2 replicas

    step()
    ref_opt.apply_gradients([(grad, ref)])
    for component in var.value.values:
        np.testing.assert_allclose(component.numpy(), ref.numpy(), rtol=1e-6)
