"""Mulan ARFF files (sparse ``{i v, ...}`` or dense rows) read with liac-arff.

In the Mulan format the labels are ordinary {0,1} attributes of the ARFF file and an XML file names them
(``<labels xmlns="http://mulan.sourceforge.net/labels"><label name="..."/>...``); every other attribute is
a feature. The label order of the dataset is the ARFF attribute order (the XML only selects), so label ``j``
is the j-th label attribute of the file. Without an XML file, a MEKA-style ``-C N`` in the relation name
says the first N (or, for negative N, the last -N) attributes are the labels.

Rows are decoded with liac-arff's generator return types (``LOD_GEN`` for sparse rows, ``DENSE_GEN`` for
dense ones) rather than ``arff.COO``: COO silently drops empty rows, which loses trailing records with no
features, and generators let the second pass stream. Omitted values of a sparse row take the attribute's
implicit value (0, or the first declared value of a nominal attribute, as Weka defines it).
"""

from __future__ import annotations

import glob
import math
import os
import re
import xml.etree.ElementTree as ET

import arff  # liac-arff; absolute import, so this module does not shadow it.
import numpy as np

from data_pipeline.converters import common
from data_pipeline.errors import DataError

MULAN_NS = "http://mulan.sourceforge.net/labels"
_NUMERIC_TYPES = ("NUMERIC", "REAL", "INTEGER")


def read_mulan_xml(path: str) -> list[str]:
    """Returns the label names of a Mulan XML file, in document order (nested labels included)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise DataError(f"{path}: cannot read Mulan label XML ({e})") from None
    names = [el.get("name") for el in root.iter() if el.tag in (f"{{{MULAN_NS}}}label", "label")]
    if not names or any(not n for n in names):
        raise DataError(f"{path}: no <label name=\"...\"> elements (namespace {MULAN_NS})")
    return names


def _find_xml(path: str) -> str | None:
    """Finds the Mulan XML beside an ARFF file: ``bibtex.xml`` for ``bibtex-train.arff``, or the only one."""
    xmls = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(path)), "*.xml")))
    base = os.path.basename(path)
    matching = [x for x in xmls if base.startswith(os.path.splitext(os.path.basename(x))[0])]
    if len(matching) >= 1:
        return max(matching, key=len)  # the longest stem is the most specific match
    return xmls[0] if len(xmls) == 1 else None


def _read_header(path: str):
    """First pass over one file: (attributes, relation, number of data rows, rows are sparse)."""
    with open(path, encoding="utf-8") as f:
        decoder = arff.ArffDecoder()
        try:
            # The generator return type parses the header only; no data row is read yet.
            obj = decoder.decode(f, return_type=arff.DENSE_GEN)
        except arff.ArffException as e:
            raise DataError(f"{path}: {e}") from None
        count, sparse = 0, None
        for line in f:  # The file iterator continues after the @data line.
            s = line.strip()
            if s and not s.startswith("%"):
                sparse = s.startswith("{") if sparse is None else sparse
                count += 1
    return obj["attributes"], obj["relation"], count, bool(sparse)


def _implicit(attr_type) -> str | float:
    """The value an attribute takes when a sparse row omits it."""
    return attr_type[0] if isinstance(attr_type, (list, tuple)) and attr_type else 0.0


def open_source(paths: list[str], options: common.ConvertOptions,
                label_names: list[str] | None = None) -> common.Source:
    """Reads the headers of Mulan ARFF files and decides features and labels.

    Args:
      paths: ARFF files (all with the same attributes).
      options: the conversion options; uses ``labels_xml``.
      label_names: unused (names come from the ARFF file); convert() overrides them if given.

    Returns:
      A common.Source.

    Raises:
      DataError: unreadable ARFF or XML, files with different attributes, a label of the XML missing from
        the ARFF file, a non-numeric feature or a label that is not {0,1}; the message names the file.
    """
    headers = {p: _read_header(p) for p in paths}
    attributes, relation = headers[paths[0]][:2]
    for p in paths[1:]:
        if headers[p][0] != attributes:
            diff = next((f"attribute {i} is {a!r:.60} there but {b!r:.60} in {paths[0]}"
                         for i, (a, b) in enumerate(zip(headers[p][0], attributes)) if a != b),
                        f"{len(headers[p][0])} attributes there, {len(attributes)} in {paths[0]}")
            raise DataError(f"{p}: attributes differ from {paths[0]} ({diff})")
    names = [a[0] for a in attributes]

    xml = options.labels_xml or _find_xml(paths[0])
    if xml:
        wanted = read_mulan_xml(xml)
        name_set = set(names)
        missing = [n for n in wanted if n not in name_set]
        if missing:
            raise DataError(f"{paths[0]}: label '{missing[0]}' of {xml} is not an attribute of the ARFF file"
                            + (f" ({len(missing)} labels missing)" if len(missing) > 1 else ""))
        label_set = set(wanted)
        label_cols = [i for i, n in enumerate(names) if n in label_set]
    else:
        m = re.search(r"-C\s+(-?\d+)", relation or "")
        if not m or int(m.group(1)) == 0:
            raise DataError(f"{paths[0]}: no Mulan label XML found beside it; pass --labels-xml")
        c = int(m.group(1))
        label_cols = list(range(c)) if c > 0 else list(range(len(names) + c, len(names)))
    label_col_set = set(label_cols)
    feature_cols = [i for i in range(len(names)) if i not in label_col_set]
    if not feature_cols:
        raise DataError(f"{paths[0]}: no feature attributes (every attribute is a label)")

    for i in feature_cols:
        t = attributes[i][1]
        if isinstance(t, (list, tuple)):
            try:
                [float(v) for v in t]
            except ValueError:
                raise DataError(f"{paths[0]}: feature '{names[i]}' is nominal with non-numeric values "
                                f"{list(t)[:5]}") from None
        elif t not in _NUMERIC_TYPES:
            raise DataError(f"{paths[0]}: feature '{names[i]}' is non-numeric ({t})")
    for i in label_cols:
        t = attributes[i][1]
        if (isinstance(t, (list, tuple)) and not set(t) <= {"0", "1"}) or t == "STRING":
            raise DataError(f"{paths[0]}: label '{names[i]}' must be {{0,1}}, is {t}")

    reader = _RowConverter(attributes, feature_cols, label_cols, {p: headers[p][3] for p in paths})
    return common.Source(
        num_features=len(feature_cols), num_labels=len(label_cols),
        label_names=[names[i] for i in label_cols], sparse=any(h[3] for h in headers.values()),
        counts={p: headers[p][2] for p in paths},
        records=reader.records,
        description=f"arff: {', '.join(os.path.basename(p) for p in paths)}"
                    + (f" (labels from {os.path.basename(xml)})" if xml else ""))


class _RowConverter:
    """Second pass: turns decoded ARFF rows into (features, labels, where)."""

    def __init__(self, attributes, feature_cols: list[int], label_cols: list[int], sparse: dict[str, bool]):
        n = len(attributes)
        self.sparse = sparse  # per path, from the first pass
        self.names = [a[0] for a in attributes]
        self.feature_cols, self.label_cols = feature_cols, label_cols
        self.feature_pos = np.full(n, -1, np.int64)
        self.feature_pos[feature_cols] = np.arange(len(feature_cols))
        self.label_pos = np.full(n, -1, np.int64)
        self.label_pos[label_cols] = np.arange(len(label_cols))
        # Attributes whose implicit (omitted) value is not zero: rare, but a sparse row must still show them.
        self.nonzero_implicit = {i: _implicit(attributes[i][1]) for i in range(n)
                                 if float(_implicit(attributes[i][1]) or 0) != 0}

    def _label(self, col: int, value, where: str) -> bool:
        if value is None:
            raise DataError(f"{where}: missing value '?' for label '{self.names[col]}'")
        v = float(value)
        if v not in (0.0, 1.0):
            raise DataError(f"{where}: label '{self.names[col]}' is {value}, expected 0 or 1")
        return v == 1.0

    def records(self, path: str, encoding: str):
        """Yields (features, label indices, where) for every data row of ``path``."""
        with open(path, encoding="utf-8") as f:
            decoder = arff.ArffDecoder()
            sparse = self.sparse[path]
            obj = decoder.decode(f, return_type=arff.LOD_GEN if sparse else arff.DENSE_GEN)
            rows = iter(obj["data"])
            i = 0
            while True:
                try:
                    row = next(rows)
                except StopIteration:
                    return
                except arff.ArffException as e:
                    # Rows are decoded lazily, so liac-arff has not filled in the line number itself
                    # (_current_line is its decoder's line counter).
                    e.line = getattr(decoder, "_current_line", -1)
                    raise DataError(f"{path} record {i}: {e}") from None
                where = f"{path} record {i} (line {getattr(decoder, '_current_line', '?')})"
                convert_row = self._sparse_row if sparse else self._dense_row
                try:
                    features, labels = convert_row(row, where, encoding)
                except (ValueError, TypeError) as e:  # a value liac-arff let through unconverted
                    raise DataError(f"{where}: {e}") from None
                yield features, labels, where
                i += 1

    def _sparse_row(self, row: dict, where: str, encoding: str):
        idx, val, labels = [], [], []
        for col, v in self.nonzero_implicit.items():
            row.setdefault(col, v)
        for col, v in row.items():
            p = self.feature_pos[col]
            if p >= 0:
                idx.append(p)
                val.append(math.nan if v is None else float(v))
            elif self._label(col, v, where):
                labels.append(int(self.label_pos[col]))
        return common.sparse_features(idx, val, len(self.feature_cols), encoding, where), labels

    def _dense_row(self, row: list, where: str, encoding: str):
        # DENSE_GEN also accepts an occasional sparse row, expanded with implicit values.
        x = [math.nan if row[c] is None else float(row[c]) for c in self.feature_cols]
        labels = [j for j, c in enumerate(self.label_cols) if self._label(c, row[c], where)]
        return common.dense_features(x, encoding), labels

