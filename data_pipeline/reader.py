"""The input pipeline: one function that turns a dataset split into batches for one input pipeline.

Order of operations, and why:
  file list -> shard files by input pipeline (each worker reads its own files; no worker reads records it
  then throws away) -> shuffle files -> parallel interleave of blocks (each file read as blocks of
  ``block_length`` consecutive serialized records) -> shuffle blocks (bounded buffer) -> repeat -> rebatch
  blocks into batches -> skip (resume inside an epoch, cheap because nothing is parsed yet) -> parse the
  whole batch in one op -> dense multi-hot labels -> prefetch.

Why blocks: every tf.data stage costs about a microsecond per element it handles, which at a few hundred
thousand records per second on a small machine is most of the budget. Reading blocks of records inside the
(parallel) interleave, then shuffling and batching whole blocks, makes the sequential stages handle one
element per block instead of one per record (bench/pipeline_throughput.py measures the difference). The
price is a coarser shuffle: a batch is made of random blocks, each of ``block_length`` neighbouring records
of one shard (shards are written in input order); ``block_length=1`` shuffles single records, slower.

Batches are ``(features [B, F] float32, labels [B, L] float32)``.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import tensorflow as tf

from data_pipeline import manifest as mf
from data_pipeline.errors import DataError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ReaderOptions:
    """Options of the input pipeline.

    Attributes:
      shuffle: shuffle files and blocks of records.
      shuffle_buffer: records held by the shuffle buffer (bounds memory).
      repeat: repeat forever (training); False reads the split once (evaluation, prediction).
      deterministic: same order for the same seed (reproducible tests and exact resume).
      seed: shuffle seed; the epoch number is mixed in so every epoch has its own order.
      cache: cache parsed batches in memory after the first pass (small datasets only).
      drop_remainder: drop a last partial batch (static shapes for distributed training).
      cycle_length: files read at once by the interleave.
      block_length: consecutive records taken from one file before the interleave moves on; also the unit
        the shuffle and the batching move around (see the module docstring).
      on_bad_features: "fail" stops on NaN/Inf features; "skip" drops those rows and counts them.
      prefetch: batches to prefetch (tf.data.AUTOTUNE by default).
      holdout_fraction: fraction of records held out as a validation set, chosen by a hash of the record
        bytes (stable whatever the read order, sharding or number of workers).
      holdout: "exclude" reads the records not held out (training), "only" the held-out ones.
    """

    shuffle: bool = True
    shuffle_buffer: int = 10000
    repeat: bool = True
    deterministic: bool = False
    seed: int = 0
    cache: bool = False
    drop_remainder: bool = False
    cycle_length: int = 8
    block_length: int = 16
    on_bad_features: str = "fail"
    prefetch: int = tf.data.AUTOTUNE
    holdout_fraction: float = 0.0
    holdout: str = "exclude"


def split_files(data_dir: str, split: str, manifest: mf.Manifest | None = None) -> list[str]:
    """Returns the shard paths of a split, checking that each exists (error names the missing one)."""
    manifest = manifest or mf.read_manifest(data_dir)
    info = manifest.split(split, data_dir)
    files = [os.path.join(data_dir, s) for s in info.shards]
    for f in files:
        if not os.path.exists(f):
            raise DataError(f"{f}: shard listed in {os.path.join(data_dir, mf.MANIFEST_NAME)} is missing")
    if info.num_examples == 0:
        raise DataError(f"{data_dir}: split '{split}' has no examples")
    return files


def make_parse_fn(manifest: mf.Manifest, check_finite: bool = False):
    """Returns a function parsing a [B] batch of serialized records into (features, multi-hot labels).

    A handful of ops per batch, each over the whole batch (per-op cost is per batch, not per record):
    ParseExample writes dense features straight into the [B, F] output and labels as a ragged tensor, one
    RaggedBincount turns those into the [B, L] multi-hot matrix (duplicates count once), and one fused check
    covers every label index of the batch.

    Args:
      manifest: the dataset's manifest (shape and encoding).
      check_finite: fail on NaN/Inf features (checked inside the parse, which saves a pipeline stage).
    """
    num_features, num_labels = manifest.num_features, manifest.num_labels
    encoding = manifest.feature_encoding
    spec = {mf.KEY_LABELS: tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int64)}
    if encoding == mf.DENSE:
        # Fails the batch if any record has another number of values.
        spec[mf.KEY_DENSE] = tf.io.FixedLenFeature([num_features], tf.float32)
    elif encoding == mf.DENSE_BYTES:
        spec[mf.KEY_DENSE] = tf.io.FixedLenFeature([], tf.string)
    else:
        spec[mf.KEY_SPARSE_INDEX] = tf.io.VarLenFeature(tf.int64)
        spec[mf.KEY_SPARSE_VALUE] = tf.io.VarLenFeature(tf.float32)
    no_weights = tf.zeros([0], tf.float32)  # RaggedBincount's "count each value once" form

    def parse(serialized):
        ex = tf.io.parse_example(serialized, spec)
        if encoding == mf.DENSE:
            x = ex[mf.KEY_DENSE]
        elif encoding == mf.DENSE_BYTES:
            # One op decodes the whole batch; it fails if any record has another length.
            x = tf.io.decode_raw(ex[mf.KEY_DENSE], tf.float32, little_endian=True)
            x = tf.ensure_shape(x, [None, num_features])
        else:
            batch = tf.shape(serialized, out_type=tf.int64)[0]
            xi, xv = ex[mf.KEY_SPARSE_INDEX], ex[mf.KEY_SPARSE_VALUE]
            tf.debugging.assert_less(xi.values, tf.cast(num_features, tf.int64),
                                     message="feature index >= num_features")
            x = tf.scatter_nd(tf.stack([xi.indices[:, 0], xi.values], axis=1), xv.values,
                              tf.stack([batch, num_features]))
            x.set_shape([None, num_features])
        y = ex[mf.KEY_LABELS]
        checks = [tf.debugging.Assert(tf.reduce_all((y.values >= 0) & (y.values < num_labels)),
                                      [f"label index out of range [0, {num_labels})"])]
        if check_finite:
            checks.append(tf.debugging.Assert(all_finite(x), ["NaN/Inf feature value"]))
        with tf.control_dependencies(checks):
            labels = tf.raw_ops.RaggedBincount(splits=y.row_splits, values=y.values, size=num_labels,
                                               weights=no_weights, binary_output=True)
            x = tf.identity(x)
        labels.set_shape([None, num_labels])
        return x, labels

    return parse


def all_finite(x: tf.Tensor) -> tf.Tensor:
    """True when no element of ``x`` is NaN or +-Inf; exact, and cheap for the usual all-finite batch.

    One vectorised sum decides almost every batch: NaN or Inf anywhere makes the sum NaN or Inf, so a finite
    sum proves every element finite. Only a non-finite sum (a bad value, or an overflow of large finite
    values) pays for the element-wise is_finite, which builds a bool tensor as large as ``x`` and costs
    about three times the sum (bench/README.md, input pipeline).
    """
    return tf.cond(tf.math.is_finite(tf.reduce_sum(x)), lambda: tf.constant(True),
                   lambda: tf.reduce_all(tf.math.is_finite(x)))


def make_dataset(data_dir: str, split: str, batch_size: int,
                 input_context: tf.distribute.InputContext | None = None,
                 options: ReaderOptions | None = None, epoch: int = 0, skip_batches: int = 0,
                 bad_feature_counter: tf.Variable | None = None) -> tf.data.Dataset:
    """Builds the tf.data pipeline of one split for one input pipeline.

    Args:
      data_dir: dataset directory (shards + manifest.json).
      split: split name, e.g. "train" or "eval".
      batch_size: batch size of this pipeline (the per-replica batch under tf.distribute).
      input_context: which pipeline this is (input_pipeline_id of num_input_pipelines); None for one.
      options: ReaderOptions.
      epoch: mixed into the shuffle seed, so each epoch has its own order.
      skip_batches: batches to skip at the start (resuming inside an epoch).
      bad_feature_counter: int64 variable incremented by rows dropped for NaN/Inf (on_bad_features="skip").

    Returns:
      A dataset of (features [B, F] float32, labels [B, L] float32).

    Raises:
      DataError: missing directory, manifest or shard; empty split.
    """
    opts = options or ReaderOptions()
    manifest = mf.read_manifest(data_dir)
    files = split_files(data_dir, split, manifest)
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    # Always seeded, so a resumed run skips the batches of the same order (exactly so in deterministic mode;
    # otherwise up to the parallel interleave's reordering).
    seed = opts.seed * 1000003 + epoch

    ds = tf.data.Dataset.from_tensor_slices(files)
    shard_records = False
    if num_pipelines > 1:
        if len(files) >= num_pipelines:
            ds = ds.shard(num_pipelines, pipeline_id)
        else:
            shard_records = True
            _warn_once("%s split '%s': %d files for %d input pipelines; sharding by record instead of by "
                        "file (every pipeline reads every file)", data_dir, split, len(files), num_pipelines)
    if opts.shuffle:
        # Sharding by record needs every pipeline to see the same record order before the shard, so the
        # file order then comes from a seed common to all pipelines, and the interleave is deterministic.
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    compression = manifest.compression or None
    block = max(1, opts.block_length)
    # Each element from here to the rebatch is a block of `block` serialized records of one file.
    ds = ds.interleave(
        # TFRecordDataset's own read buffer (256 KiB for local files): a large one (8 MiB was tried) is slower,
        # because every refill writes into freshly mapped pages that the kernel must fault in and zero.
        lambda f: tf.data.TFRecordDataset(f, compression_type=compression).batch(block),
        cycle_length=min(opts.cycle_length, len(files)), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=opts.deterministic or shard_records)
    if shard_records:
        ds = ds.shard(num_pipelines, pipeline_id)
    if opts.holdout_fraction > 0:
        keep = _holdout_predicate(opts.holdout_fraction, opts.holdout == "only")
        ds = ds.map(lambda records: tf.boolean_mask(records, keep(records)))
    if opts.shuffle:
        ds = ds.shuffle(max(1, opts.shuffle_buffer // block), seed=seed, reshuffle_each_iteration=True)
    if opts.repeat:
        ds = ds.repeat()
    # rebatch cuts and joins blocks into batches of exactly batch_size (only the last batch of a finite
    # pass is partial): the record order of unbatch().batch(), without per-record work.
    ds = ds.rebatch(batch_size, drop_remainder=opts.drop_remainder)
    if skip_batches:
        ds = ds.skip(skip_batches)
    parse = make_parse_fn(manifest, check_finite=opts.on_bad_features != "skip")
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=opts.deterministic)
    if opts.on_bad_features == "skip":
        ds = _drop_non_finite(ds, batch_size, opts.drop_remainder, bad_feature_counter)
    if opts.cache:
        ds = ds.cache()
    ds = ds.prefetch(opts.prefetch)
    ds_opts = tf.data.Options()
    ds_opts.deterministic = opts.deterministic
    # Sharding is done above by file; stop tf.distribute from sharding again.
    ds_opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(ds_opts)


_warned: set[str] = set()


def _warn_once(fmt: str, *args) -> None:
    message = fmt % args
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _holdout_predicate(fraction: float, keep_held_out: bool):
    buckets = 10000
    cut = int(round(fraction * buckets))

    def predicate(record):
        held_out = tf.strings.to_hash_bucket_fast(record, buckets) < cut
        return held_out if keep_held_out else tf.logical_not(held_out)

    return predicate


def _drop_non_finite(ds, batch_size, drop_remainder, counter):
    """Drops rows with NaN/Inf features, counting them, and re-forms full batches."""

    def keep_finite(x, y):
        ok = tf.reduce_all(tf.math.is_finite(x), axis=1)
        if counter is not None:
            counter.assign_add(tf.reduce_sum(tf.cast(~ok, tf.int64)))
        return tf.boolean_mask(x, ok), tf.boolean_mask(y, ok)

    return ds.map(keep_finite).rebatch(batch_size, drop_remainder=drop_remainder)


def steps_per_epoch(data_dir: str, split: str, global_batch_size: int) -> int:
    """Full global batches in one pass over a split (at least 1)."""
    info = mf.read_manifest(data_dir).split(split, data_dir)
    return max(1, info.num_examples // global_batch_size)


def explain_data_error(data_dir: str, split: str, exc: BaseException) -> DataError:
    """Turns an error raised while iterating ``make_dataset`` into a one-line DataError.

    The reader parses whole batches, so TensorFlow's error cannot say which record was bad. This reads
    the split record by record (validate.locate_bad_record) to name the shard file and record; when every
    record is valid (the error had another cause) it falls back to the first line of the TensorFlow error
    plus the dataset directory.

    Args:
      data_dir: the dataset directory that was being read.
      split: the split that was being read.
      exc: the exception raised by the pipeline (usually a tf.errors.OpError).

    Returns:
      A DataError whose message names the file and record when they could be found.
    """
    from data_pipeline import validate  # Imported here: only needed once something went wrong.

    try:
        located = validate.locate_bad_record(data_dir, split)
    except Exception as e:  # noqa: BLE001 - the explanation must not hide the original error.
        log.warning("could not locate the bad record of %s split '%s': %s", data_dir, split, e)
        located = None
    if located:
        return DataError(located)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return DataError(f"{data_dir} split '{split}': {_first_meaningful_line(message)}")


def _first_meaningful_line(message: str) -> str:
    """The cause in a TensorFlow error message. A tf.function error starts with "Graph execution error:" and
    a "Detected at node ... defined at" traceback; the first line alone said nothing about the cause."""
    for line in message.splitlines():
        text = line.strip()
        if text and not text.startswith(("Graph execution error", "Detected at node", "File ", "[[")):
            return text
    return message.strip().splitlines()[0] if message.strip() else message
