"""The trainer on one device: it learns, mixed precision keeps float32 outputs, a NaN loss stops cleanly, the
export serves without this package, and ``evaluate`` / ``predict`` give the trainer's numbers in dataset
order."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import assert_same_state, read_checkpoint, train_in_process
from data_pipeline import manifest as mf
from data_pipeline import validate
from data_pipeline.writer import DatasetWriter
from trainer import cli, export, inference
from trainer.config import load_config


@pytest.fixture
def float32_policy_after():
    """Mixed-precision runs set the global Keras policy; put float32 back for the tests that follow."""
    yield
    keras.mixed_precision.set_global_policy("float32")


def decode_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and multi-hot labels of a split decoded record by record with plain protobuf parsing, in
    dataset order (shards in manifest order, records in file order): the reference for "dataset order"."""
    x, labels = validate.read_split(data_dir, split)
    y = np.zeros((len(labels), mf.read_manifest(data_dir).num_labels), np.float32)
    for i, positives in enumerate(labels):
        y[i, positives] = 1.0
    return x, y


def bce(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def logged_losses(messages: list[str]) -> list[float]:
    return [float(m) for m in re.findall(r"step \d+/\d+ epoch \d+ loss ([0-9.]+)", "\n".join(messages))]


# --- Learning -----------------------------------------------------------------------------------------------

def test_one_device_learns_and_beats_trivial_predictor(trained_run, tiny_data):
    losses = logged_losses(trained_run.messages)
    assert len(losses) >= 4, trained_run.messages
    assert losses[-1] < 0.8 * losses[0], losses

    metrics = trained_run.result.final_metrics
    assert metrics["num_examples"] == mf.read_manifest(tiny_data).split("eval").num_examples
    assert metrics["macro_roc_auc"] > 0.6  # a constant (or random) predictor: 0.5
    # Held-out loss below that of predicting every label's training base rate (the best constant).
    m = mf.read_manifest(tiny_data)
    train = m.split("train")
    base_rates = np.asarray(train.label_counts, np.float64) / train.num_examples
    x, y = decode_split(tiny_data, "eval")
    predict, *_ = inference.load_predictor(trained_run.model_dir, "checkpoint")
    model_loss, trivial_loss = bce(y, predict(x)), bce(y, np.broadcast_to(base_rates, y.shape))
    assert model_loss < 0.95 * trivial_loss, (model_loss, trivial_loss)
    # The most frequent label as everyone's top label is the trivial precision@1.
    assert metrics["precision@1"] > y[:, np.argmax(base_rates)].mean() + 0.05


def test_train_puts_signal_handlers_back(trained_run):
    # train() catches SIGTERM/SIGINT while it runs; afterwards Ctrl-C must work again in the caller.
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        assert type(getattr(handler, "__self__", None)).__name__ != "_StopFlag", sig


# --- Mixed precision ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_with_float32_outputs(precision, tiny_data, tmp_path, float32_policy_after):
    cfg = load_config(None, [f"train.precision={precision}", "train.distribution=one_device", "model.hidden=[16]",
                             "train.batch_size=32", "train.max_steps=6", "data.eval_split=''",
                             "checkpoint.every_seconds=0"])
    result, _ = train_in_process(cfg, tiny_data, tmp_path / "m")
    assert result.step == 6

    # The model computes in the low precision but its logits (and so the loss) are float32.
    from trainer.model import build_model

    model = build_model(32, 8, cfg.model)
    assert model.get_layer("hidden_0").compute_dtype == precision.split("_")[1]
    assert model.outputs[0].dtype == "float32"

    state = read_checkpoint(tmp_path / "m")
    scale = float(state["optimizer/dynamic_scale/.ATTRIBUTES/VARIABLE_VALUE"])
    if precision == "mixed_float16":
        assert scale > 1.0  # dynamic loss scaling (starts at 2**15)
    else:
        assert scale == 1.0  # the LossScaleOptimizer only guards against non-finite steps
    assert all(v.dtype != np.float16 for v in state.values())  # variables stay float32

    predict, *_ = export.load_export(str(tmp_path / "m" / "export"))
    probs = predict(np.zeros((3, 32), np.float32))
    assert probs.dtype == np.float32 and np.all(np.isfinite(probs))


# --- NaN loss -----------------------------------------------------------------------------------------------

def test_nan_loss_exits_1_and_keeps_last_good_weights(tmp_path, capsys):
    # 320 records in one shard, read in order (data.shuffle=false); record 100 has finite but huge features
    # that overflow the first layer to inf, so the loss of batch 4 (records 96..127) is NaN.
    data = tmp_path / "poisoned"
    rng = np.random.default_rng(0)
    with DatasetWriter(str(data), 8, 4) as writer:
        examples = []
        for i in range(320):
            x = rng.normal(size=8).astype(np.float32)
            if i == 100:
                x[:] = 3.0e38
            examples.append((x, [i % 4], f"record {i}"))
        writer.write_split("train", iter(examples), 320, 1)
    model_dir = tmp_path / "m"
    code = cli.main(["train", "--data", str(data), "--model-dir", str(model_dir), "--distribution", "one_device",
                     "--set", "data.shuffle=false", "--set", "train.batch_size=32", "--set", "model.hidden=[8]",
                     "--set", "train.deterministic=true", "--set", "data.eval_split=''",
                     "--set", "checkpoint.every_steps=1", "--set", "checkpoint.keep=10"])
    err = capsys.readouterr().err
    assert code == 1
    assert "loss became NaN/Inf at step 4" in err, err
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith("ckpt-4")
    assert not (model_dir / "export").exists()

    at_nan, before = read_checkpoint(model_dir / "checkpoints" / "ckpt-4"), read_checkpoint(
        model_dir / "checkpoints" / "ckpt-3")
    assert all(np.all(np.isfinite(v)) for v in at_nan.values() if v.dtype.kind == "f")
    # The non-finite update was skipped: the weights saved at step 4 are those after step 3.
    weights = [k for k in at_nan if k.startswith("optimizer/_trainable_variables/")]
    assert len(weights) == 4  # kernel + bias of two Dense layers
    for k in weights:
        np.testing.assert_array_equal(at_nan[k], before[k], err_msg=k)
    first = read_checkpoint(model_dir / "checkpoints" / "ckpt-1")
    assert any(not np.array_equal(first[k], before[k]) for k in weights)  # it did train before that


# --- Export -------------------------------------------------------------------------------------------------

EXPORT_CHECK = """
import sys
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
out = loaded.signatures["serving_default"](features=tf.constant(np.load(sys.argv[2])))
np.save(sys.argv[3], out["probabilities"].numpy())
np.save(sys.argv[4], out["predictions"].numpy())
ours = sorted({m.split(".")[0] for m in sys.modules} & {"trainer", "data_pipeline", "conftest"})
assert not ours, ours
"""


def test_export_serves_with_plain_tensorflow(trained_run, tiny_data, tmp_path):
    export_dir = os.path.join(trained_run.model_dir, "export")
    x = np.random.default_rng(1).normal(size=(40, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run(
        [sys.executable, "-c", EXPORT_CHECK, os.path.join(export_dir, "saved_model"), "x.npy", "p.npy", "y.npy"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served, decisions = np.load(tmp_path / "p.npy"), np.load(tmp_path / "y.npy")

    # The trainer's model: rebuilt from the final checkpoint.
    predict, names, thresholds, _ = inference.load_predictor(trained_run.model_dir, "checkpoint")
    assert served.dtype == np.float32 and served.shape == (40, 8)
    np.testing.assert_allclose(served, predict(x), rtol=1e-5, atol=1e-6)

    with open(os.path.join(export_dir, "labels.json")) as f:
        assert json.load(f) == mf.read_manifest(tiny_data).label_names == names
    with open(os.path.join(export_dir, "thresholds.json")) as f:
        tuned = json.load(f)
    assert list(tuned) == names and all(0.0 <= t <= 1.0 for t in tuned.values())
    np.testing.assert_array_equal(decisions, served >= np.array([tuned[n] for n in names], np.float32))


# --- evaluate / predict -------------------------------------------------------------------------------------

REQUIRED_METRICS = ["precision@1", "precision@3", "precision@5", "ndcg@1", "ndcg@3", "ndcg@5", "micro_f1",
                    "macro_f1", "macro_roc_auc", "macro_pr_auc", "hamming_loss", "subset_accuracy", "lrap",
                    "num_examples", "num_labels"]
# Metrics that do not depend on the decision thresholds (training evaluates at 0.5, then tunes them).
THRESHOLD_FREE = ["precision@1", "precision@3", "precision@5", "ndcg@1", "ndcg@3", "ndcg@5", "macro_roc_auc",
                  "macro_pr_auc", "lrap", "num_examples", "num_labels"]


@pytest.mark.parametrize("source", ["checkpoint", "export"])
def test_evaluate_command_writes_metrics_and_per_label_csv(trained_run, tiny_data, tmp_path, capsys, source):
    out = tmp_path / "m.json"
    assert cli.main(["evaluate", "--model-dir", trained_run.model_dir, "--data", tiny_data, "--out", str(out),
                     "--source", source]) == 0
    capsys.readouterr()
    metrics = json.loads(out.read_text())
    assert set(REQUIRED_METRICS) <= set(metrics), sorted(set(REQUIRED_METRICS) - set(metrics))
    assert metrics["num_examples"] == 600 and metrics["num_labels"] == 8  # the eval split (no test split)
    # Same model, same data: the numbers the trainer reported at the end of training.
    for key in THRESHOLD_FREE:
        assert metrics[key] == pytest.approx(trained_run.result.final_metrics[key], abs=1e-6), key

    with open(tmp_path / "m-per-label.csv") as f:
        rows = list(csv.DictReader(f))
    names = mf.read_manifest(tiny_data).label_names
    assert len(rows) == 8
    assert [r[next(iter(r))] for r in rows] == names  # first column: the label name, in label order


def test_predict_npz_is_in_dataset_order(trained_run, tiny_data, tmp_path, capsys):
    # The train split: 4 shards, so the order across files is checked too.
    out = tmp_path / "p.npz"
    assert cli.main(["predict", "--model-dir", trained_run.model_dir, "--data", tiny_data, "--split", "train",
                     "--out", str(out), "--batch-size", "100"]) == 0
    capsys.readouterr()
    with np.load(out) as z:
        probs, names = z["probabilities"], list(z["label_names"])
    x, _ = decode_split(tiny_data, "train")
    assert len(mf.read_manifest(tiny_data).split("train").shards) == 4
    predict, *_ = inference.load_predictor(trained_run.model_dir, "checkpoint")
    assert probs.shape == (len(x), 8)
    assert names == mf.read_manifest(tiny_data).label_names
    np.testing.assert_allclose(probs, predict(x), rtol=1e-5, atol=1e-6)


def test_predict_jsonl_top_k_and_label_sets(trained_run, tiny_data, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert cli.main(["predict", "--model-dir", trained_run.model_dir, "--data", tiny_data, "--split", "eval",
                     "--out", str(out), "--top-k", "3"]) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    x, _ = decode_split(tiny_data, "eval")
    predict, names, thresholds, _ = inference.load_predictor(trained_run.model_dir, "checkpoint")
    probs = predict(x)
    assert len(rows) == len(x)
    for i, row in enumerate(rows):
        assert row["index"] == i
        top = [t["label"] for t in row["top_k"]]
        assert top == [names[j] for j in np.argsort(-probs[i], kind="stable")[:3]]
        assert row["labels"] == [n for n, p, t in zip(names, probs[i], thresholds) if p >= t]
    assert any(row["labels"] for row in rows)  # the thresholded sets are not all empty


def test_predict_from_npy_file(trained_run, tmp_path, capsys):
    x = np.random.default_rng(2).normal(size=(7, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert cli.main(["predict", "--model-dir", trained_run.model_dir, "--input", str(tmp_path / "x.npy"),
                     "--out", str(tmp_path / "q.npz")]) == 0
    with np.load(tmp_path / "q.npz") as z:
        probs = z["probabilities"]
    predict, *_ = inference.load_predictor(trained_run.model_dir, "checkpoint")
    np.testing.assert_allclose(probs, predict(x), rtol=1e-5, atol=1e-6)

    np.save(tmp_path / "bad.npy", x[:, :5])
    assert cli.main(["predict", "--model-dir", trained_run.model_dir, "--input", str(tmp_path / "bad.npy"),
                     "--out", str(tmp_path / "r.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "5 features per row, the model takes 32" in err, err


def test_after_early_stopping_evaluate_and_predict_use_the_restored_best_model(tiny_data, tmp_path, capsys):
    """Early stopping puts the best weights back before the export (and tunes the thresholds on them), but the
    last checkpoint holds the last weights. ``evaluate`` / ``predict`` of the finished run must read the
    model the trainer reported and exported, not the later, worse checkpoint."""
    # Evaluated on data of another hidden function (another seed): learning the training data makes the
    # evaluation worse, so the best evaluation is an early one and the end restores it.
    from data_pipeline.generate import generate

    other = tmp_path / "other"
    generate(str(other), num_examples=600, num_features=32, num_labels=8, num_shards=1, seed=1, split_eval=0.5)
    cfg = load_config(None, ["train.distribution=one_device", "model.hidden=[16]", "train.batch_size=32",
                             "train.max_steps=40", "train.deterministic=true", "optimizer.learning_rate=0.05",
                             "optimizer.decay=constant", "train.eval_every_steps=5",
                             "train.early_stopping_patience=100", "train.early_stopping_metric=macro_pr_auc",
                             "checkpoint.every_seconds=0"])
    model_dir = tmp_path / "m"
    result, messages = train_in_process(cfg, tiny_data, model_dir, eval_data_dir=str(other))
    restored = [m for m in messages if m.startswith("restoring the weights of step")]
    assert restored, "the last evaluation was the best: this test needs a run that restores"
    assert result.step == 40  # ended by max_steps; the checkpoint is step 40's

    out = tmp_path / "m.json"
    assert cli.main(["evaluate", "--model-dir", str(model_dir), "--data", str(other), "--split", "eval",
                     "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    for key in THRESHOLD_FREE:
        assert metrics[key] == pytest.approx(result.final_metrics[key], abs=1e-6), key

    x = np.random.default_rng(3).normal(size=(5, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert cli.main(["predict", "--model-dir", str(model_dir), "--input", str(tmp_path / "x.npy"),
                     "--out", str(tmp_path / "p.npz")]) == 0
    capsys.readouterr()
    served, *_ = export.load_export(str(model_dir / "export"))
    with np.load(tmp_path / "p.npz") as z:
        np.testing.assert_allclose(z["probabilities"], served(x), rtol=1e-5, atol=1e-6)


def test_step_error_on_valid_data_names_its_cause(tiny_data):
    """The loop reports an InvalidArgumentError from a train call as a data error; when every record is valid
    (another cause) the one line must carry TensorFlow's cause, not the "Graph execution error:" header."""
    from data_pipeline import reader

    message = ("Graph execution error:\n\nDetected at node while/CollectiveReduceV2 defined at (most recent call "
               "last):\n  File \"trainer/steps.py\", line 71, in train\n\nCollective ops is aborted by: Shape "
               "mismatch in the collective instance 101.\n\t [[{{node while/CollectiveReduceV2}}]] [Op:x]")
    error = reader.explain_data_error(tiny_data, "train", tf.errors.InvalidArgumentError(None, None, message))
    assert str(error) == f"{tiny_data} split 'train': Collective ops is aborted by: Shape mismatch in the " \
                         "collective instance 101."


# --- XLA --------------------------------------------------------------------------------------------------

def test_jit_compile_gives_the_same_training_as_without(tiny_data, tmp_path):
    """train.jit_compile=true compiles forward and backward with XLA; the result must match the plain run."""
    states = {}
    for jit in (False, True):
        cfg = load_config(None, [f"train.jit_compile={str(jit).lower()}", "train.distribution=one_device",
                                 "model.hidden=[16]", "model.dropout=0.0", "train.batch_size=32",
                                 "train.max_steps=8", "train.deterministic=true", "data.eval_split=''",
                                 "checkpoint.every_seconds=0"])
        result, _ = train_in_process(cfg, tiny_data, tmp_path / f"jit-{jit}")
        assert result.step == 8
        states[jit] = read_checkpoint(tmp_path / f"jit-{jit}")
    assert_same_state(states[False], states[True], rtol=1e-4, atol=1e-5)
