"""The input pipeline: one function that turns a dataset split into batches for one input pipeline.

Packed datasets (one record holds a block of examples, data_pipeline/packed.py), in order:
  file list -> shard files by input pipeline -> shuffle files -> parallel interleave of block records ->
  shuffle blocks (bounded buffer) -> groups of ``mix_blocks`` blocks (within one pass) -> repeat -> [skip:
  count each group's rows from two small fields and drop the groups before the resume point, nothing
  decoded] -> decode each group in one parse (+ decode_raw for 16-bit features), in parallel, select its
  examples by id (holdout, sharding by example), put its rows in a mixing order -> cut batches of exactly
  ``batch_size`` rows (a batch crossing two groups takes the tail of one and the head of the next) -> gather
  each batch's rows (its one copy of the feature bytes) -> multi-hot labels -> prefetch. The work per example
  is memory copies; every op runs once per group or per batch.

Shuffle guarantee (packed, shuffle on): a group holds ``mix_blocks`` blocks from the shuffle buffer (the last
group of a pass over the data: up to 2 * mix_blocks - 1) and orders its rows so that any run of W consecutive
rows holds rows of min(W, its blocks) different blocks when the blocks hold equally many examples
(rows.mixing_order). A batch is one such run, or the tail of one group and the head of the next, so every batch
draws its rows from at least min(mix_blocks, ceil(batch_size / 2)) blocks. A holdout makes block sizes differ a
little; while they differ by less than a factor 2 the bound is min(mix_blocks, ceil(batch_size / 4)). The
writer fills every block but the last of a split; the group holding that one may give a batch one block fewer.

One-example-per-record datasets (the older encodings):
  file list -> shard files -> shuffle files -> parallel interleave of blocks (each file read as blocks of
  ``block_length`` consecutive serialized records) -> shuffle blocks -> repeat -> rebatch blocks into batches
  -> skip (cheap because nothing is parsed yet) -> parse the whole batch in one op -> multi-hot labels ->
  prefetch. Every tf.data stage costs about a microsecond per element, so the sequential stages handle blocks
  of records, not records; a batch is made of random runs of ``block_length`` neighbouring records.

Batches are ``(features [B, F] float32, labels [B, L] float32)``; options yield sparse features as a
``tf.SparseTensor`` or half-precision features in their stored dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import types

import tensorflow as tf

from data_pipeline import manifest as mf
from data_pipeline import rows as rows_lib
from data_pipeline.errors import DataError

log = logging.getLogger(__name__)
# The functions given to tf.data are plain TensorFlow (tf.cond, no Python control flow on tensors): skipping
# AutoGraph's source conversion makes building a pipeline several times faster.
_graph = tf.autograph.experimental.do_not_convert


@dataclasses.dataclass
class ReaderOptions:
    """Options of the input pipeline.

    Attributes:
      shuffle: shuffle files and blocks (and, packed, the rows of each group of blocks).
      shuffle_buffer: examples held by the shuffle buffer (bounds memory; packed: in whole blocks).
      repeat: repeat forever (training); False reads the split once (evaluation, prediction).
      deterministic: same order for the same seed (reproducible tests and exact resume).
      seed: shuffle seed; the epoch number is mixed in so every epoch has its own order.
      cache: cache parsed batches in memory after the first pass (small datasets only).
      drop_remainder: drop a last partial batch (static shapes for distributed training).
      cycle_length: files read at once by the interleave.
      block_length: one-example-per-record encodings: consecutive records taken from one file before the
        interleave moves on; also the unit the shuffle and the batching move around.
      mix_blocks: packed encodings: blocks whose rows are mixed together (see the shuffle guarantee above).
      on_bad_features: "fail" stops on NaN/Inf features; "skip" drops those rows and counts them.
      prefetch: batches to prefetch (tf.data.AUTOTUNE by default).
      holdout_fraction: fraction of examples held out as a validation set, chosen by a hash of the record bytes
        (packed: of the example id), stable whatever the read order, sharding or number of workers.
      holdout: "exclude" reads the examples not held out (training), "only" the held-out ones.
      sparse_output: sparse-feature datasets: yield the features as a tf.SparseTensor [B, F] (float32 values)
        instead of densifying them.
      stored_dtype: packed half-precision datasets: yield dense features (or sparse values) in their stored
        dtype (float16 / bfloat16, half the bytes to copy to a device) instead of float32.
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
    mix_blocks: int = 16
    on_bad_features: str = "fail"
    prefetch: int = tf.data.AUTOTUNE
    holdout_fraction: float = 0.0
    holdout: str = "exclude"
    sparse_output: bool = False
    stored_dtype: bool = False


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
      skip_batches: batches to skip at the start (resuming inside an epoch; exact in deterministic mode).
      bad_feature_counter: int64 variable incremented by rows dropped for NaN/Inf (on_bad_features="skip").

    Returns:
      A dataset of (features [B, F] float32 (or a tf.SparseTensor, or the stored dtype, as the options say),
      labels [B, L] float32).

    Raises:
      DataError: missing directory, manifest or shard; empty split.
      ValueError: options the dataset cannot honour (sparse_output of dense features).
    """
    opts = options or ReaderOptions()
    manifest = mf.read_manifest(data_dir)
    if opts.sparse_output and not manifest.sparse:
        raise ValueError(f"{data_dir}: sparse_output needs sparse features (encoding is {manifest.feature_encoding})")
    if opts.on_bad_features == "skip" and opts.sparse_output:
        raise ValueError("on_bad_features='skip' drops rows of dense features only; not with sparse_output")
    feature_dtype = manifest.feature_dtype if opts.stored_dtype else "float32"
    to_batch = _batch_function(rows_lib.Layout.of(manifest), opts.sparse_output, feature_dtype,
                               opts.on_bad_features != "skip")
    ds = compact_batches(data_dir, split, batch_size, input_context, opts, epoch, skip_batches, manifest, to_batch)
    if opts.on_bad_features == "skip":
        ds = _drop_non_finite(ds, batch_size, opts.drop_remainder, bad_feature_counter)
    if opts.cache:
        ds = ds.cache()
    ds = ds.prefetch(opts.prefetch)
    ds_opts = tf.data.Options()
    ds_opts.deterministic = opts.deterministic
    # Sharding is done here by file or example; stop tf.distribute from sharding again.
    ds_opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(ds_opts)


@functools.lru_cache(maxsize=None)
def _batch_function(layout: rows_lib.Layout, sparse_output: bool, feature_dtype: str, check_finite: bool):
    """Compact rows -> (features, labels), checking features for NaN/Inf; traced once per process for a layout
    and options (every make_dataset call, e.g. one per epoch, reuses it)."""

    @tf.function(autograph=False, reduce_retracing=True)
    def to_batch(rows):
        x, y = rows_lib.finalize(rows, layout.num_features, layout.num_labels, sparse_output,
                                 rows_lib.TF_DTYPES[feature_dtype])
        if not check_finite:
            return x, y
        values = x.values if isinstance(x, tf.SparseTensor) else x
        with tf.control_dependencies([tf.debugging.Assert(rows_lib.all_finite(values), ["NaN/Inf feature value"])]):
            return (tf.SparseTensor(x.indices, tf.identity(x.values), x.dense_shape) if isinstance(x, tf.SparseTensor)
                    else tf.identity(x)), y

    return to_batch


def compact_batches(data_dir: str, split: str, batch_size: int, input_context=None,
                    options: ReaderOptions | None = None, epoch: int = 0, skip_batches: int = 0,
                    manifest: mf.Manifest | None = None, finish=None) -> tf.data.Dataset:
    """The batches of make_dataset before their last step, ``finish``: compact rows (data_pipeline/rows.py),
    with the labels (and sparse features) still in CSR form, or ``finish(rows)``. The in-memory loader takes
    compact rows; make_dataset's finish makes (features, labels) in the same tf.data stage (every stage costs
    per batch)."""
    opts = options or ReaderOptions()
    manifest = manifest or mf.read_manifest(data_dir)
    files = split_files(data_dir, split, manifest)
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    shard_records = num_pipelines > 1 and len(files) < num_pipelines
    if shard_records:
        _warn_once("%s split '%s': %d files for %d input pipelines; sharding by %s instead of by file (every "
                   "pipeline reads every file)", data_dir, split, len(files), num_pipelines,
                   "example" if manifest.packed else "record")
    # Always seeded, so a resumed run skips the batches of the same order (exactly so in deterministic mode;
    # otherwise up to the parallel interleave's reordering).
    seed = opts.seed * 1000003 + epoch
    ds = tf.data.Dataset.from_tensor_slices(files)
    if num_pipelines > 1 and not shard_records:
        ds = ds.shard(num_pipelines, pipeline_id)
    if not manifest.packed:
        return _example_batches(ds, len(files), manifest, batch_size, opts, seed, skip_batches,
                                (num_pipelines, pipeline_id) if shard_records else (1, 0), finish or _identity)
    selection = rows_lib.RowSelection(opts.holdout_fraction, opts.holdout == "only",
                                      *((num_pipelines, pipeline_id) if shard_records else (1, 0)))
    return _packed_batches(ds, len(files), manifest, batch_size, opts, seed, skip_batches, selection,
                           finish or _identity)


def _identity(rows):
    return rows


def _example_batches(files, num_files, manifest, batch_size, opts, seed, skip_batches, record_shard, finish):
    """Compact rows of a one-example-per-record dataset (see the module docstring)."""
    shard_records = record_shard[0] > 1
    if opts.shuffle:
        # Sharding by record needs every pipeline to see the same record order before the shard, so the
        # file order then comes from a seed common to all pipelines, and the interleave is deterministic.
        files = files.shuffle(num_files, seed=seed, reshuffle_each_iteration=True)
    compression = manifest.compression or None
    block = max(1, opts.block_length)
    # Each element from here to the rebatch is a block of `block` serialized records of one file.
    ds = files.interleave(
        # TFRecordDataset's own read buffer (256 KiB for local files): a large one (8 MiB was tried) is slower,
        # because every refill writes into freshly mapped pages that the kernel must fault in and zero.
        _graph(lambda f: tf.data.TFRecordDataset(f, compression_type=compression).batch(block)),
        cycle_length=min(opts.cycle_length, num_files), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=opts.deterministic or shard_records)
    if shard_records:
        ds = ds.shard(*record_shard)
    if opts.holdout_fraction > 0:
        keep = _holdout_predicate(opts.holdout_fraction, opts.holdout == "only")
        ds = ds.map(_graph(lambda records: tf.boolean_mask(records, keep(records))))
    if opts.shuffle:
        ds = ds.shuffle(max(1, opts.shuffle_buffer // block), seed=seed, reshuffle_each_iteration=True)
    if opts.repeat:
        ds = ds.repeat()
    # rebatch cuts and joins blocks into batches of exactly batch_size (only the last batch of a finite
    # pass is partial): the record order of unbatch().batch(), without per-record work.
    ds = ds.rebatch(batch_size, drop_remainder=opts.drop_remainder)
    if skip_batches:
        ds = ds.skip(skip_batches)
    return ds.map(_graph(lambda raw: finish(rows_lib.parse_examples(raw, manifest))), num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=opts.deterministic)


def _packed_batches(files, num_files, manifest, batch_size, opts, seed, skip_batches, selection, finish):
    """Compact rows of a packed dataset, batch_size rows each (see the module docstring)."""
    if opts.shuffle:
        files = files.shuffle(num_files, seed=seed, reshuffle_each_iteration=True)
    compression = manifest.compression or None
    # Unbuffered reads of uncompressed files: each block record is read straight into its string (a buffer
    # would copy every byte once more).
    buffer_size = None if compression else 0
    ds = files.interleave(_graph(lambda f: tf.data.TFRecordDataset(f, compression, buffer_size)),
                          cycle_length=min(opts.cycle_length, num_files), block_length=1,
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=opts.deterministic)
    if opts.shuffle:
        ds = ds.shuffle(max(opts.mix_blocks, opts.shuffle_buffer // manifest.block_size), seed=seed,
                        reshuffle_each_iteration=True)
    ops = _packed_functions(rows_lib.Layout.of(manifest), selection.selects, max(1, opts.mix_blocks), opts.shuffle,
                            batch_size, opts.drop_remainder)
    params = selection.params()
    empty = tf.zeros([0], tf.string)
    ds = ds.batch(ops.mix).concatenate(tf.data.Dataset.from_tensors(empty)).scan(empty, ops.group_blocks)
    ds = ds.filter(_graph(lambda group: tf.size(group) > 0))
    if opts.repeat:
        ds = ds.repeat()
    # Elements from here: (group index, [k] block records, rows to drop). The index seeds the group's row
    # order, so a resumed run orders every group as the uninterrupted run did.
    ds = ds.enumerate()
    seed = tf.constant(seed, tf.int64)
    if skip_batches:
        ds = _skip_rows(ds, skip_batches * batch_size, lambda records: ops.count(records, params))

    def decode(index, records, drop=0):  # drop: rows of the group before the resume point
        return ops.decode(records, tf.stack([seed, index]), tf.cast(drop, tf.int64), params), False

    ds = ds.map(_graph(decode), num_parallel_calls=tf.data.AUTOTUNE, deterministic=opts.deterministic)
    if not opts.repeat:
        # An empty group marked last closes a finite pass, so that the batch cutting emits the final partial
        # batch. Appended after the parallel decode, it comes last whatever order the decode yields.
        nothing = rows_lib.decode_group(empty, ops.layout)[0]
        ds = ds.concatenate(tf.data.Dataset.from_tensors((nothing, True)))
    # A scan carries the rows left over at the end of each group (fewer than batch_size, copied once) into the
    # next group's first batch; every other batch gathers its rows straight from its group, in parallel.
    ds = ds.scan(rows_lib.empty_compact(ops.layout), _graph(lambda leftover, element: ops.carry(leftover, *element)))
    # (zip with a range, not enumerate(): enumerate adds a graph rewrite to every group's inner dataset)
    ds = ds.flat_map(_graph(lambda leftover, group, r, count: tf.data.Dataset.zip(
        tf.data.Dataset.range(count), tf.data.Dataset.from_tensors((leftover, group, r)).repeat(count))))
    return ds.map(_graph(lambda j, element: finish(ops.one_batch(*element, j))), num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=opts.deterministic)


def _skip_rows(ds, skip_rows: int, count):
    """Drops the first ``skip_rows`` selected examples: whole groups before the resume point are dropped after
    reading only their ``n`` and ``id`` fields (``count``); the group holding it gets the number of its rows to
    drop."""

    def running(seen, element):
        index, records, rows = element
        return seen + rows, (index, records, tf.clip_by_value(skip_rows - seen, 0, rows), rows)

    ds = ds.map(_graph(lambda index, records: (index, records, count(records))), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.scan(tf.constant(0, tf.int64), _graph(running))
    ds = ds.filter(_graph(lambda index, records, drop, rows: drop < rows))
    return ds.map(_graph(lambda index, records, drop, rows: (index, records, drop)))


@functools.lru_cache(maxsize=None)
def _packed_functions(layout: rows_lib.Layout, selects: bool, mix: int, shuffle: bool, batch_size: int,
                      drop_remainder: bool):
    """The per-group and per-batch functions of a packed pipeline, traced once per process for these arguments
    (the selection of examples, when ``selects``, is a tensor argument): make_dataset, called once per epoch and
    per input pipeline, then only assembles datasets around them."""
    function = functools.partial(tf.function, autograph=False, reduce_retracing=True)
    empty_records = tf.zeros([0], tf.string)

    @function
    def group_blocks(held, group):
        """Groups of ``mix`` blocks; the last group of a pass takes the blocks left over (fewer than ``mix``)
        too, so every group holds at least ``mix`` blocks when the pass has them. Batching moves the records
        into a group (no copy); only that last group, when there are blocks left over, is copied by a concat.
        """
        def flush():  # the pass ended (group is short, or the empty end marker)
            merged = tf.cond(tf.size(held) == 0, lambda: group,
                             lambda: tf.cond(tf.size(group) == 0, lambda: held, lambda: tf.concat([held, group], 0)))
            return empty_records, merged

        return tf.cond(tf.size(group) == mix, lambda: (group, held), flush)

    @function
    def count(records, selection):
        return rows_lib.selected_count(records, layout, selection if selects else None)

    @function
    def decode(records, seed, drop, selection):
        group, block_of_row = rows_lib.decode_group(records, layout, selection if selects else None)
        order = (rows_lib.mixing_order(block_of_row, seed) if shuffle else
                 tf.range(rows_lib.num_rows(group)))
        return rows_lib.reorder(group, order[drop:])

    @function
    def carry(leftover, group, last):
        """(rows left over after this group's full batches, (the previous leftover, group, its row count,
        batches to cut from them))."""
        r, c = rows_lib.num_rows(leftover), rows_lib.num_rows(group)
        full = (r + c) // batch_size
        rest = tf.cond(full > 0, lambda: rows_lib.take(group, full * batch_size - r, c),
                       lambda: rows_lib.concat(leftover, rows_lib.take(group, 0, c)))
        count = full if drop_remainder else full + tf.cast(last & (r + c > full * batch_size), tf.int64)
        return rest, (leftover, group, r, count)

    @function
    def one_batch(leftover, group, r, j):
        """Batch j of a group: rows j*B - r .. (j+1)*B - r of it, after the r rows left over by the groups
        before it for batch 0."""
        start, stop = j * batch_size - r, tf.minimum((j + 1) * batch_size - r, rows_lib.num_rows(group))
        return tf.cond((j == 0) & (r > 0), lambda: rows_lib.concat(leftover, rows_lib.take(group, 0, stop)),
                       lambda: rows_lib.take(group, start, stop))

    return types.SimpleNamespace(layout=layout, mix=mix, group_blocks=group_blocks, count=count, decode=decode,
                                 carry=carry, one_batch=one_batch)


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

    return ds.map(_graph(keep_finite)).rebatch(batch_size, drop_remainder=drop_remainder)


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
