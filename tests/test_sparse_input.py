"""Sparse-encoded datasets end to end (model.sparse_input): training feeds a tf.SparseTensor to the sparse first
layer (never densified), under one device and mirrored, resumes exactly after SIGKILL; the export serves the
sparse and the dense form; evaluate / predict read sparse data and LIBSVM text; the pre-flight refuses what the
sparse path cannot do."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import (REPO_ROOT, assert_same_state, mirrored_backend, read_checkpoint,
                      sigkill_after_first_checkpoint, train_in_process, train_two_workers)
from data_pipeline import manifest as mf
from data_pipeline import reader
from sparse_datasets import F, L, bag_of_words, libsvm_lines, write_sparse_dataset
from trainer import cli, export, inference
from trainer.backends import make_backend
from trainer.config import ConfigError, load_config
from trainer.model import SPARSE_INPUT_MIN_FEATURES, uses_sparse_input

KERNEL = "optimizer/_trainable_variables/0/.ATTRIBUTES/VARIABLE_VALUE"  # the first layer's [F, width] kernel
BASE = ["train.distribution=one_device", "model.hidden=[16]", "model.dropout=0.0", "train.batch_size=32",
        "train.deterministic=true", "train.seed=2", "optimizer.learning_rate=0.02", "optimizer.warmup_steps=5",
        "checkpoint.every_seconds=0", "train.log_every_steps=1000"]


@pytest.fixture(scope="module")
def sparse_data(tmp_path_factory) -> str:
    """Packed CSR shards: 1600 train (4 shards, blocks of 32) and 320 eval examples, F = 5000, L = 6."""
    return write_sparse_dataset(tmp_path_factory.mktemp("sparse"), "packed")


@pytest.fixture(scope="module")
def sparse_run(sparse_data, tmp_path_factory):
    """A model trained on sparse_data (auto: sparse path), evaluated on its eval split and exported."""
    model_dir = tmp_path_factory.mktemp("sparse_run") / "m"
    cfg = load_config(None, BASE + ["train.epochs=3", "metrics.tune_thresholds=false"])
    result, messages = train_in_process(cfg, sparse_data, model_dir)
    return model_dir, result


def eval_rows(data_dir: str, split: str = "eval"):
    """The split's (ids, values, labels) in dataset order, read back from the shards as a SparseTensor."""
    options = reader.ReaderOptions(shuffle=False, repeat=False, deterministic=True, cycle_length=1,
                                   sparse_output=True)
    xs, ys = [], []
    for x, y in reader.make_dataset(data_dir, split, 10_000, options=options):
        xs.append(tf.sparse.reorder(x))
        ys.append(y.numpy())
    return tf.sparse.concat(0, xs), np.concatenate(ys)


def test_the_decision():
    assert uses_sparse_input("auto", True, SPARSE_INPUT_MIN_FEATURES)
    assert not uses_sparse_input("auto", True, SPARSE_INPUT_MIN_FEATURES - 1)
    assert uses_sparse_input("true", True, 10)
    assert not uses_sparse_input("false", True, 10 ** 6)
    assert not any(uses_sparse_input(s, False, 10 ** 6) for s in ("auto", "true", "false"))
    # YAML reads true / false as booleans: the key takes them as its names.
    assert [load_config(None, [f"model.sparse_input={v}"]).model.sparse_input for v in ("true", "false", "auto")] \
        == ["true", "false", "auto"]
    with pytest.raises(ConfigError, match=r"^model\.sparse_input: 'yes please' is not one of auto, false, true$"):
        load_config(None, ["model.sparse_input=yes please"])


def test_sparse_training_learns_and_updates_only_the_rows_it_uses(sparse_data, sparse_run, tmp_path):
    """Row-sparse updates are the sparse path's signature: over 150 steps the 300 features that never occur keep
    their initial first-layer rows (AdamW's decay included), which the dense path (model.sparse_input=false)
    decays."""
    model_dir, result = sparse_run
    assert result.final_metrics["precision@1"] > 0.75 and result.final_metrics["macro_roc_auc"] > 0.75
    trained = read_checkpoint(model_dir)[KERNEL]
    states = {}
    for setting, steps in (("true", 1), ("false", 50)):
        cfg = load_config(None, BASE + [f"train.max_steps={steps}", "data.eval_split=''",
                                        f"model.sparse_input={setting}"])
        train_in_process(cfg, sparse_data, tmp_path / setting)
        states[setting] = read_checkpoint(tmp_path / setting)[KERNEL]
    np.testing.assert_array_equal(trained[-300:], states["true"][-300:])  # same seed: same initial rows
    assert np.abs(trained[:100] - states["true"][:100]).max() > 1e-2  # the rows used did train
    assert not np.array_equal(states["false"][-300:], states["true"][-300:])


TOTAL = 240
RESUME = BASE + [f"train.max_steps={TOTAL}", "train.epochs=100", "optimizer.decay=constant", "data.eval_split=''",
                 "checkpoint.every_steps=20", "checkpoint.keep=2"]


def test_sigkill_then_resume_equals_one_run(sparse_data, tmp_path):
    """Sparse path, one device: SIGKILL after the first checkpoint, run the same command again: the same state
    (weights, the lazy optimizer's moments, counters) as one uninterrupted run."""
    full, _ = train_in_process(load_config(None, RESUME), sparse_data, tmp_path / "full")
    assert full.step == TOTAL
    model_dir = tmp_path / "killed"
    args = ["train", "--data", sparse_data, "--model-dir", model_dir]
    for s in RESUME:
        args += ["--set", s]
    killed_at = sigkill_after_first_checkpoint(args, model_dir, tmp_path / "log")
    assert 0 < killed_at < TOTAL, killed_at
    result, messages = train_in_process(load_config(None, RESUME), sparse_data, model_dir)
    assert any(f"resuming at step {killed_at} of {TOTAL}" in m for m in messages), messages[:3]
    assert_same_state(read_checkpoint(model_dir), read_checkpoint(tmp_path / "full"), rtol=1e-6, atol=1e-7)


def test_mirrored_sparse_training_resumes_and_equals_one_device(sparse_data, tmp_path):
    """2 replicas, one step per call: stopped at 20 and resumed to 40, the state of one device's 40 steps."""
    sets = RESUME + ["train.max_steps=40", "train.steps_per_call=1"]
    train_in_process(load_config(None, sets), sparse_data, tmp_path / "one")
    mirrored = [*sets, "train.distribution=mirrored"]
    train_in_process(load_config(None, mirrored + ["train.max_steps=20"]), sparse_data, tmp_path / "two",
                     backend=mirrored_backend())
    result, messages = train_in_process(load_config(None, mirrored), sparse_data, tmp_path / "two",
                                        backend=mirrored_backend())
    assert result.step == 40 and any("mirrored: 2 replica(s)" in m and "resuming at step 20" in m for m in messages)
    one, two = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "two")
    assert_same_state(two, one, rtol=1e-4, atol=1e-6)
    assert np.array_equal(one[KERNEL][-300:], two[KERNEL][-300:])  # lazy on both


def test_mirrored_sparse_evaluation_equals_one_device(sparse_data):
    """The Evaluator on sparse batches: 2 replicas sum the metric state of one device, including the uneven last
    batch (320 eval examples in per-replica batches of 24: the last step holds 8 and 0)."""
    from trainer import evaluation
    from trainer.losses import MultiLabelLoss
    from trainer.model import build_model

    cfg = load_config(None, BASE + ["train.batch_size=48", "metrics.num_bins=50"])
    manifest = mf.read_manifest(sparse_data)
    results, weights = {}, None
    for backend in (make_backend("one_device"), mirrored_backend()):
        with backend.scope():
            model = build_model(F, L, cfg.model, sparse_features=True)
        weights = weights or [np.random.default_rng(0).normal(scale=0.5, size=w.shape).astype(np.float32)
                              for w in model.get_weights()]
        model.set_weights(weights)
        evaluator = evaluation.Evaluator(backend, model, MultiLabelLoss(cfg.loss, L), manifest, cfg)
        results[backend.num_replicas] = evaluator.run(evaluation.EvalSource(sparse_data, "eval"))
    one, two = results[1], results[2]
    assert one.metrics.aggregates["num_examples"] == two.metrics.aggregates["num_examples"] == 320
    for key in one.state:
        np.testing.assert_allclose(two.state[key], one.state[key], rtol=1e-6, atol=1e-5, err_msg=key)
    assert 0.0 < one.metrics.aggregates["macro_roc_auc"] < 1.0


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_sparse_training_under_mixed_precision(sparse_data, tmp_path, precision):
    import keras

    cfg = load_config(None, BASE + ["train.max_steps=40", "data.eval_split=''", f"train.precision={precision}"])
    try:
        result, messages = train_in_process(cfg, sparse_data, tmp_path / "m")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert result.step == 40 and any(f"precision {precision}" in m for m in messages)
    assert np.isfinite(read_checkpoint(tmp_path / "m")[KERNEL]).all()


# --- Export ---------------------------------------------------------------------------------------------------

SERVE_BOTH = """
import sys
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
z = np.load(sys.argv[2])
sparse = loaded.signatures["sparse"](indices=tf.constant(z["indices"]), values=tf.constant(z["values"]),
                                     row_splits=tf.constant(z["row_splits"]))
ragged = loaded.predict_ragged(tf.RaggedTensor.from_row_splits(z["indices"], z["row_splits"]),
                               tf.RaggedTensor.from_row_splits(z["values"], z["row_splits"]))
dense = loaded.signatures["dense"](features=tf.constant(z["dense"]))
np.savez(sys.argv[3], sparse=sparse["probabilities"].numpy(), ragged=ragged["probabilities"].numpy(),
         dense=dense["probabilities"].numpy(), default=sorted(loaded.signatures["serving_default"]
                                                                .structured_input_signature[1]))
ours = sorted({m.split(".")[0] for m in sys.modules} & {"trainer", "data_pipeline", "conftest"})
assert not ours, ours
"""


def serve_in_plain_tensorflow(model_dir, x: tf.SparseTensor, tmp_path) -> dict:
    request = {k: v.numpy() for k, v in export.sparse_request(x).items()}
    np.savez(tmp_path / "req.npz", **request, dense=tf.sparse.to_dense(tf.sparse.reorder(x)).numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", SERVE_BOTH, os.path.join(model_dir, "export", "saved_model"),
                           "req.npz", "out.npz"], cwd=tmp_path, env=dict(env, TF_CPP_MIN_LOG_LEVEL="2"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as z:
        return {k: z[k] for k in z.files}


def test_sparse_model_export_serves_both_forms(sparse_data, sparse_run, tmp_path):
    model_dir, _ = sparse_run
    x, _ = eval_rows(sparse_data)
    served = serve_in_plain_tensorflow(model_dir, x, tmp_path)
    own, *_ = inference.load_predictor(str(model_dir), "checkpoint")
    expected = own(x)  # the model's own predictions (sparse-built model, restored from the checkpoint)
    assert expected.shape == (320, L) and list(served["default"]) == ["indices", "row_splits", "values"]
    for form in ("sparse", "ragged", "dense"):
        np.testing.assert_allclose(served[form], expected, rtol=1e-5, atol=1e-6, err_msg=form)
    assert np.abs(expected - expected.mean(0)).max() > 0.05  # the predictions depend on the input


def test_dense_model_export_serves_the_sparse_form_too(trained_run, tiny_data, tmp_path):
    """A dense-feature model (conftest's trained_run, F = 32): "serving_default" stays the dense signature;
    "sparse" gives the same probabilities for the same rows."""
    x = np.random.default_rng(4).normal(size=(9, 32)).astype(np.float32)
    x[np.random.default_rng(5).random(x.shape) < 0.7] = 0.0
    served = serve_in_plain_tensorflow(trained_run.model_dir, tf.sparse.from_dense(x), tmp_path)
    own, *_ = inference.load_predictor(trained_run.model_dir, "checkpoint")
    assert list(served["default"]) == ["features"]
    for form in ("sparse", "ragged", "dense"):
        np.testing.assert_allclose(served[form], own(x), rtol=1e-5, atol=1e-6, err_msg=form)


# --- evaluate / predict ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["checkpoint", "export"])
def test_evaluate_on_sparse_data_gives_training_numbers(sparse_data, sparse_run, tmp_path, capsys, source):
    model_dir, result = sparse_run
    out = tmp_path / "m.json"
    assert cli.main(["evaluate", "--model-dir", str(model_dir), "--data", sparse_data, "--split", "eval",
                     "--out", str(out), "--source", source]) == 0
    capsys.readouterr()
    metrics = json.loads(out.read_text())
    for key in ("precision@1", "precision@3", "ndcg@3", "macro_roc_auc", "macro_pr_auc", "lrap"):
        assert metrics[key] == pytest.approx(result.final_metrics[key], abs=1e-6), key


def test_predict_libsvm_input_equals_predict_data(sparse_data, sparse_run, tmp_path, capsys):
    """The eval split as LIBSVM text (1-based ids, labels on some lines only) predicts what the dataset does."""
    model_dir, _ = sparse_run
    ids, values, labels = bag_of_words(320, 1)  # the eval split's rows (write_sparse_dataset: seed + 1)
    lines = libsvm_lines(ids, values, labels, index_base=1)
    lines = [line if i % 2 else line.split(" ", 1)[1] for i, line in enumerate(lines)]  # half without labels
    (tmp_path / "x.libsvm").write_text("\n".join(lines) + "\n")
    argv = ["predict", "--model-dir", str(model_dir), "--top-k", "3"]
    assert cli.main([*argv, "--input", str(tmp_path / "x.libsvm"), "--index-base", "1",
                     "--out", str(tmp_path / "a.jsonl")]) == 0
    assert cli.main([*argv, "--data", sparse_data, "--split", "eval", "--out", str(tmp_path / "b.jsonl")]) == 0
    assert cli.main([*argv, "--input", str(tmp_path / "x.libsvm"), "--index-base", "1",
                     "--out", str(tmp_path / "c.npz")]) == 0
    capsys.readouterr()
    a, b = ((tmp_path / n).read_text().splitlines() for n in ("a.jsonl", "b.jsonl"))
    assert len(a) == 320 and a == b
    first = json.loads(a[0])
    assert len(first["top_k"]) == 3 and set(first) == {"index", "top_k", "labels"}
    with np.load(tmp_path / "c.npz") as z:
        names = list(z["label_names"])
        top = [[names[j] for j in row] for row in z["top_k_indices"]]
        sets = np.split(z["label_indices"], z["label_row_splits"][1:-1])
        assert z["probabilities"].shape == (320, L)  # few labels: the dense array too
    rows = [json.loads(line) for line in a]
    assert top == [[t["label"] for t in r["top_k"]] for r in rows]
    assert [[names[j] for j in s] for s in sets] == [r["labels"] for r in rows]


@pytest.mark.parametrize("case, text, message", [
    ("bad pair", "0,1 3:1 7-2\n", "line 1: bad feature '7-2' (expected index:value)"),
    ("index past F", f"1:1\n 2:1 {F}:3\n", f"line 2: feature index {F} is past the model's {F} features"),
    ("NaN value", "1:1\n1:2\n 4:nan\n", "line 3: NaN/Inf feature value"),
    ("twice", " 4:1 4:2\n", "line 1: a feature index occurs twice"),
    ("below base", " 0:1\n", "line 1: feature index 0 below --index-base 1"),
])
def test_predict_libsvm_errors_name_file_and_line(sparse_run, tmp_path, capsys, case, text, message):
    model_dir, _ = sparse_run
    path, out = tmp_path / "x.txt", tmp_path / "p.jsonl"
    path.write_text(text)
    out.write_text("kept\n")
    base = ["--index-base", "1"] if case == "below base" else []
    assert cli.main(["predict", "--model-dir", str(model_dir), "--input", str(path), "--out", str(out), *base]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path} {message}\n"
    assert out.read_text() == "kept\n"


def test_npz_output_at_many_labels_holds_top_k_and_label_sets_only(tmp_path):
    """Above DENSE_OUTPUT_MAX_LABELS the .npz has no [N, L] array: top-k and the thresholded sets, which the
    NumPy reference gives."""
    rng = np.random.default_rng(0)
    num_labels = inference.DENSE_OUTPUT_MAX_LABELS + 1
    probs = rng.random((50, num_labels)).astype(np.float32) ** 8
    names, thresholds = [f"l{j}" for j in range(num_labels)], np.full(num_labels, 0.5, np.float32)
    with open(tmp_path / "p.npz", "wb") as f:
        writer = inference._PredictionWriter(f, True, names, thresholds, 4)
        for i in range(0, 50, 16):
            writer.add(probs[i:i + 16])
        writer.close()
    with np.load(tmp_path / "p.npz") as z:
        assert "probabilities" not in z.files and "predictions" not in z.files
        np.testing.assert_array_equal(z["top_k_indices"], np.argsort(-probs, axis=1, kind="stable")[:, :4])
        np.testing.assert_array_equal(z["top_k_probabilities"], -np.sort(-probs, axis=1)[:, :4])
        sets = np.split(z["label_indices"], z["label_row_splits"][1:-1])
        assert [list(s) for s in sets] == [list(np.flatnonzero(p >= 0.5)) for p in probs]
        assert sum(len(s) for s in sets) > 0


# --- Pre-flight -----------------------------------------------------------------------------------------------

def fails(capsys, argv) -> str:
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("sets, key", [
    (["train.jit_compile=true"], "train.jit_compile: XLA does not compile tf.SparseTensor inputs"),
    (["model.l2=0.001"], "model.l2: not available with sparse input"),
    (["data.on_bad_features=skip"], "data.on_bad_features: skip drops rows of dense features only"),
])
def test_preflight_refuses_what_the_sparse_path_cannot_do(sparse_data, tmp_path, capsys, sets, key):
    argv = ["train", "--data", sparse_data, "--model-dir", tmp_path / "m"]
    for s in BASE + sets:
        argv += ["--set", s]
    assert fails(capsys, argv).startswith(f"error: {key}")
    assert not (tmp_path / "m").exists()


def test_mirrored_sparse_input_runs_one_step_per_call(sparse_data, tmp_path, caplog):
    """Several steps per call cannot all-gather IndexedSlices under tf.distribute (TensorFlow 2.21): the run
    takes one step per call, says so, and its config.yaml records it; the dense path keeps the setting."""
    sets = [*BASE[1:], "train.distribution=mirrored", "train.steps_per_call=3", "train.max_steps=4",
            "data.eval_split=''"]
    with caplog.at_level(logging.WARNING):
        result, _ = train_in_process(load_config(None, sets), sparse_data, tmp_path / "m", backend=mirrored_backend())
    assert result.step == 4
    assert any("train.steps_per_call 3 -> 1" in r.getMessage() for r in caplog.records)
    assert load_config(str(tmp_path / "m" / "config.yaml")).train.steps_per_call == 1
    train_in_process(load_config(None, sets + ["model.sparse_input=false"]), sparse_data, tmp_path / "d",
                     backend=mirrored_backend())
    assert load_config(str(tmp_path / "d" / "config.yaml")).train.steps_per_call == 3


def test_preflight_refuses_sparse_input_true_on_dense_data_and_dense_eval_data(sparse_data, tiny_data, tmp_path,
                                                                              capsys):
    err = fails(capsys, ["train", "--data", tiny_data, "--model-dir", tmp_path / "m", "--set",
                         "model.sparse_input=true"])
    assert err == (f"error: model.sparse_input: true needs sparse-encoded features, but {tiny_data} stores them as "
                   f"{mf.read_manifest(tiny_data).feature_encoding} (use auto or false)\n")
    from data_pipeline.converters import ConvertOptions, convert

    ids, values, labels = bag_of_words(32, 7)
    (tmp_path / "eval.libsvm").write_text("\n".join(libsvm_lines(ids, values, labels)) + "\n")
    convert(ConvertOptions(format="libsvm", inputs=(str(tmp_path / "eval.libsvm"),), splits=("eval",),
                           out=str(tmp_path / "dense"), encoding="dense", num_features=F, num_labels=L, shards=1))
    err = fails(capsys, ["train", "--data", sparse_data, "--eval-data", tmp_path / "dense", "--model-dir",
                         tmp_path / "m"])
    assert err.startswith(f"error: --eval-data {tmp_path / 'dense'}: features stored as packed_dense, but the model "
                          "takes the sparse features")


# --- Multi-process (slow) -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_multi_worker_sparse_training(sparse_data, tmp_path):
    """Two local workers on the sparse path (one step per call, see preflight): both exit 0 with identical
    weights, the unused rows untouched."""
    args = ["train", "--data", sparse_data, "--model-dir", tmp_path / "model", "--distribution", "multi_worker"]
    for s in BASE[1:] + ["train.max_steps=12", "train.steps_per_call=1", "train.eval_every_steps=6"]:
        args += ["--set", s]
    (chief, _), dumps = train_two_workers(args, tmp_path)
    assert "trained 12 steps" in chief
    with np.load(dumps / "weights-0.npz") as a, np.load(dumps / "weights-1.npz") as b:
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        kernel = a["arr_0"]
    assert kernel.shape == (F, 16)
    one = tmp_path / "one"
    train_in_process(load_config(None, BASE + ["train.max_steps=1", "data.eval_split=''"]), sparse_data, one)
    np.testing.assert_array_equal(kernel[-300:], read_checkpoint(one)[KERNEL][-300:])


@pytest.mark.slow
@pytest.mark.horovod
def test_horovod_sparse_training(sparse_data, tmp_path):
    """horovodrun -np 2 on the sparse path with several steps per call (Horovod's allgather of IndexedSlices has
    no such limit): ranks end identical, resumed after a stop they continue, the export serves the sparse form."""
    from test_sparse_model import HOROVOD_ENV

    horovodrun = HOROVOD_ENV / "bin" / "horovodrun"
    if not horovodrun.exists():
        pytest.skip("no Horovod environment (set MLT_HOROVOD_ENV)")
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOROVOD_", "OMPI_", "PMI_", "TF_CONFIG"))}
    env.update(PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="2",
               MLT_DUMP_WEIGHTS=str(dumps / "weights-{worker}.npz"))
    for steps in (10, 20):
        cmd = [str(horovodrun), "-np", "2", "-H", "localhost:2", "--gloo", str(HOROVOD_ENV / "bin" / "python"), "-m",
               "trainer", "train", "--data", sparse_data, "--model-dir", str(tmp_path / "model"), "--distribution",
               "horovod", "--max-steps", str(steps)]
        for s in BASE[1:] + ["train.steps_per_call=5", "data.eval_split=eval"]:
            cmd += ["--set", s]
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "resuming at step 10 of 20" in proc.stdout + proc.stderr
    with np.load(dumps / "weights-0.npz") as a, np.load(dumps / "weights-1.npz") as b:
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert read_checkpoint(tmp_path / "model")["step/.ATTRIBUTES/VARIABLE_VALUE"] == 20
    x, _ = eval_rows(sparse_data)
    predict, *_ = inference.load_predictor(str(tmp_path / "model"), "export")
    own, *_ = inference.load_predictor(str(tmp_path / "model"), "checkpoint")
    np.testing.assert_allclose(predict(x), own(x), rtol=1e-5, atol=1e-6)
