"""The sparse first layer and its row-sparse (lazy) Adam update, against the alternatives, in one run.

Usage:
  python bench/sparse_first_layer.py [--features F] [--nonzeros K] [--width W] [--labels L] [--batch-size B]
                                     [--steps N] [--json FILE]

Shape (defaults): F = 100,000 features, about K = 100 non-zeros per example (feature ids drawn from a Zipf
law, so a batch shares its frequent features), first layer width W = 2048, batch B = 256. Measured one after
the other in this process (wall and CPU ms per step, median over ``--steps`` steps after a warm-up):

  layer: forward and backward (kernel gradient) of x [B, F] sparse times the [F, W] kernel:
      (a) tf.nn.embedding_lookup_sparse(kernel, ids, values, combiner="sum"),
      (b) tf.sparse.sparse_dense_matmul(x, kernel): reads the whole kernel; dense [F, W] gradient,
      (c) trainer.model.SparseDense: unique feature ids, gather of their rows, sparse_dense_matmul of x
          re-indexed onto them.
  update alone: ``apply_gradients`` of one batch's first-layer gradient (tf.IndexedSlices over the rows the
    batch uses) to the [F, W] kernel:
      (a) keras.optimizers.AdamW as it is (it converts the slices to a dense [F, W] gradient),
      (b) trainer.optimizers.AdamW (lazy: only those rows),
      (c) trainer.optimizers.AdamW on the same gradient made dense: what the optimizer of today's densified
          path costs per step.
  whole step: the W-W-L MLP with trainer.model.SparseDense first, trained by trainer.steps.make_train_function
    (one device) from an in-memory sparse batch, with (a) Keras' AdamW in Keras' LossScaleOptimizer and
    (b) trainer.optimizers.build_optimizer.

Prints the figures and the ratios a/b; ``--json FILE`` writes them (keys layer_ms, update_ms, step_ms,
update_keras_vs_lazy, step_keras_vs_lazy). Layer (b) runs on a kernel no sparse op has touched: once a gather
or scatter has used a variable, every dense read of it copies it whole.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.common import write_json  # noqa: E402
from trainer.backends import make_backend  # noqa: E402
from trainer.config import LossConfig, ModelConfig, OptimizerConfig  # noqa: E402
from trainer.losses import MultiLabelLoss  # noqa: E402
from trainer.model import build_model  # noqa: E402
from trainer.optimizers import AdamW, build_optimizer  # noqa: E402
from trainer.steps import make_train_function  # noqa: E402


def sparse_examples(num_examples: int, num_features: int, nonzeros: int, num_labels: int, seed: int = 0):
    """Zipf-distributed feature ids (unique per example), uniform values in [0, 1), ~5 labels per example."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_features + 1)
    weights /= weights.sum()
    indices = []
    for row in range(num_examples):
        cols = np.unique(rng.choice(num_features, nonzeros, p=weights))
        indices.append(np.stack([np.full(len(cols), row), cols], axis=1))
    indices = np.concatenate(indices).astype(np.int64)
    x = tf.SparseTensor(indices, rng.random(len(indices)).astype(np.float32), [num_examples, num_features])
    y = (rng.random((num_examples, num_labels)) < 5.0 / num_labels).astype(np.float32)
    return x, y


def timed(fn, steps: int, warmup: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds of ``fn()`` over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(steps):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(1000 * (time.perf_counter() - w))
        cpu.append(1000 * (time.process_time() - c))
    return statistics.median(wall), statistics.median(cpu)


def layer_timings(x, width: int, steps: int) -> tuple[dict, tf.IndexedSlices]:
    """Forward + kernel gradient of the three forms of the first layer; returns their timings and (c)'s gradient."""
    num_features = int(x.dense_shape[1])
    upstream = tf.random.stateless_normal([int(x.dense_shape[0]), width], [0, 1])
    layer = build_model(num_features, 1, ModelConfig(hidden=[width]), sparse_features=True).get_layer("hidden_0")

    def lookup(kernel):
        ids = tf.SparseTensor(x.indices, x.indices[:, 1], x.dense_shape)
        return tf.nn.embedding_lookup_sparse(kernel, ids, x, combiner="sum")

    forms = [("(a) embedding_lookup_sparse", lookup, tf.Variable(tf.zeros([num_features, width]))),
             ("(b) sparse_dense_matmul, whole kernel", lambda kernel: tf.sparse.sparse_dense_matmul(x, kernel),
              tf.Variable(tf.zeros([num_features, width]))),
             ("(c) SparseDense", lambda kernel: layer(x), layer.kernel.value)]
    timings, grad = {}, None
    for name, form, kernel in forms:
        def forward_backward(form=form, kernel=kernel):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(form(kernel) * upstream)
            return tape.gradient(loss, kernel)

        step = tf.function(forward_backward)
        timings[name] = timed(lambda: tf.nest.flatten(step(), expand_composites=True)[0].numpy(), steps, warmup=2)
        grad = step()
        print(f"  layer  {name:<34s} {timings[name][0]:9.1f} ms wall {timings[name][1]:9.1f} ms CPU "
              f"(gradient: {type(grad).__name__})", flush=True)
    return timings, grad


def update_alone(name: str, optimizer, grad, num_features: int, width: int, steps: int) -> tuple[float, float]:
    kernel = keras.Variable(tf.random.normal([num_features, width], stddev=0.01))
    optimizer.build([kernel])
    apply = tf.function(lambda: optimizer.apply_gradients([(grad, kernel)]))
    result = timed(apply, steps, warmup=2)
    print(f"  update {name:<34s} {result[0]:9.1f} ms wall {result[1]:9.1f} ms CPU", flush=True)
    return result


def whole_step(name: str, make_optimizer, x, y, args) -> tuple[float, float]:
    backend = make_backend("one_device")
    with backend.scope():
        model = build_model(args.features, args.labels, ModelConfig(hidden=[args.width, args.width]),
                            sparse_features=True)
        optimizer = make_optimizer()
        optimizer.build(model.trainable_variables)
    train = make_train_function(backend, model, optimizer, MultiLabelLoss(LossConfig(), args.labels), args.batch_size)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch_size, drop_remainder=True).repeat()
    iterator = iter(backend.distribute_dataset(lambda ctx: dataset))
    result = timed(lambda: train(iterator, tf.constant(1), tf.zeros([2])).numpy(), args.steps, warmup=2)
    print(f"  step   {name:<34s} {result[0]:9.1f} ms wall {result[1]:9.1f} ms CPU", flush=True)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=100_000)
    p.add_argument("--nonzeros", type=int, default=100)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--labels", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)

    x, y = sparse_examples(4 * args.batch_size, args.features, args.nonzeros, args.labels)
    first = tf.sparse.slice(x, [0, 0], [args.batch_size, args.features])
    print(f"F={args.features:,} width={args.width} batch={args.batch_size}: "
          f"{first.values.shape[0] / args.batch_size:.0f} non-zeros per example; "
          f"TF_CPU_ALLOCATOR_USE_BFC={os.environ.get('TF_CPU_ALLOCATOR_USE_BFC', '')}", flush=True)
    layer, grad = layer_timings(first, args.width, args.steps)
    print(f"  {grad.indices.shape[0]:,} of {args.features:,} rows in the first batch's gradient", flush=True)
    gc.collect()
    update, step = {}, {}
    update["keras"] = update_alone("(a) keras AdamW (densifies)", keras.optimizers.AdamW(1e-3), grad,
                                   args.features, args.width, args.steps)
    gc.collect()
    update["lazy"] = update_alone("(b) trainer AdamW, lazy rows", AdamW(1e-3), grad, args.features, args.width,
                                  args.steps)
    update["dense"] = update_alone("(c) trainer AdamW, dense gradient", AdamW(1e-3), tf.convert_to_tensor(grad),
                                   args.features, args.width, args.steps)
    gc.collect()
    step["keras"] = whole_step("(a) keras AdamW + LossScaleOptimizer",
                               lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.AdamW(1e-3)), x, y, args)
    gc.collect()
    step["lazy"] = whole_step("(b) trainer build_optimizer",
                              lambda: build_optimizer(OptimizerConfig(), args.batch_size, 1000, False), x, y, args)
    ratios = {"update_keras_vs_lazy": update["keras"][0] / update["lazy"][0],
              "step_keras_vs_lazy": step["keras"][0] / step["lazy"][0]}
    print(f"update: keras/lazy {ratios['update_keras_vs_lazy']:.1f}x (CPU {update['keras'][1] / update['lazy'][1]:.1f}x)"
          f"   whole step: keras/lazy {ratios['step_keras_vs_lazy']:.1f}x "
          f"(CPU {step['keras'][1] / step['lazy'][1]:.1f}x)")
    result = {"layer_ms": layer, "update_ms": update, "step_ms": step, **ratios, "shape": vars(args)}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
