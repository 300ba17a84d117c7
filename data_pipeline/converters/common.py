"""What every converter shares: the Source interface and feature-encoding helpers.

A format module turns its input files into a Source. ``converters.convert`` then asks the Source how many
records each file holds (first pass) and writes them (second pass), so no converter has to hold an input
file in memory unless its format makes that unavoidable (NPZ).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from data_pipeline import manifest as mf
from data_pipeline.errors import DataError
from data_pipeline.hashing import HashSpec, hash_features

# One record as DatasetWriter.write_split wants it: (features, label indices, "file line N").
Record = tuple[object, Sequence[int], str]


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """What ``converters.convert`` does; the command line (data_pipeline.cli) builds one from its flags.

    Attributes:
      format: input format, one of converters.FORMATS.
      inputs: input files, one per split.
      out: dataset directory to write.
      splits: split name of each input file; None derives them from the file names (converters.split_names).
      shards: shards per split (fewer for small splits).
      layout: "packed" (blocks of examples per record) or "example" (one example per record).
      encoding: feature storage, "dense" or "sparse"; None: sparse for sparse inputs, dense otherwise.
      feature_dtype: packed layout: stored feature dtype, "float32", "float16" or "bfloat16".
      block_size: packed layout: examples per block record.
      on_bad_features: "fail" stops on a NaN/Inf feature, "skip" leaves the record out.
      overwrite: replace an existing ``out``.
      label_names: file with one label name per line.
      labels_xml: arff: the Mulan XML naming the label attributes (default: found beside the ARFF file).
      label_columns: csv: label column names "a,b,c", or a prefix "tag_*".
      num_labels: libsvm / npz: number of labels (default: from the data).
      num_features: libsvm: number of features (default: from the data).
      index_base: libsvm: index of the first feature, 0 or 1.
      hash_features: hash the feature ids (or tokens) into this many buckets (data_pipeline/hashing.py), or
        None to keep them.
      feature_keys, label_keys: tfds: the features and the labels of the TFDS dataset (converters/tfds.py).
    """

    format: str
    inputs: tuple[str, ...]
    out: str
    splits: tuple[str, ...] | None = None
    shards: int = 8
    layout: str = "packed"
    encoding: str | None = None
    feature_dtype: str = "float32"
    block_size: int = mf.DEFAULT_BLOCK_SIZE
    on_bad_features: str = "fail"
    overwrite: bool = False
    label_names: str | None = None
    labels_xml: str | None = None
    label_columns: str | None = None
    num_labels: int | None = None
    num_features: int | None = None
    index_base: int = 0
    hash_features: int | None = None
    feature_keys: tuple[str, ...] = ()
    label_keys: tuple[str, ...] = ()


@dataclasses.dataclass
class Source:
    """The converted inputs, as the writer needs them.

    Attributes:
      num_features, num_labels: dataset shape, fixed before anything is written.
      label_names: one name per label, or None for the default names.
      sparse: whether the input is naturally sparse (decides the default encoding).
      counts: number of records of each input path (first pass), or of each part of ``splits``.
      records: ``records(path, encoding)`` yields the Records of one file (or part) in the given encoding.
      description: what the data came from, recorded in the manifest.
      splits: for an input that holds several splits (TFDS): split name -> the part to pass to ``records``;
        None: one split per input file (converters.split_names).
    """

    num_features: int
    num_labels: int
    label_names: list[str] | None
    sparse: bool
    counts: dict[str, int]
    records: Callable[[str, str], Iterator[Record]]
    description: str = ""
    splits: dict[str, str] | None = None


def hashed_source(source: Source, spec: HashSpec) -> Source:
    """The source with every record's features (ids or tokens) hashed into ``spec.buckets`` features, the values
    of colliding features summed (data_pipeline/hashing.py)."""
    def records(path: str, encoding: str) -> Iterator[Record]:
        for (keys, values), labels, where in source.records(path, mf.SPARSE):
            buckets, summed = hash_features(keys, values, spec)
            yield sparse_features(buckets, summed, spec.buckets, encoding, where), labels, where

    return dataclasses.replace(source, num_features=spec.buckets, records=records,
                               description=f"{source.description}; features hashed into {spec.buckets} buckets")


def sparse_features(idx, val, num_features: int, encoding: str, where: str):
    """Returns sparse (indices, values) in the requested encoding.

    Indices are sorted and checked for duplicates here because the reader densifies with scatter_nd,
    which would silently add duplicated entries together.

    Args:
      idx, val: feature indices and values of one record.
      num_features: feature count (densified length).
      encoding: the dataset's encoding (mf.ENCODINGS); sparse ones keep (indices, values).
      where: "file line N", for the error message.

    Returns:
      A float32 vector for a dense encoding, or (int64 indices, float32 values) for a sparse one.

    Raises:
      DataError: duplicated or out-of-range feature index.
    """
    idx = np.asarray(idx, np.int64).reshape(-1)
    val = np.asarray(val, np.float32).reshape(-1)
    if idx.size:
        order = np.argsort(idx, kind="stable")
        idx, val = idx[order], val[order]
        if np.any(idx[1:] == idx[:-1]):
            raise DataError(f"{where}: duplicate feature index {int(idx[1:][idx[1:] == idx[:-1]][0])}")
        if idx[0] < 0 or idx[-1] >= num_features:
            bad = idx[0] if idx[0] < 0 else idx[-1]
            raise DataError(f"{where}: feature index {int(bad)} out of range [0, {num_features})")
    if encoding in mf.SPARSE_ENCODINGS:
        return idx, val
    dense = np.zeros(num_features, np.float32)
    dense[idx] = val
    return dense


def dense_features(values, encoding: str):
    """Returns a dense float32 vector in the requested encoding (sparse keeps the non-zeros).

    NaN counts as non-zero, so a record with NaN features still reaches the writer's NaN/Inf check.
    """
    values = np.asarray(values, np.float32).reshape(-1)
    if encoding not in mf.SPARSE_ENCODINGS:
        return values
    idx = np.flatnonzero(values != 0)
    return idx, values[idx]


def parse_label_list(text: str, where: str) -> list[int]:
    """Parses "3,17,42" into label indices (empty text: no labels)."""
    text = text.strip()
    if not text:
        return []
    try:
        labels = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise DataError(f"{where}: bad label list '{text[:50]}' (expected comma-separated integers)") from None
    if labels and min(labels) < 0:
        raise DataError(f"{where}: negative label index {min(labels)}")
    return labels


def read_label_names(path: str) -> list[str]:
    """Reads a file of label names, one per line (blank lines ignored)."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise DataError(f"{path}: cannot read label names ({e.strerror})") from None
    if len(set(names)) != len(names):
        raise DataError(f"{path}: duplicate label names")
    return names
