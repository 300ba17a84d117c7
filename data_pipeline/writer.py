"""Writing dataset directories: TFRecord shards plus a manifest, atomically.

A DatasetWriter writes into ``<out>.tmp-<pid>`` and renames it to ``<out>`` only when every split is
complete, so a crash never leaves a half-written dataset that looks whole.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

import numpy as np

from data_pipeline import manifest as mf
from data_pipeline.errors import DataError


def encode_example(features, labels: Sequence[int], encoding: str) -> bytes:
    """Serializes one example as a tf.train.Example.

    Args:
      features: for the dense encodings a float32 vector; for SPARSE a pair (indices, values).
      labels: indices of the positive labels.
      encoding: mf.DENSE, mf.DENSE_BYTES (the older layout) or mf.SPARSE.

    Returns:
      The serialized proto.
    """
    import tensorflow as tf  # Imported lazily: converters' argument errors should not wait for TF.

    feats = {mf.KEY_LABELS: tf.train.Feature(int64_list=tf.train.Int64List(value=list(labels)))}
    if encoding in mf.DENSE_ENCODINGS:
        raw = np.ascontiguousarray(features, dtype="<f4").tobytes()
        if encoding == mf.DENSE:
            # A packed repeated float is its little-endian bytes behind a tag and a length: parsing that is one
            # copy, where FloatList(value=array) converts float by float in Python (~10x slower to write).
            floats = tf.train.FloatList.FromString(b"\x0a" + _varint(len(raw)) + raw) if raw else tf.train.FloatList()
            feats[mf.KEY_DENSE] = tf.train.Feature(float_list=floats)
        else:
            feats[mf.KEY_DENSE] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[raw]))
    else:
        idx, val = features
        feats[mf.KEY_SPARSE_INDEX] = tf.train.Feature(int64_list=tf.train.Int64List(value=list(idx)))
        feats[mf.KEY_SPARSE_VALUE] = tf.train.Feature(float_list=tf.train.FloatList(value=list(val)))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def _varint(n: int) -> bytes:
    """Protocol-buffer base-128 varint of a non-negative int."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class ShardWriter:
    """Writes one TFRecord shard and counts what went into it.

    Args:
      path: the shard file to write.
      num_features, num_labels: the dataset's shape, checked on every example.
      encoding: mf.DENSE or mf.SPARSE.
      on_bad_features: "fail" raises on NaN/Inf features, "skip" drops the example and counts it.
      compression: "" or "GZIP".
    """

    def __init__(self, path: str, num_features: int, num_labels: int, encoding: str = mf.DENSE,
                 on_bad_features: str = "fail", compression: str = ""):
        import tensorflow as tf

        self.path = path
        self.num_features = num_features
        self.num_labels = num_labels
        self.encoding = encoding
        self.on_bad_features = on_bad_features
        self.num_examples = 0
        self.num_skipped = 0
        self.label_counts = np.zeros(num_labels, np.int64)
        self._writer = tf.io.TFRecordWriter(path, options=compression or None)

    def write(self, features, labels: Sequence[int], where: str = "") -> bool:
        """Checks and writes one example.

        Args:
          features: dense vector, or (indices, values) for the sparse encoding.
          labels: positive label indices.
          where: names the input record for error messages, e.g. "data.svm line 12".

        Returns:
          True if written, False if skipped for NaN/Inf features.

        Raises:
          DataError: wrong feature length, label or feature index out of range, or NaN/Inf with
            on_bad_features="fail".
        """
        labels = np.asarray(labels, np.int64).reshape(-1)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_labels):
            raise DataError(f"{where}: label index {int(labels.max() if labels.max() >= self.num_labels else labels.min())} "
                            f"out of range [0, {self.num_labels})")
        labels = np.unique(labels)
        if self.encoding in mf.DENSE_ENCODINGS:
            values = np.asarray(features, np.float32).reshape(-1)
            if values.size != self.num_features:
                raise DataError(f"{where}: {values.size} features, expected {self.num_features}")
        else:
            idx = np.asarray(features[0], np.int64).reshape(-1)
            values = np.asarray(features[1], np.float32).reshape(-1)
            if idx.size != values.size:
                raise DataError(f"{where}: {idx.size} feature indices but {values.size} values")
            if idx.size and (idx.min() < 0 or idx.max() >= self.num_features):
                raise DataError(f"{where}: feature index out of range [0, {self.num_features})")
            features = (idx, values)
        if not np.all(np.isfinite(values)):
            if self.on_bad_features == "skip":
                self.num_skipped += 1
                return False
            raise DataError(f"{where}: NaN/Inf feature value (use --on-bad-features skip to drop such records)")
        self._writer.write(encode_example(values if self.encoding in mf.DENSE_ENCODINGS else features, labels,
                                          self.encoding))
        self.num_examples += 1
        self.label_counts[labels] += 1
        return True

    def close(self) -> None:
        self._writer.close()


class DatasetWriter:
    """Writes a dataset directory atomically (temporary directory, renamed on commit).

    Use as a context manager: leaving the block with an exception removes the temporary directory and
    leaves any existing ``out_dir`` untouched.

    Args:
      out_dir: final dataset directory.
      num_features, num_labels: dataset shape.
      label_names: names of the labels (default label_000...).
      encoding: mf.DENSE or mf.SPARSE.
      overwrite: replace an existing out_dir on commit (otherwise an existing one is an error).
      source: free text recorded in the manifest (what it was made from).
      on_bad_features: "fail" or "skip" (see ShardWriter).
      compression: "" or "GZIP".
    """

    def __init__(self, out_dir: str, num_features: int, num_labels: int,
                 label_names: Sequence[str] | None = None, encoding: str = mf.DENSE,
                 overwrite: bool = False, source: str = "", on_bad_features: str = "fail",
                 compression: str = ""):
        self.out_dir = os.path.abspath(out_dir)
        if os.path.exists(self.out_dir) and not overwrite:
            raise DataError(f"{out_dir}: already exists (pass --overwrite to replace it)")
        if label_names is not None and len(label_names) != num_labels:
            raise DataError(f"{out_dir}: {len(label_names)} label names for {num_labels} labels")
        self.tmp_dir = f"{self.out_dir}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        os.makedirs(self.tmp_dir)
        self.manifest = mf.Manifest(
            num_features=num_features, num_labels=num_labels,
            label_names=list(label_names) if label_names is not None else default_label_names(num_labels),
            feature_encoding=encoding, splits={}, compression=compression, source=source)
        self.on_bad_features = on_bad_features
        self.num_skipped = 0

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif os.path.exists(self.tmp_dir):
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise

    def shard_path(self, split: str, index: int, num_shards: int) -> str:
        """Path of a shard inside the temporary directory (for writers running in other processes)."""
        return os.path.join(self.tmp_dir, mf.shard_name(split, index, num_shards))

    def new_shard(self, split: str, index: int, num_shards: int) -> ShardWriter:
        """Opens shard ``index`` of ``split`` for writing."""
        return ShardWriter(self.shard_path(split, index, num_shards), self.manifest.num_features,
                           self.manifest.num_labels, self.manifest.feature_encoding,
                           self.on_bad_features, self.manifest.compression)

    def add_split(self, split: str, shard_lengths: Sequence[int], label_counts, num_skipped: int = 0) -> None:
        """Records a finished split whose shards are 0..len(shard_lengths)-1."""
        n = len(shard_lengths)
        self.manifest.splits[split] = mf.SplitInfo(
            shards=[mf.shard_name(split, i, n) for i in range(n)],
            shard_lengths=[int(x) for x in shard_lengths],
            label_counts=[int(c) for c in np.asarray(label_counts).reshape(-1)])
        self.num_skipped += num_skipped

    def write_split(self, split: str, examples, num_examples: int, num_shards: int) -> None:
        """Writes a split from an iterator, contiguous runs of examples per shard (dataset order kept).

        Args:
          split: split name ("train", "eval", "test").
          examples: iterable of (features, labels, where) in dataset order.
          num_examples: how many ``examples`` yields (decides the shard boundaries).
          num_shards: number of shards (reduced to num_examples when there are fewer examples).
        """
        num_shards = max(1, min(num_shards, num_examples))
        bounds = np.linspace(0, num_examples, num_shards + 1).round().astype(int)
        lengths, counts, skipped = [], np.zeros(self.manifest.num_labels, np.int64), 0
        it = iter(examples)
        for s in range(num_shards):
            w = self.new_shard(split, s, num_shards)
            try:
                for _ in range(bounds[s + 1] - bounds[s]):
                    features, labels, where = next(it)
                    w.write(features, labels, where)
            finally:
                w.close()
            lengths.append(w.num_examples)
            counts += w.label_counts
            skipped += w.num_skipped
        self.add_split(split, lengths, counts, skipped)

    def commit(self) -> mf.Manifest:
        """Writes the manifest and moves the finished dataset to its final name."""
        if not self.manifest.splits:
            raise DataError(f"{self.out_dir}: nothing was written")
        for name, info in self.manifest.splits.items():
            if info.num_examples == 0:
                raise DataError(f"{self.out_dir}: split '{name}' is empty")
        mf.write_manifest(self.tmp_dir, self.manifest)
        if os.path.exists(self.out_dir):
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp_dir, self.out_dir)
        return self.manifest

    def abort(self) -> None:
        """Removes the temporary directory."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def default_label_names(num_labels: int) -> list[str]:
    width = max(3, len(str(num_labels - 1)))
    return [f"label_{i:0{width}d}" for i in range(num_labels)]
