"""This process' training input for an epoch: streamed from the shards, or held in host or device memory.

``data.input_mode`` chooses how (README, "Input modes"):

- ``stream``: data_pipeline.reader.make_dataset reads the shards every epoch; the backend prefetches batches to
  the replicas' devices, so the copy of batch n+1 overlaps step n.
- ``memory``: this process' share of the train split is read once into host arrays (data_pipeline.memory);
  every epoch's batches are gathered from them in a fresh seeded permutation, by tf.data.
- ``device``: the share is split among this process' replicas, each part placed on its replica's device with
  a permutation of it; the replica step gathers its batch there (``replica_batch``): no host work per step
  and no copy to the device. Per replica, not shared: a device holds 1/R of the share (R local replicas), so
  R devices hold R times the data a shared copy would allow, and every gather reads local memory.
- ``auto``: ``memory`` when this process' share (data_pipeline.memory.estimate_bytes, from the manifest) fits
  ``data.memory_budget_mib``, else ``stream``. Never ``device``: device memory is shared with the model's
  weights and activations, whose needs are not known before the first step.

In the memory modes, epoch e visits the examples in the order memory.epoch_permutation(seed, e, n), every
example once (the last partial batch of a part left out), and a run resumed at (epoch, step in epoch) gets
exactly the batches the uninterrupted run would have. The held-out examples (data.validation_fraction) are
never loaded; rows with NaN/Inf features fail the load or, with data.on_bad_features=skip, are dropped there.
Every mode yields batches of the form ``training_reader_options`` gives the reader: the one place they are set.
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from data_pipeline import manifest as mf
from data_pipeline import memory
from data_pipeline import reader
from data_pipeline import rows as rows_lib
from trainer.backends import Backend
from trainer.config import ConfigError
from trainer.model import uses_sparse_input

log = logging.getLogger(__name__)

_MIB = 2 ** 20
_STREAM_ID_STRIDE = 1_000_003  # seeds of different parts (processes, replicas) of one run


def training_reader_options(cfg, manifest: mf.Manifest) -> reader.ReaderOptions:
    """The reader options of the training input; the memory modes take the batch form (sparse_output,
    stored_dtype) from them too. Half-precision features stay in their stored dtype up to the replica step,
    which casts them (steps.float32_features): half the bytes through the input path and to the device."""
    return reader.ReaderOptions(
        stored_dtype=True,
        sparse_output=uses_sparse_input(cfg.model.sparse_input, manifest.sparse, manifest.num_features),
        shuffle=cfg.data.shuffle, shuffle_buffer=cfg.data.shuffle_buffer, repeat=True,
        deterministic=cfg.train.deterministic, seed=cfg.train.seed, cache=cfg.data.cache, drop_remainder=True,
        cycle_length=cfg.data.cycle_length, block_length=cfg.data.block_length,
        on_bad_features=cfg.data.on_bad_features, holdout_fraction=cfg.data.validation_fraction, holdout="exclude")


def process_input_context(backend: Backend) -> tf.distribute.InputContext:
    """This process as an input pipeline: one per process, as the backends' distribute_dataset makes them."""
    return tf.distribute.InputContext(num_input_pipelines=backend.num_workers, input_pipeline_id=backend.worker_index,
                                      num_replicas_in_sync=backend.num_replicas)


def resolve_mode(cfg, backend: Backend, data_dir: str) -> str:
    """data.input_mode with ``auto`` resolved (see the module docstring; a share smaller than one step's batch
    streams too: the reader repeats the examples within a batch)."""
    mode = cfg.data.input_mode
    if mode != "auto":
        return mode
    if _share_examples(cfg, backend, data_dir) < cfg.train.batch_size // backend.num_workers:
        return "stream"
    need = memory.estimate_bytes(data_dir, cfg.data.train_split, process_input_context(backend),
                                 cfg.data.validation_fraction, "exclude")
    mode = "memory" if need <= cfg.data.memory_budget_mib * _MIB else "stream"
    log.info("data.input_mode auto: this process' share of the train split needs %.1f MiB, budget "
             "data.memory_budget_mib %g: %s", need / _MIB, cfg.data.memory_budget_mib, mode)
    return mode


def _share_examples(cfg, backend: Backend, data_dir: str) -> float:
    """About how many training examples this process holds (the split's share less the expected holdout)."""
    examples = mf.read_manifest(data_dir).split(cfg.data.train_split, data_dir).num_examples
    return examples * (1.0 - cfg.data.validation_fraction) / backend.num_workers


def make_training_input(cfg, backend: Backend, data_dir: str, global_batch: int) -> "TrainingInput":
    """The training input of data.input_mode; the memory modes read their data here.

    Raises:
      ConfigError: a memory mode whose share makes no batch of this process' replicas.
    """
    mode = resolve_mode(cfg, backend, data_dir)
    options = training_reader_options(cfg, mf.read_manifest(data_dir))
    if mode == "stream":
        return StreamInput(backend, data_dir, cfg.data.train_split, global_batch, options)
    data = load_share(data_dir, cfg.data.train_split, backend, options)
    step_batch = global_batch // backend.num_workers
    if data.num_examples < step_batch:
        raise ConfigError(f"data.input_mode: {mode} holds this worker's {data.num_examples} training examples, "
                          f"fewer than its batch of {step_batch} (train.batch_size); stream repeats them instead")
    seed = cfg.train.seed + _STREAM_ID_STRIDE * backend.worker_index
    if mode == "memory":
        return HostMemoryInput(backend, data, global_batch, seed, options)
    return DeviceInput(backend, data, global_batch, seed, options)


class TrainingInput:
    """Interface: ``epoch(e, step_in_epoch)`` gives what the train function iterates over from that position
    on; the train function's replica step turns each element into (features, labels) by ``replica_batch``."""

    mode = "base"

    def epoch(self, epoch: int, in_epoch: int):
        raise NotImplementedError

    def replica_batch(self, element):
        """(features, labels) of a replica, from the element the train call handed it: the batch itself."""
        x, y = element
        return x, y


class StreamInput(TrainingInput):
    """Batches read from the shards every epoch; a resumed epoch skips the batches already taken."""

    mode = "stream"

    def __init__(self, backend: Backend, data_dir: str, split: str, global_batch: int, options):
        self.backend, self.data_dir, self.split, self.global_batch, self.options = (backend, data_dir, split,
                                                                                    global_batch, options)

    def epoch(self, epoch, in_epoch):
        skip = in_epoch * self.backend.local_replicas

        def dataset_fn(ctx):
            return reader.make_dataset(self.data_dir, self.split, ctx.get_per_replica_batch_size(self.global_batch),
                                       ctx, self.options, epoch=epoch, skip_batches=skip)

        return iter(self.backend.distribute_dataset(dataset_fn))


class HostMemoryInput(TrainingInput):
    """This process' share in host arrays; each epoch's batches drawn by tf.data from its permutation."""

    mode = "memory"

    def __init__(self, backend: Backend, data: memory.InMemoryData, global_batch: int, seed: int, options):
        self.backend, self.data, self.global_batch, self.seed, self.options = (backend, data, global_batch, seed,
                                                                               options)

    def epoch(self, epoch, in_epoch):
        skip = in_epoch * self.backend.local_replicas  # the pipeline's batches go to the local replicas in turn
        opts = self.options

        def dataset_fn(ctx):
            return memory.make_memory_dataset(
                self.data, ctx.get_per_replica_batch_size(self.global_batch), seed=self.seed, epoch=epoch,
                skip_batches=skip, shuffle=opts.shuffle, sparse_output=opts.sparse_output,
                stored_dtype=opts.stored_dtype)

        return iter(self.backend.distribute_dataset(dataset_fn))


class DeviceInput(TrainingInput):
    """This process' share split among its replicas (strided, so every part spans the whole share), each
    part on its replica's device with a permutation variable there. An element is the step's batch index in
    the epoch; replica r gathers rows ``perm_r[j*b : (j+1)*b]`` (wrapping around at the end of its part)."""

    mode = "device"

    def __init__(self, backend: Backend, data: memory.InMemoryData, global_batch: int, seed: int, options):
        self.backend, self.options = backend, options
        self.per_replica_batch = global_batch // backend.num_replicas
        self.num_features, self.num_labels = data.num_features, data.num_labels
        stored = data.features if data.features is not None else data.feature_values
        self.feature_dtype = tf.as_dtype(stored.dtype) if options.stored_dtype else tf.float32
        local = backend.local_replicas
        self.parts = []
        for r, device in enumerate(backend.local_devices):
            part = data if local == 1 else data.select(np.arange(r, data.num_examples, local))
            with tf.device(device):
                tensors = {k: tf.identity(v) for k, v in part.tensors().items()}
                permutation = tf.Variable(tf.zeros([part.num_examples], tf.int64), trainable=False)
            replica_seed = seed + _STREAM_ID_STRIDE * backend.num_workers * r
            self.parts.append((tensors, permutation, part.num_examples, replica_seed))
        self.shuffle, self.permuted_epoch = options.shuffle, None
        log.info("data.input_mode device: %d part(s) of %s examples, %.1f MiB per device", local,
                 "/".join(str(p[2]) for p in self.parts), data.nbytes / local / _MIB)

    def epoch(self, epoch, in_epoch):
        if epoch != self.permuted_epoch:
            for _, permutation, n, seed in self.parts:
                permutation.assign(memory.epoch_permutation(seed, epoch, n) if self.shuffle
                                   else tf.range(n, dtype=tf.int64))
            self.permuted_epoch = epoch
        return iter(tf.data.Dataset.range(in_epoch, np.iinfo(np.int64).max))

    def replica_batch(self, element):
        tensors, permutation, n, _ = self.parts[self.backend.local_replica_index()]
        b = self.per_replica_batch
        positions = (element * b + tf.range(b, dtype=tf.int64)) % n
        rows = memory.gather_rows(tensors, tf.gather(permutation, positions))
        return rows_lib.finalize(rows, self.num_features, self.num_labels, self.options.sparse_output,
                                 self.feature_dtype)


# --- Loading this process' share ---------------------------------------------------------------------------------

def load_share(data_dir: str, split: str, backend: Backend, options: reader.ReaderOptions) -> memory.InMemoryData:
    """This process' share of the split without the held-out examples, with rows of NaN/Inf features failing
    the load (one line naming the record) or dropped (``on_bad_features="skip"``)."""
    try:
        data = memory.load_split(data_dir, split, process_input_context(backend), options.holdout_fraction,
                                 options.holdout)
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
        raise reader.explain_data_error(data_dir, split, e) from None
    finite = data.finite_rows()
    if not finite.all():
        if options.on_bad_features != "skip":
            raise reader.explain_data_error(data_dir, split, ValueError("NaN/Inf feature value"))
        log.warning("%s split '%s': dropped %d example(s) with NaN/Inf features", data_dir, split,
                    int((~finite).sum()))
        data = data.select(np.flatnonzero(finite))
    log.info("read %d examples of %s split '%s' into memory (%.1f MiB)", data.num_examples, data_dir, split,
             data.nbytes / _MIB)
    return data
