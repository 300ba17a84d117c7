"""Distribution backends: the seam between the one training step and the ways of running it.

Backends differ in how gradients and metric sums are reduced, how the dataset is split, and which process
reads and writes checkpoints. tf.distribute strategies (one device, Mirrored, MultiWorkerMirrored) share one
class, with Keras summing gradients across replicas inside ``apply_gradients``; Horovod sums them itself in
``reduce_gradients``. The training step (trainer/steps.py) and the loop (trainer/train.py) are written once
against this interface: they ask the backend what to do (properties and methods), never which one it is.

TensorFlow is imported inside the functions that use it, so that config validation and ``--help`` can read
DISTRIBUTIONS without the seconds a TensorFlow import takes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

PREFETCH_TO_DEVICE = 2  # batches held on (or being copied to) each replica's device

# The distribution names (train.distribution, --distribution); "auto" picks one of them (resolve_distribution).
DISTRIBUTIONS = ("one_device", "mirrored", "multi_worker", "horovod")


class Backend:
    """Interface of a distribution backend (see module docstring).

    Attributes:
      name: the distribution name (for log lines only: callers never branch on it).
      num_replicas: replicas over all workers (the global batch is split across them).
      num_workers: processes taking part.
      worker_index: this process' index (rank).
      is_chief: whether this process writes checkpoints into the model directory, summaries and exports.
    """

    name = "base"
    num_replicas = 1
    num_workers = 1
    worker_index = 0
    is_chief = True

    @property
    def local_replicas(self) -> int:
        """Replicas fed by this process' input pipeline: a step takes one per-replica batch for each."""
        return self.num_replicas // self.num_workers

    @property
    def restores_checkpoints(self) -> bool:
        """Whether this process reads the checkpoint on resume (otherwise it receives the restored state from
        broadcast_initial_state)."""
        return True

    @property
    def writes_checkpoints(self) -> bool:
        """Whether this process writes a copy when the job saves (only the chief's copy is kept in the model
        directory; MultiWorkerMirroredStrategy needs every worker to write one)."""
        return True

    @property
    def local_devices(self) -> list[str]:
        """The devices of this process' replicas, in local replica order."""
        return ["/CPU:0"]

    def local_replica_index(self) -> int:
        """Inside ``run``'s function: which of this process' replicas runs it (a Python int, for choosing
        that replica's data)."""
        return 0

    @property
    def multi_step_sparse_calls(self) -> bool:
        """Whether one train call may run several steps whose gradients hold tf.IndexedSlices (the sparse first
        layer): not where replicas all-gather them with tf.distribute's collectives, which in TensorFlow 2.21
        fail inside a multi-step tf.function ("Shape mismatch in the collective instance": each step's slices
        have another row count)."""
        return True

    def scope(self):
        """Context in which the model, the optimizer and the training counters are created."""
        return contextlib.nullcontext()

    def distribute_dataset(self, dataset_fn: Callable):
        """Returns an iterable of batches for this process from ``dataset_fn(tf.distribute.InputContext)``,
        prefetched to the replicas' devices (PREFETCH_TO_DEVICE batches each), so that the copy of the next
        batch overlaps the current step."""
        raise NotImplementedError

    def run(self, fn, args):
        """Runs ``fn(*args)`` on every local replica (inside a tf.function)."""
        raise NotImplementedError

    def reduce_sum(self, value):
        """Sums per-replica values over all replicas and workers (inside a tf.function)."""
        raise NotImplementedError

    def reduce_gradients(self, grads):
        """Sums gradients across processes when the optimizer does not (Horovod)."""
        return grads

    def sync_non_finite(self, grads):
        """Makes gradients non-finite on every replica when they are on any one.

        The LossScaleOptimizer skips a step with non-finite gradients; every replica must make the same
        choice, or one applies an update the others skip (and collectives inside the update hang).
        """
        return grads

    def reduce_eval_batch(self, state):
        """Sums one eval batch's per-replica metric state as far as is safe per batch (inside a tf.function).

        tf.distribute sums over every replica and worker (its input pipelines give every worker the same
        number of batches, padding with empty ones); Horovod ranks may hold different numbers of eval batches,
        so a per-batch allreduce would hang: they sum at the end instead, in reduce_eval_total.
        """
        return self.reduce_sum(state)

    def reduce_eval_total(self, host_state):
        """Completes the sum of a host-side (NumPy) eval state after the last batch (see reduce_eval_batch)."""
        return host_state

    def any_process(self, flags: Sequence[bool]) -> list[bool]:
        """For each flag, whether any process raised it: every process gets the same answer, so all of them
        act on a request together (stop after SIGTERM, save when one process' timer is due). One tiny
        all-reduce across processes; nothing to reduce in a single process."""
        return [bool(f) for f in flags]

    def broadcast_initial_state(self, variables) -> None:
        """Makes every process start from the restoring process' values (Horovod; tf.distribute does this
        itself)."""

    def barrier(self) -> None:
        """Waits for every process (used around file writes)."""


class StrategyBackend(Backend):
    """tf.distribute strategies: OneDevice, Mirrored and MultiWorkerMirrored."""

    def __init__(self, name: str, strategy):
        self.name = name
        self.strategy = strategy
        self.num_replicas = strategy.num_replicas_in_sync
        resolver = getattr(strategy, "cluster_resolver", None)
        if name == "multi_worker" and resolver is not None:
            spec = resolver.cluster_spec().as_dict()
            self.num_workers = len(spec.get("worker", [])) + len(spec.get("chief", []))
            task_type, task_id = resolver.task_type, resolver.task_id or 0
            has_chief = "chief" in spec
            self.is_chief = task_type == "chief" or (not has_chief and task_type == "worker" and task_id == 0)
            self.worker_index = task_id + (1 if has_chief and task_type == "worker" else 0)

    @property
    def local_devices(self) -> list[str]:
        return list(self.strategy.extended.worker_devices)

    def local_replica_index(self) -> int:
        import tensorflow as tf

        replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
        return int(tf.get_static_value(replica_id)) % self.local_replicas

    @property
    def multi_step_sparse_calls(self) -> bool:
        return self.num_replicas == 1

    def scope(self):
        return self.strategy.scope()

    def distribute_dataset(self, dataset_fn):
        import tensorflow as tf

        options = tf.distribute.InputOptions(experimental_fetch_to_device=True,
                                             experimental_per_replica_buffer_size=PREFETCH_TO_DEVICE)
        return self.strategy.distribute_datasets_from_function(dataset_fn, options=options)

    def run(self, fn, args):
        return self.strategy.run(fn, args=args)

    def reduce_sum(self, value):
        import tensorflow as tf

        # One reduce per tensor: MultiWorkerMirroredStrategy.reduce does not take a nest (a dict of metric
        # state failed with "Expected any non-tensor type, but got a tensor instead" in multi-worker
        # evaluation); Mirrored and OneDevice accept either.
        return tf.nest.map_structure(
            lambda v: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None), value)

    def sync_non_finite(self, grads):
        import tensorflow as tf

        if self.num_replicas == 1:
            return grads
        # A row-sparse gradient (tf.IndexedSlices of the sparse first layer) is checked and poisoned by its
        # values: tf.where on the slices would turn it into a dense [F, width] tensor.
        values = [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads]
        bad = tf.cast(~tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in values]), tf.float32)
        any_bad = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, bad) > 0

        def poison(g):
            if isinstance(g, tf.IndexedSlices):
                return tf.IndexedSlices(poison(g.values), g.indices, g.dense_shape)
            return tf.where(any_bad, tf.constant(float("nan"), g.dtype), g)

        return [poison(g) for g in grads]

    def any_process(self, flags):
        import tensorflow as tf

        if self.num_workers == 1:
            return super().any_process(flags)
        local = tf.constant([float(bool(f)) for f in flags], tf.float32)
        total = self.strategy.reduce(tf.distribute.ReduceOp.SUM, self.strategy.run(lambda: tf.identity(local)),
                                     axis=None)
        return [bool(v > 0) for v in total.numpy()]

    def barrier(self) -> None:
        if self.num_workers > 1:
            self.any_process([True])  # An all-reduce is a barrier every worker must reach.


class HorovodBackend(Backend):
    """Horovod (horovodrun / MPI): one process per device, gradients summed with allreduce; rank 0 alone
    restores and writes checkpoints, and broadcasts its state to the other ranks.

    Args:
      fp16_compression: compress gradients to float16 for the allreduce.
    """

    name = "horovod"

    def __init__(self, fp16_compression: bool = False):
        import horovod.tensorflow as hvd
        import tensorflow as tf

        hvd.init()
        self.hvd = hvd
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:  # One rank per GPU: each process sees only its own device.
            tf.config.experimental.set_memory_growth(gpus[hvd.local_rank()], True)
            tf.config.set_visible_devices(gpus[hvd.local_rank()], "GPU")
        self.num_replicas = self.num_workers = hvd.size()
        self.worker_index = hvd.rank()
        self.is_chief = hvd.rank() == 0
        self.compression = hvd.Compression.fp16 if fp16_compression else hvd.Compression.none
        self._device = "/GPU:0" if gpus else "/CPU:0"

    @property
    def local_devices(self) -> list[str]:
        return [self._device]

    @property
    def restores_checkpoints(self) -> bool:
        return self.is_chief

    @property
    def writes_checkpoints(self) -> bool:
        return self.is_chief  # Ranks hold identical state; rank 0 alone writes.

    def distribute_dataset(self, dataset_fn):
        import tensorflow as tf

        ctx = tf.distribute.InputContext(num_input_pipelines=self.num_workers,
                                         input_pipeline_id=self.worker_index,
                                         num_replicas_in_sync=self.num_replicas)
        return dataset_fn(ctx).apply(tf.data.experimental.prefetch_to_device(self._device, PREFETCH_TO_DEVICE))

    def run(self, fn, args):
        return fn(*args)

    def reduce_sum(self, value):
        import tensorflow as tf

        return tf.nest.map_structure(lambda v: self.hvd.allreduce(v, op=self.hvd.Sum), value)

    def reduce_gradients(self, grads):
        # Losses are already divided by the global batch, so the sum over ranks is the mean gradient.
        return self.hvd.grouped_allreduce(list(grads), op=self.hvd.Sum, compression=self.compression)

    def reduce_eval_batch(self, state):
        return state

    def reduce_eval_total(self, host_state):
        import tensorflow as tf

        return tf.nest.map_structure(
            lambda v: self.hvd.allreduce(tf.convert_to_tensor(v), op=self.hvd.Sum).numpy(), host_state)

    def any_process(self, flags):
        import tensorflow as tf

        if self.num_workers == 1:
            return super().any_process(flags)
        total = self.hvd.allreduce(tf.constant([float(bool(f)) for f in flags], tf.float32), op=self.hvd.Sum)
        return [bool(v > 0) for v in total.numpy()]

    def broadcast_initial_state(self, variables) -> None:
        # Horovod needs the underlying tf.Variables, not Keras 3 variable wrappers (horovod#4290).
        self.hvd.broadcast_variables([tf_variable(v) for v in variables], root_rank=0)

    def barrier(self) -> None:
        self.any_process([True])


def tf_variable(v):
    """The tf.Variable behind a Keras 3 variable (a plain tf.Variable is returned as is)."""
    import keras

    return v.value if isinstance(v, keras.Variable) else v


def configure_logical_cpus(count: int) -> None:
    """Splits the CPU into ``count`` logical devices (MirroredStrategy on a CPU-only machine).

    Must run before TensorFlow initialises its devices; a second call with the same count is harmless.
    """
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current and len(current) == count:
        return
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)


def resolve_distribution(name: str) -> str:
    """Resolves ``auto``: horovod under horovodrun/mpirun, multi_worker with TF_CONFIG, mirrored with
    several GPUs, else one_device."""
    import tensorflow as tf

    if name != "auto":
        return name
    if any(k in os.environ for k in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")):
        return "horovod"
    if os.environ.get("TF_CONFIG"):
        cluster = json.loads(os.environ["TF_CONFIG"]).get("cluster", {})
        if sum(len(v) for v in cluster.values()) > 1:
            return "multi_worker"
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return "mirrored"
    return "one_device"


_MIRRORED: dict = {}


def _mirrored_strategy(devices: tuple[str, ...]):
    """One MirroredStrategy per device list and process.

    Every new MirroredStrategy numbers its collective ops from the same start, so a second train() in one
    process (a notebook, the tests) ran its all-reduces under the keys of the first run's and failed with
    "Shape mismatch in the collective instance 101" when the models differed. Reusing the strategy keeps
    the numbering going.
    """
    import tensorflow as tf

    if devices not in _MIRRORED:
        _MIRRORED[devices] = tf.distribute.MirroredStrategy(list(devices))
    return _MIRRORED[devices]


def make_backend(name: str, fp16_compression: bool = False) -> Backend:
    """Creates the backend for a distribution name (``auto`` resolved first).

    Raises:
      ValueError: the distribution cannot run here (no TF_CONFIG, one device for mirrored, no Horovod).
    """
    import tensorflow as tf

    name = resolve_distribution(name)
    if name not in DISTRIBUTIONS:
        raise ValueError(f"train.distribution: unknown '{name}' (one of auto, {', '.join(DISTRIBUTIONS)})")
    if name == "horovod":
        try:
            return HorovodBackend(fp16_compression)
        except ImportError:
            raise ValueError("train.distribution=horovod: horovod is not installed in this environment "
                             "(build it with scripts/install_horovod.sh and use its python)") from None
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ValueError("train.distribution=multi_worker: TF_CONFIG is not set (see README, "
                             "'Multi-worker training')")
        return StrategyBackend(name, tf.distribute.MultiWorkerMirroredStrategy())
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    if name == "mirrored":
        if len(devices) < 2:
            raise ValueError("train.distribution=mirrored: needs at least 2 devices, found "
                             f"{len(devices)} (no GPUs; set MLT_LOGICAL_CPUS=2 to try it on a CPU)")
        return StrategyBackend(name, _mirrored_strategy(tuple(devices)))
    return StrategyBackend(name, tf.distribute.OneDeviceStrategy(devices[0]))
