"""Export for serving: a SavedModel with a signature ``features -> probabilities``, and label files beside it.

The SavedModel loads with plain ``tf.saved_model.load`` in a process that has none of this package.
Beside it: ``labels.json`` (label names in output order) and ``thresholds.json`` (the per-label decision
thresholds tuned on the validation split, or 0.5).

Readers never see a half-written export: a new one is written into ``export.tmp-<pid>``, synced to disk,
and swapped in by renames (``replace_dir``); ``find_export`` picks the complete copy a crash left.

Layout of ``<model_dir>/export``::

    export/saved_model/     SavedModel; every signature returns
                            {"probabilities": [N, L] float32, "predictions": [N, L] int32}
    export/labels.json      ["label name", ...]
    export/thresholds.json  {"label name": threshold, ...}

Signatures: "sparse" takes each example's feature ids and values as the components of two ragged tensors
with shared row splits (``indices`` [nnz] int64, ``values`` [nnz] float32, ``row_splits`` [N + 1] int64: example
i is ``indices[row_splits[i]:row_splits[i+1]]``); "dense" takes ``features`` [N, F] float32, and exists for
dense models and for sparse ones up to DENSE_SIGNATURE_MAX_FEATURES. "serving_default" is the model's own
form ("sparse" for a model with a sparse first layer, else "dense"). The module's ``predict_ragged(indices,
values)`` takes tf.RaggedTensors directly.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import keras
import numpy as np
import tensorflow as tf

from data_pipeline.errors import DataError
from trainer import files
from trainer.backends import tf_variable
from trainer.metrics.compute import load_thresholds
from trainer.steps import probabilities

SAVED_MODEL = "saved_model"
LABELS_FILE = "labels.json"
THRESHOLDS_FILE = "thresholds.json"
OLD_SUFFIX = ".old"


# The dense signature of a sparse model: a request row is F float32s, 256 KiB at this size.
DENSE_SIGNATURE_MAX_FEATURES = 65536


def is_sparse_model(model: keras.Model) -> bool:
    """Whether the model takes a tf.SparseTensor (built with sparse_features=True)."""
    return bool(model.inputs[0].sparse)


class _Serving(tf.Module):
    """The exported functions; the Keras model is closed over, not tracked (saving a Keras model tracked by a
    tf.Module adds Keras' own dense default signature, which a sparse model cannot trace)."""

    def __init__(self, model: keras.Model, thresholds: np.ndarray):
        super().__init__()
        # Keras 3 variables wrap tf.Variables; track the underlying ones so the SavedModel owns them.
        self.weights_ = [tf_variable(v) for v in model.weights]
        self.thresholds = tf.constant(thresholds, tf.float32)
        num_features = model.input_shape[-1]
        sparse_model = is_sparse_model(model)

        def outputs(x):
            probs = probabilities(model, x)
            return {"probabilities": probs, "predictions": tf.cast(probs >= self.thresholds, tf.int32)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="indices"),
                                      tf.TensorSpec([None], tf.float32, name="values"),
                                      tf.TensorSpec([None], tf.int64, name="row_splits")])
        def serve_sparse(indices, values, row_splits):
            rows = tf.ragged.row_splits_to_segment_ids(row_splits, out_type=tf.int64)
            shape = tf.stack([tf.size(row_splits, tf.int64) - 1, num_features])
            x = tf.SparseTensor(tf.stack([rows, indices], axis=1), values, shape)
            return outputs(x if sparse_model else tf.sparse.to_dense(tf.sparse.reorder(x)))

        @tf.function(input_signature=[tf.RaggedTensorSpec([None, None], tf.int64, ragged_rank=1),
                                      tf.RaggedTensorSpec([None, None], tf.float32, ragged_rank=1)])
        def predict_ragged(indices, values):
            return serve_sparse(indices.flat_values, values.flat_values, indices.row_splits)

        @tf.function(input_signature=[tf.TensorSpec([None, num_features], tf.float32, name="features")])
        def serve_dense(features):
            return outputs(tf.sparse.from_dense(features) if sparse_model else features)

        self.serve_sparse, self.predict_ragged = serve_sparse, predict_ragged
        self.signature_functions = {"sparse": serve_sparse}
        if not sparse_model or num_features <= DENSE_SIGNATURE_MAX_FEATURES:
            self.serve_dense = serve_dense
            self.signature_functions["dense"] = serve_dense
        self.signature_functions["serving_default"] = serve_sparse if sparse_model else serve_dense


def export_model(model: keras.Model, export_dir: str, label_names: list[str], thresholds=None) -> str:
    """Writes the serving export, replacing an existing one atomically (see ``replace_dir``).

    Args:
      model: the trained Keras model (logits out).
      export_dir: target directory (replaced if it exists).
      label_names: names in output order.
      thresholds: per-label decision thresholds (default 0.5).

    Returns:
      export_dir.
    """
    thresholds = np.full(len(label_names), 0.5, np.float32) if thresholds is None else np.asarray(
        thresholds, np.float32)
    export_dir = export_dir.rstrip("/")
    for leftover in glob.glob(glob.escape(export_dir) + ".tmp*"):  # of an export that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = f"{export_dir}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    module = _Serving(model, thresholds)
    tf.saved_model.save(module, os.path.join(tmp, SAVED_MODEL), signatures=module.signature_functions)
    write_label_files(tmp, label_names, thresholds)
    sync_tree(tmp)
    replace_dir(tmp, export_dir)
    return export_dir


def replace_dir(new: str, target: str) -> None:
    """Puts the complete directory ``new`` in place of ``target`` so that a crash at any point leaves a
    complete copy for ``find_export``: rename ``target`` aside to ``<target>.old``, rename ``new`` in,
    then delete ``<target>.old``.

    Killed between the renames, there is no ``target`` but a complete ``<target>.old``; killed while deleting
    ``<target>.old``, ``target`` is complete and takes precedence. The next call removes the leftovers.
    """
    old = target + OLD_SUFFIX
    if os.path.isdir(target):
        shutil.rmtree(old, ignore_errors=True)  # target is complete, so any old one is a leftover
        os.rename(target, old)
    os.rename(new, target)
    fsync(os.path.dirname(os.path.abspath(target)))
    shutil.rmtree(old, ignore_errors=True)


def sync_tree(path: str) -> None:
    """fsyncs every file and directory under ``path``, so that the rename that publishes them cannot survive
    a power loss that their contents do not."""
    for root, _, names in os.walk(path):
        for name in names:
            fsync(os.path.join(root, name))
        fsync(root)


def fsync(path: str) -> None:
    """fsyncs one file or directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(export_dir: str) -> bool:
    """Whether ``export_dir`` holds the SavedModel and both label files."""
    return all(os.path.isfile(os.path.join(export_dir, name))
               for name in (os.path.join(SAVED_MODEL, "saved_model.pb"), LABELS_FILE, THRESHOLDS_FILE))


def find_export(export_dir: str) -> str | None:
    """The complete export to read for ``export_dir``: itself, else ``<export_dir>.old`` (left by an export
    killed between its renames), else None. A directory being written (``.tmp-*``) is never returned."""
    export_dir = export_dir.rstrip("/")
    for candidate in (export_dir, export_dir + OLD_SUFFIX):
        if is_complete(candidate):
            return candidate
    return None


def write_label_files(directory: str, label_names: list[str], thresholds) -> None:
    with open(os.path.join(directory, LABELS_FILE), "w") as f:
        json.dump(list(label_names), f)
    with open(os.path.join(directory, THRESHOLDS_FILE), "w") as f:
        json.dump({n: float(t) for n, t in zip(label_names, thresholds)}, f, indent=0)


def load_export(export_dir: str):
    """Loads the complete export of ``export_dir`` (see ``find_export``).

    Returns:
      (predict_fn features -> probabilities, label_names, thresholds).

    Raises:
      FileNotFoundError: there is no complete export.
      DataError, ValueError: its label files are not valid JSON or do not match (names the file).
    """
    for attempt in range(3):  # An export replaced while we read it: read again from the new one.
        path = find_export(export_dir)
        if path is None:
            raise FileNotFoundError(f"{export_dir}: no complete exported model (training did not finish?)")
        try:
            return _load(path)
        except (FileNotFoundError, tf.errors.NotFoundError):
            if attempt == 2:
                raise


def _load(path: str):
    loaded = tf.saved_model.load(os.path.join(path, SAVED_MODEL))
    names = files.read_json(os.path.join(path, LABELS_FILE))
    if not isinstance(names, list):
        raise DataError(f"{os.path.join(path, LABELS_FILE)}: expected a JSON list of label names")
    thresholds = load_thresholds(os.path.join(path, THRESHOLDS_FILE), names).astype(np.float32)
    return _signature_predictor(loaded.signatures), names, thresholds


def _signature_predictor(signatures):
    """features -> probabilities over an export's signatures: a tf.SparseTensor goes to "sparse", a dense array
    to "dense", or to "sparse" when the export has no dense signature (a sparse model of many features). An
    export written before the sparse signature existed has only "serving_default" (dense)."""
    dense = signatures.get("dense", signatures["serving_default"] if "sparse" not in signatures else None)

    def predict(x):
        if isinstance(x, tf.SparseTensor):
            if "sparse" not in signatures:
                return dense(features=tf.sparse.to_dense(tf.sparse.reorder(x)))["probabilities"].numpy()
            return signatures["sparse"](**sparse_request(x))["probabilities"].numpy()
        if dense is None:
            return predict(tf.sparse.from_dense(tf.convert_to_tensor(x, tf.float32)))
        return dense(features=tf.convert_to_tensor(x, tf.float32))["probabilities"].numpy()

    return predict


def sparse_request(x: tf.SparseTensor) -> dict:
    """The inputs of the "sparse" signature for a [N, F] tf.SparseTensor."""
    x = tf.sparse.reorder(x)
    counts = tf.math.bincount(x.indices[:, 0], minlength=x.dense_shape[0], maxlength=x.dense_shape[0],
                              dtype=tf.int64)
    row_splits = tf.concat([tf.zeros([1], tf.int64), tf.cumsum(counts)], axis=0)
    return {"indices": x.indices[:, 1], "values": tf.cast(x.values, tf.float32), "row_splits": row_splits}
