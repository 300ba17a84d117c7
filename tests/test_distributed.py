"""tf.distribute backends: MirroredStrategy on 2 logical CPUs (in-process, see conftest) gives one_device's
results on the same global batch, for training and for evaluation; two multi-worker processes end with
identical weights and only the chief writes into the model directory."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import assert_same_state, mirrored_backend, read_checkpoint, train_in_process, train_two_workers
from data_pipeline import manifest as mf
from data_pipeline import reader
from trainer import evaluation
from trainer.backends import make_backend
from trainer.config import load_config
from trainer.losses import MultiLabelLoss
from trainer.model import build_model

# Deterministic, no dropout, no evaluation: two runs that see the same batches end with the same weights.
SAME_RUN = ["train.distribution=one_device", "model.hidden=[32, 32]", "model.dropout=0.0", "train.batch_size=64",
            "train.deterministic=true", "train.seed=3", "train.max_steps=30", "optimizer.learning_rate=0.01",
            "data.eval_split=''", "checkpoint.every_seconds=0", "optimizer.warmup_steps=5"]


def backend_for(name: str):
    return mirrored_backend() if name == "mirrored" else make_backend(name)


def test_mirrored_global_batch_is_one_device_batch(tiny_data):
    """Why mirrored and one_device can be compared on the training data as it is, shuffled.

    With 1 input pipeline and 2 replicas, the reader makes batches of the per-replica size (32) and the
    strategy hands consecutive ones to replica 0 and 1. The record stream before batching does not depend
    on the batch size (same seed, deterministic order), so replica 0 + replica 1 of global step i are records
    [64 i, 64 i + 64) of the stream: exactly one_device's batch i of 64.
    """
    cfg = load_config(None, SAME_RUN)
    options = reader.ReaderOptions(shuffle=True, shuffle_buffer=500, repeat=True, deterministic=True, seed=3,
                                   drop_remainder=True, block_length=cfg.data.block_length)

    def batches(backend, count):
        def dataset_fn(ctx):
            return reader.make_dataset(tiny_data, "train", ctx.get_per_replica_batch_size(64), ctx, options)

        it = iter(backend.distribute_dataset(dataset_fn))
        out = []
        for _ in range(count):
            x, y = next(it)
            parts = backend.strategy.experimental_local_results(x), backend.strategy.experimental_local_results(y)
            out.append((np.concatenate([p.numpy() for p in parts[0]]), np.concatenate([p.numpy() for p in parts[1]])))
        return out

    mirrored, one = mirrored_backend(), make_backend("one_device")
    assert mirrored.num_replicas == 2
    for (xm, ym), (xo, yo) in zip(batches(mirrored, 40), batches(one, 40)):  # 40 > one epoch (37 batches)
        assert xm.shape == (64, 32)
        np.testing.assert_array_equal(xm, xo)
        np.testing.assert_array_equal(ym, yo)


def test_mirrored_trains_like_one_device(tiny_data, tmp_path):
    cfg = load_config(None, SAME_RUN)
    states = {}
    for name in ("one_device", "mirrored"):
        result, messages = train_in_process(cfg, tiny_data, tmp_path / name, backend=backend_for(name))
        assert result.step == 30
        assert any(f"{name}: {2 if name == 'mirrored' else 1} replica(s)" in m for m in messages)
        states[name] = read_checkpoint(tmp_path / name)
    # Losses are divided by the global batch and gradients summed over replicas: the same update up to
    # float summation order (observed differences ~3e-8).
    assert_same_state(states["one_device"], states["mirrored"], rtol=1e-4, atol=1e-6)
    # ... and the comparison can fail: training moved the weights far more than the tolerance.
    init = load_config(None, SAME_RUN + ["train.max_steps=1"])
    train_in_process(init, tiny_data, tmp_path / "one_step", backend=make_backend("one_device"))
    early = read_checkpoint(tmp_path / "one_step")
    kernel = "optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE"
    assert np.abs(early[kernel] - states["one_device"][kernel]).max() > 1e-2


def test_two_mirrored_runs_of_different_models_in_one_process(tiny_data, tmp_path):
    # A second MirroredStrategy used to reuse the first one's collective keys: "Shape mismatch in the
    # collective instance 101", reported as a data error (see backends._mirrored_strategy).
    for i, hidden in enumerate(["[8, 8]", "[8]"]):
        cfg = load_config(None, [f"model.hidden={hidden}", "train.batch_size=32", "train.max_steps=3",
                                 "data.eval_split=''", "train.distribution=mirrored"])
        result, _ = train_in_process(cfg, tiny_data, tmp_path / str(i), backend=mirrored_backend())
        assert result.step == 3


def test_mirrored_evaluation_equals_single_device(tiny_data):
    """Evaluator with 2 replicas sums the same metric state as with one device, including the last uneven
    batch: 600 eval examples in per-replica batches of 32 are 19 batches, so on the last step replica 0 holds
    the 24 remaining examples and replica 1 none."""
    cfg = load_config(None, ["model.hidden=[16]", "train.batch_size=64", "metrics.num_bins=50"])
    manifest = mf.read_manifest(tiny_data)
    loss_fn = MultiLabelLoss(cfg.loss, manifest.num_labels)
    source = evaluation.EvalSource(tiny_data, "eval")
    weights, results = None, {}
    for name in ("one_device", "mirrored"):
        backend = backend_for(name)
        with backend.scope():
            model = build_model(manifest.num_features, manifest.num_labels, cfg.model, seed=0)
        if weights is None:
            # Non-trivial weights: random, scaled up so that probabilities spread over many bins.
            rng = np.random.default_rng(0)
            weights = [rng.normal(scale=0.5, size=w.shape).astype(np.float32) for w in model.get_weights()]
        model.set_weights(weights)
        results[name] = evaluation.Evaluator(backend, model, loss_fn, manifest, cfg).run(source)
    one, mirrored = results["one_device"], results["mirrored"]
    assert one.metrics.aggregates["num_examples"] == mirrored.metrics.aggregates["num_examples"] == 600
    for key in one.state:
        np.testing.assert_allclose(mirrored.state[key], one.state[key], rtol=1e-6, atol=1e-5, err_msg=key)
    assert mirrored.loss == pytest.approx(one.loss, rel=1e-6)
    for key, value in one.metrics.aggregates.items():
        assert mirrored.metrics.aggregates[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key
    assert 0.0 < one.metrics.aggregates["macro_roc_auc"] < 1.0


@pytest.mark.slow
def test_multi_worker_two_processes(tiny_data, tmp_path):
    """Two local workers (TF_CONFIG on 127.0.0.1): both exit 0, end with identical weights, and only the
    chief writes into the (shared) model directory."""
    model_dir = tmp_path / "model"
    args = ["train", "--data", tiny_data, "--model-dir", model_dir, "--distribution", "multi_worker",
            "--set", "model.hidden=[16]", "--set", "train.batch_size=64", "--set", "train.max_steps=12",
            "--set", "train.log_every_steps=4", "--set", "checkpoint.every_steps=5",
            "--set", "checkpoint.every_seconds=0", "--set", "train.eval_every_steps=6"]
    (chief_log, other_log), dumps = train_two_workers(args, tmp_path, timeout=240)
    assert "multi_worker: 2 replica(s), 2 worker(s)" in chief_log
    assert "trained 12 steps" in chief_log and "trained 12 steps" in other_log

    with np.load(dumps / "weights-0.npz") as a, np.load(dumps / "weights-1.npz") as b:
        assert len(a.files) == len(b.files) == 4
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    # Only the chief wrote: no temporary checkpoint directory of worker 1 is left, one events file per run.
    names = sorted(os.listdir(model_dir))
    assert names == ["checkpoints", "config.yaml", "export", "logs", "run_info.json"], names
    for run in ("train", "eval"):
        events = [n for n in os.listdir(model_dir / "logs" / run) if n.startswith("events.out.tfevents")]
        assert len(events) == 1, (run, events)
    ckpt = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    assert ckpt.endswith("ckpt-12")
    state = read_checkpoint(ckpt)
    with np.load(dumps / "weights-0.npz") as a:
        for i in range(4):
            np.testing.assert_array_equal(
                state[f"optimizer/_trainable_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE"], a[f"arr_{i}"])
