"""Converters from common multi-label file formats into dataset directories.

One module per format (``arff``, ``libsvm``, ``csv``, ``npz``, ``tfds``); each turns its input files into a
``common.Source``, reading its format's options off a ``ConvertOptions``. ``convert`` decides the split of each file, runs the first pass (counts and shape) and
writes every split through one DatasetWriter, so a failure at any record leaves no dataset at ``--out``.
"""

from __future__ import annotations

import importlib
import logging
import os
import re

from data_pipeline import manifest as mf
from data_pipeline.converters.common import ConvertOptions, hashed_source, read_label_names
from data_pipeline.errors import DataError
from data_pipeline.hashing import HashSpec
from data_pipeline.writer import DatasetWriter

log = logging.getLogger(__name__)

FORMATS = ("arff", "libsvm", "csv", "npz", "tfds")
DIRECTORY_FORMATS = ("tfds",)  # formats whose one input is a directory holding every split

# Words in a file name that decide its split, checked in this order. "val" must be a whole word so that
# e.g. "interval.csv" is not taken for an eval split.
_SPLIT_PATTERNS = (
    ("train", re.compile(r"train")),
    ("test", re.compile(r"test")),
    ("eval", re.compile(r"valid|eval|(?:^|[^a-z])val(?:[^a-z]|$)")),
)
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def split_names(paths: list[str], given: list[str] | None = None) -> list[str]:
    """Decides the split name of every input file.

    Args:
      paths: input files.
      given: names from ``--splits`` (one per file), or None to derive them from the file names: a name
        containing "train" is train, "test" is test, "val"/"valid"/"eval" is eval; a single file whose name
        says nothing is train.

    Returns:
      One split name per path.

    Raises:
      DataError: wrong number of --splits, a name that is ambiguous or says nothing while there are several
        files, or two files for one split.
    """
    if given is not None:
        if len(given) != len(paths):
            raise DataError(f"--splits: {len(given)} names for {len(paths)} --input files")
        for name in given:
            if not _SPLIT_NAME.match(name):
                raise DataError(f"--splits: bad split name '{name}' (letters, digits and '_' only)")
        names = list(given)
    else:
        names = []
        for path in paths:
            stem = os.path.splitext(os.path.basename(path))[0].lower()
            found = [split for split, pattern in _SPLIT_PATTERNS if pattern.search(stem)]
            if len(found) > 1:
                raise DataError(f"{path}: file name matches splits {' and '.join(found)}; pass --splits")
            if not found and len(paths) > 1:
                raise DataError(f"{path}: cannot tell the split from the file name "
                                "(expected train/test/val/eval in it); pass --splits")
            names.append(found[0] if found else "train")
    seen: dict[str, str] = {}
    for path, name in zip(paths, names):
        if name in seen:
            raise DataError(f"{path}: split '{name}' already comes from {seen[name]}; pass --splits")
        seen[name] = path
    return names


def convert(options: ConvertOptions) -> mf.Manifest:
    """Converts the input files into a dataset directory.

    Args:
      options: what to convert and how (ConvertOptions; the command line builds it from its flags).

    Returns:
      The Manifest written.

    Raises:
      DataError: bad or missing input, naming the file (and line or record); nothing is left at options.out.
    """
    if options.format not in FORMATS:
        raise DataError(f"unknown format '{options.format}' (one of {', '.join(FORMATS)})")
    paths = [str(p) for p in options.inputs]
    directory = options.format in DIRECTORY_FORMATS
    for path in paths:
        if not (os.path.isdir(path) if directory else os.path.isfile(path)):
            raise DataError(f"{path}: no such input {'directory' if directory else 'file'}")
    if directory and options.splits is not None:
        raise DataError(f"--splits: not used by --format {options.format} (its splits are the dataset's)")
    splits = None if directory else split_names(paths, list(options.splits) if options.splits is not None else None)
    # Checked here as well as in DatasetWriter so that a long first pass is not wasted.
    if os.path.exists(options.out) and not options.overwrite:
        raise DataError(f"{options.out}: already exists (pass --overwrite to replace it)")
    names = read_label_names(options.label_names) if options.label_names else None
    hashing = None
    if options.hash_features is not None:
        hashing = HashSpec(options.hash_features)
        hashing.check("--hash-features")

    module = importlib.import_module(f"data_pipeline.converters.{options.format}")
    source = module.open_source(paths, options, names)
    if hashing is not None:
        source = hashed_source(source, hashing)
    if names is not None:
        if len(names) != source.num_labels:
            raise DataError(f"{options.label_names}: {len(names)} label names for {source.num_labels} labels")
        source.label_names = names
    parts = list(source.splits.items()) if source.splits is not None else list(zip(splits, paths))
    for _, part in parts:
        if source.counts[part] == 0:
            raise DataError(f"{part}: no records")

    sparse = source.sparse if options.encoding is None else options.encoding == "sparse"
    encoding = mf.encoding_for(options.layout, sparse)
    with DatasetWriter(options.out, source.num_features, source.num_labels, source.label_names, encoding,
                       overwrite=options.overwrite, source=source.description or f"{options.format}: {paths}",
                       on_bad_features=options.on_bad_features, feature_dtype=options.feature_dtype,
                       block_size=options.block_size) as writer:
        writer.manifest.feature_hashing = hashing
        for split, path in parts:
            log.info("converting %s (%d records) into split '%s'", path, source.counts[path], split)
            writer.write_split(split, source.records(path, encoding), source.counts[path], options.shards)
    if writer.num_skipped:
        log.warning("skipped %d records with NaN/Inf features (--on-bad-features skip)", writer.num_skipped)
    return writer.manifest
