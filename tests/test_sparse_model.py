"""Sparse features: build_model(sparse_features=True) over a tf.SparseTensor, trained by the step of
trainer/steps.py with the lazy row-sparse optimizer update -- against the dense model, through mixed precision,
a checkpoint round trip, and under MirroredStrategy (2 logical CPUs) and Horovod (2 ranks) against one device."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT, mirrored_backend
from sparse_training import F, L, SparseRun, sparse_data
from trainer.backends import make_backend
from trainer.checkpointing import CheckpointKeeper
from trainer.config import ConfigError, ModelConfig
from trainer.model import build_model


HOROVOD_ENV = Path(os.environ["MLT_HOROVOD_ENV"]) if os.environ.get("MLT_HOROVOD_ENV") else REPO_ROOT / ".venv-horovod"


def test_sparse_model_equals_the_dense_model_on_the_same_weights():
    x, _ = sparse_data(16)
    xs = tf.sparse.from_dense(x)
    for cfg in (ModelConfig(hidden=[16, 8]), ModelConfig(hidden=[8], ensemble=2),
                ModelConfig(hidden=[], input_transform="log1p"), ModelConfig(hidden=[8], input_transform="l2_normalize"),
                ModelConfig(hidden=[8], input_transform="log1p_l2", dropout=0.5)):
        sparse = build_model(F, L, cfg, sparse_features=True)
        dense = build_model(F, L, cfg)
        dense.set_weights(sparse.get_weights())
        np.testing.assert_allclose(sparse(xs).numpy(), dense(x).numpy(), rtol=1e-5, atol=1e-6, err_msg=str(cfg))
        with tf.GradientTape(persistent=True) as tape:
            loss_sparse = tf.reduce_sum(tf.square(sparse(xs)))
            loss_dense = tf.reduce_sum(tf.square(dense(x)))
        grads_sparse = tape.gradient(loss_sparse, sparse.trainable_variables)
        grads_dense = tape.gradient(loss_dense, dense.trainable_variables)
        first_kernels = [i for i, v in enumerate(sparse.trainable_variables) if v.shape[0] == F]
        assert first_kernels and all(isinstance(grads_sparse[i], tf.IndexedSlices) for i in first_kernels)
        for i in first_kernels:  # only the rows of features present in the batch
            assert set(grads_sparse[i].indices.numpy()) == set(np.flatnonzero(x.any(0)))
        for gs, gd in zip(grads_sparse, grads_dense):
            np.testing.assert_allclose(tf.convert_to_tensor(gs).numpy(), gd.numpy(), rtol=1e-4, atol=1e-5)


def test_sparse_input_dropout_drops_stored_values_only_in_training():
    x, _ = sparse_data(400, density=0.2)
    xs = tf.sparse.from_dense(x)
    model = build_model(F, L, ModelConfig(hidden=[4], input_dropout=0.3), seed=3, sparse_features=True)
    dropout = model.get_layer("input_dropout")
    dropped = dropout(xs, training=True)
    kept = dropped.values.numpy() != 0
    assert abs(1.0 - kept.mean() - 0.3) < 0.02
    np.testing.assert_allclose(dropped.values.numpy()[kept], xs.values.numpy()[kept] / 0.7, rtol=1e-6)
    np.testing.assert_array_equal(dropout(xs, training=False).values.numpy(), xs.values.numpy())


def test_l2_with_sparse_features_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^model\.l2: .*weight_decay"):
        build_model(F, L, ModelConfig(hidden=[4], l2=1e-4), sparse_features=True)


def test_sparse_training_updates_only_the_rows_it_uses():
    x, y = sparse_data(64)
    run = SparseRun(make_backend("one_device"), 16)
    initial = run.kernel()
    stats = run.train(x, y, steps=4)
    moved = np.any(run.kernel() != initial, axis=1)
    np.testing.assert_array_equal(moved, x.any(0))  # AdamW's decay too touches the used rows only
    assert not moved[-20:].any() and stats[2] == 0  # the features that never occur; no non-finite step


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_sparse_model_trains_under_mixed_precision(precision):
    x, y = sparse_data(256)
    keras.mixed_precision.set_global_policy(precision)
    try:
        run = SparseRun(make_backend("one_device"), 32, ModelConfig(hidden=[8, 8], dropout=0.0))
        first_loss = run.loss(x, y)
        stats = run.train(x, y, steps=80)
        assert run.model.get_layer("hidden_0").kernel.dtype == "float32"
        assert run.model.get_layer("hidden_0").compute_dtype == "float32"  # see SparseDense
        assert run.model.get_layer("hidden_1").compute_dtype == precision.split("_")[1]
        assert run.model.get_layer("logits").kernel.dtype == "float32"
        assert run.model.outputs[0].dtype == "float32"
        assert stats[2] == 0 and run.loss(x, y) < 0.9 * first_loss
        if precision == "mixed_float16":
            assert float(run.optimizer.dynamic_scale.numpy()) > 1.0
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _state(run: SparseRun) -> list[np.ndarray]:
    return [v.numpy() for v in run.model.variables + run.optimizer.variables]


def test_checkpoint_round_trip_restores_the_same_state_and_continues_identically(tmp_path):
    x, y = sparse_data(96)
    backend = make_backend("one_device")
    first = SparseRun(backend, 16, seed=0)
    first.train(x, y, steps=3)
    CheckpointKeeper(str(tmp_path), backend, 0, 0, 1, model=first.model, optimizer=first.optimizer).save(3)

    second = SparseRun(backend, 16, seed=1)  # other initial weights, overwritten by the restore
    assert not np.array_equal(second.kernel(), first.kernel())
    keeper = CheckpointKeeper(str(tmp_path), backend, 0, 0, 1, model=second.model, optimizer=second.optimizer)
    assert keeper.restore()
    for a, b in zip(_state(first), _state(second)):
        np.testing.assert_array_equal(a, b)
    first.train(x[48:], y[48:], steps=2)
    second.train(x[48:], y[48:], steps=2)
    for a, b in zip(_state(first), _state(second)):
        np.testing.assert_array_equal(a, b)


def test_mirrored_sparse_training_equals_one_device_on_the_same_global_batches():
    """Keras sums the replicas' IndexedSlices by concatenating them (duplicate rows across replicas); the
    optimizer adds the duplicates up, so 2 replicas of 16 make the same update as one device on 32."""
    x, y = sparse_data(128)
    mirrored = mirrored_backend()
    two = SparseRun(mirrored, 32)
    one = SparseRun(make_backend("one_device"), 32)
    initial = one.kernel()
    np.testing.assert_array_equal(initial, two.kernel())
    stats_two, stats_one = two.train(x, y, steps=4), one.train(x, y, steps=4)
    np.testing.assert_allclose(stats_two[:2], stats_one[:2], rtol=1e-5)
    for a, b in zip(one.model.get_weights(), two.model.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    for component in two.model.get_layer("hidden_0").kernel.value.values:  # every replica's copy
        np.testing.assert_allclose(component.numpy(), one.kernel(), rtol=1e-4, atol=1e-6)
    # Lazy on both: the features that never occur kept their initial rows (dense AdamW would decay them).
    np.testing.assert_array_equal(two.kernel()[-20:], initial[-20:])


_HOROVOD_JOB = r"""
import sys
import numpy as np
from sparse_training import SparseRun, sparse_data
from trainer.backends import make_backend

backend = make_backend(sys.argv[1])
run = SparseRun(backend, 32)
backend.broadcast_initial_state(run.model.variables + run.optimizer.variables)
x, y = sparse_data(128)
run.train(x, y, steps=4, steps_per_call=2)  # several steps per call: Horovod's allgather has no such limit
np.savez(sys.argv[2].format(rank=backend.worker_index), *run.model.get_weights())
"""


@pytest.mark.slow
@pytest.mark.horovod
def test_horovod_sparse_training_equals_one_process(tmp_path):
    """Horovod's grouped_allreduce (HorovodBackend.reduce_gradients as it is) sums IndexedSlices by allgathering
    values and indices, never densifying them; 2 ranks of 16 then train like one process on 32."""
    horovodrun = HOROVOD_ENV / "bin" / "horovodrun" if HOROVOD_ENV else None
    if horovodrun is None or not horovodrun.exists():
        pytest.skip("no Horovod environment (set MLT_HOROVOD_ENV)")
    python = str(HOROVOD_ENV / "bin" / "python")
    env = dict(os.environ, PYTHONPATH=f"{REPO_ROOT / 'tests'}{os.pathsep}{REPO_ROOT}", TF_CPP_MIN_LOG_LEVEL="2")
    env = {k: v for k, v in env.items() if not k.startswith(("HOROVOD_", "OMPI_", "PMI_", "TF_CONFIG"))}
    out = str(tmp_path / "weights-{rank}-" )
    jobs = {"horovod": [str(horovodrun), "-np", "2", "-H", "localhost:2", "--gloo", python, "-c", _HOROVOD_JOB,
                        "horovod", out + "hvd.npz"],
            "one_device": [python, "-c", _HOROVOD_JOB, "one_device", out + "one.npz"]}
    for name, cmd in jobs.items():
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{name}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    reference = np.load(tmp_path / "weights-0-one.npz")
    for rank in (0, 1):
        weights = np.load(tmp_path / f"weights-{rank}-hvd.npz")
        for key in reference.files:
            np.testing.assert_allclose(weights[key], reference[key], rtol=1e-4, atol=1e-6, err_msg=f"rank {rank} {key}")
