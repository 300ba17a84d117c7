"""The training loop: one code path for every backend, in named sections.

Sections of ``train``: runtime (precision, backend, determinism) -> data -> model, loss, optimizer ->
resume (model, optimizer, counters, input position, in that order) -> loop (steps, logs, checkpoints,
evaluation, SIGTERM) -> finish (final checkpoint, evaluation, thresholds, export, hparams).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from data_pipeline import manifest as mf
from data_pipeline import reader
from trainer import config as config_lib
from trainer import evaluation, export, precision
from trainer.backends import Backend, make_backend
from trainer.checkpointing import CheckpointKeeper
from trainer.losses import MultiLabelLoss
from trainer.model import build_model, build_optimizer, prior_log_odds
from trainer.steps import TRAIN_STATS, make_train_function
from trainer.summaries import PerLabelOptions, SummaryWriters

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says why in one line."""


@dataclasses.dataclass
class TrainResult:
    step: int
    stopped_by_signal: bool
    final_metrics: dict
    export_dir: str | None


class _StopFlag:
    """Set by SIGTERM/SIGINT; read after every train call (and shared with the other processes there)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self) -> None:
        if threading_main():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Puts the handlers back that were there before install (train() called from a library, a
        notebook or the tests must not leave Ctrl-C swallowed by a finished run's flag)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: checkpointing and stopping after the current step", signum)
        self.requested = True


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(cfg: config_lib.Config, data_dir: str, model_dir: str, eval_data_dir: str | None = None,
          backend: Backend | None = None) -> TrainResult:
    """Trains (or resumes training) a model.

    Args:
      cfg: the validated config.
      data_dir: dataset directory with the training split.
      model_dir: where checkpoints, config, TensorBoard logs and the export go.
      eval_data_dir: dataset directory for evaluation (default: data_dir).
      backend: an existing backend (tests); by default made from cfg.train.distribution.

    Returns:
      TrainResult.
    """
    stop = _StopFlag()
    stop.install()
    try:
        return _train(cfg, data_dir, model_dir, eval_data_dir, backend, stop)
    finally:
        stop.uninstall()


def _train(cfg, data_dir, model_dir, eval_data_dir, backend, stop: _StopFlag) -> TrainResult:
    # --- Runtime: precision policy, backend, determinism -----------------------------------------------
    policy = precision.apply_policy(cfg.train.precision)
    backend = backend or make_backend(cfg.train.distribution, cfg.horovod.fp16_compression)
    if not backend.is_chief:  # One progress log per job: the chief's.
        logging.getLogger().setLevel(logging.WARNING)
    if cfg.train.deterministic:
        keras.utils.set_random_seed(cfg.train.seed)
        tf.config.experimental.enable_op_determinism()

    # --- Data --------------------------------------------------------------------------------------------
    manifest = mf.read_manifest(data_dir)
    train_info = manifest.split(cfg.data.train_split, data_dir)
    global_batch = cfg.train.batch_size
    if global_batch % backend.num_replicas:
        raise config_lib.ConfigError(f"train.batch_size: {global_batch} is not divisible by the "
                                     f"{backend.num_replicas} replicas")
    train_examples = int(train_info.num_examples * (1.0 - cfg.data.validation_fraction))
    steps_per_epoch = max(1, train_examples // global_batch)
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    eval_source = evaluation.eval_source(cfg, data_dir, eval_data_dir)
    if eval_source is None and backend.is_chief:
        log.warning("nothing to evaluate during training (no per-label metrics, early stopping or tuned "
                    "thresholds): pass --eval-data DIR with an 'eval' split, or --set data.validation_fraction=0.1")
    os.makedirs(model_dir, exist_ok=True)  # Only once the config and the data have passed their checks.

    # The same options every epoch: the epoch number enters make_dataset's shuffle seed separately.
    train_options = reader.ReaderOptions(
        shuffle=cfg.data.shuffle, shuffle_buffer=cfg.data.shuffle_buffer, repeat=True,
        deterministic=cfg.train.deterministic, seed=cfg.train.seed, cache=cfg.data.cache,
        drop_remainder=True, cycle_length=cfg.data.cycle_length, block_length=cfg.data.block_length,
        on_bad_features=cfg.data.on_bad_features,
        holdout_fraction=cfg.data.validation_fraction, holdout="exclude")

    # --- Model, loss, optimizer ----------------------------------------------------------------------------
    with backend.scope():
        output_bias = prior_log_odds(train_info.label_counts, train_info.num_examples) \
            if cfg.model.output_bias == "prior" else None
        model = build_model(manifest.num_features, manifest.num_labels, cfg.model, seed=cfg.train.seed,
                            output_bias=output_bias)
        optimizer = build_optimizer(cfg.optimizer, global_batch, total_steps,
                                    loss_scale=policy == "mixed_float16")
        # Build optimizer variables now, under the scope: building them lazily inside strategy.run fails
        # under MirroredStrategy (see README, Keras 3 notes), and restore needs them to exist.
        optimizer.build(model.trainable_variables)
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        in_epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_in_epoch")
    loss_fn = MultiLabelLoss(cfg.loss, manifest.num_labels, train_info.label_counts, train_info.num_examples)
    train_fn = make_train_function(backend, model, optimizer, loss_fn, global_batch, cfg.train.jit_compile)
    evaluator = evaluation.Evaluator(backend, model, loss_fn, manifest, cfg) if eval_source else None

    # --- Resume: model, optimizer, counters, input position ----------------------------------------------
    keeper = CheckpointKeeper(model_dir, backend, cfg.checkpoint.every_steps, cfg.checkpoint.every_seconds,
                              cfg.checkpoint.keep, model=model, optimizer=optimizer, step=step_var,
                              epoch=epoch_var, step_in_epoch=in_epoch_var)
    _check_run_info(model_dir, manifest, cfg)
    if backend.name != "horovod" or backend.is_chief:
        keeper.restore()
    # Horovod: rank 0 restored (or initialised); every rank starts from its values.
    backend.broadcast_initial_state(list(model.variables) + list(optimizer.variables)
                                    + [step_var, epoch_var, in_epoch_var])
    step = int(step_var.numpy())
    keeper.last_step = step  # The checkpoint just restored needs no second copy at the first step.
    if backend.is_chief:
        config_lib.save_config(cfg, os.path.join(model_dir, "config.yaml"))
        _write_run_info(model_dir, manifest, cfg, data_dir)
    writers = SummaryWriters(os.path.join(model_dir, "logs"), enabled=backend.is_chief,
                             per_label=PerLabelOptions.from_config(cfg.metrics))
    log.info("%s: %d replica(s), %d worker(s), precision %s, global batch %d, %d steps/epoch, %s step %d of %d",
             backend.name, backend.num_replicas, backend.num_workers, policy, global_batch, steps_per_epoch,
             "resuming at" if step else "starting at", step, total_steps)

    def evaluate_and_log(at_step: int) -> evaluation.EvalResult:
        result = evaluator.run(eval_source)
        writers.eval_results(at_step, result.metrics, loss=result.loss)
        log.info("eval step %d: %s", at_step, evaluation.summary_line(result))
        return result

    # --- Loop ------------------------------------------------------------------------------------------------
    replicas_per_pipeline = backend.num_replicas // backend.num_workers
    stopped_by_signal = False
    best = evaluation.EarlyStopping(cfg.train.early_stopping_patience, cfg.train.early_stopping_metric)
    last_eval_step = -1
    window = _Window()
    while step < total_steps and not stopped_by_signal and not best.should_stop:
        epoch, in_epoch = int(epoch_var.numpy()), int(in_epoch_var.numpy())
        if in_epoch >= steps_per_epoch:  # The batch size changed since the checkpoint: next epoch.
            epoch, in_epoch = epoch + 1, 0
        skip = in_epoch * replicas_per_pipeline

        def dataset_fn(ctx, epoch=epoch, skip=skip):
            return reader.make_dataset(data_dir, cfg.data.train_split, ctx.get_per_replica_batch_size(global_batch),
                                       ctx, train_options, epoch=epoch, skip_batches=skip)

        iterator = iter(backend.distribute_dataset(dataset_fn))
        while in_epoch < steps_per_epoch and step < total_steps:
            n = _steps_this_call(step, in_epoch, steps_per_epoch, total_steps, cfg)
            t0 = time.perf_counter()
            try:
                requests = tf.constant([float(stop.requested), float(keeper.time_due())])
                stats = train_fn(iterator, tf.constant(n), requests)
                stats = dict(zip(TRAIN_STATS, stats.numpy().tolist()))
            except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
                raise reader.explain_data_error(data_dir, cfg.data.train_split, e) from None
            step, in_epoch = step + n, in_epoch + n
            step_var.assign(step)
            epoch_var.assign(epoch)
            in_epoch_var.assign(in_epoch)
            window.add(stats, n, time.perf_counter() - t0)
            _progress_bar(step, total_steps, stats, time.perf_counter() - t0, n)
            if stats["non_finite_steps"] > 0:
                # The loss-scale optimizer skipped the non-finite update, so the weights are still the last
                # good ones: save them, then stop.
                path = keeper.save(step)
                raise TrainingError(f"loss became NaN/Inf at step {step}: stopped; last good weights saved "
                                    f"in {path or keeper.chief_dir} (lower optimizer.learning_rate, or check "
                                    "the data with 'python -m data_pipeline inspect')")
            if stats["stop_requests"] > 0:
                stopped_by_signal = True
            if step % cfg.train.log_every_steps < n or step == total_steps:
                _log_progress(writers, window, step, total_steps, epoch, optimizer, policy)
            if keeper.steps_due(step) or stats["save_requests"] > 0 or stopped_by_signal:
                keeper.save(step)
            if evaluator and not stopped_by_signal and _eval_due(step, in_epoch, steps_per_epoch, total_steps, cfg):
                result = evaluate_and_log(step)
                last_eval_step = step
                best.update(step, result, model)
                if best.should_stop:
                    log.info("early stopping at step %d: no %s improvement for %d evaluations (best %.4f at "
                             "step %d)", step, best.metric, best.patience, best.best_value, best.best_step)
                    break
        if in_epoch >= steps_per_epoch:
            epoch_var.assign(epoch + 1)
            in_epoch_var.assign(0)

    # --- Finish: checkpoint, evaluation, thresholds, export, hparams ------------------------------------------
    if keeper.last_step != step:
        keeper.save(step)
    final_metrics, export_dir = {}, None
    if not stopped_by_signal:
        thresholds = None
        if evaluator:
            if best.restore_best(model):
                result = best.best_result
            elif last_eval_step == step:
                result = best.last_result
            else:
                result = evaluate_and_log(step)
            final_metrics = dict(result.metrics.aggregates)
            if cfg.metrics.tune_thresholds:
                thresholds = evaluator.tune_thresholds(result)
        export_dir = os.path.join(model_dir, "export")
        if backend.is_chief:
            export.export_model(model, export_dir, manifest.label_names, thresholds)
            log.info("exported the model to %s", export_dir)
        writers.hparams(config_lib.flatten(config_lib.to_dict(cfg)), final_metrics, step=step)
    writers.close()
    _maybe_dump_weights(model, backend)
    backend.barrier()
    return TrainResult(step, stopped_by_signal, final_metrics, export_dir)


def _maybe_dump_weights(model, backend: Backend) -> None:
    """MLT_DUMP_WEIGHTS=path/weights-{worker}.npz: every process writes its final weights (a debugging aid
    and what the tests use to check that all workers / ranks hold identical weights)."""
    pattern = os.environ.get("MLT_DUMP_WEIGHTS")
    if pattern:
        np.savez(pattern.format(worker=backend.worker_index), *model.get_weights())


def _steps_this_call(step, in_epoch, steps_per_epoch, total_steps, cfg) -> int:
    """Steps in the next call: up to steps_per_call, never past an epoch, log, eval or the end."""
    n = min(cfg.train.steps_per_call, steps_per_epoch - in_epoch, total_steps - step)
    for every in (cfg.train.log_every_steps, cfg.train.eval_every_steps, cfg.checkpoint.every_steps):
        if every:
            n = min(n, every - step % every)
    return max(1, n)


def _eval_due(step, in_epoch, steps_per_epoch, total_steps, cfg) -> bool:
    if step == total_steps:
        return False  # The final evaluation runs in the finish section.
    if cfg.train.eval_every_steps:
        return step % cfg.train.eval_every_steps == 0
    return in_epoch == steps_per_epoch


def _progress_bar(step: int, total: int, stats: dict, seconds: float, steps: int) -> None:
    """A one-line progress bar, redrawn in place, on a terminal only (logs and pipes get the log lines)."""
    if not sys.stderr.isatty():
        return
    done = int(30 * step / max(total, 1))
    loss = stats["loss_sum"] / max(stats["examples"], 1.0)
    sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {step}/{total} loss {loss:.4f} "
                     f"{stats['examples'] / max(seconds, 1e-9):,.0f} ex/s {1000 * seconds / steps:.1f} ms/step ")
    sys.stderr.flush()


class _Window:
    """Accumulates train statistics between two log lines."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.loss_sum = self.examples = self.seconds = 0.0
        self.steps = 0

    def add(self, stats, steps, seconds):
        self.loss_sum += stats["loss_sum"]
        self.examples += stats["examples"]
        self.seconds += seconds
        self.steps += steps


def _log_progress(writers, window, step, total_steps, epoch, optimizer, policy) -> None:
    loss = window.loss_sum / max(window.examples, 1.0)
    ex_s = window.examples / max(window.seconds, 1e-9)
    step_ms = 1000.0 * window.seconds / max(window.steps, 1)
    lr = float(optimizer.inner_optimizer.learning_rate.numpy()) if hasattr(
        optimizer.inner_optimizer.learning_rate, "numpy") else float(optimizer.learning_rate)
    values = {"loss": loss, "learning_rate": lr, "examples_per_second": ex_s, "step_time_ms": step_ms,
              "epoch": epoch}
    if policy == "mixed_float16":
        values["loss_scale"] = float(optimizer.dynamic_scale.numpy())
    writers.train_progress(step, values)
    if sys.stderr.isatty():
        sys.stderr.write("\r")
    msg = (f"step {step}/{total_steps} epoch {epoch + 1} loss {loss:.5f} lr {lr:.3g} {ex_s:,.0f} ex/s "
           f"{step_ms:.1f} ms/step")
    log.info(msg)
    window.reset()


def _run_info(manifest: mf.Manifest, cfg) -> dict:
    return {"num_features": manifest.num_features, "num_labels": manifest.num_labels,
            "hidden": list(cfg.model.hidden), "ensemble": cfg.model.ensemble}


def _write_run_info(model_dir, manifest, cfg, data_dir) -> None:
    info = {**_run_info(manifest, cfg), "label_names": manifest.label_names, "data_dir": os.path.abspath(data_dir),
            "label_counts": manifest.split(cfg.data.train_split).label_counts}
    tmp = os.path.join(model_dir, "run_info.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, os.path.join(model_dir, "run_info.json"))


def _check_run_info(model_dir, manifest, cfg) -> None:
    """A model directory from a run of another shape is an error, not a silent restart."""
    path = os.path.join(model_dir, "run_info.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    new = _run_info(manifest, cfg)
    old = {"ensemble": 1, **old}  # Written before ensembles existed: one model.
    diffs = [f"{k} {old.get(k)} -> {v}" for k, v in new.items() if old.get(k) != v]
    if diffs:
        raise config_lib.ConfigError(f"{model_dir}: holds a run of another shape ({'; '.join(diffs)}); use a new "
                                     "--model-dir, or the data and config it was started with")


