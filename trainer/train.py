"""The training loop: one code path for every backend, in four named parts.

``train`` = ``_set_up`` -> ``_resume`` -> ``_loop`` -> ``_finish``:

- ``_set_up``: runtime (precision, backend, determinism) -> data and the run's length (``_Plan``) -> model,
  loss, optimizer, counters (``Position``) -> train and eval functions, checkpoint keeper, summaries. Every
  check that needs no step runs here, before anything is written.
- ``_resume``: the latest checkpoint (model, optimizer, counters and so the input position, in one restore),
  handed to every process, then config.yaml and run_info.json.
- ``_loop``: train calls of up to ``train.steps_per_call`` steps over each epoch's input; after every call
  ``_after_call`` does the call's bookkeeping: progress, the NaN stop, the requests every process agrees on
  (stop after SIGTERM/SIGINT, timed save), log line, checkpoint, evaluation, early stopping.
- ``_finish``: the last checkpoint; unless stopped by a signal, the final evaluation, thresholds, export and
  hparams.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from data_pipeline import manifest as mf
from data_pipeline import reader
from trainer import config as config_lib
from trainer import evaluation, export, inputs, precision
from trainer import preflight
from trainer.backends import Backend, make_backend
from trainer.checkpointing import CheckpointKeeper
from trainer.lock import LockedError, ModelDirLock
from trainer.losses import MultiLabelLoss
from trainer.model import build_model, prior_log_odds, uses_sparse_input
from trainer.optimizers import build_optimizer
from trainer.progress import LogWindow, ProgressBar
from trainer.steps import CallStats, make_train_function
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


def train(cfg: config_lib.Config, data_dir: str, model_dir: str, eval_data_dir: str | None = None,
          backend: Backend | None = None) -> TrainResult:
    """Trains (or resumes training) a model.

    SIGTERM or SIGINT stops training at the end of the current call (at most train.steps_per_call steps),
    writes one checkpoint and returns with ``stopped_by_signal``; a second signal ends the process at once,
    without a checkpoint, with exit status 128 + the signal's number (143 for SIGTERM, 130 for SIGINT).

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
    dir_lock = ModelDirLock(model_dir)
    try:
        run = _set_up(cfg, data_dir, model_dir, eval_data_dir, backend)
        _lock_model_dir(run.backend, dir_lock)
        stop.install()
        _resume(run)
        with ProgressBar(run.plan.total_steps, run.plan.steps_per_epoch, run.position.step) as run.bar:
            ended_by = _loop(run, stop)
            return _finish(run, ended_by)
    finally:
        stop.uninstall()
        dir_lock.release()


class _StopFlag:
    """SIGTERM/SIGINT while training: the first sets ``requested`` (read after every train call and agreed on by
    every process there); the second ends the process at once with exit status 128 + the signal's number.

    Python runs signal handlers only between bytecodes of the main thread, which may sit in one TensorFlow
    call for a long time (a train call, a checkpoint). So the handlers do nothing themselves: the signal
    module's wake-up file descriptor receives every signal's number at once, and a watcher thread acts on it.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous_handlers: dict = {}
        self._previous_wakeup_fd = -1
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None

    def install(self) -> None:
        """Takes SIGTERM and SIGINT; called again after set-up, which may have taken them (TensorFlow's
        multi-worker preemption notifier installs its own SIGTERM handler)."""
        if threading.current_thread() is not threading.main_thread():
            return  # Signals reach the main thread only; a run in another thread keeps the caller's handling.
        if self._pipe is None:
            self._pipe = os.pipe()
            os.set_blocking(self._pipe[1], False)
            self._watcher = threading.Thread(target=self._watch, args=(self._pipe[0],), name="signal-watcher",
                                             daemon=True)
            self._watcher.start()
            self._previous_wakeup_fd = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
        for sig in self.SIGNALS:
            self._previous_handlers.setdefault(sig, signal.signal(sig, self._handle))

    def uninstall(self) -> None:
        """Puts back the handlers that were there before install (train() called from a library, a notebook
        or the tests must not leave Ctrl-C swallowed by a finished run's flag)."""
        if self._pipe is None:
            return
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        os.close(self._pipe[1])  # The watcher reads end-of-file and returns.
        self._watcher.join()
        os.close(self._pipe[0])
        self._previous_handlers, self._pipe, self._watcher = {}, None, None

    def _handle(self, signum, frame) -> None:
        """Installed for SIGTERM/SIGINT so that they neither kill nor raise; the watcher acts on them."""

    def _watch(self, read_fd: int) -> None:
        while signums := os.read(read_fd, 64):
            for signum in signums:
                if signum not in self.SIGNALS:
                    continue
                if self.requested:
                    os.write(2, f"\nreceived signal {signum} again: exiting now, without a checkpoint\n".encode())
                    os._exit(128 + signum)
                self.requested = True
                log.warning("received signal %d: stopping at the end of the current call with a checkpoint (a "
                            "second signal stops at once, without one)", signum)


# --- Set-up ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Plan:
    """The run's length, fixed before the first step (the learning-rate schedule spans it)."""

    global_batch: int
    steps_per_epoch: int
    total_steps: int


class Position:
    """Where training is: the global step, the epoch, and the steps already taken in that epoch (the input
    position, so a resumed run continues the epoch at the right record).

    Held once, in tf.Variables created under the backend's scope: they are checkpointed, restored and
    broadcast with the model, and the loop reads and moves them only through this class.
    """

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self._in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_in_epoch")

    def trackables(self) -> dict:
        """The checkpoint entries (their names are the checkpoint's keys)."""
        return {"step": self._step, "epoch": self._epoch, "step_in_epoch": self._in_epoch}

    @property
    def step(self) -> int:
        return int(self._step.numpy())

    @property
    def epoch(self) -> int:
        return int(self._epoch.numpy())

    @property
    def in_epoch(self) -> int:
        return int(self._in_epoch.numpy())

    def advance(self, steps: int) -> bool:
        """Counts ``steps`` more steps; returns whether they ended the epoch (the next one then starts)."""
        self._step.assign(self.step + steps)
        return self._start_next_epoch_if_done(self.in_epoch + steps)

    def _start_next_epoch_if_done(self, in_epoch: int) -> bool:
        done = in_epoch >= self.steps_per_epoch
        if done:
            self._epoch.assign(self.epoch + 1)
        self._in_epoch.assign(0 if done else in_epoch)
        return done

    def after_restore(self) -> None:
        """A restored position at or past its epoch's end (saved at the end of an epoch, or by a run with a
        smaller batch, so more steps per epoch) continues with the next epoch."""
        self._start_next_epoch_if_done(self.in_epoch)


@dataclasses.dataclass
class _Run:
    """Everything the loop works with (made by _set_up)."""

    cfg: config_lib.Config
    data_dir: str
    model_dir: str
    backend: Backend
    precision: str
    manifest: mf.Manifest
    plan: _Plan
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    position: Position
    train_input: inputs.TrainingInput
    train_call: Callable[..., CallStats]
    keeper: CheckpointKeeper
    evaluator: evaluation.Evaluator | None
    eval_source: evaluation.EvalSource | None
    early_stopping: evaluation.EarlyStopping
    last_eval: tuple[int, evaluation.EvalResult] | None = None
    writers: SummaryWriters | None = None
    window: LogWindow = dataclasses.field(default_factory=LogWindow)
    bar: ProgressBar | None = None


def _set_up(cfg, data_dir, model_dir, eval_data_dir, backend) -> _Run:
    # Runtime: precision policy, backend, determinism.
    policy = precision.apply_policy(cfg.train.precision)
    backend = backend or make_backend(cfg.train.distribution, cfg.horovod.fp16_compression)
    if not backend.is_chief:  # One progress log per job: the chief's.
        logging.getLogger().setLevel(logging.WARNING)
    if cfg.train.deterministic:
        keras.utils.set_random_seed(cfg.train.seed)
        tf.config.experimental.enable_op_determinism()

    # Data, the run's length, what to evaluate on; a model directory of another run is refused here.
    manifest = mf.read_manifest(data_dir)
    train_info = manifest.split(cfg.data.train_split, data_dir)
    cfg = _calls_the_backend_can_run(cfg, manifest, backend)
    plan = _make_plan(cfg, train_info.num_examples, backend)
    eval_source = evaluation.eval_source(cfg, data_dir, eval_data_dir)
    preflight.check_before_training(cfg, manifest, data_dir, eval_source, model_dir, backend)
    if eval_source is None and backend.is_chief:
        log.warning("nothing to evaluate during training (no per-label metrics, early stopping or tuned "
                    "thresholds): pass --eval-data DIR with an 'eval' split, or --set data.validation_fraction=0.1")
    _check_run_info(model_dir, manifest, cfg)
    os.makedirs(model_dir, exist_ok=True)  # Only once the config and the data have passed their checks.
    train_input = inputs.make_training_input(cfg, backend, data_dir, plan.global_batch)

    # Model, loss, optimizer, counters.
    with backend.scope():
        output_bias = prior_log_odds(train_info.label_counts, train_info.num_examples) \
            if cfg.model.output_bias == "prior" else None
        model = build_model(manifest.num_features, manifest.num_labels, cfg.model, seed=cfg.train.seed,
                            output_bias=output_bias, sparse_features=uses_sparse_input(
                                cfg.model.sparse_input, manifest.sparse, manifest.num_features))
        optimizer = build_optimizer(cfg.optimizer, plan.global_batch, plan.total_steps,
                                    loss_scale=policy == "mixed_float16")
        # Build optimizer variables now, under the scope: building them lazily inside strategy.run fails
        # under MirroredStrategy (see README, Keras 3 notes), and restore needs them to exist.
        optimizer.build(model.trainable_variables)
        position = Position(plan.steps_per_epoch)
    loss_fn = MultiLabelLoss(cfg.loss, manifest.num_labels, train_info.label_counts, train_info.num_examples)

    # Train and eval functions, checkpoints.
    train_call = make_train_function(backend, model, optimizer, loss_fn, plan.global_batch, cfg.train.jit_compile,
                                     train_input.replica_batch)
    evaluator = evaluation.Evaluator(backend, model, loss_fn, manifest, cfg) if eval_source else None
    keeper = CheckpointKeeper(model_dir, backend, cfg.checkpoint.every_steps, cfg.checkpoint.every_seconds,
                              cfg.checkpoint.keep, model=model, optimizer=optimizer, **position.trackables())
    early_stopping = evaluation.EarlyStopping(cfg.train.early_stopping_patience, cfg.train.early_stopping_metric)
    return _Run(cfg, data_dir, model_dir, backend, policy, manifest, plan, model, optimizer, position, train_input,
                train_call, keeper, evaluator, eval_source, early_stopping)


def _lock_model_dir(backend: Backend, dir_lock: ModelDirLock) -> None:
    """The chief takes the model directory's lock for the job (its workers and ranks share it). Every process
    learns whether it got it, so that when another run holds it the whole job stops with the chief's one-line
    error instead of the other workers waiting for the chief in their first collective."""
    error = None
    if backend.is_chief:
        try:
            dir_lock.acquire()
        except LockedError as e:
            error = e
    (refused,) = backend.any_process([error is not None])
    if error is not None:
        raise error
    if refused:
        raise LockedError(f"{dir_lock.model_dir}: the chief could not lock it (see the chief's log)")


def _calls_the_backend_can_run(cfg, manifest: mf.Manifest, backend: Backend):
    """cfg with one step per train call where several cannot run: sparse input under tf.distribute with several
    replicas (TensorFlow 2.21 fails to all-gather the IndexedSlices gradients of a multi-step call). The
    config.yaml of the run records the 1."""
    sparse = uses_sparse_input(cfg.model.sparse_input, manifest.sparse, manifest.num_features)
    if cfg.train.steps_per_call == 1 or not sparse or backend.multi_step_sparse_calls:
        return cfg
    if backend.is_chief:
        log.warning("train.steps_per_call %d -> 1: %s with %d replicas runs one step per call on sparse input "
                    "(model.sparse_input=false trains densified with %d)", cfg.train.steps_per_call, backend.name,
                    backend.num_replicas, cfg.train.steps_per_call)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps_per_call=1))


def _make_plan(cfg, num_train_records: int, backend: Backend) -> _Plan:
    global_batch = cfg.train.batch_size
    if global_batch % backend.num_replicas:
        raise config_lib.ConfigError(f"train.batch_size: {global_batch} is not divisible by the "
                                     f"{backend.num_replicas} replicas")
    train_examples = int(num_train_records * (1.0 - cfg.data.validation_fraction))
    steps_per_epoch, total_steps = run_length(train_examples, global_batch, cfg.train.epochs,
                                              cfg.train.example_budget, cfg.train.max_steps)
    cut_by_budget = total_steps < steps_per_epoch * cfg.train.epochs and total_steps != cfg.train.max_steps
    if cut_by_budget:
        log.info("train.example_budget %d: %d steps (%.2f epochs of %d examples) instead of %d epochs",
                 cfg.train.example_budget, total_steps, total_steps / steps_per_epoch, train_examples,
                 cfg.train.epochs)
    return _Plan(global_batch, steps_per_epoch, total_steps)


def run_length(train_examples: int, global_batch: int, epochs: int, example_budget: int | None,
               max_steps: int | None) -> tuple[int, int]:
    """(steps per epoch, total steps): ``epochs`` epochs, cut to ``example_budget`` examples when they would train
    on more, but never to less than one epoch; ``max_steps`` cuts further.

    So a run trains on min(epochs x N, max(example_budget, N)) examples of N: the epochs the defaults were tuned
    with on small datasets, a fixed amount of work (with linear learning-rate scaling, the same whatever the
    batch) on middle-sized ones, and one pass over every record on the largest. The last epoch may be partial.
    """
    steps_per_epoch = max(1, train_examples // global_batch)
    total_steps = steps_per_epoch * epochs
    if example_budget is not None:
        total_steps = min(total_steps, max(steps_per_epoch, example_budget // global_batch))
    if max_steps:
        total_steps = min(total_steps, max_steps)
    return steps_per_epoch, total_steps


# --- Resume ----------------------------------------------------------------------------------------------------

def _resume(run: _Run) -> None:
    """Restores model, optimizer and counters (one checkpoint: the input position comes with the counters),
    gives every process the same start, then records the run's config and shape in the model directory."""
    backend, position = run.backend, run.position
    if backend.restores_checkpoints:
        run.keeper.restore()
    backend.broadcast_initial_state(list(run.model.variables) + list(run.optimizer.variables)
                                    + list(position.trackables().values()))
    position.after_restore()
    step = position.step
    run.keeper.last_step = step  # The checkpoint just restored needs no second copy at the first step.
    if backend.is_chief:
        config_lib.save_config(run.cfg, os.path.join(run.model_dir, "config.yaml"))
        _write_run_info(run.model_dir, run.manifest, run.cfg, run.data_dir)
    run.writers = SummaryWriters(os.path.join(run.model_dir, "logs"), enabled=backend.is_chief,
                                 per_label=PerLabelOptions.from_config(run.cfg.metrics))
    log.info("%s: %d replica(s), %d worker(s), precision %s, global batch %d, %d steps/epoch, %s step %d of %d",
             backend.name, backend.num_replicas, backend.num_workers, run.precision, run.plan.global_batch,
             run.plan.steps_per_epoch, "resuming at" if step else "starting at", step, run.plan.total_steps)


# --- Loop ------------------------------------------------------------------------------------------------------

def _loop(run: _Run, stop: _StopFlag) -> str:
    """Trains until the end of the run; returns what ended it: "end", "signal" or "early_stopping" (a NaN
    loss raises TrainingError)."""
    iterator, iterator_epoch = None, None
    while run.position.step < run.plan.total_steps:
        epoch = run.position.epoch
        if epoch != iterator_epoch:
            iterator, iterator_epoch = _epoch_input(run), epoch
        steps = _steps_this_call(run)
        started = time.perf_counter()
        try:
            stats = run.train_call(iterator, steps)
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
            raise reader.explain_data_error(run.data_dir, run.cfg.data.train_split, e) from None
        ended_by = _after_call(run, stop, stats, steps, epoch, time.perf_counter() - started)
        if ended_by:
            return ended_by
    return "end"


def _epoch_input(run: _Run):
    """This process' iterator over the current epoch, from the epoch's position on (a resumed run skips the
    batches its steps already took): trainer/inputs.py, in the mode data.input_mode chose."""
    return run.train_input.epoch(run.position.epoch, run.position.in_epoch)


def _steps_this_call(run: _Run) -> int:
    """Steps in the next call: up to steps_per_call, never past an epoch, a log line, an evaluation, a
    checkpoint or the end."""
    cfg, step = run.cfg, run.position.step
    n = min(cfg.train.steps_per_call, run.plan.steps_per_epoch - run.position.in_epoch,
            run.plan.total_steps - step)
    for every in (cfg.train.log_every_steps, cfg.train.eval_every_steps, cfg.checkpoint.every_steps):
        if every:
            n = min(n, every - step % every)
    return max(1, n)


def _after_call(run: _Run, stop: _StopFlag, stats: CallStats, steps: int, epoch: int, seconds: float) -> str | None:
    """One call's bookkeeping, in this order: counters, progress line, NaN stop, the requests all processes
    agree on, log line, checkpoint, then (unless stopping) evaluation and early stopping. Returns what ends
    the loop, if anything."""
    epoch_ended = run.position.advance(steps)
    step = run.position.step
    run.window.add(stats.loss_sum, stats.examples, steps, seconds)
    run.bar.update(step, epoch, stats.mean_loss, stats.examples / max(seconds, 1e-9))
    if stats.non_finite_steps > 0:
        _stop_on_non_finite_loss(run, step)
    stop_requested, save_requested = run.backend.any_process([stop.requested, run.keeper.time_due()])
    if step % run.cfg.train.log_every_steps < steps or step == run.plan.total_steps:
        _log_progress(run, step, epoch)
    if stop_requested or save_requested or run.keeper.steps_due(step):
        run.keeper.save(step)
    if stop_requested:
        return "signal"
    if run.evaluator and _eval_due(run, step, epoch_ended):
        run.early_stopping.update(step, _evaluate(run, step), run.model)
        if run.early_stopping.should_stop:
            best = run.early_stopping
            log.info("early stopping at step %d: no %s improvement for %d evaluations (best %.4f at step %d)",
                     step, best.metric, best.patience, best.best_value, best.best_step)
            return "early_stopping"
    return None


def _stop_on_non_finite_loss(run: _Run, step: int) -> None:
    # The loss-scale optimizer skipped the non-finite update, so the weights are still the last good ones:
    # save them, then stop.
    path = run.keeper.save(step)
    raise TrainingError(f"loss became NaN/Inf at step {step}: stopped; last good weights saved in "
                        f"{path or run.keeper.chief_dir} (lower optimizer.learning_rate, or check the data with "
                        "'python -m data_pipeline inspect')")


def _eval_due(run: _Run, step: int, epoch_ended: bool) -> bool:
    if step == run.plan.total_steps:
        return False  # The final evaluation runs in _finish.
    if run.cfg.train.eval_every_steps:
        return step % run.cfg.train.eval_every_steps == 0
    return epoch_ended


def _evaluate(run: _Run, step: int) -> evaluation.EvalResult:
    """One evaluation pass, written to the eval summaries and the log."""
    result = run.evaluator.run(run.eval_source)
    run.writers.eval_results(step, result.metrics, loss=result.loss)
    log.info("eval step %d: %s", step, evaluation.summary_line(result))
    run.last_eval = (step, result)
    return result


def _log_progress(run: _Run, step: int, epoch: int) -> None:
    window, optimizer = run.window, run.optimizer
    schedule = optimizer.inner_optimizer.learning_rate
    lr = float(schedule.numpy()) if hasattr(schedule, "numpy") else float(optimizer.learning_rate)
    values = {"loss": window.mean_loss, "learning_rate": lr, "examples_per_second": window.examples_per_second,
              "step_time_ms": window.step_ms, "epoch": epoch}
    if run.precision == "mixed_float16":
        values["loss_scale"] = float(optimizer.dynamic_scale.numpy())
    run.writers.train_progress(step, values)
    log.info(f"step {step}/{run.plan.total_steps} epoch {epoch + 1} loss {window.mean_loss:.5f} lr {lr:.3g} "
             f"{window.examples_per_second:,.0f} ex/s {window.step_ms:.1f} ms/step")
    window.reset()


# --- Finish ----------------------------------------------------------------------------------------------------

def _finish(run: _Run, ended_by: str) -> TrainResult:
    """The last checkpoint; unless a signal stopped the run: final evaluation, thresholds, export, hparams."""
    step = run.position.step
    if run.keeper.last_step != step:
        run.keeper.save(step)
    result = TrainResult(step, stopped_by_signal=ended_by == "signal", final_metrics={}, export_dir=None)
    if not result.stopped_by_signal:
        thresholds = None
        if run.evaluator:
            final = _final_evaluation(run, step)
            result.final_metrics = dict(final.metrics.aggregates)
            if run.cfg.metrics.tune_thresholds:
                thresholds = run.evaluator.tune_thresholds(final)
        result.export_dir = os.path.join(run.model_dir, "export")
        if run.backend.is_chief:
            export.export_model(run.model, result.export_dir, run.manifest.label_names, thresholds)
            log.info("exported the model to %s", result.export_dir)
        run.writers.hparams(config_lib.flatten(config_lib.to_dict(run.cfg)), result.final_metrics, step=step)
    run.writers.close()
    _maybe_dump_weights(run.model, run.backend)
    run.backend.barrier()
    return result


def _final_evaluation(run: _Run, step: int) -> evaluation.EvalResult:
    """The evaluation of the weights that are exported: early stopping's best (its weights are put back) when
    training ended on a worse one; otherwise the last step's, evaluated now unless the loop just did."""
    best = run.early_stopping.restore_best(run.model)
    if best is not None:
        return best
    if run.last_eval is not None and run.last_eval[0] == step:
        return run.last_eval[1]
    return _evaluate(run, step)


def _maybe_dump_weights(model, backend: Backend) -> None:
    """MLT_DUMP_WEIGHTS=path/weights-{worker}.npz: every process writes its final weights (a debugging aid
    and what the tests use to check that all workers / ranks hold identical weights)."""
    pattern = os.environ.get("MLT_DUMP_WEIGHTS")
    if pattern:
        np.savez(pattern.format(worker=backend.worker_index), *model.get_weights())


# --- The model directory's record of the run -------------------------------------------------------------------

def _run_info(manifest: mf.Manifest, cfg) -> dict:
    return {"num_features": manifest.num_features, "num_labels": manifest.num_labels,
            "hidden": list(cfg.model.hidden), "ensemble": cfg.model.ensemble}


def _write_run_info(model_dir, manifest, cfg, data_dir) -> None:
    train_split = manifest.split(cfg.data.train_split)
    info = {**_run_info(manifest, cfg), "label_names": manifest.label_names, "data_dir": os.path.abspath(data_dir),
            "label_counts": train_split.label_counts, "num_train_examples": train_split.num_examples,
            "feature_hashing": dataclasses.asdict(manifest.feature_hashing) if manifest.feature_hashing else None}
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
