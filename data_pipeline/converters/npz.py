"""NumPy ``.npz`` files (``np.savez`` / ``np.savez_compressed``).

Accepted keys (one file per split; ``allow_pickle`` stays off, so object arrays are refused):

- features: ``x`` or ``features``, float array [N, F] (dense).
- labels, either
  - ``y`` or ``labels``: 0/1 (or bool) array [N, L], or
  - ``label_indices`` and ``label_indptr``: the positive label indices of every row in CSR form (row i has
    ``label_indices[label_indptr[i]:label_indptr[i+1]]``); L is --num-labels, else the largest index + 1.
- optional ``label_names``: string array [L].

An .npz member is read whole when first accessed, so the file must fit in memory (unlike the text formats).
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from data_pipeline.converters import common
from data_pipeline.errors import DataError

_X_KEYS = ("x", "features")
_Y_KEYS = ("y", "labels")


def _key(npz, keys, path: str, what: str) -> str | None:
    found = [k for k in keys if k in npz.files]
    if len(found) > 1:
        raise DataError(f"{path}: both '{found[0]}' and '{found[1]}' given for the {what}")
    return found[0] if found else None


class _NpzFile:
    """One open .npz file, checked, with its label rows as index lists."""

    def __init__(self, path: str):
        self.path = path
        if not zipfile.is_zipfile(path):  # np.load would try to unpickle it and blame pickling
            raise DataError(f"{path}: not an .npz file (not a zip archive)")
        try:
            npz = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable .npz file ({e})") from None
        with npz:
            xkey = _key(npz, _X_KEYS, path, "features")
            if xkey is None:
                raise DataError(f"{path}: no features array (expected key 'x' or 'features'; "
                                f"has {', '.join(npz.files)})")
            self.x = self._array(npz, xkey)
            if self.x.ndim != 2 or not (np.issubdtype(self.x.dtype, np.number) or self.x.dtype == bool):
                raise DataError(f"{path}: '{xkey}' must be a numeric [N, F] array, is {self.x.dtype} "
                                f"{self.x.shape}")
            ykey = _key(npz, _Y_KEYS, path, "labels")
            if ykey is not None:
                y = self._array(npz, ykey)
                if y.ndim != 2 or y.shape[0] != self.x.shape[0]:
                    raise DataError(f"{path}: '{ykey}' must be [N, L] with N = {self.x.shape[0]}, is {y.shape}")
                if not np.all((y == 0) | (y == 1)):
                    raise DataError(f"{path}: '{ykey}' record {int(np.argwhere((y != 0) & (y != 1))[0, 0])} "
                                    "has a value other than 0/1")
                self.dense_num_labels = y.shape[1]
                rows, cols = np.nonzero(y)
                self.indices, self.indptr = cols.astype(np.int64), np.searchsorted(rows, np.arange(len(y) + 1))
            elif "label_indices" in npz.files and "label_indptr" in npz.files:
                self.dense_num_labels = None
                self.indices = self._array(npz, "label_indices").astype(np.int64).reshape(-1)
                self.indptr = self._array(npz, "label_indptr").astype(np.int64).reshape(-1)
                if (self.indptr.size != self.x.shape[0] + 1 or self.indptr[0] != 0
                        or self.indptr[-1] != self.indices.size or np.any(np.diff(self.indptr) < 0)):
                    raise DataError(f"{path}: 'label_indptr' must be non-decreasing, of length N + 1 = "
                                    f"{self.x.shape[0] + 1}, from 0 to len(label_indices)")
                if self.indices.size and self.indices.min() < 0:
                    raise DataError(f"{path}: negative label index in 'label_indices'")
            else:
                raise DataError(f"{path}: no labels (expected key 'y'/'labels', or 'label_indices' and "
                                f"'label_indptr'; has {', '.join(npz.files)})")
            self.label_names = ([str(n) for n in self._array(npz, "label_names").reshape(-1)]
                                if "label_names" in npz.files else None)

    def _array(self, npz, key: str) -> np.ndarray:
        try:
            return npz[key]
        except ValueError as e:  # object arrays need pickle, which we refuse
            raise DataError(f"{self.path}: cannot read '{key}' ({e})") from None

    @property
    def max_label(self) -> int:
        return int(self.indices.max()) if self.indices.size else -1


def open_source(paths: list[str], options: common.ConvertOptions,
                label_names: list[str] | None = None) -> common.Source:
    """Loads and checks .npz files.

    Args:
      paths: .npz files, one per split.
      options: the conversion options; uses num_labels.
      label_names: names from --label-names, if given.

    Returns:
      A common.Source.

    Raises:
      DataError: missing keys, wrong shapes or dtypes, non-0/1 labels, files that disagree on the shape.
    """
    files = {p: _NpzFile(p) for p in paths}
    first = files[paths[0]]
    num_features = first.x.shape[1]
    num_labels = options.num_labels or (len(label_names) if label_names else None)
    for p, f in files.items():
        if f.x.shape[1] != num_features:
            raise DataError(f"{p}: {f.x.shape[1]} features, {paths[0]} has {num_features}")
        if f.dense_num_labels is not None:
            if num_labels is not None and f.dense_num_labels != num_labels:
                raise DataError(f"{p}: {f.dense_num_labels} label columns, expected {num_labels}")
            num_labels = f.dense_num_labels
    if num_labels is None:
        num_labels = max(f.max_label for f in files.values()) + 1
        if num_labels == 0:
            raise DataError(f"{paths[0]}: no positive label anywhere; pass --num-labels")
    names = next((f.label_names for f in files.values() if f.label_names is not None), None)
    if names is not None and len(names) != num_labels:
        raise DataError(f"{paths[0]}: {len(names)} label_names for {num_labels} labels")

    def records(path: str, encoding: str):
        f = files[path]
        for i in range(f.x.shape[0]):
            yield (common.dense_features(f.x[i], encoding), f.indices[f.indptr[i]:f.indptr[i + 1]],
                   f"{path} record {i}")

    return common.Source(
        num_features=num_features, num_labels=num_labels, label_names=names, sparse=False,
        counts={p: f.x.shape[0] for p, f in files.items()}, records=records,
        description=f"npz: {', '.join(os.path.basename(p) for p in paths)}")
