"""A prepared TensorFlow Datasets dataset, read offline from its directory (``tfds.builder_from_directory``).

``--input`` is the directory TFDS prepared (the one holding ``dataset_info.json``, e.g.
``~/tensorflow_datasets/my_dataset/1.0.0``); nothing is downloaded. Every split of the dataset is converted, under
its TFDS name. ``--feature-keys`` names the feature(s), concatenated in the order given:

- a numeric tensor of fixed shape: its values, flattened (dense);
- text or tokens (a string, split on white space, or a sequence of strings; or a variable-length sequence of
  integer token ids): a bag of words, each token's value the number of times it occurs. Strings need
  ``--hash-features``; integer ids take ``--num-features`` ids (or are hashed).

``--label-keys`` names the labels, as one of:

- one multi-hot tensor ``[L]`` (bool or 0/1);
- one ``Sequence(ClassLabel)`` (or a variable-length integer tensor of label indices, L from --num-labels); the
  label names are the ClassLabel's;
- several boolean (or 0/1) scalar features, one per label, named after their keys.
"""

from __future__ import annotations

import collections
import os

import numpy as np

from data_pipeline.converters import common
from data_pipeline.errors import DataError


def _open_builder(path: str):
    import tensorflow_datasets as tfds  # Lazily: only this format needs it.

    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
        raise DataError(f"{path}: not a prepared TFDS dataset directory (no dataset_info.json)")
    try:
        return tfds.builder_from_directory(path)
    except Exception as e:  # noqa: BLE001 - TFDS raises many types for an unreadable directory
        raise DataError(f"{path}: cannot open as a TFDS dataset ({type(e).__name__}: {e})") from None


def _feature(features, key: str, flag: str, path: str):
    if key not in features:
        raise DataError(f"{path}: {flag} '{key}' is not a feature of the dataset (has: {', '.join(features)})")
    return features[key]


class _FeatureReader:
    """Turns the feature keys of one example into (keys, values): int feature ids, or token strings to hash."""

    def __init__(self, features, keys, options, path: str):
        import tensorflow_datasets as tfds

        self.parts = []  # (key, kind, offset, width)
        offset = 0
        for key in keys:
            f = _feature(features, key, "--feature-keys", path)
            dtype, shape = np.dtype(f.np_dtype), tuple(f.shape)
            if isinstance(f, tfds.features.Text) or dtype.kind in "SUO":
                if options.hash_features is None:
                    raise DataError(f"{path}: --feature-keys '{key}' holds text: pass --hash-features N")
                self.parts.append((key, "tokens", 0, 0))
            elif dtype.kind in "iu" and None in shape:
                if options.hash_features is None and options.num_features is None:
                    raise DataError(f"{path}: --feature-keys '{key}' holds token ids of a variable length: pass "
                                    "--num-features (the id count) or --hash-features N")
                width = options.num_features or 0
                self.parts.append((key, "ids", offset, width))
                offset += width
            elif dtype.kind in "iufb" and None not in shape:
                width = int(np.prod(shape, dtype=np.int64))
                self.parts.append((key, "dense", offset, width))
                offset += width
            else:
                raise DataError(f"{path}: --feature-keys '{key}' is {type(f).__name__} {dtype} {shape}: not a "
                                "numeric tensor of fixed shape, text, or token ids")
        self.num_features = offset
        self.dense = all(kind == "dense" for _, kind, _, _ in self.parts)

    def __call__(self, example: dict, where: str):
        keys, values = [], []
        for key, kind, offset, width in self.parts:
            v = np.asarray(example[key])
            if kind == "dense":
                flat = v.reshape(-1).astype(np.float32)
                nz = np.flatnonzero(flat != 0)  # NaN is non-zero: the writer's check sees it
                keys.append(nz + offset)
                values.append(flat[nz])
                continue
            tokens = (v.item().split() if v.ndim == 0 else v.reshape(-1).tolist()) if kind == "tokens" else v.reshape(-1)
            counts = collections.Counter(t.decode("utf-8") if isinstance(t, bytes) else t for t in tokens)
            ids = np.asarray(list(counts), object if kind == "tokens" else np.int64)
            if kind == "ids" and width and ids.size and (ids.min() < 0 or ids.max() >= width):
                raise DataError(f"{where}: '{key}' token id {int(ids.max() if ids.max() >= width else ids.min())} "
                                f"out of range [0, --num-features {width})")
            keys.append(ids + offset if kind == "ids" else ids)
            values.append(np.fromiter(counts.values(), np.float32, len(counts)))
        if any(k.dtype == object for k in keys):  # tokens: every key as text (an id i hashes as "i")
            keys = [k.astype(str).astype(object) for k in keys]
        return np.concatenate(keys) if keys else np.zeros([0], np.int64), np.concatenate(values)


def _label_reader(features, keys, options, path: str):
    """(num_labels, label names or None, function example -> label indices)."""
    import tensorflow_datasets as tfds

    fs = [_feature(features, key, "--label-keys", path) for key in keys]
    if len(keys) > 1:
        for key, f in zip(keys, fs):
            if tuple(f.shape) != () or np.dtype(f.np_dtype).kind not in "biu":
                raise DataError(f"{path}: --label-keys '{key}' is not a boolean scalar (several label keys must "
                                "each be one boolean label)")
        return len(keys), list(keys), lambda ex: [j for j, key in enumerate(keys) if ex[key]]
    key, f = keys[0], fs[0]
    inner = f.feature if isinstance(f, tfds.features.Sequence) else f
    if isinstance(inner, tfds.features.ClassLabel):
        return inner.num_classes, list(inner.names), lambda ex: np.asarray(ex[key]).reshape(-1).tolist()
    shape, kind = tuple(f.shape), np.dtype(f.np_dtype).kind
    if len(shape) == 1 and shape[0] is not None and kind in "biuf":
        return shape[0], None, lambda ex: np.flatnonzero(np.asarray(ex[key])).tolist()
    if len(shape) == 1 and kind in "iu":
        if options.num_labels is None:
            raise DataError(f"{path}: --label-keys '{key}' holds label indices without a ClassLabel: pass "
                            "--num-labels")
        return options.num_labels, None, lambda ex: np.asarray(ex[key]).tolist()
    raise DataError(f"{path}: --label-keys '{key}' is {type(f).__name__} {np.dtype(f.np_dtype)} {shape}: not a "
                    "multi-hot tensor, a Sequence(ClassLabel) or label indices")


def open_source(paths: list[str], options: common.ConvertOptions,
                label_names: list[str] | None = None) -> common.Source:
    """Opens a prepared TFDS dataset directory.

    Args:
      paths: one directory.
      options: the conversion options; uses feature_keys, label_keys, num_features, num_labels, hash_features.
      label_names: names from --label-names, if given (they replace the ClassLabel's).

    Returns:
      A common.Source with one part per TFDS split.

    Raises:
      DataError: not a TFDS directory, a key the dataset does not have or of a kind this converter cannot read.
    """
    import tensorflow_datasets as tfds

    if len(paths) != 1:
        raise DataError(f"--input: --format tfds reads one dataset directory (got {len(paths)} paths)")
    path = paths[0]
    if not options.feature_keys or not options.label_keys:
        raise DataError(f"{path}: --format tfds needs --feature-keys and --label-keys")
    builder = _open_builder(path)
    features = builder.info.features
    read_features = _FeatureReader(features, options.feature_keys, options, path)
    num_labels, names, read_labels = _label_reader(features, options.label_keys, options, path)
    splits = {name: f"{path}[{name}]" for name in builder.info.splits}

    def records(part: str, encoding: str):
        split = next(name for name, p in splits.items() if p == part)
        ds = builder.as_dataset(split=split, shuffle_files=False)
        for i, example in enumerate(tfds.as_numpy(ds)):
            where = f"{path} split {split} example {i}"
            keys, values = read_features(example, where)
            if options.hash_features is None:
                yield (common.sparse_features(keys, values, read_features.num_features, encoding, where),
                       read_labels(example), where)
            else:  # raw ids or tokens, for common.hashed_source
                yield (keys, values), read_labels(example), where

    return common.Source(
        num_features=read_features.num_features, num_labels=num_labels, label_names=names,
        sparse=not read_features.dense, counts={p: builder.info.splits[s].num_examples for s, p in splits.items()},
        records=records, description=f"tfds {builder.info.full_name}: {path}", splits=splits)
