"""Evaluation is never silently off: a warning when training evaluates nothing, and `trainer evaluate` writes
its results (per-label table included) into the run's TensorBoard logs under the split's name."""

import csv
import os
import shutil

import numpy as np
from tensorboard.backend.event_processing import event_accumulator as ea

from conftest import REPO_ROOT, train_in_process
from trainer.labels_plugin.reader import LogdirReader


def test_warns_when_nothing_is_evaluated(tiny_data, tmp_path):
    from trainer.config import load_config

    cfg = load_config(str(REPO_ROOT / "configs" / "tiny.yaml"),
                      ["train.max_steps=2", "train.distribution=one_device", "data.eval_split="])
    _, messages = train_in_process(cfg, tiny_data, tmp_path / "model")
    warnings = [m for m in messages if "nothing to evaluate" in m]
    assert len(warnings) == 1 and "--eval-data" in warnings[0] and "data.validation_fraction" in warnings[0]
    assert not os.path.exists(tmp_path / "model" / "logs" / "eval")

    cfg = load_config(str(REPO_ROOT / "configs" / "tiny.yaml"), ["train.max_steps=2", "train.distribution=one_device"])
    _, messages = train_in_process(cfg, tiny_data, tmp_path / "model2")  # tiny_data has an eval split
    assert not [m for m in messages if "nothing to evaluate" in m]


def test_evaluate_writes_the_split_run(trained_run, tiny_data, tmp_path):
    from trainer.inference import evaluate_command

    model_dir = tmp_path / "model"
    shutil.copytree(trained_run.model_dir, model_dir)  # the session's run stays as it was for other tests
    out = tmp_path / "metrics-train.json"
    result = evaluate_command(str(model_dir), tiny_data, "train", str(out), "auto", 512)

    runs = LogdirReader(str(model_dir / "logs")).runs()
    assert sorted(runs) == ["eval", "train"]
    (step,) = runs["train"].steps()
    assert step == trained_run.result.step  # the step of the evaluated model
    table = runs["train"].tables[step]
    assert table.thresholds_tuned  # the export's thresholds
    with open(tmp_path / "metrics-train-per-label.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == table.labels
    for column in ("support", "pr_auc", "f1", "threshold"):
        expected = np.array([float(r[column]) if r[column] else np.nan for r in rows])
        np.testing.assert_allclose(table.column(column), expected, rtol=1e-4, err_msg=column)

    acc = ea.EventAccumulator(str(model_dir / "logs" / "train"), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert "metrics/micro_f1_at_tuned_thresholds" in tags and "metrics/macro_pr_auc" in tags
    assert acc.Tensors("metrics/macro_pr_auc")[-1].step == step
    assert "worst_labels" in tags and result.aggregates["num_examples"] > 0
