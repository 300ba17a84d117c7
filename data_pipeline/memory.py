"""Training data held in memory: one input pipeline's share of a split, read once into arrays, and batches
drawn from a fresh seeded permutation every epoch.

Memory per example: dense features ``F x`` the stored itemsize (4 bytes float32, 2 float16 / bfloat16), or for
sparse features ``(4 + itemsize)`` bytes per non-zero plus an 8-byte row offset; labels 4 bytes per positive
label plus an 8-byte row offset (CSR). ``estimate_bytes`` gives the total from the manifest before anything is
read, so a caller can choose memory or streaming against a budget.

Order: epoch ``e`` visits the examples in the order ``epoch_permutation(seed, e, N)``; batch ``j`` of the
epoch is rows ``j*B:(j+1)*B`` of it. Every example comes exactly once per epoch (with ``drop_remainder``,
the last ``N mod B`` of the permutation are left out of that epoch), every epoch has its own order, the same
seed gives the same order, and a run resumed at (epoch, batch) sees exactly the batches the uninterrupted
run would have. ``epoch_permutation``, ``batch_indices`` and ``gather_rows`` are plain TensorFlow functions of
(seed, epoch, step), so the same selection can run inside a ``tf.function`` where the arrays are (an
accelerator's memory, for ops with a kernel there).
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import tensorflow as tf

from data_pipeline import manifest as mf
from data_pipeline import packed
from data_pipeline import reader
from data_pipeline import rows as rows_lib

_graph = tf.autograph.experimental.do_not_convert  # plain TensorFlow functions: no AutoGraph conversion


@dataclasses.dataclass
class InMemoryData:
    """One input pipeline's share of a split, in dataset order.

    Attributes:
      num_features, num_labels: the dataset's shape.
      label_indices: int32 [nnz]: positive label indices, row after row.
      label_offsets: int64 [N + 1]: row i's labels are label_indices[label_offsets[i]:label_offsets[i+1]].
      features: dense features [N, F] in the stored dtype (float32, float16, or TensorFlow's NumPy bfloat16);
        None for sparse features.
      feature_indices, feature_values, feature_offsets: sparse features in CSR form (int32 indices, values in
        the stored dtype, int64 offsets [N + 1]); None for dense features.
    """

    num_features: int
    num_labels: int
    label_indices: np.ndarray
    label_offsets: np.ndarray
    features: np.ndarray | None = None
    feature_indices: np.ndarray | None = None
    feature_values: np.ndarray | None = None
    feature_offsets: np.ndarray | None = None

    @property
    def num_examples(self) -> int:
        return len(self.label_offsets) - 1

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.label_indices, self.label_offsets, self.features, self.feature_indices,
                                      self.feature_values, self.feature_offsets) if a is not None)

    def finite_rows(self, chunk: int = 65536) -> np.ndarray:
        """bool [N]: rows whose features are all finite (dense rows checked a chunk at a time)."""
        if self.features is not None:
            return np.concatenate([np.isfinite(self.features[i:i + chunk].astype(np.float32)).all(axis=1)
                                   for i in range(0, self.num_examples, chunk)] or [np.ones(0, bool)])
        bad_values = ~np.isfinite(self.feature_values.astype(np.float32))
        row_of_value = np.repeat(np.arange(self.num_examples), np.diff(self.feature_offsets))
        return np.bincount(row_of_value[bad_values], minlength=self.num_examples) == 0

    def select(self, rows: np.ndarray) -> "InMemoryData":
        """The examples ``rows``, in that order (CSR parts gathered with their offsets)."""

        def csr(values, offsets):
            starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
            new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            positions = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
            return values[positions], new_offsets

        out = InMemoryData(self.num_features, self.num_labels, *csr(self.label_indices, self.label_offsets))
        if self.features is not None:
            out.features = self.features[rows]
        else:
            out.feature_indices, out.feature_offsets = csr(self.feature_indices, self.feature_offsets)
            out.feature_values = csr(self.feature_values, self.feature_offsets)[0]
        return out

    def tensors(self) -> dict[str, tf.Tensor]:
        """The arrays as tensors on the current device, keyed as gather_rows expects."""
        arrays = {"y": self.label_indices, "yp": self.label_offsets, "x": self.features, "xi": self.feature_indices,
                  "xv": self.feature_values, "xp": self.feature_offsets}
        return {k: tf.convert_to_tensor(v) for k, v in arrays.items() if v is not None}


def _share(manifest: mf.Manifest, data_dir: str, split: str, input_context) -> tuple[int, float]:
    """(examples in this pipeline's files before any holdout, fraction of them this pipeline keeps)."""
    info = manifest.split(split, data_dir)
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    if num_pipelines > 1 and len(info.shards) >= num_pipelines:
        return sum(info.shard_lengths[pipeline_id::num_pipelines]), 1.0
    return info.num_examples, 1.0 / num_pipelines


def estimate_bytes(data_dir: str, split: str, input_context: tf.distribute.InputContext | None = None,
                   holdout_fraction: float = 0.0, holdout: str = "exclude") -> int:
    """Bytes ``load_split`` will hold for this pipeline, from the manifest alone (nothing is read).

    Exact for dense features up to the holdout's randomness (the expected share of held-out examples is used);
    for sparse features it uses the split's mean non-zeros per example (the manifest's ``feature_values``, or
    the shard file sizes for datasets written before it was recorded).
    """
    manifest = mf.read_manifest(data_dir)
    info = manifest.split(split, data_dir)
    in_files, share = _share(manifest, data_dir, split, input_context)
    if holdout_fraction > 0:
        share *= holdout_fraction if holdout == "only" else 1.0 - holdout_fraction
    examples = in_files * share
    width = packed.itemsize(manifest.feature_dtype)
    labels_per_example = sum(info.label_counts) / max(1, info.num_examples)
    per_example = 8 + 4 * labels_per_example
    if manifest.sparse:
        values = info.feature_values or _file_bytes(data_dir, info) / (4 + width)
        per_example += 8 + (4 + width) * values / max(1, info.num_examples)
    else:
        per_example += manifest.num_features * width
    return int(math.ceil(examples * per_example + 8))


def _file_bytes(data_dir: str, info: mf.SplitInfo) -> int:
    return sum(os.path.getsize(os.path.join(data_dir, s)) for s in info.shards)


def load_split(data_dir: str, split: str, input_context: tf.distribute.InputContext | None = None,
               holdout_fraction: float = 0.0, holdout: str = "exclude") -> InMemoryData:
    """Reads this input pipeline's share of a split into NumPy arrays, once, in dataset order.

    The share is the one make_dataset reads with the same arguments: this pipeline's files, or every
    num_input_pipelines-th example when there are fewer files than pipelines, without the held-out examples
    (``holdout="exclude"``) or only them (``"only"``). Features keep their stored dtype.

    Raises:
      DataError: as make_dataset; a bad record fails the read (reader.explain_data_error names it).
    """
    manifest = mf.read_manifest(data_dir)
    options = reader.ReaderOptions(shuffle=False, repeat=False, deterministic=True, cycle_length=1,
                                   holdout_fraction=holdout_fraction, holdout=holdout)
    batches = reader.compact_batches(data_dir, split, 4096, input_context, options, manifest=manifest)
    upper = _share(manifest, data_dir, split, input_context)[0]
    x, n, parts = None, 0, {k: [] for k in ("y", "yn", "xi", "xv", "xn")}
    for rows in batches.prefetch(2):
        if "x" in rows:
            if x is None:
                x = np.empty((upper, manifest.num_features), rows["x"].dtype.as_numpy_dtype)
            x[n:n + len(rows["yn"])] = rows["x"].numpy()
        for k, v in rows.items():
            if k != "x":
                parts[k].append(v.numpy())
        n += len(rows["yn"])
    if x is not None:
        x.resize((n, manifest.num_features), refcheck=False)  # gives back the rows the holdout left empty

    def cat(key, dtype):
        return np.concatenate(parts[key]).astype(dtype, copy=False) if parts[key] else np.zeros(0, dtype)

    def offsets(key):
        return np.concatenate([[0], np.cumsum(cat(key, np.int64))]).astype(np.int64)

    data = InMemoryData(manifest.num_features, manifest.num_labels, cat("y", np.int32), offsets("yn"), features=x)
    if manifest.sparse:
        values_dtype = parts["xv"][0].dtype if parts["xv"] else np.float32
        data.feature_indices, data.feature_values = cat("xi", np.int32), cat("xv", values_dtype)
        data.feature_offsets = offsets("xn")
    return data


def epoch_permutation(seed, epoch, num_examples) -> tf.Tensor:
    """The order in which epoch ``epoch`` visits ``num_examples`` examples: int64 [N], a function of
    (seed, epoch) only (a stateless shuffle)."""
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.experimental.stateless_shuffle(tf.range(tf.cast(num_examples, tf.int64)), key)


def batch_indices(permutation: tf.Tensor, step, batch_size: int) -> tf.Tensor:
    """Rows of batch ``step`` of an epoch: ``permutation[step*B:(step+1)*B]`` (the last batch may be short)."""
    start = tf.cast(step, tf.int64) * batch_size
    return permutation[start:start + batch_size]


def gather_rows(tensors: dict[str, tf.Tensor], indices: tf.Tensor) -> dict:
    """Compact rows (data_pipeline/rows.py) of examples ``indices`` of InMemoryData.tensors(); rows.finalize
    turns them into (features, labels)."""

    def csr(values, offsets):
        starts = tf.gather(offsets, indices)
        lengths = tf.gather(offsets, indices + 1) - starts
        return rows_lib.gather_csr(values, starts, lengths), lengths

    out = {}
    out["y"], out["yn"] = csr(tensors["y"], tensors["yp"])
    if "x" in tensors:
        out["x"] = tf.gather(tensors["x"], indices)
    else:
        out["xi"], out["xn"] = csr(tensors["xi"], tensors["xp"])
        out["xv"] = rows_lib.gather_csr(tensors["xv"], tf.gather(tensors["xp"], indices), out["xn"])
    return out


def make_memory_dataset(data: InMemoryData, batch_size: int, seed: int = 0, epoch: int = 0, skip_batches: int = 0,
                        shuffle: bool = True, repeat: bool = True, drop_remainder: bool = True,
                        sparse_output: bool = False, stored_dtype: bool = False) -> tf.data.Dataset:
    """Batches of in-memory data: epoch ``epoch`` in the order epoch_permutation(seed, epoch) (dataset order
    without shuffle), then, with ``repeat``, epoch + 1, ... each in its own order.

    Args:
      data: InMemoryData (load_split).
      batch_size: examples per batch.
      seed, epoch: decide the order (see the module docstring).
      skip_batches: batches to skip at the start (resume); costs nothing but the first permutation.
      shuffle: permute each epoch; False visits the examples in dataset order.
      repeat: go on with the following epochs; False stops after epoch ``epoch``.
      drop_remainder: leave out each epoch's last partial batch.
      sparse_output, stored_dtype: as ReaderOptions.

    Returns:
      A dataset of (features, labels [B, L] float32), features as make_dataset yields them.
    """
    n = data.num_examples
    steps = n // batch_size if drop_remainder else -(-n // batch_size)
    if steps == 0:
        raise ValueError(f"{n} examples make no batch of {batch_size}")
    feature_dtype = data.features.dtype if data.features is not None else data.feature_values.dtype
    feature_dtype = tf.as_dtype(feature_dtype) if stored_dtype else tf.float32

    def epoch_batches(e):
        # The epoch's batches as rows of an index matrix (slicing them needs no function call per batch), and
        # the last partial batch unless dropped.
        order = epoch_permutation(seed, e, n) if shuffle else tf.range(n, dtype=tf.int64)
        full = n // batch_size
        ds = tf.data.Dataset.from_tensor_slices(tf.reshape(order[:full * batch_size], [full, batch_size]))
        if drop_remainder or n % batch_size == 0:
            return ds
        return ds.concatenate(tf.data.Dataset.from_tensors(order[full * batch_size:]))

    last = epoch + 1 if not repeat else np.iinfo(np.int64).max
    indices = tf.data.Dataset.range(epoch, last).flat_map(_graph(epoch_batches)).skip(skip_batches)
    arrays = tf.data.Dataset.from_tensors(data.tensors()).repeat()

    def to_batch(idx, tensors):
        return rows_lib.finalize(gather_rows(tensors, idx), data.num_features, data.num_labels, sparse_output,
                                 feature_dtype)

    ds = tf.data.Dataset.zip((indices, arrays)).map(_graph(to_batch), num_parallel_calls=tf.data.AUTOTUNE)
    ds_opts = tf.data.Options()
    ds_opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.prefetch(tf.data.AUTOTUNE).with_options(ds_opts)
