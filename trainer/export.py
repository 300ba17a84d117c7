"""Export for serving: a SavedModel with a signature ``features -> probabilities``, and label files beside it.

The SavedModel loads with plain ``tf.saved_model.load`` in a process that has none of this package.
Beside it: ``labels.json`` (label names in output order) and ``thresholds.json`` (the per-label decision
thresholds tuned on the validation split, or 0.5).

Layout of ``<model_dir>/export``::

    export/saved_model/     SavedModel, signature "serving_default": features [N, F] float32 ->
                            {"probabilities": [N, L] float32, "predictions": [N, L] int32}
    export/labels.json      ["label name", ...]
    export/thresholds.json  {"label name": threshold, ...}
"""

from __future__ import annotations

import json
import os
import shutil

import keras
import numpy as np
import tensorflow as tf

from trainer.backends import tf_variable
from trainer.steps import probabilities

SAVED_MODEL = "saved_model"
LABELS_FILE = "labels.json"
THRESHOLDS_FILE = "thresholds.json"


class _Serving(tf.Module):
    def __init__(self, model: keras.Model, thresholds: np.ndarray):
        super().__init__()
        self.model = model
        # Keras 3 variables wrap tf.Variables; track the underlying ones so the SavedModel owns them.
        self.weights_ = [tf_variable(v) for v in model.weights]
        self.thresholds = tf.constant(thresholds, tf.float32)
        num_features = model.input_shape[-1]

        @tf.function(input_signature=[tf.TensorSpec([None, num_features], tf.float32, name="features")])
        def serve(features):
            probs = probabilities(self.model, features)
            return {"probabilities": probs,
                    "predictions": tf.cast(probs >= self.thresholds, tf.int32)}

        self.serve = serve


def export_model(model: keras.Model, export_dir: str, label_names: list[str], thresholds=None) -> str:
    """Writes the serving export atomically (temporary directory, then rename).

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
    tmp = export_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    module = _Serving(model, thresholds)
    tf.saved_model.save(module, os.path.join(tmp, SAVED_MODEL), signatures={"serving_default": module.serve})
    write_label_files(tmp, label_names, thresholds)
    shutil.rmtree(export_dir, ignore_errors=True)
    os.replace(tmp, export_dir)
    return export_dir


def write_label_files(directory: str, label_names: list[str], thresholds) -> None:
    with open(os.path.join(directory, LABELS_FILE), "w") as f:
        json.dump(list(label_names), f)
    with open(os.path.join(directory, THRESHOLDS_FILE), "w") as f:
        json.dump({n: float(t) for n, t in zip(label_names, thresholds)}, f, indent=0)


def load_export(export_dir: str):
    """Loads an export: returns (predict_fn features->probabilities, label_names, thresholds)."""
    loaded = tf.saved_model.load(os.path.join(export_dir, SAVED_MODEL))
    fn = loaded.signatures["serving_default"]
    with open(os.path.join(export_dir, LABELS_FILE)) as f:
        names = json.load(f)
    with open(os.path.join(export_dir, THRESHOLDS_FILE)) as f:
        th = json.load(f)
    thresholds = np.array([th[n] for n in names], np.float32)
    return (lambda x: fn(features=tf.convert_to_tensor(x, tf.float32))["probabilities"].numpy()), names, thresholds
