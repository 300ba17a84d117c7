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

# One record as DatasetWriter.write_split wants it: (features, label indices, "file line N").
Record = tuple[object, Sequence[int], str]


@dataclasses.dataclass
class Source:
    """The converted inputs, as the writer needs them.

    Attributes:
      num_features, num_labels: dataset shape, fixed before anything is written.
      label_names: one name per label, or None for the default names.
      sparse: whether the input is naturally sparse (decides the default encoding).
      counts: number of records of each input path (first pass).
      records: ``records(path, encoding)`` yields the Records of one file in the given encoding.
      description: what the data came from, recorded in the manifest.
    """

    num_features: int
    num_labels: int
    label_names: list[str] | None
    sparse: bool
    counts: dict[str, int]
    records: Callable[[str, str], Iterator[Record]]
    description: str = ""


def sparse_features(idx, val, num_features: int, encoding: str, where: str):
    """Returns sparse (indices, values) in the requested encoding.

    Indices are sorted and checked for duplicates here because the reader densifies with scatter_nd,
    which would silently add duplicated entries together.

    Args:
      idx, val: feature indices and values of one record.
      num_features: feature count (densified length).
      encoding: mf.DENSE or mf.SPARSE.
      where: "file line N", for the error message.

    Returns:
      A float32 vector for mf.DENSE, or (int64 indices, float32 values) for mf.SPARSE.

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
    if encoding == mf.SPARSE:
        return idx, val
    dense = np.zeros(num_features, np.float32)
    dense[idx] = val
    return dense


def dense_features(values, encoding: str):
    """Returns a dense float32 vector in the requested encoding (sparse keeps the non-zeros).

    NaN counts as non-zero, so a record with NaN features still reaches the writer's NaN/Inf check.
    """
    values = np.asarray(values, np.float32).reshape(-1)
    if encoding in mf.DENSE_ENCODINGS:
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
