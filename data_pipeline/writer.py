"""Writing dataset directories: TFRecord shards plus a manifest, atomically.

A DatasetWriter writes into ``<out>.tmp-<pid>`` and renames it to ``<out>`` only when every split is
complete, so a crash never leaves a half-written dataset that looks whole. Beside the manifest it writes the
metadata TensorFlow Datasets needs to open the directory (data_pipeline/tfds_metadata.py). New datasets are packed
(data_pipeline/packed.py: a record holds a block of examples) unless an encoding of one example per record is
asked for.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

import numpy as np

from data_pipeline import manifest as mf
from data_pipeline import packed
from data_pipeline.errors import DataError
from data_pipeline.tfds_metadata import write_tfds_metadata


def encode_example(features, labels: Sequence[int], encoding: str) -> bytes:
    """Serializes one example as a tf.train.Example.

    Args:
      features: for the dense encodings a float32 vector; for SPARSE a pair (indices, values).
      labels: indices of the positive labels.
      encoding: mf.DENSE, mf.DENSE_BYTES (the older layout) or mf.SPARSE (packed blocks: packed.encode_block).

    Returns:
      The serialized proto.
    """
    import tensorflow as tf  # Imported lazily: converters' argument errors should not wait for TF.

    feats = {mf.KEY_LABELS: tf.train.Feature(int64_list=tf.train.Int64List(value=list(labels)))}
    if encoding in mf.DENSE_ENCODINGS:
        raw = np.ascontiguousarray(features, dtype="<f4").tobytes()
        if encoding == mf.DENSE:
            feats[mf.KEY_DENSE] = tf.train.Feature(float_list=packed.float_list(raw))
        else:
            feats[mf.KEY_DENSE] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[raw]))
    else:
        idx, val = features
        feats[mf.KEY_SPARSE_INDEX] = tf.train.Feature(int64_list=tf.train.Int64List(value=list(idx)))
        feats[mf.KEY_SPARSE_VALUE] = tf.train.Feature(float_list=tf.train.FloatList(value=list(val)))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


class ShardWriter:
    """Writes one TFRecord shard and counts what went into it.

    Args:
      path: the shard file to write.
      num_features, num_labels: the dataset's shape, checked on every example.
      encoding: one of mf.ENCODINGS but mf.DENSE_BYTES.
      on_bad_features: "fail" raises on NaN/Inf features, "skip" drops the example and counts it.
      compression: "" or "GZIP".
      feature_dtype: packed encodings: stored feature dtype (mf.FEATURE_DTYPES).
      block_size: packed encodings: examples per block record.
      first_id: packed encodings: id of the shard's first example (ids must be unique within a split).
    """

    def __init__(self, path: str, num_features: int, num_labels: int, encoding: str = mf.PACKED_DENSE,
                 on_bad_features: str = "fail", compression: str = "", feature_dtype: str = "float32",
                 block_size: int = mf.DEFAULT_BLOCK_SIZE, first_id: int = 0):
        import tensorflow as tf

        self.path = path
        self.num_features = num_features
        self.num_labels = num_labels
        self.encoding = encoding
        self.on_bad_features = on_bad_features
        self.feature_dtype = feature_dtype
        self.block_size = block_size
        self.next_id = first_id
        self.num_examples = 0
        self.num_skipped = 0
        self.feature_values = 0
        self.label_counts = np.zeros(num_labels, np.int64)
        if encoding in mf.PACKED_ENCODINGS:
            self._block = _BlockBuffer(num_features, feature_dtype, block_size, encoding == mf.PACKED_SPARSE)
        self._writer = tf.io.TFRecordWriter(path, options=compression or None)

    def write(self, features, labels: Sequence[int], where: str = "") -> bool:
        """Checks and writes one example.

        Args:
          features: dense vector, or (indices, values) for the sparse encodings.
          labels: positive label indices.
          where: names the input record for error messages, e.g. "data.svm line 12".

        Returns:
          True if written, False if skipped for NaN/Inf features.

        Raises:
          DataError: wrong feature length, label or feature index out of range, NaN/Inf with
            on_bad_features="fail", or a value too large for the stored feature dtype.
        """
        labels = np.asarray(labels, np.int64).reshape(-1)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_labels):
            raise DataError(f"{where}: label index {int(labels.max() if labels.max() >= self.num_labels else labels.min())} "
                            f"out of range [0, {self.num_labels})")
        labels = np.unique(labels)
        if self.encoding in mf.SPARSE_ENCODINGS:
            idx = np.asarray(features[0], np.int64).reshape(-1)
            values = np.asarray(features[1], np.float32).reshape(-1)
            if idx.size != values.size:
                raise DataError(f"{where}: {idx.size} feature indices but {values.size} values")
            if idx.size and (idx.min() < 0 or idx.max() >= self.num_features):
                raise DataError(f"{where}: feature index out of range [0, {self.num_features})")
        else:
            values = np.asarray(features, np.float32).reshape(-1)
            if values.size != self.num_features:
                raise DataError(f"{where}: {values.size} features, expected {self.num_features}")
        if not np.all(np.isfinite(values)):
            if self.on_bad_features == "skip":
                self.num_skipped += 1
                return False
            raise DataError(f"{where}: NaN/Inf feature value (use --on-bad-features skip to drop such records)")
        if self.encoding in mf.PACKED_ENCODINGS:
            stored = packed.to_stored(values, self.feature_dtype)
            if not np.all(np.isfinite(packed.from_stored(stored, self.feature_dtype))):
                big = values[~np.isfinite(packed.from_stored(stored, self.feature_dtype))][0]
                raise DataError(f"{where}: feature value {big:g} is too large for {self.feature_dtype} "
                                "(write float32 features: --feature-dtype float32)")
            self._block.add(stored, labels, idx if self.encoding == mf.PACKED_SPARSE else None)
            if self._block.num_rows == self.block_size:
                self._flush()
        else:
            self._writer.write(encode_example((idx, values) if self.encoding == mf.SPARSE else values, labels,
                                              self.encoding))
        self.num_examples += 1
        self.feature_values += values.size
        self.label_counts[labels] += 1
        return True

    def _flush(self) -> None:
        if self.encoding in mf.PACKED_ENCODINGS and self._block.num_rows:
            self._writer.write(self._block.encode(self.next_id))
            self.next_id += self._block.num_rows
            self._block.clear()

    def close(self) -> None:
        self._flush()
        self._writer.close()


class _BlockBuffer:
    """The examples of the block being filled, already in their stored form (CSR byte arrays, or rows of a
    preallocated dense array): memory bounded by one block, no object per example."""

    def __init__(self, num_features: int, feature_dtype: str, block_size: int, sparse: bool):
        self.feature_dtype, self.block_size, self.sparse = feature_dtype, block_size, sparse
        self.dense = None if sparse else np.zeros((block_size, num_features), packed.stored_dtype(feature_dtype))
        self.clear()

    def clear(self) -> None:
        self.num_rows = 0
        self.labels, self.label_offsets = bytearray(), [0]
        self.indices, self.values, self.offsets = bytearray(), bytearray(), [0]

    def add(self, stored_values: np.ndarray, labels: np.ndarray, indices: np.ndarray | None) -> None:
        self.labels += labels.astype("<i4").tobytes()
        self.label_offsets.append(self.label_offsets[-1] + labels.size)
        if self.sparse:
            self.indices += indices.astype("<i4").tobytes()
            self.values += stored_values.tobytes()
            self.offsets.append(self.offsets[-1] + indices.size)
        else:
            self.dense[self.num_rows] = stored_values
        self.num_rows += 1

    def encode(self, first_id: int) -> bytes:
        labels = np.frombuffer(self.labels, "<i4")
        if self.sparse:
            csr = (np.frombuffer(self.indices, "<i4"), np.frombuffer(self.values, packed.stored_dtype(self.feature_dtype)),
                   self.offsets)
            return packed.encode_block(first_id, labels, self.label_offsets, self.feature_dtype, self.block_size,
                                       sparse=csr)
        return packed.encode_block(first_id, labels, self.label_offsets, self.feature_dtype, self.block_size,
                                   dense=self.dense[:self.num_rows])


def shard_bounds(num_examples: int, num_shards: int, block_size: int = 0) -> np.ndarray:
    """Example index where each shard starts, and the total: [num_shards' + 1] (fewer shards when there are
    fewer examples, or blocks). With a block size, every shard but the last holds whole blocks, so that a split
    has a single short block."""
    if not block_size:
        num_shards = max(1, min(num_shards, num_examples))
        return np.linspace(0, num_examples, num_shards + 1).round().astype(int)
    num_blocks = max(1, -(-num_examples // block_size))
    num_shards = max(1, min(num_shards, num_blocks))
    return np.minimum(np.linspace(0, num_blocks, num_shards + 1).round().astype(int) * block_size, num_examples)


class DatasetWriter:
    """Writes a dataset directory atomically (temporary directory, renamed on commit).

    Use as a context manager: leaving the block with an exception removes the temporary directory and
    leaves any existing ``out_dir`` untouched.

    Args:
      out_dir: final dataset directory.
      num_features, num_labels: dataset shape.
      label_names: names of the labels (default label_000...).
      encoding: one of mf.ENCODINGS but mf.DENSE_BYTES (default: packed dense features).
      overwrite: replace an existing out_dir on commit (otherwise an existing one is an error).
      source: free text recorded in the manifest (what it was made from).
      on_bad_features: "fail" or "skip" (see ShardWriter).
      compression: "" or "GZIP".
      feature_dtype: packed encodings: stored feature dtype, "float32", "float16" or "bfloat16".
      block_size: packed encodings: examples per block record.
    """

    def __init__(self, out_dir: str, num_features: int, num_labels: int,
                 label_names: Sequence[str] | None = None, encoding: str = mf.PACKED_DENSE,
                 overwrite: bool = False, source: str = "", on_bad_features: str = "fail",
                 compression: str = "", feature_dtype: str = "float32", block_size: int = mf.DEFAULT_BLOCK_SIZE):
        self.out_dir = os.path.abspath(out_dir)
        if os.path.exists(self.out_dir) and not overwrite:
            raise DataError(f"{out_dir}: already exists (pass --overwrite to replace it)")
        if label_names is not None and len(label_names) != num_labels:
            raise DataError(f"{out_dir}: {len(label_names)} label names for {num_labels} labels")
        packed_encoding = encoding in mf.PACKED_ENCODINGS
        if encoding not in mf.ENCODINGS or encoding == mf.DENSE_BYTES or feature_dtype not in mf.FEATURE_DTYPES:
            raise ValueError(f"cannot write encoding '{encoding}' with feature dtype '{feature_dtype}'")
        if feature_dtype != "float32" and not packed_encoding:
            raise DataError(f"{out_dir}: feature dtype {feature_dtype} needs a packed encoding (--layout packed)")
        if packed_encoding and block_size < 1:
            raise DataError(f"{out_dir}: block size must be positive, got {block_size}")
        self.manifest = mf.Manifest(
            num_features=num_features, num_labels=num_labels,
            label_names=list(label_names) if label_names is not None else default_label_names(num_labels),
            feature_encoding=encoding, splits={}, compression=compression, source=source,
            feature_dtype=feature_dtype, block_size=block_size if packed_encoding else 0)
        self.on_bad_features = on_bad_features
        self.num_skipped = 0
        self.tmp_dir = f"{self.out_dir}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        os.makedirs(self.tmp_dir)

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

    def new_shard(self, split: str, index: int, num_shards: int, first_id: int = 0) -> ShardWriter:
        """Opens shard ``index`` of ``split`` for writing; ``first_id``: the id of its first example."""
        m = self.manifest
        return ShardWriter(self.shard_path(split, index, num_shards), m.num_features, m.num_labels,
                           m.feature_encoding, self.on_bad_features, m.compression, m.feature_dtype, m.block_size,
                           first_id)

    def shard_bounds(self, num_examples: int, num_shards: int) -> np.ndarray:
        """Where each shard of a split of ``num_examples`` starts (see shard_bounds)."""
        return shard_bounds(num_examples, num_shards, self.manifest.block_size)

    def add_split(self, split: str, shard_lengths: Sequence[int], label_counts, num_skipped: int = 0,
                  feature_values: int = 0) -> None:
        """Records a finished split whose shards are 0..len(shard_lengths)-1."""
        n = len(shard_lengths)
        self.manifest.splits[split] = mf.SplitInfo(
            shards=[mf.shard_name(split, i, n) for i in range(n)],
            shard_lengths=[int(x) for x in shard_lengths],
            label_counts=[int(c) for c in np.asarray(label_counts).reshape(-1)], feature_values=int(feature_values))
        self.num_skipped += num_skipped

    def write_split(self, split: str, examples, num_examples: int, num_shards: int) -> None:
        """Writes a split from an iterator, contiguous runs of examples per shard (dataset order kept).

        Args:
          split: split name ("train", "eval", "test").
          examples: iterable of (features, labels, where) in dataset order.
          num_examples: how many ``examples`` yields (decides the shard boundaries).
          num_shards: number of shards (fewer when there are fewer examples, or blocks).
        """
        bounds = self.shard_bounds(num_examples, num_shards)
        lengths, counts, skipped, values = [], np.zeros(self.manifest.num_labels, np.int64), 0, 0
        it = iter(examples)
        for s in range(len(bounds) - 1):
            w = self.new_shard(split, s, len(bounds) - 1, first_id=int(bounds[s]))
            try:
                for _ in range(bounds[s + 1] - bounds[s]):
                    features, labels, where = next(it)
                    w.write(features, labels, where)
            finally:
                w.close()
            lengths.append(w.num_examples)
            counts += w.label_counts
            skipped += w.num_skipped
            values += w.feature_values
        self.add_split(split, lengths, counts, skipped, values)

    def commit(self) -> mf.Manifest:
        """Writes the manifest and moves the finished dataset to its final name."""
        if not self.manifest.splits:
            raise DataError(f"{self.out_dir}: nothing was written")
        for name, info in self.manifest.splits.items():
            if info.num_examples == 0:
                raise DataError(f"{self.out_dir}: split '{name}' is empty")
        write_tfds_metadata(self.tmp_dir, self.manifest, os.path.basename(self.out_dir))
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
