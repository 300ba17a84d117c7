"""A sparse-feature model trained by trainer/steps.py's train function on in-memory data, for the tests of
test_sparse_model.py and the Horovod job they start (which imports this file)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from trainer.config import LossConfig, ModelConfig, OptimizerConfig
from trainer.losses import MultiLabelLoss
from trainer.model import build_model
from trainer.optimizers import build_optimizer
from trainer.steps import make_train_function

F, L = 120, 6  # features, labels


def sparse_data(num_examples: int, seed: int = 0, density: float = 0.04):
    """Dense features with a few non-zeros per row (the last 20 features never occur) and labels they predict."""
    rng = np.random.default_rng(seed)
    x = (rng.random((num_examples, F)) < density) * rng.uniform(0.5, 3.0, (num_examples, F))
    x[:, -20:] = 0.0
    y = (x @ rng.normal(size=(F, L)) > 0.5).astype(np.float32)
    return x.astype(np.float32), y


def sparse_batches(x, y, batch: int, ctx: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    """(tf.SparseTensor, labels) batches of ``batch`` rows in order, repeated; with an input context, every
    num_input_pipelines-th batch from this pipeline's (so the processes of one step read consecutive batches)."""
    ds = tf.data.Dataset.from_tensor_slices((tf.sparse.from_dense(x), y)).batch(batch, drop_remainder=True)
    if ctx is not None:
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
    return ds.repeat()


class SparseRun:
    """A sparse model, its optimizer (AdamW with weight decay) and trainer/steps.py's train function."""

    def __init__(self, backend, global_batch: int, cfg: ModelConfig = ModelConfig(hidden=[8], dropout=0.0), seed: int = 0):
        self.backend, self.global_batch = backend, global_batch
        keras.utils.set_random_seed(seed)
        with backend.scope():
            self.model = build_model(F, L, cfg, seed=seed, sparse_features=True)
            self.optimizer = build_optimizer(
                OptimizerConfig(name="adamw", learning_rate=0.05, weight_decay=0.1, warmup_steps=0), global_batch, total_steps=100,
                loss_scale=keras.mixed_precision.global_policy().name == "mixed_float16")
            self.optimizer.build(self.model.trainable_variables)
        self.train_fn = make_train_function(backend, self.model, self.optimizer, MultiLabelLoss(LossConfig(), L),
                                            global_batch)

    def train(self, x, y, steps: int, steps_per_call: int = 1) -> np.ndarray:
        """``steps`` steps over the batches of (x, y) in order, from the first; returns the summed stats.

        Under MirroredStrategy only one step per call: TF 2.21's all-gather of IndexedSlices (CollectiveGatherV2)
        fails with "Shape mismatch in the collective instance" when one call loops over several steps whose
        slices have different row counts.
        """
        per_replica = self.global_batch // self.backend.num_replicas
        iterator = iter(self.backend.distribute_dataset(lambda ctx: sparse_batches(x, y, per_replica, ctx)))
        calls = [steps_per_call] * (steps // steps_per_call)
        stats = [self.train_fn(iterator, n) for n in calls]
        return np.array([[s.loss_sum, s.examples, s.non_finite_steps] for s in stats]).sum(axis=0)

    def loss(self, x, y) -> float:
        logits = self.model(tf.sparse.from_dense(x), training=False)
        return float(tf.reduce_mean(MultiLabelLoss(LossConfig(), L)(y, logits)))

    def kernel(self) -> np.ndarray:
        return self.model.get_layer("hidden_0").kernel.numpy()
