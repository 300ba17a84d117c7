"""trainer.optimizers: the fused dense Adam/AdamW update against Keras' own optimizers, and the lazy row-sparse
update for tf.IndexedSlices gradients against a NumPy reference."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import mirrored_backend
from trainer.config import OptimizerConfig
from trainer.optimizers import Adam, AdamW, LossScaleOptimizer, build_optimizer


@pytest.mark.parametrize("fused_cls, keras_cls, kwargs", [
    (AdamW, keras.optimizers.AdamW, {"weight_decay": 0.05}),
    (Adam, keras.optimizers.Adam, {}),
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


def lazy_adamw_reference(var, steps, lr, wd, beta_1=0.9, beta_2=0.999, eps=1e-7):
    """LazyAdam(W) in NumPy (float64), written from the formulas: at step t, the rows present in the gradient
    (duplicates summed) decay by (1 - lr wd), then get Adam's update; other rows and their moments stay."""
    var = var.astype(np.float64)
    m, v = np.zeros_like(var), np.zeros_like(var)
    for t, (indices, values) in enumerate(steps, start=1):
        grad = np.zeros_like(var)
        np.add.at(grad, indices, values)
        rows = np.unique(indices)
        g = grad[rows]
        m[rows] = beta_1 * m[rows] + (1 - beta_1) * g
        v[rows] = beta_2 * v[rows] + (1 - beta_2) * g * g
        var[rows] *= 1 - lr * wd
        var[rows] -= lr * np.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t) * m[rows] / (np.sqrt(v[rows]) + eps)
    return var, m, v


def dense_adamw_reference(var, grads, lr, wd, beta_1=0.9, beta_2=0.999, eps=1e-7):
    """Keras' AdamW on dense gradients, in NumPy: every element decays and moves every step."""
    var = var.astype(np.float64)
    m, v = np.zeros_like(var), np.zeros_like(var)
    for t, g in enumerate(grads, start=1):
        var *= 1 - lr * wd
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        var -= lr * np.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t) * m / (np.sqrt(v) + eps)
    return var


def _row_steps(rng, num_rows, width, num_steps):
    """Sparse gradients over rows 0..num_rows-2 (the last row is never used), with duplicate indices."""
    steps = []
    for _ in range(num_steps):
        indices = rng.integers(0, num_rows - 1, size=6)
        indices[1] = indices[0]  # a duplicate row, as replicas' concatenated slices have
        steps.append((indices, rng.normal(size=(6, width)).astype(np.float32)))
    return steps


@pytest.mark.parametrize("cls, wd", [(AdamW, 0.1), (Adam, 0.0)])
def test_row_sparse_update_is_lazy_adam(cls, wd):
    rng = np.random.default_rng(1)
    num_rows, width, lr = 9, 4, 0.05
    kernel0 = rng.normal(size=(num_rows, width)).astype(np.float32)
    bias0 = rng.normal(size=width).astype(np.float32)
    kernel, bias = keras.Variable(kernel0), keras.Variable(bias0)
    opt = cls(learning_rate=lr, **({"weight_decay": wd} if wd else {}))
    opt.build([kernel, bias])
    steps = _row_steps(rng, num_rows, width, 7)
    bias_grads = [rng.normal(size=width).astype(np.float32) for _ in steps]

    @tf.function
    def apply(indices, values, bias_grad):
        grad = tf.IndexedSlices(values, indices, tf.constant([num_rows, width], tf.int64))
        opt.apply_gradients([(grad, kernel), (bias_grad, bias)])

    for (indices, values), bias_grad in zip(steps, bias_grads):
        apply(tf.constant(indices), tf.constant(values), tf.constant(bias_grad))
    ref_kernel, ref_m, ref_v = lazy_adamw_reference(kernel0, steps, lr, wd)
    np.testing.assert_allclose(kernel.numpy(), ref_kernel, rtol=1e-5, atol=1e-6)
    index = opt._get_variable_index(kernel)
    np.testing.assert_allclose(opt._momentums[index].numpy(), ref_m, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(opt._velocities[index].numpy(), ref_v, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(kernel.numpy()[-1], kernel0[-1])  # never in a gradient: not even decayed
    # The dense variable of the same step keeps the fused update with the decay of every element.
    np.testing.assert_allclose(bias.numpy(), dense_adamw_reference(bias0, bias_grads, lr, wd), rtol=1e-5, atol=1e-6)


def test_row_sparse_update_with_every_row_present_equals_the_dense_update():
    rng = np.random.default_rng(2)
    init = rng.normal(size=(5, 3)).astype(np.float32)
    sparse_var, dense_var = keras.Variable(init), keras.Variable(init)
    opt_sparse, opt_dense = AdamW(0.01, weight_decay=0.05), AdamW(0.01, weight_decay=0.05)
    for _ in range(4):
        g = rng.normal(size=(5, 3)).astype(np.float32)
        order = rng.permutation(5)
        opt_sparse.apply_gradients([(tf.IndexedSlices(tf.constant(g[order]), tf.constant(order), [5, 3]), sparse_var)])
        opt_dense.apply_gradients([(tf.constant(g), dense_var)])
    np.testing.assert_allclose(sparse_var.numpy(), dense_var.numpy(), rtol=1e-5, atol=1e-6)


def test_built_optimizer_is_fused_and_still_skips_non_finite_steps():
    opt = build_optimizer(OptimizerConfig(name="adamw"), global_batch_size=256, total_steps=100, loss_scale=False)
    assert isinstance(opt, LossScaleOptimizer) and isinstance(opt.inner_optimizer, AdamW)
    var = keras.Variable(np.ones(3, np.float32))
    opt.build([var])
    opt.apply_gradients([(tf.constant([1.0, np.nan, 1.0]), var)])
    np.testing.assert_array_equal(var.numpy(), np.ones(3, np.float32))
    opt.apply_gradients([(tf.constant([1.0, 1.0, 1.0]), var)])
    assert np.all(var.numpy() < 1.0)


@pytest.mark.parametrize("loss_scale", [False, True])
def test_non_finite_row_sparse_gradient_skips_the_step(loss_scale):
    opt = build_optimizer(OptimizerConfig(name="adamw"), global_batch_size=256, total_steps=100,
                          loss_scale=loss_scale)
    kernel = keras.Variable(np.ones((4, 2), np.float32))
    opt.build([kernel])
    scale = float(opt.dynamic_scale.numpy())

    def grad(values):
        return tf.IndexedSlices(tf.constant(values, tf.float32), tf.constant([2]), tf.constant([4, 2]))

    opt.apply_gradients([(grad([[np.inf, 1.0]]), kernel)])
    np.testing.assert_array_equal(kernel.numpy(), np.ones((4, 2), np.float32))
    assert int(opt.iterations.numpy()) == 0
    if loss_scale:
        assert float(opt.dynamic_scale.numpy()) == scale / 2
    opt.apply_gradients([(grad([[scale, -scale]]), kernel)])
    assert np.all(kernel.numpy()[2] != 1.0) and np.all(np.delete(kernel.numpy(), 2, axis=0) == 1.0)


def test_fused_update_under_mirrored_strategy():
    """Each replica's copy gets the same update (the raw op writes the local component of each variable)."""
    # The process-wide strategy of the trainer's mirrored backend: a second MirroredStrategy in one process
    # would reuse its collective keys and break later mirrored tests.
    strategy = mirrored_backend().strategy
    with strategy.scope():
        var = keras.Variable(np.ones((4,), np.float32))
        opt = AdamW(learning_rate=0.1, weight_decay=0.0)
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
