"""The dataset manifest: the schema of a dataset directory.

A dataset is a directory of TFRecord shards named ``<split>-NNNNN-of-MMMMM.tfrecord`` plus one
``manifest.json`` describing them. Everything a reader or a trainer needs to know without opening a shard
lives here: feature and label counts, label names, the feature encoding (with, for packed encodings, the stored
feature dtype and the block size), examples per shard and per-label positive counts (for ``pos_weight`` and
head/torso/tail buckets).

We keep our own JSON manifest because TFDS metadata carries no per-label positive counts and cannot describe a
record holding a block of examples; the TFDS metadata written beside it (data_pipeline/tfds_metadata.py) lets
TFDS tools open the same shards. The records themselves are
plain ``tf.train.Example`` protos that any TensorFlow tool can parse (``tf.io.parse_example`` with the
FixedLenFeature/VarLenFeature specs the encodings below name); in the packed encodings one proto holds a
block of examples (data_pipeline/packed.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from data_pipeline.errors import DataError
from data_pipeline.hashing import HashSpec

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1

# Feature encodings.
# feature "x": a packed float list of F values. ParseExample writes a whole batch of them straight into one
# [B, F] float32 tensor (bench/pipeline_throughput.py: cheaper than a bytes value plus decode_raw, which copies
# every feature vector twice).
DENSE = "dense_float32_list"
# feature "x": one bytes value, F little-endian float32s; written by earlier versions, still read.
DENSE_BYTES = "dense_float32_bytes"
SPARSE = "sparse_index_value"  # features "xi" (int64 list) and "xv" (float list), densified at read time.
# Packed encodings: one record holds a block of up to ``block_size`` examples (data_pipeline/packed.py), the
# features stored as ``feature_dtype``. The reader's work per example is then a few memory copies.
PACKED_DENSE = "packed_dense"  # "x": the block's [n, F] features as one little-endian array.
PACKED_SPARSE = "packed_sparse"  # "xi", "xv", "xp": the block's features in CSR form.
ENCODINGS = (DENSE, DENSE_BYTES, SPARSE, PACKED_DENSE, PACKED_SPARSE)
DENSE_ENCODINGS = (DENSE, DENSE_BYTES)
PACKED_ENCODINGS = (PACKED_DENSE, PACKED_SPARSE)
SPARSE_ENCODINGS = (SPARSE, PACKED_SPARSE)
FEATURE_DTYPES = ("float32", "float16", "bfloat16")  # stored feature dtypes of the packed encodings
DEFAULT_BLOCK_SIZE = 256

# Record keys, shared by the writer, the reader and inspect.
KEY_DENSE = "x"
KEY_SPARSE_INDEX = "xi"
KEY_SPARSE_VALUE = "xv"
KEY_LABELS = "y"  # int64 list of positive label indices.
# Keys of a packed block record (see data_pipeline/packed.py).
KEY_BLOCK_ROWS = "n"  # int64: examples in the block.
KEY_BLOCK_ID = "id"  # int64: id of the block's first example; example r of the block has id + r.
KEY_SPARSE_OFFSETS = "xp"  # CSR row offsets of the sparse features (n + 1 values).
KEY_LABEL_OFFSETS = "yp"  # CSR row offsets of the labels (n + 1 values).


def encoding_for(layout: str, sparse: bool) -> str:
    """The encoding of a layout ("packed" or "example": one example per record) and feature storage."""
    if layout == "packed":
        return PACKED_SPARSE if sparse else PACKED_DENSE
    if layout == "example":
        return SPARSE if sparse else DENSE
    raise ValueError(f"unknown layout '{layout}' (packed or example)")


def shard_name(split: str, index: int, num_shards: int) -> str:
    """Returns the file name of shard ``index`` of ``num_shards`` for ``split``."""
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


@dataclasses.dataclass
class SplitInfo:
    """What the manifest records about one split.

    Attributes:
      shards: file names, relative to the dataset directory, in dataset order.
      shard_lengths: number of examples in each shard.
      label_counts: positives per label over the split.
      feature_values: stored feature values over the split (non-zeros of a sparse encoding; 0 where unknown,
        in datasets written before it was recorded). Sizes the in-memory copy before it is read.
    """

    shards: list[str]
    shard_lengths: list[int]
    label_counts: list[int]
    feature_values: int = 0

    @property
    def num_examples(self) -> int:
        return int(sum(self.shard_lengths))


@dataclasses.dataclass
class Manifest:
    """Schema of a dataset directory (see module docstring)."""

    num_features: int
    num_labels: int
    label_names: list[str]
    feature_encoding: str
    splits: dict[str, SplitInfo]
    compression: str = ""  # "" or "GZIP"
    source: str = ""
    format_version: int = FORMAT_VERSION
    feature_dtype: str = "float32"  # stored dtype of the features (packed encodings: also float16, bfloat16)
    block_size: int = 0  # packed encodings: examples per block record (the last block of a shard may hold fewer)
    # Features hashed into num_features buckets by the converter (data_pipeline/hashing.py), or None.
    feature_hashing: HashSpec | None = None

    @property
    def packed(self) -> bool:
        return self.feature_encoding in PACKED_ENCODINGS

    @property
    def sparse(self) -> bool:
        return self.feature_encoding in SPARSE_ENCODINGS

    def shard_records(self, num_examples: int) -> int:
        """TFRecord records of a shard holding ``num_examples`` examples (packed: full blocks, the last may be
        short)."""
        return -(-num_examples // self.block_size) if self.packed else num_examples

    def describe_records(self, num_examples: int) -> str:
        """``"N"`` records of a shard of ``num_examples`` examples, with the blocks when packed (for errors)."""
        records = self.shard_records(num_examples)
        return f"{records} ({num_examples} examples in blocks of {self.block_size})" if self.packed else f"{records}"

    def split(self, name: str, directory: str = "") -> SplitInfo:
        """Returns the split ``name``, with an error naming the directory when it is absent."""
        if name not in self.splits:
            raise DataError(
                f"{os.path.join(directory, MANIFEST_NAME)}: no split '{name}' "
                f"(has: {', '.join(sorted(self.splits)) or 'none'})")
        return self.splits[name]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name, info in self.splits.items():
            d["splits"][name]["num_examples"] = info.num_examples
        return d

    def validate(self, path: str) -> None:
        """Checks internal consistency; raises DataError naming ``path``."""
        if self.feature_encoding not in ENCODINGS:
            raise DataError(f"{path}: unknown feature_encoding '{self.feature_encoding}'")
        if self.num_features <= 0 or self.num_labels <= 0:
            raise DataError(f"{path}: num_features and num_labels must be positive")
        if self.feature_dtype not in FEATURE_DTYPES or (self.feature_dtype != "float32" and not self.packed):
            raise DataError(f"{path}: feature_dtype '{self.feature_dtype}' is not stored by encoding "
                            f"'{self.feature_encoding}'")
        if self.packed and self.block_size <= 0:
            raise DataError(f"{path}: encoding '{self.feature_encoding}' needs a positive block_size")
        if len(self.label_names) != self.num_labels:
            raise DataError(f"{path}: {len(self.label_names)} label names for {self.num_labels} labels")
        if self.feature_hashing is not None:
            self.feature_hashing.check(f"{path}: feature_hashing")
            if self.feature_hashing.buckets != self.num_features:
                raise DataError(f"{path}: feature_hashing has {self.feature_hashing.buckets} buckets for "
                                f"{self.num_features} features")
        if not self.splits:
            raise DataError(f"{path}: the dataset has no splits")
        for name, info in self.splits.items():
            if len(info.shards) != len(info.shard_lengths):
                raise DataError(f"{path}: split '{name}' lists {len(info.shards)} shards "
                                f"but {len(info.shard_lengths)} shard lengths")
            if len(info.label_counts) != self.num_labels:
                raise DataError(f"{path}: split '{name}' has {len(info.label_counts)} label counts "
                                f"for {self.num_labels} labels")


def _hash_spec(raw) -> HashSpec | None:
    return None if not raw else HashSpec(buckets=int(raw["buckets"]), hash=str(raw["hash"]))


def write_manifest(directory: str, manifest: Manifest) -> str:
    """Writes ``manifest.json`` into ``directory``; returns its path."""
    path = os.path.join(directory, MANIFEST_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest.to_json(), f, indent=1)
    os.replace(tmp, path)  # Atomic: a reader never sees half a manifest.
    return path


def read_manifest(directory: str) -> Manifest:
    """Reads and validates the manifest of a dataset directory.

    Args:
      directory: the dataset directory.

    Returns:
      The Manifest.

    Raises:
      DataError: the directory or manifest is missing or malformed (message names the path).
    """
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: no such dataset directory")
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.exists(path):
        raise DataError(f"{path}: manifest missing (is {directory} a dataset written by data_pipeline?)")
    try:
        with open(path) as f:
            raw = json.load(f)
        splits = {
            name: SplitInfo(shards=list(s["shards"]), shard_lengths=[int(n) for n in s["shard_lengths"]],
                            label_counts=[int(c) for c in s["label_counts"]],
                            feature_values=int(s.get("feature_values", 0)))
            for name, s in raw["splits"].items()
        }
        manifest = Manifest(
            num_features=int(raw["num_features"]), num_labels=int(raw["num_labels"]),
            label_names=[str(n) for n in raw["label_names"]], feature_encoding=raw["feature_encoding"],
            splits=splits, compression=raw.get("compression", ""), source=raw.get("source", ""),
            format_version=int(raw.get("format_version", FORMAT_VERSION)),
            feature_dtype=raw.get("feature_dtype", "float32"), block_size=int(raw.get("block_size", 0)),
            feature_hashing=_hash_spec(raw.get("feature_hashing")))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    manifest.validate(path)
    return manifest
