"""Bad settings and bad files of the trainer and the generator: caught before the first training step (or
before anything is written) with one line naming the flag, key, file or record, exit status 2; settings that
are legal but probably not meant get a one-line warning saying what the run will do."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY_DATA, train_in_process
from data_pipeline import cli as data_cli
from data_pipeline import manifest as mf
from data_pipeline.errors import DataError
from data_pipeline.generate import generate
from data_pipeline.writer import encode_example
from trainer import cli, inference, preflight
from trainer.config import load_config


def fails(capsys, main, argv) -> str:
    """Runs a command line in process; expects exit status 2 and one stderr line (log lines aside)."""
    assert main([str(a) for a in argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and " INFO " not in line and " WARNING " not in line]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def train_argv(data, model_dir, *sets, eval_data=None):
    argv = ["train", "--data", data, "--model-dir", model_dir, "--set", "train.distribution=one_device",
            "--set", "model.hidden=[8]", "--set", "train.max_steps=3"]
    for s in sets:
        argv += ["--set", s]
    return argv + (["--eval-data", eval_data] if eval_data else [])


@pytest.fixture
def copied_data(tiny_data, tmp_path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(tiny_data, out)
    return out


# --- Before the first step ------------------------------------------------------------------------------------

def test_eval_data_of_another_shape(tiny_data, tmp_path, capsys):
    other = tmp_path / "other"
    generate(str(other), 300, 32, 9, 1, seed=1, split_eval=0.3)
    line = fails(capsys, cli.main, train_argv(tiny_data, tmp_path / "m", eval_data=other))
    assert line == f"error: --eval-data {other}: 32 features / 9 labels, but --data {tiny_data} has 32 / 8"
    assert not (tmp_path / "m").exists()


def test_unknown_pr_curve_label(tiny_data, tmp_path, capsys):
    line = fails(capsys, cli.main, train_argv(tiny_data, tmp_path / "m", "metrics.pr_curve_labels=[label_001,label_01]"))
    assert line == (f"error: metrics.pr_curve_labels: 'label_01' is not a label of {tiny_data} "
                    "(did you mean 'label_001'?)")
    assert not (tmp_path / "m").exists()


def test_label_weights_of_another_length(tiny_data, tmp_path, capsys):
    line = fails(capsys, cli.main, train_argv(tiny_data, tmp_path / "m", "loss.label_weights=[1.0,2.0]"))
    assert line == f"error: loss.label_weights: 2 weights for the 8 labels of {tiny_data}"


def test_no_hidden_layer_is_refused(tiny_data, tmp_path, capsys):
    line = fails(capsys, cli.main, train_argv(tiny_data, tmp_path / "m", "model.hidden=[]"))
    assert line.startswith("error: model.hidden: [] would train a linear model")


def test_batch_larger_than_the_split_warns_and_says_what_happens(tiny_data, tmp_path):
    cfg = load_config(None, ["train.distribution=one_device", "model.hidden=[8]", "train.batch_size=100000",
                             "optimizer.base_batch_size=64", "train.epochs=2", "data.eval_split=''",
                             "train.early_stopping_patience=3"])
    result, messages = train_in_process(cfg, tiny_data, tmp_path / "m")
    warning = [m for m in messages if "train.batch_size 100000 is larger" in m]
    assert warning == [f"train.batch_size 100000 is larger than the 2400 training examples of {tiny_data} split "
                       "'train': each step repeats them 41.7 times, an epoch is 1 step (2 in all), at learning rate "
                       "x1562 (linear scaling from optimizer.base_batch_size 64)"], messages[:3]
    assert result.step == 2  # what the warning said
    assert "train.early_stopping_patience=3 has no effect: nothing to evaluate on (set data.validation_fraction, " \
        "or data.eval_split with an eval split)" in messages


def test_model_dir_that_is_a_file(tiny_data, tmp_path, capsys):
    (tmp_path / "m").write_text("not a directory")
    line = fails(capsys, cli.main, train_argv(tiny_data, tmp_path / "m"))
    assert line == f"error: --model-dir {tmp_path / 'm'}: exists and is not a directory"


def test_manifest_count_disagreeing_with_a_shard(copied_data, tmp_path, capsys):
    path = copied_data / mf.MANIFEST_NAME
    raw = json.loads(path.read_text())
    block = raw["block_size"]  # the tiny data is packed: the manifest's examples fix the number of block records
    raw["splits"]["train"]["shard_lengths"][2] += block
    path.write_text(json.dumps(raw))
    shard = copied_data / raw["splits"]["train"]["shards"][2]
    examples = raw["splits"]["train"]["shard_lengths"][2]
    blocks = -(-examples // block)
    line = fails(capsys, cli.main, train_argv(copied_data, tmp_path / "m"))
    assert line == (f"error: {shard}: {blocks - 1} records but the manifest says {blocks} "
                    f"({examples} examples in blocks of {block})")
    assert not (tmp_path / "m").exists()


def test_truncated_shard_is_found_before_training(copied_data, tmp_path, capsys):
    shard = copied_data / mf.shard_name("eval", 0, 1)
    size = shard.stat().st_size
    os.truncate(shard, size - 30)
    m = mf.read_manifest(str(copied_data))
    n = m.shard_records(m.split("eval").num_examples)
    line = fails(capsys, cli.main, train_argv(copied_data, tmp_path / "m"))
    assert line == f"error: {shard} record {n - 1}: truncated TFRecord (the file ends inside the record)"


def test_shards_beyond_the_counting_budget_are_checked_by_size(copied_data):
    m = mf.read_manifest(str(copied_data))
    preflight.check_shards(str(copied_data), "train", m, budget_bytes=0)  # sizes fit the counts
    m.splits["train"].shard_lengths[1] = 10 ** 7
    shard = copied_data / m.splits["train"].shards[1]
    with pytest.raises(DataError, match=f"{shard}: {shard.stat().st_size} bytes cannot hold the records the "
                                        f"manifest says: 39063 \\(10000000 examples"):
        preflight.check_shards(str(copied_data), "train", m, budget_bytes=0)
    m.splits["train"].shard_lengths[1] = 600 + m.block_size
    preflight.check_shards(str(copied_data), "train", m, budget_bytes=0)  # what a size cannot tell
    with pytest.raises(DataError, match="3 records but the manifest says 4 \\(856 examples in blocks of 256\\)"):
        preflight.check_shards(str(copied_data), "train", m)


def test_count_records_reads_the_framing_only(tmp_path):
    path = str(tmp_path / "x.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        for i in range(257):
            w.write(b"r" * (i % 13))  # records of 0..12 bytes, an empty one among them
    assert preflight.count_records(path) == 257
    Path(tmp_path / "empty.tfrecord").write_bytes(b"")
    assert preflight.count_records(str(tmp_path / "empty.tfrecord")) == 0


def test_damaged_run_info_is_named(trained_run, tiny_data, tmp_path, capsys):
    model_dir = tmp_path / "m"
    shutil.copytree(trained_run.model_dir, model_dir)
    info = model_dir / "run_info.json"
    info.write_text('{"num_features": 32, "num_labels"')
    expected = f"error: {info}: not valid JSON (Expecting ':' delimiter at line 1 column 34)"
    np.save(tmp_path / "x.npy", np.zeros((2, 32), np.float32))
    assert fails(capsys, cli.main, ["predict", "--model-dir", model_dir, "--input", tmp_path / "x.npy",
                                    "--out", tmp_path / "p.jsonl"]) == expected
    assert fails(capsys, cli.main, ["evaluate", "--model-dir", model_dir, "--data", tiny_data]) == expected
    config = model_dir / "config.yaml"
    assert fails(capsys, cli.main, ["train", "--config", config, "--data", tiny_data, "--model-dir", model_dir]) \
        == expected
    info.write_text('{"num_features": 32}')
    assert fails(capsys, cli.main, ["evaluate", "--model-dir", model_dir, "--data", tiny_data]) == \
        f"error: {info}: no 'num_labels' key (the file is damaged)"
    assert not (tmp_path / "p.jsonl").exists()


# --- predict ------------------------------------------------------------------------------------------------------

def test_predict_on_a_bad_dataset_names_the_file_and_record(trained_run, tmp_path, capsys):
    copied_data = tmp_path / "data"  # one example per record, so one record can be replaced
    generate(str(copied_data), **TINY_DATA, layout="example")
    m = mf.read_manifest(str(copied_data))
    shard = copied_data / m.split("eval").shards[0]
    records = list(tf.data.TFRecordDataset(str(shard)).as_numpy_iterator())
    records[7] = encode_example(np.zeros(31, np.float32), [1], mf.DENSE)  # one feature short
    with tf.io.TFRecordWriter(str(shard)) as w:
        for r in records:
            w.write(r)
    argv = ["--model-dir", trained_run.model_dir, "--data", copied_data, "--split", "eval"]
    expected = f"error: {shard} record 7: 31 features, expected 32"
    assert fails(capsys, cli.main, ["predict", *argv, "--out", tmp_path / "p.npz"]) == expected
    assert fails(capsys, cli.main, ["evaluate", *argv, "--out", tmp_path / "m.json"]) == expected
    assert not (tmp_path / "p.npz").exists()


@pytest.mark.parametrize("case", ["1-D", "3-D", "NaN row", "Inf row", "text in csv", "not an array"])
def test_predict_input_errors(case, trained_run, tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    path = tmp_path / ("x.csv" if case == "text in csv" else "x.npy")
    if case == "1-D":
        np.save(path, x[0])
    elif case == "3-D":
        np.save(path, x[None])
    elif case in ("NaN row", "Inf row"):
        x[3, 5] = np.nan if case == "NaN row" else -np.inf
        np.save(path, x)
    elif case == "text in csv":
        path.write_text("1,2,3\n4,five,6\n")
    else:
        path.write_bytes(b"not numpy at all")
    out = tmp_path / "p.jsonl"
    out.write_text("kept\n")
    line = fails(capsys, cli.main, ["predict", "--model-dir", trained_run.model_dir, "--input", path, "--out", out])
    assert line.startswith(f"error: {path}")
    assert {"1-D": ": expected a 2-D array [rows, features], got shape (32,)",
            "3-D": ": expected a 2-D array [rows, features], got shape (1, 5, 32)",
            "NaN row": " row 3: NaN/Inf feature value", "Inf row": " row 3: NaN/Inf feature value",
            "text in csv": ": cannot read features (", "not an array": ": cannot read features ("}[case] in line
    assert out.read_text() == "kept\n"  # an earlier output is not touched


def test_nan_probability_is_written_as_null_not_invalid_json():
    record = inference._prediction_record(4, np.array([0.2, np.nan, 0.9], np.float32), ["a", "b", "c"],
                                          np.full(3, 0.5, np.float32), k=3)
    line = json.dumps(record, allow_nan=False)
    assert json.loads(line) == {"index": 4, "top_k": [{"label": "c", "probability": 0.9},
                                                      {"label": "a", "probability": 0.2},
                                                      {"label": "b", "probability": None}], "labels": ["c"]}


# --- config and generate ----------------------------------------------------------------------------------------

def test_yaml_syntax_error_names_the_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden: [64, 64]\n dropout: 0.1\ntrain:\n  epochs: 2\n")
    line = fails(capsys, cli.main, ["train", "--config", path, "--data", tmp_path, "--model-dir", tmp_path / "m"])
    assert line.startswith(f"error: {path} line 3 column 2: not valid YAML (expected <block end>")
    path.write_text("train:\n  epochs: [2\n  batch_size: 3\n")
    line = fails(capsys, cli.main, ["train", "--config", path, "--data", tmp_path, "--model-dir", tmp_path / "m"])
    assert line.startswith(f"error: {path} line 3 column 13: not valid YAML (")


@pytest.mark.parametrize("flag,value,message", [
    ("--features", "-1", "--features: must be >= 1 (got -1)"),
    ("--labels", "0", "--labels: must be >= 1 (got 0)"),
    ("--examples", "0", "--examples: must be >= 1 (got 0)"),
    ("--shards", "-3", "--shards: must be >= 1 (got -3)"),
    ("--seed", "-5", "--seed: must be >= 0 (got -5)"),
    ("--workers", "0", "--workers: must be >= 1 (got 0)"),
    ("--split-eval", "1.5", "--split-eval: must be in [0, 1) (got 1.5)"),
    ("--split-eval", "0.999", "--split-eval 0.999: leaves no training example of --examples 100"),
])
def test_generate_flag_errors_name_the_flag(flag, value, message, tmp_path, capsys):
    argv = {"--out": str(tmp_path / "d"), "--examples": "100", "--features": "4", "--labels": "3"}
    argv[flag] = value
    line = fails(capsys, data_cli.main, ["generate", *[a for kv in argv.items() for a in kv]])
    assert line == f"error: {message}"
    assert os.listdir(tmp_path) == []
