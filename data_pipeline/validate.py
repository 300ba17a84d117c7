"""Record-by-record validation of a dataset directory: ``inspect`` and locating a bad record.

The fast reader parses whole batches (packed: whole groups of blocks), so when TensorFlow rejects a batch it
cannot say which file and record was at fault. This module reads records one at a time, in Python, and names
the first bad one (packed: and the example inside the block); the trainer calls it to turn a bare TensorFlow
error into a one-line message.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import tensorflow as tf

from data_pipeline import manifest as mf
from data_pipeline import packed
from data_pipeline.errors import DataError


@dataclasses.dataclass
class SplitStats:
    """Statistics of one split, gathered by reading every record."""

    num_examples: int
    label_counts: np.ndarray  # [L]
    label_cardinality: float  # mean positives per example
    label_density: float  # cardinality / L
    non_finite_records: int


def check_record(raw: bytes, manifest: mf.Manifest) -> tuple[np.ndarray, int, np.ndarray]:
    """Parses and checks one serialized one-example record.

    Returns:
      (label indices, 1 if its features hold NaN/Inf else 0, the features as a dense float32 [1, F] array).

    Raises:
      ValueError: with what is wrong (the caller adds file and record).
    """
    ex = tf.train.Example.FromString(raw)
    feats = ex.features.feature
    if mf.KEY_LABELS not in feats:
        raise ValueError(f"no '{mf.KEY_LABELS}' (labels) feature")
    labels = np.asarray(feats[mf.KEY_LABELS].int64_list.value, np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= manifest.num_labels):
        bad = labels[(labels < 0) | (labels >= manifest.num_labels)][0]
        raise ValueError(f"label index {bad} out of range [0, {manifest.num_labels})")
    if manifest.feature_encoding in mf.DENSE_ENCODINGS:
        x = dense_features_of(ex, manifest.feature_encoding)
        if x.size != manifest.num_features:
            raise ValueError(f"{x.size} features, expected {manifest.num_features}")
    else:
        idx = np.asarray(feats[mf.KEY_SPARSE_INDEX].int64_list.value, np.int64)
        values = np.asarray(feats[mf.KEY_SPARSE_VALUE].float_list.value, np.float32)
        if idx.size != values.size:
            raise ValueError(f"{idx.size} feature indices but {values.size} values")
        if idx.size and (idx.min() < 0 or idx.max() >= manifest.num_features):
            raise ValueError(f"feature index out of range [0, {manifest.num_features})")
        x = np.zeros(manifest.num_features, np.float32)
        x[idx] = values
    return labels, int(not np.all(np.isfinite(x))), x.reshape(1, -1)


def dense_features_of(example: tf.train.Example, encoding: str) -> np.ndarray:
    """The dense feature vector of a parsed record in ``encoding`` (mf.DENSE or mf.DENSE_BYTES).

    Raises:
      ValueError: the record has no dense feature of that encoding.
    """
    feats = example.features.feature
    if encoding == mf.DENSE_BYTES:
        if mf.KEY_DENSE not in feats or len(feats[mf.KEY_DENSE].bytes_list.value) != 1:
            raise ValueError(f"no '{mf.KEY_DENSE}' (dense features) bytes feature")
        raw_x = feats[mf.KEY_DENSE].bytes_list.value[0]
        if len(raw_x) % 4:
            raise ValueError(f"'{mf.KEY_DENSE}' holds {len(raw_x)} bytes, not a whole number of float32s")
        return np.frombuffer(raw_x, "<f4")
    if mf.KEY_DENSE not in feats or feats[mf.KEY_DENSE].WhichOneof("kind") != "float_list":
        raise ValueError(f"no '{mf.KEY_DENSE}' (dense features) float list feature")
    return np.asarray(feats[mf.KEY_DENSE].float_list.value, np.float32)


def iter_split_records(data_dir: str, split: str, manifest: mf.Manifest):
    """Yields (file path, record index, raw bytes) for every record, raising DataError on a corrupt file and,
    for one-example-per-record encodings, on a record count that differs from the manifest."""
    info = manifest.split(split, data_dir)
    for shard, expected in zip(info.shards, info.shard_lengths):
        path = os.path.join(data_dir, shard)
        if not os.path.exists(path):
            raise DataError(f"{path}: shard listed in the manifest is missing")
        n = 0
        ds = tf.data.TFRecordDataset(path, compression_type=manifest.compression or None)
        try:
            for raw in ds.as_numpy_iterator():
                yield path, n, raw
                n += 1
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            reason = e.message.splitlines()[0] if e.message else type(e).__name__
            # Keep TensorFlow's reason ("corrupted record at 500"), not its function and op decoration.
            reason = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:.*$", "", reason) or type(e).__name__
            raise DataError(f"{path} record {n}: truncated or corrupted TFRecord ({reason})") from None
        if n != expected and not manifest.packed:
            raise DataError(f"{path}: {n} records but the manifest says {expected}")


def iter_split_examples(data_dir: str, split: str, manifest: mf.Manifest | None = None):
    """Decodes a split one record at a time, in dataset order, without tf.data's reader: yields (file path,
    record index, features [n, F] float32, label indices per example, rows with NaN/Inf features) per record
    (n = 1 for one-example-per-record encodings).

    Raises:
      DataError: naming the file and record of the first malformed record (or shard, for a wrong count).
    """
    manifest = manifest or mf.read_manifest(data_dir)
    info = manifest.split(split, data_dir)
    expected = dict(zip((os.path.join(data_dir, s) for s in info.shards), info.shard_lengths))
    shard, examples, next_id = None, 0, 0
    for path, i, raw in iter_split_records(data_dir, split, manifest):
        if path != shard:
            _check_shard_count(shard, examples, expected)
            shard, examples, next_id = path, 0, 0
        try:
            if manifest.packed:
                block = packed.decode_block(raw, manifest)
                if block.ids[0] < next_id:
                    raise ValueError(f"example ids from {block.ids[0]} overlap the previous record's")
                next_id = int(block.ids[-1]) + 1
                labels = np.split(block.label_indices, block.label_offsets[1:-1])
                x, bad = block.dense_features(manifest.num_features), block.non_finite_rows()
            else:
                labels, non_finite, x = check_record(raw, manifest)
                labels, bad = [labels], np.flatnonzero([non_finite])
        except Exception as e:  # noqa: BLE001 - any parse problem is reported with its location.
            raise DataError(f"{path} record {i}: {e}") from None
        examples += len(labels)
        yield path, i, x, labels, bad
    _check_shard_count(shard, examples, expected)


def _check_shard_count(path: str | None, examples: int, expected: dict[str, int]) -> None:
    if path is not None and examples != expected[path]:
        raise DataError(f"{path}: {examples} examples but the manifest says {expected[path]}")


def inspect_split(data_dir: str, split: str, manifest: mf.Manifest | None = None,
                  allow_non_finite: bool = False) -> SplitStats:
    """Reads every record of a split and checks it.

    Args:
      data_dir: dataset directory.
      split: split name.
      manifest: the manifest, if already read.
      allow_non_finite: count NaN/Inf feature examples instead of failing on the first.

    Returns:
      SplitStats.

    Raises:
      DataError: naming the shard file and record (packed: and the row in the block) of the first problem.
    """
    manifest = manifest or mf.read_manifest(data_dir)
    counts = np.zeros(manifest.num_labels, np.int64)
    n = bad = positives = 0
    for path, i, _, labels, non_finite in iter_split_examples(data_dir, split, manifest):
        if non_finite.size and not allow_non_finite:
            where = f" row {non_finite[0]}" if manifest.packed else ""
            raise DataError(f"{path} record {i}{where}: NaN/Inf feature value")
        bad += non_finite.size
        for example_labels in labels:
            unique = np.unique(example_labels)
            counts[unique] += 1
            positives += unique.size
        n += len(labels)
    if n == 0:
        raise DataError(f"{data_dir}: split '{split}' has no examples")
    expected = manifest.split(split).label_counts
    if list(counts) != list(expected):
        raise DataError(f"{os.path.join(data_dir, mf.MANIFEST_NAME)}: label counts of split '{split}' do not "
                        "match its records")
    card = positives / n
    return SplitStats(n, counts, card, card / manifest.num_labels, bad)


def read_split(data_dir: str, split: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """A whole split decoded record by record (iter_split_examples), in dataset order: (features [N, F]
    float32, label indices of each example). An independent reference for the reader's output."""
    xs, labels = [], []
    for _, _, x, example_labels, _ in iter_split_examples(data_dir, split):
        xs.append(x)
        labels.extend(example_labels)
    return np.concatenate(xs), labels


def locate_bad_record(data_dir: str, split: str) -> str | None:
    """Returns a one-line description of the first bad record of a split, or None if all are valid."""
    try:
        inspect_split(data_dir, split)
    except DataError as e:
        return str(e)
    return None
