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

from data_pipeline import hashing
from data_pipeline import manifest as mf
from data_pipeline import reader
from data_pipeline.errors import DataError
from trainer import config as config_lib
from trainer import evaluation, export, files
from trainer.metrics import compute
from trainer.metrics import state as metric_state
from trainer.model import uses_sparse_input
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
      (predict_fn features -> [N, L] probabilities, label_names, thresholds, info dict from run_info.json). The
      features are a dense [N, F] array, or a [N, F] tf.SparseTensor that stays sparse (a sparse-built model from
      the checkpoint, the export's "sparse" signature).
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
    names = run.info["label_names"]
    complete = export.find_export(export_dir)
    thresholds = compute.load_thresholds(os.path.join(complete, export.THRESHOLDS_FILE), names) if complete else \
        np.full(len(names), 0.5, np.float32)
    log.info("loading %s", latest)
    return _checkpoint_predictor(run, latest), names, thresholds, run.info


def _checkpoint_predictor(run: _Run, checkpoint: str):
    """features -> probabilities from a checkpoint: a tf.SparseTensor goes to the model built with a sparse first
    layer, a dense array to the dense one (the same weights: each is built and restored when first needed)."""
    from trainer.model import build_model

    functions = {}

    def function(sparse: bool):
        if sparse not in functions:
            # model.l2 only regularises training (and is not available with a sparse first layer).
            model = build_model(run.info["num_features"], run.info["num_labels"],
                                dataclasses.replace(run.cfg.model, l2=0.0), sparse_features=sparse)
            tf.train.Checkpoint(model=model).restore(checkpoint).expect_partial()
            functions[sparse] = tf.function(lambda x: probabilities(model, x))
        return functions[sparse]

    def predict(x):
        if isinstance(x, tf.SparseTensor):
            return function(True)(x).numpy()
        return function(False)(tf.convert_to_tensor(x, tf.float32)).numpy()

    return predict


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


def _ordered_batches(run: _Run, data_dir: str, split: str, batch_size: int):
    """Batches of a split in dataset order (one file at a time, no shuffling); sparse features stay a
    tf.SparseTensor when the run's model.sparse_input takes them so (model.uses_sparse_input)."""
    m = mf.read_manifest(data_dir)
    options = reader.ReaderOptions(shuffle=False, repeat=False, deterministic=True, cycle_length=1,
                                   sparse_output=uses_sparse_input(run.cfg.model.sparse_input, m.sparse,
                                                                   m.num_features))
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
    state = evaluation.sum_metric_state(_ordered_batches(run, data_dir, split, batch_size),
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


LIBSVM_SUFFIXES = (".libsvm", ".svm", ".txt")
# Above this many labels predict's .npz holds the top-k and the thresholded label sets, not [N, L] arrays.
DENSE_OUTPUT_MAX_LABELS = 1000


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
            raise DataError(f"{path}: unknown input format (use .npy, .npz, .csv or LIBSVM text: "
                            f"{', '.join(LIBSVM_SUFFIXES)})")
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


def _load_libsvm(path: str, info: dict, index_base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads LIBSVM / XMC text (``[labels] idx:val idx:val ...`` per line; labels optional and ignored; an XMC
    header line is skipped; feature ids from ``index_base``) as CSR: (ids [nnz] int64, values [nnz] float32,
    row_splits [rows + 1] int64). Errors name the file and line."""
    from data_pipeline.converters.libsvm import _is_header, parse_line

    ids, values, lengths = [], [], []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if (lineno == 1 and _is_header(line)) or not line.strip():
                    continue
                where = f"{path} line {lineno}"
                _, row_ids, row_values = parse_line(line, where, index_base)
                if not np.isfinite(row_values).all():
                    raise DataError(f"{where}: NaN/Inf feature value")
                if np.unique(row_ids).size != row_ids.size:
                    raise DataError(f"{where}: a feature index occurs twice")
                row_ids, row_values = input_features(row_ids, row_values, info, where)
                ids.append(row_ids)
                values.append(row_values)
                lengths.append(row_ids.size)
        except UnicodeDecodeError as e:
            raise DataError(f"{path} line {lineno}: not UTF-8 text ({e.reason})") from None
    row_splits = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    concat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
    return concat(ids, np.int64), concat(values, np.float32), row_splits


def input_features(ids: np.ndarray, values: np.ndarray, info: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The model's (feature ids, values) for one row of raw (LIBSVM) input: the one place where a mapping the
    training data was written with applies to prediction input. A dataset converted with --hash-features
    (``feature_hashing`` in run_info.json, from its manifest) hashes the raw ids the same way, summing the values
    of ids that share a bucket; without one, ids are the model's own and must be below its F."""
    spec = info.get("feature_hashing")
    if spec:
        return hashing.hash_features(ids, values, hashing.HashSpec(**spec))
    num_features = info["num_features"]
    if ids.size and ids.max() >= num_features:
        raise DataError(f"{where}: feature index {int(ids.max())} is past the model's {num_features} features")
    return ids, values


def _input_batches(run: _Run, path: str, batch_size: int, index_base: int):
    """(rows, batches of features) of a --input file, every row checked before the first is predicted. LIBSVM
    rows are tf.SparseTensor batches when the run's model.sparse_input takes them so, else dense."""
    info = run.info
    num_features = info["num_features"]
    if not path.endswith(LIBSVM_SUFFIXES):
        x = _load_input(path)
        if x.shape[1] != num_features:
            raise DataError(f"{path}: {x.shape[1]} features per row, the model takes {num_features}")
        return len(x), (x[i:i + batch_size] for i in range(0, len(x), batch_size))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such input file")
    ids, values, row_splits = _load_libsvm(path, info, index_base)
    sparse = uses_sparse_input(run.cfg.model.sparse_input, True, num_features)
    rows = len(row_splits) - 1

    def batch(start: int, stop: int):
        a, b = row_splits[start], row_splits[stop]
        row_ids = np.repeat(np.arange(stop - start, dtype=np.int64), np.diff(row_splits[start:stop + 1]))
        x = tf.SparseTensor(np.stack([row_ids, ids[a:b]], axis=1), values[a:b], [stop - start, num_features])
        return x if sparse else tf.sparse.to_dense(tf.sparse.reorder(x)).numpy()

    return rows, (batch(i, min(i + batch_size, rows)) for i in range(0, rows, batch_size))


def predict_command(model_dir: str, data_dir: str | None, input_path: str | None, split: str | None, out: str,
                    top_k: int, batch_size: int, index_base: int = 0) -> int:
    """Writes, for every example, its top-k labels and its thresholded label set (.jsonl, streamed), or arrays of
    them (.npz; with the [N, L] probabilities up to DENSE_OUTPUT_MAX_LABELS labels); returns the examples."""
    if not (out.endswith(".npz") or out.endswith(".jsonl")):
        raise ValueError(f"--out {out}: use a .npz or .jsonl file name")
    if top_k < 1:
        raise ValueError(f"--top-k {top_k}: must be >= 1")
    run = _read_run(model_dir)
    predict, names, thresholds, info = _load_predictor(run, "auto")
    if data_dir:
        _check_shape(data_dir, info)
        split = default_split(data_dir, split)
        batches = (x for x, _ in _ordered_batches(run, data_dir, split, batch_size))
    else:
        _, batches = _input_batches(run, input_path, batch_size, index_base)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"  # renamed over --out when complete: a failed write keeps the old file
    try:
        with open(tmp, "wb") as f:
            writer = _PredictionWriter(f, out.endswith(".npz"), names, thresholds, min(top_k, len(names)))
            try:
                for x in batches:
                    writer.add(predict(x))
            except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
                raise reader.explain_data_error(data_dir, split, e) from None
            writer.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {writer.rows} predictions to {out}")
    return writer.rows


class _PredictionWriter:
    """Writes predictions batch by batch: .jsonl lines at once (memory bounded by a batch), .npz arrays at the
    end: ``top_k_indices`` / ``top_k_probabilities`` [N, k], the thresholded sets as CSR (``label_indices``,
    ``label_row_splits``), ``label_names``, ``thresholds``, and up to DENSE_OUTPUT_MAX_LABELS labels also
    ``probabilities`` [N, L] and ``predictions`` [N, L] int8."""

    def __init__(self, file, npz: bool, names: list[str], thresholds: np.ndarray, k: int):
        self.file, self.npz, self.names, self.thresholds, self.k = file, npz, names, thresholds, k
        self.dense = npz and len(names) <= DENSE_OUTPUT_MAX_LABELS
        self.rows = 0
        self.parts: dict[str, list] = {"top_k_indices": [], "top_k_probabilities": [], "label_indices": [],
                                       "label_counts": [], "probabilities": []}

    def add(self, probs: np.ndarray) -> None:
        if not self.npz:
            for i, p in enumerate(probs):
                record = _prediction_record(self.rows + i, p, self.names, self.thresholds, self.k)
                self.file.write((json.dumps(record, allow_nan=False) + "\n").encode())
        else:
            top = _top_k(probs, self.k)
            rows, labels = np.nonzero(probs >= self.thresholds)
            self.parts["top_k_indices"].append(top.astype(np.int32))
            self.parts["top_k_probabilities"].append(np.take_along_axis(probs, top, axis=1))
            self.parts["label_indices"].append(labels.astype(np.int32))
            self.parts["label_counts"].append(np.bincount(rows, minlength=len(probs)))
            if self.dense:
                self.parts["probabilities"].append(probs)
        self.rows += len(probs)

    def close(self) -> None:
        if not self.npz:
            return
        num_labels = len(self.names)
        joined = {key: np.concatenate(parts) if parts else None for key, parts in self.parts.items()}
        arrays = {"top_k_indices": _or_empty(joined["top_k_indices"], (0, self.k), np.int32),
                  "top_k_probabilities": _or_empty(joined["top_k_probabilities"], (0, self.k), np.float32),
                  "label_indices": _or_empty(joined["label_indices"], (0,), np.int32),
                  "label_row_splits": np.concatenate([[0], np.cumsum(_or_empty(joined["label_counts"], (0,),
                                                                               np.int64))]).astype(np.int64),
                  "label_names": np.array(self.names), "thresholds": self.thresholds}
        if self.dense:
            probs = _or_empty(joined["probabilities"], (0, num_labels), np.float32)
            arrays.update(probabilities=probs, predictions=(probs >= self.thresholds).astype(np.int8))
        np.savez_compressed(self.file, **arrays)


def _or_empty(array, shape, dtype) -> np.ndarray:
    return np.zeros(shape, dtype) if array is None else array


def _top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """[N, k] label indices by decreasing probability, in O(L) per row (NaN last; ties in index order, except
    at the k-th place)."""
    keyed = -np.nan_to_num(probs, nan=-1.0)
    if k < probs.shape[1]:
        part = np.argpartition(keyed, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(probs.shape[1]), probs.shape)
    order = np.lexsort((part, np.take_along_axis(keyed, part, axis=1)), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _prediction_record(index: int, probs: np.ndarray, names: list[str], thresholds: np.ndarray, k: int) -> dict:
    """One .jsonl line: the top-k labels and the thresholded label set. A NaN probability (a model whose
    weights went NaN; input rows with NaN/Inf are refused before) is written as null, never as the invalid
    JSON token NaN, and ranks last."""
    top = _top_k(probs[None], k)[0]
    return {"index": index,
            "top_k": [{"label": names[j], "probability": None if np.isnan(probs[j]) else round(float(probs[j]), 6)}
                      for j in top],
            "labels": [names[j] for j in np.flatnonzero(probs >= thresholds)]}
