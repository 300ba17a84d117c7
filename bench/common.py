"""Helpers shared by the benchmark scripts: the generated benchmark dataset, the per-example parse of the
baselines, and the JSON result file."""

from __future__ import annotations

import json
import time

from data_pipeline import manifest as mf
from data_pipeline.generate import generate


def ensure_dataset(data_dir: str, examples: int, features: int, labels: int, shards: int,
                   split_eval: float = 0.0, layout: str = "example", feature_dtype: str = "float32") -> mf.Manifest:
    """Generates the synthetic benchmark dataset unless ``data_dir`` already holds one of this shape and storage.

    Args:
      data_dir: where the dataset is (or goes).
      examples, features, labels, shards: its shape (``examples`` counts every split).
      split_eval: fraction of the examples written to an "eval" split (0: train only).
      layout, feature_dtype: storage (generate's arguments). The default, one example per record, is what the
        per-example baselines parse; the examples are the same in every layout and dtype for a shape.

    A dataset of the right shape but another encoding (e.g. written by an earlier version) is regenerated, so
    every pipeline measures the records the current writer produces.

    Returns:
      The dataset's manifest.
    """
    encoding = mf.encoding_for(layout, sparse=False)
    try:
        m = mf.read_manifest(data_dir)
        shape = (m.num_features, m.num_labels, sum(s.num_examples for s in m.splits.values()),
                 len(m.splits["train"].shards), m.feature_encoding, m.feature_dtype, "eval" in m.splits)
        if shape == (features, labels, examples, shards, encoding, feature_dtype, split_eval > 0):
            print(f"reusing {data_dir}")
            return m
    except Exception:  # noqa: BLE001 - anything unusable is regenerated.
        pass
    print(f"generating {examples} x {features} features x {labels} labels ({shards} shards, {layout} layout, "
          f"{feature_dtype}) into {data_dir} ...", flush=True)
    t = time.perf_counter()
    m = generate(data_dir, examples, features, labels, shards, seed=0, split_eval=split_eval, overwrite=True,
                 layout=layout, feature_dtype=feature_dtype)
    print(f"  generated in {time.perf_counter() - t:.0f} s", flush=True)
    return m


def parse_one_example(num_features: int, num_labels: int):
    """Returns the per-example parse the baselines use: what a tutorial pipeline writes for these records.

    ``parse_single_example`` on one serialized record, then its multi-hot label vector as the sum of one-hots
    (zeros for a record without labels), clipped for duplicates. The package's reader parses whole batches
    instead (data_pipeline.rows.parse_examples, or the packed encodings' blocks).
    """
    import tensorflow as tf  # Lazily: bench/tune_defaults.py only drives the CLI and needs no TensorFlow.

    spec = {mf.KEY_DENSE: tf.io.FixedLenFeature([num_features], tf.float32),
            mf.KEY_LABELS: tf.io.VarLenFeature(tf.int64)}

    def parse(record):
        ex = tf.io.parse_single_example(record, spec)
        y = tf.minimum(tf.reduce_sum(tf.one_hot(ex[mf.KEY_LABELS].values, num_labels), axis=0), 1.0)
        return ex[mf.KEY_DENSE], y

    return parse


def write_json(path: str | None, result: dict) -> None:
    """Writes ``result`` to ``path`` (nothing when path is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")
