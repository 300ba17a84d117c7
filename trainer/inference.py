"""``trainer evaluate`` and ``trainer predict``: load a trained model and run it over data.

A model directory can be read two ways: the latest checkpoint (rebuilt from the saved config.yaml and
run_info.json) or the serving export. Both give a function ``features -> probabilities``; evaluation then
accumulates the same metric state with the same loop as training does (evaluation.sum_metric_state) and
computes the same values.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np
import tensorflow as tf

from data_pipeline import manifest as mf
from data_pipeline import reader
from data_pipeline.errors import DataError
from trainer import config as config_lib
from trainer import evaluation, export, files
from trainer.metrics import compute
from trainer.metrics import state as metric_state
from trainer.steps import probabilities
from trainer.summaries import PerLabelOptions, SummaryWriters

log = logging.getLogger(__name__)


def load_predictor(model_dir: str, source: str = "auto"):
    """Loads a model directory.

    Args:
      model_dir: the training run's model directory.
      source: "checkpoint", "export" or "auto": the export when training finished after the latest
        checkpoint was written (it holds the weights training kept: with early stopping the best evaluation's,
        not the last step's, and the thresholds tuned for them), else the latest checkpoint.

    Returns:
      (predict_fn [N, F] -> [N, L] probabilities, label_names, thresholds, info dict from run_info.json).
    """
    return _load_predictor(_read_run(model_dir), source)


@dataclasses.dataclass
class _Run:
    """The files of a model directory that describe its run, read once."""

    model_dir: str
    info: dict  # run_info.json
    cfg: config_lib.Config  # config.yaml


def _read_run(model_dir: str) -> _Run:
    info = files.read_run_info(model_dir)
    if info is None:
        raise FileNotFoundError(f"{model_dir}: not a model directory (no run_info.json); train one first")
    return _Run(model_dir, info, config_lib.load_config(os.path.join(model_dir, "config.yaml")))


def _load_predictor(run: _Run, source: str):
    export_dir = os.path.join(run.model_dir, "export")
    latest = tf.train.latest_checkpoint(os.path.join(run.model_dir, "checkpoints"))
    if source == "auto":
        source = "export" if _export_is_current(export_dir, latest) else "checkpoint" if latest else "export"
    if source == "export":
        fn, names, thresholds = export.load_export(export_dir)
        return fn, names, thresholds, run.info
    if latest is None:
        raise FileNotFoundError(f"{run.model_dir}/checkpoints: no checkpoint")
    from trainer.model import build_model

    model = build_model(run.info["num_features"], run.info["num_labels"], run.cfg.model)
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    names = run.info["label_names"]
    complete = export.find_export(export_dir)
    thresholds = compute.load_thresholds(os.path.join(complete, export.THRESHOLDS_FILE), names) if complete else \
        np.full(len(names), 0.5, np.float32)
    predict = tf.function(lambda x: probabilities(model, x))
    log.info("loaded %s", latest)
    return (lambda x: predict(tf.convert_to_tensor(x, tf.float32)).numpy()), names, thresholds, run.info


def _export_is_current(export_dir: str, latest_checkpoint: str | None) -> bool:
    """Whether a complete export exists and was written after the latest checkpoint (the run finished)."""
    complete = export.find_export(export_dir)
    if complete is None:
        return False
    saved = os.path.join(complete, export.SAVED_MODEL)
    if latest_checkpoint is None:
        return True
    index = latest_checkpoint + ".index"
    return not os.path.exists(index) or os.path.getmtime(saved) >= os.path.getmtime(index)


def default_split(data_dir: str, split: str | None) -> str:
    """The split to use: the one named, else test, else eval, else train."""
    m = mf.read_manifest(data_dir)
    if split:
        m.split(split, data_dir)
        return split
    for name in ("test", "eval", "train"):
        if name in m.splits:
            return name
    return next(iter(m.splits))


def _ordered_batches(data_dir: str, split: str, batch_size: int):
    """Batches of a split in dataset order (one file at a time, no shuffling)."""
    options = reader.ReaderOptions(shuffle=False, repeat=False, deterministic=True, cycle_length=1)
    return reader.make_dataset(data_dir, split, batch_size, options=options)


def _check_shape(data_dir: str, info: dict) -> None:
    m = mf.read_manifest(data_dir)
    if (m.num_features, m.num_labels) != (info["num_features"], info["num_labels"]):
        raise DataError(f"{data_dir}: {m.num_features} features / {m.num_labels} labels, but the model was "
                        f"trained on {info['num_features']} / {info['num_labels']}")


def evaluate_command(model_dir: str, data_dir: str, split: str | None, out: str | None, source: str,
                     batch_size: int) -> compute.MetricsResult:
    """Evaluates a model directory on a dataset split; writes metrics JSON and per-label CSV, prints a table.

    The histograms have the run's metrics.num_bins: the resolution changes the AUCs a little, and
    ``evaluate`` must give the numbers training reported for the same model and data.
    """
    run = _read_run(model_dir)
    predict, names, thresholds, info = _load_predictor(run, source)
    _check_shape(data_dir, info)
    split = default_split(data_dir, split)
    num_bins, state_fn = evaluation.metric_state_function(run.cfg.metrics, len(names), thresholds,
                                                          info.get("label_counts"), info.get("num_train_examples"))
    batch_state = tf.function(state_fn)
    state = evaluation.sum_metric_state(_ordered_batches(data_dir, split, batch_size),
                                        lambda batch: batch_state(batch[1], predict(batch[0])),
                                        metric_state.zero_state(len(names), num_bins),
                                        evaluation.EvalSource(data_dir, split))
    result = compute.compute_metrics(state, names, thresholds, info.get("label_counts"))
    out = out or os.path.join(model_dir, f"metrics-{split}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in result.aggregates.items()},
                  f, indent=1)
    csv_path = os.path.splitext(out)[0] + "-per-label.csv"
    compute.per_label_csv(result, names, csv_path)
    print(f"evaluated {data_dir} split '{split}': {int(result.aggregates['num_examples'])} examples")
    print(compute.format_table(result))
    print(f"wrote {out} and {csv_path}")
    # The run's TensorBoard logs get the results too, under the split's name, at the model's training step.
    checkpoint = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    with SummaryWriters(os.path.join(model_dir, "logs"), per_label=PerLabelOptions.from_config(run.cfg.metrics)) as w:
        w.eval_results(int(checkpoint.rsplit("-", 1)[1]) if checkpoint else 0, result, run=split)
    print(f"wrote TensorBoard summaries to {os.path.join(model_dir, 'logs', split)}")
    return result


def _load_input(path: str) -> np.ndarray:
    """Reads a [rows, features] float32 array from .npy / .npz / .csv; errors name the file (and row)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such input file")
    try:
        if path.endswith(".npy"):
            x = np.load(path)
        elif path.endswith(".npz"):
            with np.load(path) as z:
                key = next((k for k in ("features", "x") if k in z), None)
                if key is None:
                    raise DataError(f"{path}: no array named 'features' or 'x'")
                x = z[key]
        elif path.endswith(".csv"):
            x = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
        else:
            raise DataError(f"{path}: unknown input format (use .npy, .npz or .csv)")
        x = np.asarray(x, np.float32)
    except (ValueError, OSError, EOFError) as e:  # a damaged file, pickled objects, a non-number in a CSV
        raise DataError(f"{path}: cannot read features ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    if x.ndim != 2:
        raise DataError(f"{path}: expected a 2-D array [rows, features], got shape {x.shape}")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise DataError(f"{path} row {bad[0]}: NaN/Inf feature value")
    return x


def predict_command(model_dir: str, data_dir: str | None, input_path: str | None, split: str | None, out: str,
                    top_k: int, batch_size: int) -> np.ndarray:
    """Writes probabilities (.npz) or top-k and thresholded label sets (.jsonl) for every example."""
    if not (out.endswith(".npz") or out.endswith(".jsonl")):
        raise ValueError(f"--out {out}: use a .npz or .jsonl file name")
    predict, names, thresholds, info = load_predictor(model_dir)
    if data_dir:
        _check_shape(data_dir, info)
        split = default_split(data_dir, split)
        try:
            probs = np.concatenate([predict(x) for x, _ in _ordered_batches(data_dir, split, batch_size)])
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
            raise reader.explain_data_error(data_dir, split, e) from None
    else:
        x = _load_input(input_path)
        if x.shape[1] != info["num_features"]:
            raise DataError(f"{input_path}: {x.shape[1]} features per row, the model takes {info['num_features']}")
        probs = np.concatenate([predict(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) \
            else np.zeros((0, len(names)), np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"  # renamed over --out when complete: a failed write keeps the old file
    try:
        with open(tmp, "wb") as f:
            if out.endswith(".npz"):
                np.savez_compressed(f, probabilities=probs, label_names=np.array(names),
                                    predictions=(probs >= thresholds).astype(np.int8), thresholds=thresholds)
            else:
                k = min(top_k, len(names))
                for i, p in enumerate(probs):
                    record = _prediction_record(i, p, names, thresholds, k)
                    f.write((json.dumps(record, allow_nan=False) + "\n").encode())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {len(probs)} predictions to {out}")
    return probs


def _prediction_record(index: int, probs: np.ndarray, names: list[str], thresholds: np.ndarray, k: int) -> dict:
    """One .jsonl line: the top-k labels and the thresholded label set. A NaN probability (a model whose
    weights went NaN; input rows with NaN/Inf are refused before) is written as null, never as the invalid
    JSON token NaN, and ranks last."""
    top = np.argsort(-np.nan_to_num(probs, nan=-1.0), kind="stable")[:k]
    return {"index": index,
            "top_k": [{"label": names[j], "probability": None if np.isnan(probs[j]) else round(float(probs[j]), 6)}
                      for j in top],
            "labels": [names[j] for j in np.flatnonzero(probs >= thresholds)]}
