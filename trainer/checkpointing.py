"""Checkpoints with automatic resume, written by the chief only.

What a checkpoint holds: model weights, optimizer state (moments, iteration, loss scale), the global step,
the epoch and the number of steps already taken in that epoch (the input position, so a resumed run
continues the epoch instead of restarting it).

Why it survives SIGKILL: tf.train.CheckpointManager writes the data files first and then replaces the
small ``checkpoint`` index file atomically, so the latest checkpoint it names is always complete.

Multi-worker: every worker takes part in saving (MultiWorkerMirroredStrategy requires it), but only the
chief writes into the model directory; the others write to a temporary directory they delete again.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import tensorflow as tf

from trainer.backends import Backend

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
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.write_dir, max_to_keep=keep)
        self.last_step = -1
        self.last_time = time.monotonic()

    def latest(self) -> str | None:
        """Path of the chief's latest checkpoint, or None."""
        return tf.train.latest_checkpoint(self.chief_dir)

    def restore(self) -> str | None:
        """Restores the latest checkpoint of the model directory, if any.

        Returns:
          The restored path, or None when starting fresh.

        Raises:
          ResumeError: the checkpoint does not fit this model (another shape or another model).
        """
        path = self.latest()
        if path is None:
            return None
        try:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        except (ValueError, AssertionError, tf.errors.InvalidArgumentError) as e:
            first = str(e).strip().splitlines()[0][:300]
            raise ResumeError(
                f"{path}: checkpoint does not fit this model ({first}); use a new --model-dir or the config "
                "the run was started with") from None
        log.info("resumed from %s", path)
        return path

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
            path = self.manager.save(checkpoint_number=step)
            if not self.backend.is_chief:
                shutil.rmtree(os.path.dirname(self.write_dir), ignore_errors=True)
                path = None
        self.last_step, self.last_time = step, time.monotonic()
        return path
