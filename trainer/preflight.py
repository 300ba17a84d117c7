"""Checks that run before the first training step: whatever can be known to fail (or to be a mistake) from
the config, the manifests and the shard files fails here, in one line, instead of after minutes of training.

Errors (ConfigError / DataError, exit status 2) for what cannot work; one-line warnings for settings that
are legal but probably not meant (what the run will then do is part of the warning).
"""

from __future__ import annotations

import difflib
import logging
import mmap
import os
import struct

from data_pipeline import manifest as mf
from data_pipeline.errors import DataError
from trainer import files
from trainer.config import ConfigError
from trainer.optimizers import scaled_learning_rate

log = logging.getLogger(__name__)

COUNT_BUDGET_BYTES = 2 << 30  # shard bytes whose records are counted, per split (cost: bench/README.md)
_FRAMING = 16  # bytes around each TFRecord: uint64 length, uint32 CRC of the length, (data), uint32 CRC of the data


def check_before_training(cfg, manifest: mf.Manifest, data_dir: str, eval_source, model_dir: str) -> None:
    """Runs every check; raises on the first error, logs each warning.

    Args:
      cfg: the validated config.
      manifest: the training dataset's manifest.
      data_dir: the training dataset directory.
      eval_source: evaluation.EvalSource or None (what training evaluates on).
      model_dir: the model directory (may not exist yet).
    """
    check_model(cfg)
    check_labels(cfg, manifest, data_dir)
    if eval_source is not None and eval_source.data_dir != data_dir:
        check_eval_data(manifest, data_dir, eval_source.data_dir)
    check_batch_size(cfg, manifest, data_dir)
    check_shards(data_dir, cfg.data.train_split, manifest)
    if eval_source is not None and (eval_source.data_dir, eval_source.split) != (data_dir, cfg.data.train_split):
        check_shards(eval_source.data_dir, eval_source.split, mf.read_manifest(eval_source.data_dir))
    if eval_source is None and cfg.train.early_stopping_patience:
        log.warning("train.early_stopping_patience=%d has no effect: nothing to evaluate on (set "
                    "data.validation_fraction, or data.eval_split with an eval split)", cfg.train.early_stopping_patience)
    check_model_dir(model_dir)


def check_model_dir(model_dir: str) -> None:
    """The model directory is a directory (or does not exist yet) and its run_info.json (if any) is readable."""
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise ConfigError(f"--model-dir {model_dir}: exists and is not a directory")
    files.read_run_info(model_dir)  # a damaged run_info.json is named now, not as a JSON error later


def check_model(cfg) -> None:
    if not cfg.model.hidden:
        raise ConfigError("model.hidden: [] would train a linear model (no hidden layer); give at least one "
                          "width, e.g. [2048, 2048]")


def check_labels(cfg, manifest: mf.Manifest, data_dir: str) -> None:
    """Config keys that name or count labels must fit the dataset."""
    names = set(manifest.label_names)
    for name in cfg.metrics.pr_curve_labels:
        if name not in names:
            close = difflib.get_close_matches(name, manifest.label_names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"metrics.pr_curve_labels: '{name}' is not a label of {data_dir}{hint}")
    weights = cfg.loss.label_weights
    if weights is not None and len(weights) != manifest.num_labels:
        raise ConfigError(f"loss.label_weights: {len(weights)} weights for the {manifest.num_labels} labels of "
                          f"{data_dir}")


def check_eval_data(manifest: mf.Manifest, data_dir: str, eval_dir: str) -> None:
    """--eval-data must have the training data's shape; other label names are suspicious."""
    other = mf.read_manifest(eval_dir)
    if (other.num_features, other.num_labels) != (manifest.num_features, manifest.num_labels):
        raise DataError(f"--eval-data {eval_dir}: {other.num_features} features / {other.num_labels} labels, but "
                        f"--data {data_dir} has {manifest.num_features} / {manifest.num_labels}")
    if other.label_names != manifest.label_names:
        i = next(i for i, (a, b) in enumerate(zip(other.label_names, manifest.label_names)) if a != b)
        log.warning("--eval-data %s: label %d is '%s' there but '%s' in --data; per-label metrics assume the "
                    "same labels in the same order", eval_dir, i, other.label_names[i], manifest.label_names[i])


def check_batch_size(cfg, manifest: mf.Manifest, data_dir: str) -> None:
    """A global batch larger than the training records: legal, but every step repeats records."""
    split = cfg.data.train_split
    examples = int(manifest.split(split, data_dir).num_examples * (1.0 - cfg.data.validation_fraction))
    batch = cfg.train.batch_size
    if batch <= examples:
        return
    steps = cfg.train.epochs if cfg.train.max_steps is None else min(cfg.train.epochs, cfg.train.max_steps)
    factor = scaled_learning_rate(cfg.optimizer, batch) / cfg.optimizer.learning_rate
    log.warning("train.batch_size %d is larger than the %d training examples of %s split '%s': each step "
                "repeats them %.1f times, an epoch is 1 step (%d in all), at learning rate x%.4g (%s scaling from "
                "optimizer.base_batch_size %d)", batch, examples, data_dir, split, batch / max(examples, 1), steps,
                factor, cfg.optimizer.lr_scaling, cfg.optimizer.base_batch_size)


def check_shards(data_dir: str, split: str, manifest: mf.Manifest, budget_bytes: int = COUNT_BUDGET_BYTES) -> None:
    """Every shard of the split exists and holds the number of records the manifest says.

    Records are counted by walking the TFRecord framing (``count_records``), which also finds a truncated
    record, from the last shard backwards (an interrupted copy leaves its last file short) until
    ``budget_bytes`` of shards have been walked; the other shards, and GZIP shards (which cannot be walked
    without decompressing), are checked for presence and a size that can hold their records.
    """
    info = manifest.split(split, data_dir)
    walked = 0
    for shard, examples in reversed(list(zip(info.shards, info.shard_lengths))):
        expected = -(-examples // manifest.block_size) if manifest.packed else examples  # packed: block records
        path = os.path.join(data_dir, shard)
        if not os.path.isfile(path):
            raise DataError(f"{path}: shard listed in {os.path.join(data_dir, mf.MANIFEST_NAME)} is missing")
        size = os.path.getsize(path)
        if manifest.compression or walked + size > budget_bytes:
            minimum = (1 if expected else 0) if manifest.compression else _FRAMING * expected
            if size < minimum:
                raise DataError(f"{path}: {size} bytes cannot hold the {expected} records the manifest says")
            continue
        walked += size
        count = count_records(path)
        if count != expected:
            raise DataError(f"{path}: {count} records but the manifest says {expected}")


def count_records(path: str) -> int:
    """Records of an uncompressed TFRecord file, from its length headers (memory-mapped: the pages of the
    headers are read, the records are not parsed).

    Raises:
      DataError: the file ends inside a record (truncated), naming the file and record.
    """
    size = os.path.getsize(path)
    if size == 0:
        return 0
    length = struct.Struct("<Q").unpack_from
    count = pos = 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        while pos + 8 <= size:
            end = pos + _FRAMING + length(data, pos)[0]
            if end > size:
                break
            count, pos = count + 1, end
    if pos != size:
        raise DataError(f"{path} record {count}: truncated TFRecord (the file ends inside the record)")
    return count
