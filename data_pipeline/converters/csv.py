"""CSV files with a header row: some columns are 0/1 labels, every other column is a numeric feature.

``--label-columns`` names the label columns, either as a comma-separated list (``a,b,c``) or as a prefix
ending in ``*`` (``tag_*``: every column whose name starts with ``tag_``). Labels keep the column order of
the first file. Feature cells must be numbers; an empty cell is a missing value and becomes NaN, which the
writer rejects or skips (``--on-bad-features``). Label cells must be 0 or 1 (``0.0``/``1.0`` accepted).

Files are streamed with the csv module twice (count, then write). Several files (splits) may order their
columns differently; columns are matched by name.
"""

from __future__ import annotations

import csv
import math
import os

from data_pipeline.converters import common
from data_pipeline.errors import DataError


def _header(path: str) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        try:
            header = next(csv.reader(f))
        except StopIteration:
            raise DataError(f"{path}: empty file (expected a header row)") from None
    header = [h.strip() for h in header]
    dup = {h for h in header if header.count(h) > 1}
    if dup:
        raise DataError(f"{path}: duplicate column '{sorted(dup)[0]}' in the header")
    return header


def label_columns(spec: str | None, header: list[str], path: str) -> list[str]:
    """Resolves --label-columns against a header.

    Args:
      spec: "a,b,c" or "prefix*".
      header: column names of the file.
      path: the file, for error messages.

    Returns:
      Label column names, in header order.

    Raises:
      DataError: no spec, a named column missing, or a prefix matching nothing.
    """
    if not spec:
        raise DataError(f"{path}: csv needs --label-columns (names 'a,b,c' or a prefix 'tag_*')")
    if spec.endswith("*") and "," not in spec:
        prefix = spec[:-1]
        cols = [h for h in header if h.startswith(prefix)]
        if not cols:
            raise DataError(f"{path}: no column starts with '{prefix}' (--label-columns {spec})")
        return cols
    wanted = [c.strip() for c in spec.split(",") if c.strip()]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(f"{path}: label column '{missing[0]}' not in the header")
    wanted_set = set(wanted)
    return [h for h in header if h in wanted_set]


def _count(path: str) -> int:
    # csv.reader rather than counting lines: quoted cells may hold newlines.
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)
        return sum(1 for row in reader if row)


def open_source(paths: list[str], options: common.ConvertOptions,
                label_names: list[str] | None = None) -> common.Source:
    """Reads the CSV headers, decides label and feature columns, and counts rows.

    Args:
      paths: CSV files with a header row.
      options: the conversion options; uses label_columns.
      label_names: unused (label names are the column names); convert() overrides them if given.

    Returns:
      A common.Source.

    Raises:
      DataError: missing label column, files with different columns, no feature column.
    """
    header = _header(paths[0])
    labels = label_columns(options.label_columns, header, paths[0])
    label_set = set(labels)
    features = [h for h in header if h not in label_set]
    if not features:
        raise DataError(f"{paths[0]}: no feature columns (every column is a label)")
    for p in paths[1:]:
        other = _header(p)
        if set(other) != set(header):
            diff = sorted(set(other) ^ set(header))[0]
            raise DataError(f"{p}: columns differ from {paths[0]} (column '{diff}')")

    def records(path: str, encoding: str):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            cols = [h.strip() for h in next(reader)]
            pos = {h: i for i, h in enumerate(cols)}
            fcols, lcols = [pos[h] for h in features], [pos[h] for h in labels]
            for row in reader:
                if not row:
                    continue
                where = f"{path} line {reader.line_num}"
                if len(row) != len(cols):
                    raise DataError(f"{where}: {len(row)} cells, the header has {len(cols)}")
                yield (common.dense_features([_number(row[c], cols[c], where) for c in fcols], encoding),
                       [j for j, c in enumerate(lcols) if _label(row[c], cols[c], where)], where)

    return common.Source(
        num_features=len(features), num_labels=len(labels), label_names=labels, sparse=False,
        counts={p: _count(p) for p in paths}, records=records,
        description=f"csv: {', '.join(os.path.basename(p) for p in paths)}")


def _number(cell: str, column: str, where: str) -> float:
    cell = cell.strip()
    if not cell:
        return math.nan
    try:
        return float(cell)
    except ValueError:
        raise DataError(f"{where}: column '{column}' is not a number ('{cell[:30]}')") from None


def _label(cell: str, column: str, where: str) -> bool:
    try:
        v = float(cell)
    except ValueError:
        v = math.nan
    if v not in (0.0, 1.0):
        raise DataError(f"{where}: label column '{column}' is '{cell[:30]}', expected 0 or 1")
    return v == 1.0
