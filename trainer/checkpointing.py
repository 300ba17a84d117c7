"""Checkpoints with automatic resume, written by the chief only.

What a checkpoint holds: model weights, the model's non-trainable variables (the dropout layers' random
generator states), optimizer state (moments, iteration, loss scale), the global step, the epoch and the
number of steps already taken in that epoch (the input position, so a resumed run continues the epoch instead
of restarting it).

Why it survives SIGKILL: tf.train.CheckpointManager writes the data files first and then replaces the
small ``checkpoint`` index file atomically, so the latest checkpoint it names is always complete. Should its
files be damaged later (a truncated copy, a bad disk), restore falls back to the previous checkpoint; a save
that fails (a full disk) removes what it had written and leaves the index and the older checkpoints alone.

Multi-worker: every worker takes part in saving (MultiWorkerMirroredStrategy requires it), but only the
chief writes into the model directory; the others write to a temporary directory they delete again.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import time

import keras
import tensorflow as tf

from data_pipeline.errors import DiskFullError, as_disk_full
from trainer.backends import Backend, tf_variable

log = logging.getLogger(__name__)


class ResumeError(RuntimeError):
    """The model directory holds a checkpoint this run cannot continue (e.g. another model shape)."""


class CheckpointKeeper:
    """Saves and restores the training state of a model directory.

    Args:
      model_dir: the run's model directory.
      backend: the distribution backend (decides who writes).
      every_steps, every_seconds: save when either interval has passed (0 disables that trigger).
      keep: checkpoints to keep.
      **objects: trackables to save (model=..., optimizer=..., counters...).
    """

    def __init__(self, model_dir: str, backend: Backend, every_steps: int, every_seconds: float, keep: int,
                 **objects):
        self.backend = backend
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.chief_dir = os.path.join(model_dir, "checkpoints")
        if backend.is_chief or not backend.writes_checkpoints:
            self.write_dir = self.chief_dir
        else:  # A worker's copy, written because the save needs every worker, then deleted.
            self.write_dir = os.path.join(model_dir, f".tmp_worker_{backend.worker_index}", "checkpoints")
        # Keras does not hand a model's non-trainable variables to tf.train.Checkpoint (its weights reach the
        # checkpoint through the optimizer), so the dropout layers' seed-generator states were not saved and a
        # resumed run drew other dropout masks than the uninterrupted one. Saved under their own key, and
        # restored only if present (checkpoints written before have none).
        non_trainable = [tf_variable(v) for obj in objects.values() if isinstance(obj, keras.Model)
                         for v in obj.non_trainable_variables]
        self._required = tf.train.Checkpoint(**objects)
        self._optional = tf.train.Checkpoint(non_trainable=non_trainable)
        self.checkpoint = tf.train.Checkpoint(**objects, non_trainable=non_trainable)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.write_dir, max_to_keep=keep)
        self.last_step = -1
        self.last_time = time.monotonic()

    def latest(self) -> str | None:
        """Path of the chief's latest checkpoint, or None."""
        return tf.train.latest_checkpoint(self.chief_dir)

    def restore(self) -> str | None:
        """Restores the newest readable checkpoint of the model directory, if any.

        A damaged checkpoint (truncated or missing files, a bad checksum) is skipped with a warning naming
        it, for the next older one that ``checkpoint.keep`` retained. Leftovers of a save that was killed
        (``*_temp`` directories) are removed first, by the chief.

        Returns:
          The restored path, or None when starting fresh.

        Raises:
          ResumeError: a readable checkpoint does not fit this model (another shape or another model), or
            every checkpoint is damaged.
        """
        if self.backend.is_chief:
            self._remove_unfinished_saves()
        damaged = []
        for path in self._candidates():
            try:
                self._required.restore(path).assert_existing_objects_matched()
                self._optional.restore(path).expect_partial()
            except Exception as e:  # noqa: BLE001 - damaged files raise IndexError, OpError, DataLossError...
                reason = unreadable(path)
                if reason is None:  # every tensor reads back: the checkpoint is whole but of another model
                    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                    raise ResumeError(
                        f"{path}: checkpoint does not fit this model ({first}); use a new --model-dir or the "
                        "config the run was started with") from None
                log.warning("%s: damaged checkpoint (%s); trying the previous one", path, reason)
                damaged.append(path)
                continue
            log.info("resumed from %s", path)
            return path
        if damaged:
            raise ResumeError(f"{self.chief_dir}: every checkpoint is damaged ({', '.join(damaged)}); move them "
                              "aside to start the run again from step 0")
        return None

    def _candidates(self) -> list[str]:
        """Checkpoints named by the index, newest first."""
        state = tf.train.get_checkpoint_state(self.chief_dir)
        if state is None:
            return []
        paths = [state.model_checkpoint_path, *reversed(state.all_model_checkpoint_paths)]
        paths = [p if os.path.isabs(p) else os.path.join(self.chief_dir, p) for p in paths]
        return list(dict.fromkeys(paths))

    def _remove_unfinished_saves(self) -> None:
        for leftover in glob.glob(os.path.join(glob.escape(self.write_dir), "*_temp")):
            log.warning("%s: removing the leftover of an interrupted checkpoint save", leftover)
            shutil.rmtree(leftover, ignore_errors=True)

    def steps_due(self, step: int) -> bool:
        """Whether the step interval has passed at ``step`` (the same answer on every process)."""
        if step == self.last_step or not self.every_steps:
            return False
        return step // self.every_steps > max(self.last_step, 0) // self.every_steps

    def time_due(self) -> bool:
        """Whether this process' timer is due; the loop shares the answer across processes before saving."""
        return bool(self.every_seconds) and time.monotonic() - self.last_time >= self.every_seconds

    def save(self, step: int) -> str | None:
        """Saves now (every process must call it; only the chief's copy is kept). Returns the chief's path."""
        if not self.backend.writes_checkpoints:
            path = None
        else:
            path = self._save(step)
            if not self.backend.is_chief:
                shutil.rmtree(os.path.dirname(self.write_dir), ignore_errors=True)
                path = None
        self.last_step, self.last_time = step, time.monotonic()
        return path

    def _save(self, step: int) -> str:
        """manager.save, undoing a failed one: its ``ckpt-<step>_temp`` directory and any ``ckpt-<step>`` files
        go, the index and the older checkpoints stay as they were."""
        try:
            return self.manager.save(checkpoint_number=step)
        except Exception as e:
            prefix = os.path.join(self.write_dir, f"ckpt-{step}")
            leftovers = glob.glob(glob.escape(prefix) + "_temp*") + glob.glob(glob.escape(prefix) + ".*") + \
                glob.glob(os.path.join(glob.escape(self.write_dir), "checkpoint.tmp*"))
            for leftover in leftovers:
                if os.path.isdir(leftover):
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    os.remove(leftover)
            full = as_disk_full(e)
            if full is None:
                raise
            raise DiskFullError(f"{prefix}: checkpoint not written ({full}); the latest complete checkpoint, "
                                f"{self.latest() or 'none'}, is kept") from None


def unreadable(path: str) -> str | None:
    """Why the checkpoint ``path`` cannot be read back (first line of the error), or None when every tensor
    in it reads back whole (its checksums are verified on the way)."""
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as e:  # noqa: BLE001 - any failure to read is the answer
        text = str(e).strip()
        return text.splitlines()[0][:200] if text else type(e).__name__
    return None
