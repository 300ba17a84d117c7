"""Multi-label LIBSVM / extreme-classification (XMC) text files, streamed.

One record per line: ``l1,l2,... idx:val idx:val ...``. The label list may be empty (the line then starts
with a space or directly with ``idx:val``). Files from the Extreme Classification Repository start with a
header line ``num_points num_features num_labels``; it is detected (three integers, no ``:``) and its
counts are used unless --num-features / --num-labels are given, and its point count is checked.

Indices: label indices are always 0-based. Feature indices are 0-based in XMC repository files and 1-based
in classic LIBSVM files; ``--index-base`` (default 0) says which, and 1-based indices are shifted down.

The file is read twice and never held in memory: the first pass counts lines (and finds the largest
feature and label index when the shape is not given), the second parses and writes line by line.
"""

from __future__ import annotations

import os

import numpy as np

from data_pipeline.converters import common
from data_pipeline.errors import DataError


def _is_header(line: str) -> bool:
    tokens = line.split()
    return len(tokens) == 3 and all(t.isdigit() for t in tokens)


def parse_line(line: str, where: str, index_base: int = 0):
    """Parses one record line.

    Args:
      line: the text of the line.
      where: "file line N", for error messages.
      index_base: 0 or 1, the index of the first feature in the file.

    Returns:
      (label indices, feature indices (0-based, int64), feature values (float32)).

    Raises:
      DataError: malformed label list or ``idx:val`` pair, or a feature index below index_base.
    """
    labels: list[int] = []
    text = line.strip()
    head, rest = (text.split(None, 1) + ["", ""])[:2]
    if head and ":" not in head:
        labels = common.parse_label_list(head, where)
    else:
        rest = text
    # One split and one NumPy conversion for the whole line: no Python object per pair. Each pair must
    # hold exactly one ':', so the halves line up; anything else takes the slow path for the message.
    num_pairs = rest.count(":")
    parts = rest.replace(":", " ").split()
    try:
        if len(parts) != 2 * num_pairs or len(rest.split()) != num_pairs:
            raise ValueError("not index:value")
        flat = np.array(parts, np.float64).reshape(-1, 2)
        idx = flat[:, 0].astype(np.int64)
        if not np.array_equal(idx, flat[:, 0]):
            raise ValueError("non-integer index")
    except ValueError:
        bad = next((t for t in rest.split() if not _is_pair(t)), rest)
        raise DataError(f"{where}: bad feature '{bad[:40]}' (expected index:value)") from None
    if idx.size and idx.min() < index_base:
        raise DataError(f"{where}: feature index {int(idx.min())} below --index-base {index_base}")
    return labels, idx - index_base, flat[:, 1].astype(np.float32)


def _is_pair(token: str) -> bool:
    try:
        i, v = token.split(":")
        int(i), float(v)
        return True
    except ValueError:
        return False


def _scan(path: str, index_base: int, need_shape: bool):
    """First pass: (records, header or None, max feature index + 1, max label index + 1).

    Lines are parsed only when ``need_shape`` and the file has no header; otherwise only counted.
    """
    count, header, max_f, max_l = 0, None, 0, 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and _is_header(line):
                header = [int(t) for t in line.split()]
                need_shape = False  # The header gives the shape.
                continue
            if not line.strip():
                continue
            count += 1
            if need_shape:
                labels, idx, _ = parse_line(line, f"{path} line {lineno}", index_base)
                if labels:
                    max_l = max(max_l, max(labels) + 1)
                if idx.size:
                    max_f = max(max_f, int(idx.max()) + 1)
    if header and header[0] != count:
        raise DataError(f"{path}: header says {header[0]} records but the file has {count} (truncated?)")
    return count, header, max_f, max_l


def open_source(paths: list[str], options: common.ConvertOptions,
                label_names: list[str] | None = None) -> common.Source:
    """First pass over LIBSVM/XMC files: counts records and decides the dataset shape.

    The shape is, in order of precedence: --num-features/--num-labels, the XMC header (the largest over
    the files), the number of --label-names (labels), else the largest index seen plus one.

    Args:
      paths: input files.
      options: the conversion options; uses num_features, num_labels, index_base.
      label_names: names from --label-names, if given (their count is the label count by default).

    Returns:
      A common.Source whose records stream each file.

    Raises:
      DataError: a malformed line (naming file and line), a header that disagrees with the file.
    """
    index_base = options.index_base
    num_features, num_labels = options.num_features, options.num_labels
    if num_labels is None and label_names is not None:
        num_labels = len(label_names)
    need_shape = num_features is None or num_labels is None
    scans = {p: _scan(p, index_base, need_shape) for p in paths}
    headers = [s[1] for s in scans.values() if s[1]]
    if num_features is None:
        num_features = max([h[1] for h in headers] + [s[2] for s in scans.values()])
    if num_labels is None:
        num_labels = max([h[2] for h in headers] + [s[3] for s in scans.values()])
    if num_features <= 0 or num_labels <= 0:
        raise DataError(f"{paths[0]}: cannot tell the number of features/labels (no features or labels "
                        "seen); pass --num-features and --num-labels")

    def records(path: str, encoding: str):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if (lineno == 1 and _is_header(line)) or not line.strip():
                    continue
                where = f"{path} line {lineno}"
                labels, idx, val = parse_line(line, where, index_base)
                yield common.sparse_features(idx, val, num_features, encoding, where), labels, where

    return common.Source(
        num_features=num_features, num_labels=num_labels, label_names=None, sparse=True,
        counts={p: s[0] for p, s in scans.items()}, records=records,
        description=f"libsvm (index base {index_base}): {', '.join(os.path.basename(p) for p in paths)}")
