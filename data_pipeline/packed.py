"""The packed block encodings: one TFRecord record holds a block of examples.

A block record is a ``tf.train.Example`` with a handful of features, all little-endian arrays in byte strings:

- ``n`` (int64): examples in the block (1 .. the manifest's ``block_size``);
- ``id`` (int64): the id of the block's first example; example ``r`` of the block has id ``id + r``. Ids are
  unique within a split and do not depend on how the split is read (they decide the holdout);
- ``x`` (``packed_dense``): the block's features as ``block_size`` rows of F values, row-major, rows from n on
  zero: float32 as a packed float list (ParseExample writes it straight into the group's tensor), float16 and
  bfloat16 as the bytes of the little-endian values (decode_raw);
- ``xi``, ``xv``, ``xp`` (``packed_sparse``): the features in CSR form: int32 feature indices, their values in
  ``feature_dtype``, and int32 row offsets (``n + 1`` values from 0: row r owns ``xp[r]:xp[r+1]``);
- ``y``, ``yp``: the labels in CSR form: int32 label indices and int32 row offsets.

Reading a block is a parse of a few byte strings, ``decode_raw`` and gathers: no work per example. This module
holds both sides of the format: NumPy encoding and decoding (writer, ``inspect``, tests) and the TensorFlow
decoding of a group of blocks into "rows" (reader). A rows value is a dict of tensors: storage (``x`` dense
features, or ``xi``/``xv`` sparse ones; ``y`` label indices) plus per-row references into it (``xr`` the row of
``x``, or ``xs``/``xn`` start and length in ``xi``/``xv``; ``ys``/``yn`` in ``y``), so that reordering and
selecting rows moves a few integers per row, and the feature bytes are copied once, into the batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline import manifest as mf

KEY_SPARSE_INDEX, KEY_SPARSE_VALUE = mf.KEY_SPARSE_INDEX, mf.KEY_SPARSE_VALUE
HOLDOUT_BUCKETS = 10000
_NUMPY_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}


def stored_dtype(feature_dtype: str) -> np.dtype:
    """The NumPy dtype of stored feature values (bfloat16: uint16 bit patterns)."""
    return _NUMPY_DTYPES[feature_dtype]


def itemsize(feature_dtype: str) -> int:
    """Bytes per stored feature value."""
    return _NUMPY_DTYPES[feature_dtype].itemsize


# --- NumPy: stored dtypes, ids, block records ---------------------------------------------------------------

def to_stored(values: np.ndarray, feature_dtype: str) -> np.ndarray:
    """float32 values in the stored dtype, little-endian (bfloat16 as its uint16 bit patterns, rounded to nearest
    even as TensorFlow casts); values already in the stored dtype are returned as they are. A finite value too
    large for the dtype becomes Inf; the caller checks."""
    if np.asarray(values).dtype == _NUMPY_DTYPES[feature_dtype]:
        return np.asarray(values)
    values = np.asarray(values, np.float32)
    if feature_dtype != "bfloat16":
        with np.errstate(over="ignore"):
            return values.astype(_NUMPY_DTYPES[feature_dtype])
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.where(np.isnan(values), (bits >> 16) | 0x40, rounded).astype("<u2")


def from_stored(stored: np.ndarray, feature_dtype: str) -> np.ndarray:
    """Stored values (as written by to_stored) as float32."""
    if feature_dtype == "bfloat16":
        return (np.asarray(stored, "<u2").astype(np.uint32) << 16).view(np.float32)
    return np.asarray(stored).astype(np.float32)


def holdout_buckets(ids: np.ndarray) -> np.ndarray:
    """Bucket in [0, HOLDOUT_BUCKETS) of each example id: a fixed integer hash, the same as holdout_buckets_tf."""
    ids = np.asarray(ids, np.int64)
    x = (ids ^ (ids >> 32)) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return ((x >> 16) ^ x) % HOLDOUT_BUCKETS


def float_list(raw: bytes):
    """A tf.train.FloatList holding the little-endian float32s ``raw``, built in one copy: a packed repeated
    float is those bytes behind a tag and a length (FloatList(value=array) converts float by float in Python,
    about ten times slower)."""
    import tensorflow as tf

    return tf.train.FloatList.FromString(b"\x0a" + _varint(len(raw)) + raw) if raw else tf.train.FloatList()


def _varint(n: int) -> bytes:
    """Protocol-buffer base-128 varint of a non-negative int."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_block(first_id: int, label_indices, label_offsets, feature_dtype: str, block_size: int,
                 dense: np.ndarray | None = None, sparse: tuple | None = None) -> bytes:
    """Serializes one block record.

    Args:
      first_id: id of the block's first example.
      label_indices, label_offsets: the examples' positive labels in CSR form (offsets: n + 1 values from 0).
      feature_dtype: stored dtype ("float32", "float16", "bfloat16").
      block_size: the dataset's block size (dense rows are padded to it).
      dense: packed_dense: the features [n, F], float32 or already in the stored dtype (to_stored).
      sparse: packed_sparse: the features in CSR form (indices, values, offsets), values as for dense.

    Returns:
      The serialized tf.train.Example.
    """
    import tensorflow as tf  # Lazily, as in writer.py.

    def raw(array, dtype="<i4") -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[np.ascontiguousarray(array, dtype).tobytes()]))

    def ints(value: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    stored = _NUMPY_DTYPES[feature_dtype]
    feats = {mf.KEY_BLOCK_ROWS: ints(len(label_offsets) - 1), mf.KEY_BLOCK_ID: ints(first_id),
             mf.KEY_LABELS: raw(label_indices), mf.KEY_LABEL_OFFSETS: raw(label_offsets)}
    if sparse is not None:
        indices, values, offsets = sparse
        feats[KEY_SPARSE_INDEX] = raw(indices)
        feats[KEY_SPARSE_VALUE] = raw(to_stored(values, feature_dtype), stored)
        feats[mf.KEY_SPARSE_OFFSETS] = raw(offsets)
    else:
        x = to_stored(dense, feature_dtype)
        if len(x) < block_size:
            x = np.concatenate([x, np.zeros((block_size - len(x), x.shape[1]), stored)])
        data = np.ascontiguousarray(x, stored).tobytes()
        feats[mf.KEY_DENSE] = (tf.train.Feature(float_list=float_list(data)) if feature_dtype == "float32" else
                               tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


@dataclasses.dataclass
class Block:
    """One decoded block: ids [n]; dense features [n, F] float32, or CSR (indices, values float32, offsets
    [n + 1]); labels in CSR (indices, offsets [n + 1])."""

    ids: np.ndarray
    label_indices: np.ndarray
    label_offsets: np.ndarray
    features: np.ndarray | None = None
    feature_indices: np.ndarray | None = None
    feature_values: np.ndarray | None = None
    feature_offsets: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return len(self.ids)

    def non_finite_rows(self) -> np.ndarray:
        """Rows whose features hold NaN or Inf."""
        if self.features is not None:
            return np.flatnonzero(~np.isfinite(self.features).all(axis=1))
        bad = np.flatnonzero(~np.isfinite(self.feature_values))
        return np.unique(np.searchsorted(self.feature_offsets, bad, side="right") - 1)

    def dense_features(self, num_features: int) -> np.ndarray:
        """The features as a dense float32 [n, F] array."""
        if self.features is not None:
            return self.features
        x = np.zeros((self.num_rows, num_features), np.float32)
        rows = np.repeat(np.arange(self.num_rows), np.diff(self.feature_offsets))
        x[rows, self.feature_indices] = self.feature_values
        return x


def decode_block(raw: bytes, manifest: mf.Manifest) -> Block:
    """Decodes and checks one block record (NumPy, one record at a time: for ``inspect`` and tests).

    Features are not checked for NaN/Inf here (``Block.non_finite_rows``).

    Raises:
      ValueError: what is wrong, naming the row where the problem is in one row (the caller adds file and
        record).
    """
    import tensorflow as tf

    feats = tf.train.Example.FromString(raw).features.feature

    def scalar(key: str) -> int:
        if key not in feats or len(feats[key].int64_list.value) != 1:
            raise ValueError(f"no '{key}' int64 feature (not a packed block record)")
        return int(feats[key].int64_list.value[0])

    def array(key: str, dtype, what: str) -> np.ndarray:
        if key not in feats or len(feats[key].bytes_list.value) != 1:
            raise ValueError(f"no '{key}' ({what}) bytes feature")
        data = feats[key].bytes_list.value[0]
        if len(data) % np.dtype(dtype).itemsize:
            raise ValueError(f"'{key}' ({what}) holds {len(data)} bytes, not a whole number of "
                             f"{np.dtype(dtype).itemsize}-byte values")
        return np.frombuffer(data, dtype)

    n, first_id = scalar(mf.KEY_BLOCK_ROWS), scalar(mf.KEY_BLOCK_ID)
    if not 1 <= n <= manifest.block_size:
        raise ValueError(f"block of {n} examples (block_size {manifest.block_size})")
    labels = array(mf.KEY_LABELS, "<i4", "label indices")
    label_offsets = _check_offsets(array(mf.KEY_LABEL_OFFSETS, "<i4", "label offsets"), n, labels.size, "label")
    _check_range(labels, label_offsets, manifest.num_labels, "label")
    block = Block(ids=first_id + np.arange(n, dtype=np.int64), label_indices=labels.astype(np.int64),
                  label_offsets=label_offsets)
    stored = _NUMPY_DTYPES[manifest.feature_dtype]
    if manifest.feature_encoding == mf.PACKED_SPARSE:
        idx = array(KEY_SPARSE_INDEX, "<i4", "feature indices")
        values = from_stored(array(KEY_SPARSE_VALUE, stored, "feature values"), manifest.feature_dtype)
        if idx.size != values.size:
            raise ValueError(f"{idx.size} feature indices but {values.size} values")
        block.feature_offsets = _check_offsets(array(mf.KEY_SPARSE_OFFSETS, "<i4", "feature offsets"), n, idx.size,
                                               "feature")
        _check_range(idx, block.feature_offsets, manifest.num_features, "feature")
        block.feature_indices, block.feature_values = idx.astype(np.int64), values
    else:
        if manifest.feature_dtype == "float32":
            if mf.KEY_DENSE not in feats or feats[mf.KEY_DENSE].WhichOneof("kind") != "float_list":
                raise ValueError(f"no '{mf.KEY_DENSE}' (dense features) float list feature")
            x = np.asarray(feats[mf.KEY_DENSE].float_list.value, np.float32)
        else:
            x = from_stored(array(mf.KEY_DENSE, stored, "dense features"), manifest.feature_dtype)
        if x.size != manifest.block_size * manifest.num_features:
            raise ValueError(f"{x.size} feature values, expected {manifest.block_size} rows of "
                             f"{manifest.num_features} features")
        block.features = x.reshape(manifest.block_size, manifest.num_features)[:n]
    return block


def _check_offsets(offsets: np.ndarray, n: int, size: int, what: str) -> np.ndarray:
    if offsets.size != n + 1 or offsets[0] != 0 or offsets[-1] != size or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{what} offsets are not {n + 1} non-decreasing values from 0 to {size}")
    return offsets.astype(np.int64)


def _check_range(indices: np.ndarray, offsets: np.ndarray, limit: int, what: str) -> None:
    bad = np.flatnonzero((indices < 0) | (indices >= limit))
    if bad.size:
        row = int(np.searchsorted(offsets, bad[0], side="right") - 1)
        raise ValueError(f"row {row}: {what} index {int(indices[bad[0]])} out of range [0, {limit})")
