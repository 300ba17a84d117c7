"""Evaluation during and after training: streaming metric state, early stopping, threshold tuning.

The eval step (trainer/steps.py) returns additive metric state, summed by the backend; sum_metric_state, the
one evaluation loop, accumulates it over a split on the host, and the pure functions of trainer.metrics turn it
into values, so evaluation during training, ``trainer evaluate`` and threshold tuning all read the same
numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from data_pipeline import manifest as mf
from data_pipeline import reader
from trainer.backends import Backend
from trainer.metrics import compute
from trainer.metrics import state as metric_state
from trainer.model import uses_sparse_input
from trainer.steps import make_eval_function

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalSource:
    """Which records to evaluate on: a split of a dataset, optionally only the held-out validation part."""

    data_dir: str
    split: str
    holdout_fraction: float = 0.0

    def describe(self) -> str:
        part = f" (validation records held out of it: {self.holdout_fraction:g})" if self.holdout_fraction else ""
        return f"{self.data_dir} split '{self.split}'{part}"


@dataclasses.dataclass
class EvalResult:
    metrics: compute.MetricsResult
    loss: float
    state: dict


def eval_source(cfg, data_dir: str, eval_data_dir: str | None) -> EvalSource | None:
    """Chooses what to evaluate on during training (see DataConfig): the validation holdout, else the
    eval split, else nothing."""
    if cfg.data.validation_fraction > 0:
        return EvalSource(data_dir, cfg.data.train_split, cfg.data.validation_fraction)
    directory = eval_data_dir or data_dir
    split = cfg.data.eval_split
    if split == "auto":
        split = "eval" if "eval" in mf.read_manifest(directory).splits else ""
    if not split:
        return None
    mf.read_manifest(directory).split(split, directory)  # A missing split is an error now, not at step N.
    return EvalSource(directory, split)


class Evaluator:
    """Runs evaluation passes with a backend.

    Args:
      backend: the distribution backend.
      model: the model.
      loss_fn: per-example loss.
      manifest: the training dataset's manifest (label names, training label counts for buckets).
      cfg: the config (metrics section, batch size, train split).

    Precision, recall and F1 are computed at 0.5 (thresholds are tuned afterwards, from the histograms).
    """

    def __init__(self, backend: Backend, model, loss_fn, manifest: mf.Manifest, cfg):
        self.backend, self.manifest, self.cfg = backend, manifest, cfg
        train = manifest.splits.get(cfg.data.train_split)
        self.train_counts = train.label_counts if train else None
        self.thresholds = np.full(manifest.num_labels, 0.5, np.float32)
        self.num_bins, state_fn = metric_state_function(
            cfg.metrics, manifest.num_labels, self.thresholds, self.train_counts, train.num_examples if train else None)
        self.eval_fn = make_eval_function(backend, model, loss_fn, state_fn)

    def run(self, source: EvalSource) -> EvalResult:
        """One pass over ``source``; returns metrics computed from the globally summed state."""
        batch = self.cfg.train.batch_size
        options = reader.ReaderOptions(shuffle=False, repeat=False, deterministic=True,
                                       cycle_length=self.cfg.data.cycle_length,
                                       on_bad_features=self.cfg.data.on_bad_features,
                                       holdout_fraction=source.holdout_fraction, holdout="only",
                                       sparse_output=uses_sparse_input(
                                           self.cfg.model.sparse_input, self.manifest.sparse,
                                           self.manifest.num_features))

        def dataset_fn(ctx):
            return reader.make_dataset(source.data_dir, source.split, ctx.get_per_replica_batch_size(batch), ctx,
                                       options)

        state = metric_state.zero_state(self.manifest.num_labels, self.num_bins)
        state["loss_sum"] = np.zeros((), np.float64)
        state = sum_metric_state(self.backend.distribute_dataset(dataset_fn), self.eval_fn, state, source)
        state = self.backend.reduce_eval_total(state)
        n = float(state["num_examples"])
        if n == 0:
            raise ValueError(f"evaluation on {source.describe()} saw no examples")
        metrics = compute.compute_metrics(state, self.manifest.label_names, self.thresholds, self.train_counts)
        return EvalResult(metrics, float(state["loss_sum"]) / n, state)

    def tune_thresholds(self, result: EvalResult) -> np.ndarray:
        """Per-label F1-optimal thresholds from an evaluation's histograms (0.5 for rare labels)."""
        return compute.tune_thresholds(result.state, self.cfg.metrics.min_positives_for_threshold)


class EarlyStopping:
    """Stops after ``patience`` evaluations without improvement and keeps the best weights (host copy).

    Args:
      patience: evaluations without improvement before stopping; 0 disables early stopping.
      metric: aggregate to maximise (e.g. macro_pr_auc, precision@1) or "loss" to minimise.
    """

    def __init__(self, patience: int, metric: str):
        self.patience, self.metric = patience, metric
        self.best_value, self.best_step, self.bad_evals = -np.inf, -1, 0
        self.best_weights = None
        self.best_result: EvalResult | None = None

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.bad_evals >= self.patience

    def update(self, step: int, result: EvalResult, model) -> None:
        if not self.patience:
            return
        value = -result.loss if self.metric == "loss" else result.metrics.aggregates[self.metric]
        if value > self.best_value:
            self.best_value, self.best_step, self.bad_evals = value, step, 0
            self.best_weights = model.get_weights()
            self.best_result = result
        else:
            self.bad_evals += 1

    def restore_best(self, model) -> EvalResult | None:
        """Puts the best weights back when training ended on a worse evaluation; returns the best evaluation
        then, else None."""
        if self.best_weights is None or not self.bad_evals:
            return None
        log.info("restoring the weights of step %d (best %s %.4f)", self.best_step, self.metric, self.best_value)
        model.set_weights(self.best_weights)
        return self.best_result


def metric_state_function(metrics_cfg, num_labels: int, thresholds, train_counts=None,
                          num_train_examples: int | None = None) -> tuple[int, Callable]:
    """The histogram resolution and the per-batch metric-state function of a run, from its metrics config:
    the one definition shared by training's evaluations and ``trainer evaluate``, so both report the same
    numbers. PSP@k / PSnDCG@k need the training split's label counts and size (else they are NaN)."""
    num_bins = metric_state.histogram_bins(num_labels, metrics_cfg.num_bins, metrics_cfg.histogram_budget_mib)
    inv_propensity = None
    if train_counts is not None and num_train_examples:
        inv_propensity = tf.constant(compute.inverse_propensity(
            train_counts, num_train_examples, metrics_cfg.propensity_a, metrics_cfg.propensity_b), tf.float32)
    state_fn = functools.partial(metric_state.batch_metric_state, thresholds=tf.constant(thresholds, tf.float32),
                                 num_bins=num_bins, inv_propensity=inv_propensity)
    return num_bins, state_fn


def sum_metric_state(batches, eval_step: Callable, state: dict, source: EvalSource) -> dict:
    """The evaluation loop (training's evaluations and ``trainer evaluate``): adds ``eval_step(batch)``, a dict
    of additive metric state, to ``state`` for every batch, on the host in float64.

    Raises:
      DataError: a bad record, named with its file (reader.explain_data_error).
    """
    try:
        for batch in batches:
            state = metric_state.accumulate(state, eval_step(batch))
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
        raise reader.explain_data_error(source.data_dir, source.split, e) from None
    return state


def summary_line(result: EvalResult) -> str:
    a = result.metrics.aggregates
    keys = ("precision@1", "precision@3", "precision@5", "micro_f1", "macro_f1", "macro_roc_auc", "macro_pr_auc")
    return f"loss {result.loss:.5f} " + " ".join(f"{k} {a[k]:.4f}" for k in keys if k in a)
