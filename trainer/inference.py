"""``trainer evaluate`` and ``trainer predict``: load a trained model and run it over data.

A model directory can be read two ways: the latest checkpoint (rebuilt from the saved config.yaml and
run_info.json) or the serving export. Both give a function ``features -> probabilities``; evaluation then
accumulates the same metric state as training does and computes the same values.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import tensorflow as tf

from data_pipeline import manifest as mf
from data_pipeline import reader
from data_pipeline.errors import DataError
from trainer import config as config_lib
from trainer import export
from trainer.metrics import compute
from trainer.metrics import state as metric_state

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
    info_path = os.path.join(model_dir, "run_info.json")
    if not os.path.exists(info_path):
        raise FileNotFoundError(f"{model_dir}: not a model directory (no run_info.json); train one first")
    with open(info_path) as f:
        info = json.load(f)
    export_dir = os.path.join(model_dir, "export")
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    if source == "auto":
        source = "export" if _export_is_current(export_dir, latest) else "checkpoint" if latest else "export"
    if source == "export":
        if not os.path.exists(os.path.join(export_dir, export.SAVED_MODEL)):
            raise FileNotFoundError(f"{export_dir}: no exported model (training did not finish?)")
        fn, names, thresholds = export.load_export(export_dir)
        return fn, names, thresholds, info
    if latest is None:
        raise FileNotFoundError(f"{model_dir}/checkpoints: no checkpoint")
    from trainer.model import build_model

    cfg = config_lib.load_config(os.path.join(model_dir, "config.yaml"))
    model = build_model(info["num_features"], info["num_labels"], cfg.model)
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    names = info["label_names"]
    thresholds_path = os.path.join(export_dir, export.THRESHOLDS_FILE)
    thresholds = compute.load_thresholds(thresholds_path, names) if os.path.exists(thresholds_path) else \
        np.full(len(names), 0.5, np.float32)
    predict = tf.function(lambda x: tf.sigmoid(tf.cast(model(x, training=False), tf.float32)))
    log.info("loaded %s", latest)
    return (lambda x: predict(tf.convert_to_tensor(x, tf.float32)).numpy()), names, thresholds, info


def _export_is_current(export_dir: str, latest_checkpoint: str | None) -> bool:
    """Whether the export exists and was written after the latest checkpoint (the run finished)."""
    saved = os.path.join(export_dir, export.SAVED_MODEL)
    if not os.path.exists(saved):
        return False
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
                     batch_size: int, num_bins: int | None = None) -> compute.MetricsResult:
    """Evaluates a model directory on a dataset split; writes metrics JSON and per-label CSV, prints a table.

    ``num_bins`` defaults to the run's metrics.num_bins: the histogram resolution changes the AUCs a little,
    and ``evaluate`` must give the numbers training reported for the same model and data.
    """
    predict, names, thresholds, info = load_predictor(model_dir, source)
    run_metrics = config_lib.load_config(os.path.join(model_dir, "config.yaml")).metrics
    if num_bins is None:
        num_bins = metric_state.histogram_bins(len(names), run_metrics.num_bins, run_metrics.histogram_budget_mib)
    inv_propensity = None  # PSP@k / PSnDCG@k need the training set's size (run_info.json of newer runs)
    if "num_train_examples" in info:
        inv_propensity = tf.constant(compute.inverse_propensity(
            info["label_counts"], info["num_train_examples"], run_metrics.propensity_a, run_metrics.propensity_b),
            tf.float32)
    _check_shape(data_dir, info)
    split = default_split(data_dir, split)
    update = tf.function(lambda y, p: metric_state.batch_metric_state(y, p, tf.constant(thresholds), num_bins,
                                                                      inv_propensity=inv_propensity))
    acc = metric_state.zero_state(len(names), num_bins)
    try:
        for x, y in _ordered_batches(data_dir, split, batch_size):
            probs = predict(x)
            acc = metric_state.accumulate(acc, {k: v.numpy() for k, v in update(y, probs).items()})
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
        raise reader.explain_data_error(data_dir, split, e) from None
    result = compute.compute_metrics(acc, names, thresholds, info.get("label_counts"))
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
    return result


def _load_input(path: str) -> np.ndarray:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such input file")
    if path.endswith(".npy"):
        return np.load(path).astype(np.float32)
    if path.endswith(".npz"):
        with np.load(path) as z:
            for key in ("features", "x"):
                if key in z:
                    return z[key].astype(np.float32)
        raise DataError(f"{path}: no array named 'features' or 'x'")
    if path.endswith(".csv"):
        return np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    raise DataError(f"{path}: unknown input format (use .npy, .npz or .csv)")


def predict_command(model_dir: str, data_dir: str | None, input_path: str | None, split: str | None, out: str,
                    top_k: int, batch_size: int) -> np.ndarray:
    """Writes probabilities (.npz) or top-k and thresholded label sets (.jsonl) for every example."""
    if not (out.endswith(".npz") or out.endswith(".jsonl")):
        raise ValueError(f"--out {out}: use a .npz or .jsonl file name")
    predict, names, thresholds, info = load_predictor(model_dir)
    if data_dir:
        _check_shape(data_dir, info)
        split = default_split(data_dir, split)
        probs = np.concatenate([predict(x) for x, _ in _ordered_batches(data_dir, split, batch_size)])
    else:
        x = _load_input(input_path)
        if x.shape[1] != info["num_features"]:
            raise DataError(f"{input_path}: {x.shape[1]} features per row, the model takes {info['num_features']}")
        probs = np.concatenate([predict(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) \
            else np.zeros((0, len(names)), np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".npz"):
        np.savez_compressed(out, probabilities=probs, label_names=np.array(names),
                            predictions=(probs >= thresholds).astype(np.int8), thresholds=thresholds)
    else:
        k = min(top_k, len(names))
        with open(out, "w") as f:
            for i, p in enumerate(probs):
                top = np.argsort(-p, kind="stable")[:k]
                f.write(json.dumps({
                    "index": i,
                    "top_k": [{"label": names[j], "probability": round(float(p[j]), 6)} for j in top],
                    "labels": [names[j] for j in np.flatnonzero(p >= thresholds)]}) + "\n")
    print(f"wrote {len(probs)} predictions to {out}")
    return probs
