"""TensorBoard summaries for training and evaluation (written by the chief only).

``SummaryWriters(logdir, enabled=is_chief, per_label=PerLabelOptions(...))`` owns one run per directory
under ``logdir``: ``train`` (training progress), ``eval`` (evaluation during training), and one per split
that ``trainer evaluate`` evaluated (``test``, ...), plus the logdir root for the hparams session.  With
``enabled=False`` every method is a no-op and nothing is created on disk, so the loop calls it
unconditionally on every worker.

Train run (:meth:`SummaryWriters.train_progress`): ``loss/per_example`` and ``train/<name>`` (learning
rate, examples/s, step time, epoch, loss scale).  The eval runs share ``loss/per_example``, so TensorBoard
draws the training and evaluation losses in one chart.

An evaluation (:meth:`SummaryWriters.eval_results`, one step of the split's run) writes:

* ``metrics/<name>``: the aggregates of :class:`~trainer.metrics.compute.MetricsResult` that change
  between evaluations (not ``num_examples``, ``num_labels``, bucket sizes: they are in the text below).
  Aggregates that depend on the decision thresholds (micro/macro precision, recall, F1, Hamming loss,
  subset accuracy) get the suffix ``_at_tuned_thresholds`` when any label's threshold is not 0.5 (what
  ``trainer evaluate`` reports with the thresholds tuned during training);
* the per-label table ``labels/table`` and ``labels/pr_curves`` read by the Labels dashboard (format:
  :mod:`trainer.labels_plugin.table`);
* histograms ``across_labels/{pr_auc,roc_auc,f1}``: how one metric is spread over the labels;
* PR curves ``pr_curve/<label>`` (pr_curves plugin, :func:`pr_curve_data`) for one fixed set of labels per
  model directory: ``metrics.pr_curve_labels``, else :data:`NUM_PR_CURVES` labels spread from the most to the least
  frequent in training, chosen at the first evaluation and kept in ``<logdir>/pr_curve_labels.json`` so
  that resumed training and ``trainer evaluate`` draw the same labels;
* text ``worst_labels`` and ``best_labels``: the N labels with the lowest / highest PR-AUC among those
  with at least ``min_support`` positives in the evaluated data, with training count and threshold;
* optionally (``per_label.scalars``) ``per_label/<metric>/<label>`` scalars: 5 tags per label, readable
  for a few hundred labels at most, hence off by default -- the Labels dashboard shows the same values.

Undefined values (NaN, e.g. the AUC of a label without positives) are not written as scalars: a gap in a
chart reads as "undefined".  Label names become tags through :func:`sanitize_tag_names`.

All values of one call are packed into one ``Summary`` protobuf and written with one
``tf.summary.experimental.write_raw_pb``; timings are in bench/README.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.histogram import summary_v2 as histogram_summary
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.pr_curve import metadata as pr_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.util import tensor_util

from trainer.labels_plugin import table as label_table
from trainer.metrics import bins
from trainer.metrics.compute import MetricsResult, worst_labels

PER_LABEL_SCALARS = ("roc_auc", "pr_auc", "f1", "precision", "recall")
LOSS_TAG = "loss/per_example"
NUM_PR_CURVES = 10
PR_CURVE_THRESHOLDS = 201  # 0, 0.005, ..., 1 (the pr_curves plugin wants them evenly spaced)
PR_CURVE_LABELS_FILE = "pr_curve_labels.json"
# Aggregates that do not change between evaluations of one split: not drawn as series.
CONSTANT_AGGREGATES = ("num_examples", "num_labels", "num_labels_with_support")
THRESHOLD_DEPENDENT = ("micro_precision", "micro_recall", "micro_f1", "macro_f1", "macro_precision", "macro_recall",
                       "hamming_loss", "subset_accuracy")
# Final metrics shown in the HParams dashboard, in this order.
HPARAMS_METRICS = ("precision@1", "precision@3", "precision@5", "ndcg@5", "micro_f1", "macro_f1", "macro_pr_auc",
                   "macro_roc_auc", "micro_pr_auc", "lrap")
# Config sections shown first in the HParams dashboard (it sorts hparams by name: names get a rank prefix).
HPARAMS_SECTION_ORDER = ("model", "optimizer", "data", "loss", "train", "metrics")
_RUN_NAME = re.compile(r"[\w.\-]+")
_SCALAR_METADATA = scalar_metadata.create_summary_metadata(display_name="", description="")


@dataclasses.dataclass
class PerLabelOptions:
    """What an evaluation writes per label (the ``metrics.*`` config keys of the same meaning).

    Attributes:
      enabled: write per-label output at all (``metrics.per_label_summaries``); off: aggregates only.
      scalars: per-label scalars as well (``metrics.per_label_scalars``).
      pr_curve_labels: labels for the pr_curves plugin; empty: chosen at the first evaluation.
      num_ranked: rows of the worst / best label tables (``metrics.num_worst_labels``).
      min_support: evaluation positives a label needs to be ranked (``metrics.min_support``).
    """

    enabled: bool = True
    scalars: bool = False
    pr_curve_labels: Sequence[str] = ()
    num_ranked: int = 10
    min_support: int = 10

    @classmethod
    def from_config(cls, metrics_cfg) -> "PerLabelOptions":
        """From the ``metrics`` section of a :class:`trainer.config.Config`."""
        return cls(metrics_cfg.per_label_summaries, metrics_cfg.per_label_scalars,
                   tuple(metrics_cfg.pr_curve_labels), metrics_cfg.num_worst_labels, metrics_cfg.min_support)


def sanitize_tag_names(names: Sequence[str]) -> list[str]:
    """Readable, unique TensorBoard tag components for label names.

    Characters other than letters, digits, ``_ . -`` turn into ``_`` (a ``/`` would split the tag
    hierarchy); names that collide after that get ``_<label index>`` appended.
    """
    clean = [re.sub(r"[^\w.\-]", "_", str(n)) or "_" for n in names]
    counts: dict[str, int] = {}
    for c in clean:
        counts[c] = counts.get(c, 0) + 1
    return [c if counts[c] == 1 else f"{c}_{i}" for i, c in enumerate(clean)]


def _add_scalar(summary: summary_pb2.Summary, tag: str, value) -> None:
    """Appends a scalars-plugin value (same wire format as ``tf.summary.scalar``); skips non-finite."""
    value = float(value)
    if not np.isfinite(value):
        return
    v = summary.value.add(tag=tag, metadata=_SCALAR_METADATA)
    v.tensor.dtype = 1  # DT_FLOAT; a 0-d tensor has an empty shape
    v.tensor.float_val.append(value)


def pr_curve_data(pos_hist: np.ndarray, neg_hist: np.ndarray, num_thresholds: int = PR_CURVE_THRESHOLDS) -> np.ndarray:
    """PR-curve plugin data for one label from its histograms.

    The pr_curves plugin takes its thresholds to be ``j/(T-1)``, evenly spaced, whatever the data; the
    histograms' bin edges are not (:mod:`trainer.metrics.bins`), so the counts are read at the plugin's
    thresholds (``bins.counts_at``): exact where a threshold is a bin edge below 1 (0 always), interpolated
    inside a bin otherwise, so the plot and the thresholds it shows agree; at 1 the curve ends with nothing
    predicted (the last bin cannot tell scores of exactly 1 from those just below). Evenly spaced thresholds resolve
    little below 1/(T-1), where a rare label's scores lie; the Labels dashboard draws its curves at bin edges.

    Args:
      pos_hist: ``[K]`` positive counts per bin.
      neg_hist: ``[K]`` negative counts per bin.
      num_thresholds: T.

    Returns:
      float32 ``[6, T]``: tp, fp, tn, fn, precision, recall at the thresholds ``j/(T-1)``, the layout the
      pr_curves plugin expects.  Precision is 0 where nothing is predicted, as in the plugin's own op.
    """
    thresholds = np.linspace(0.0, 1.0, num_thresholds)
    tp, fp = bins.counts_at(pos_hist, thresholds), bins.counts_at(neg_hist, thresholds)
    fn, tn = tp[0] - tp, fp[0] - fp  # tp[0], fp[0]: at threshold 0, every positive and negative
    precision = tp / np.maximum(tp + fp, 1e-7)
    recall = tp / np.maximum(tp + fn, 1e-7)
    return np.stack([tp, fp, tn, fn, precision, recall]).astype(np.float32)


def choose_pr_curve_labels(result: MetricsResult, k: int = NUM_PR_CURVES, min_support: float = 1) -> list[int]:
    """``k`` labels spread evenly over the frequency ranking, from the most to the least frequent in
    training (by evaluation support without training counts), among labels with at least
    ``min_support`` evaluation positives (or any, if fewer than ``k`` have that many)."""
    pl = result.per_label
    support = np.asarray(pl["support"], np.float64)
    counts = pl.get("train_count")
    counts = support if counts is None or np.isnan(counts).all() else np.nan_to_num(counts)
    eligible = np.flatnonzero(support >= max(min_support, 1))
    if len(eligible) < k:
        eligible = np.flatnonzero(support > 0)
    ranked = eligible[np.argsort(-counts[eligible], kind="stable")]
    if len(ranked) <= k:
        return [int(i) for i in ranked]
    return [int(ranked[j]) for j in np.unique(np.round(np.linspace(0, len(ranked) - 1, k)).astype(int))]


def _markdown_cell(text) -> str:
    return str(text).replace("|", "\\|")


def _number(value: float, digits: int = 3) -> str:
    return "–" if np.isnan(value) else f"{value:.{digits}f}"


def readable_hparam(value):
    """An hparam value TensorBoard can show: bool/int/float/str kept, NumPy scalars unwrapped, None as
    ``none``, short lists as ``a, b`` (a single item as itself), long ones as ``[N values]``."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return readable_hparam(value[0])
        return ", ".join(str(v) for v in value) if len(value) <= 8 else f"[{len(value)} values]"
    if value is None:
        return "none"
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _hparam_name(key: str) -> str:
    """``model.hidden`` -> ``1.model.hidden``: the rank prefix makes TensorBoard's name sort show the
    sections in HPARAMS_SECTION_ORDER (the display name stays ``model.hidden``)."""
    section = key.split(".", 1)[0]
    rank = HPARAMS_SECTION_ORDER.index(section) if section in HPARAMS_SECTION_ORDER else len(HPARAMS_SECTION_ORDER)
    return f"{rank + 1}.{key}"


class SummaryWriters:
    """Per-run TensorBoard writers under one logdir; a no-op when ``enabled`` is False (non-chief).

    Args:
      logdir: root directory; runs go to ``<logdir>/<run>``, the hparams session to ``<logdir>`` itself.
      enabled: write anything at all (pass ``backend.is_chief``).
      per_label: what evaluations write per label.
    """

    def __init__(self, logdir: str, enabled: bool = True, per_label: PerLabelOptions | None = None):
        self.logdir = str(logdir)
        self.enabled = bool(enabled)
        self.per_label = per_label or PerLabelOptions()
        self._writers: dict[str, tf.summary.SummaryWriter] = {}
        self._described: set[tuple[str, str]] = set()  # (run, tag) whose description this event file has
        self._pr_curve_names: list[str] | None = None
        self._names: tuple[str, ...] = ()  # the label names _tags and _index were made for
        self._tags: list[str] = []
        self._index: dict[str, int] = {}

    def _writer(self, run: str):
        # Created lazily so a run that is never written leaves no empty event file.
        if run not in self._writers:
            if run and not _RUN_NAME.fullmatch(run):
                raise ValueError(f"summary run {run!r}: use letters, digits, '_', '.', '-'")
            path = self.logdir if run == "" else f"{self.logdir}/{run}"
            self._writers[run] = tf.summary.create_file_writer(path)
        return self._writers[run]

    def _write(self, run: str, step: int, summary: summary_pb2.Summary) -> None:
        if not summary.value:
            return
        with self._writer(run).as_default():
            tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=int(step))

    def scalars(self, run: str, step: int, values: Mapping[str, float]) -> None:
        """Writes ``{tag: value}`` as scalars into ``<logdir>/<run>`` (non-finite values skipped)."""
        if not self.enabled:
            return
        summary = summary_pb2.Summary()
        for tag, value in values.items():
            _add_scalar(summary, tag, value)
        self._write(run, step, summary)

    def train_progress(self, step: int, values: Mapping[str, float]) -> None:
        """Training statistics into the train run: ``loss`` as ``loss/per_example``, the others (learning
        rate, throughput, epoch, ...) under ``train/``."""
        self.scalars("train", step, {LOSS_TAG if k == "loss" else f"train/{k}": v for k, v in values.items()})

    def eval_results(self, step: int, result: MetricsResult, run: str = "eval", loss: float | None = None) -> None:
        """Writes one evaluation (see module doc for the tags) into ``<logdir>/<run>``.

        Args:
          step: global step of the evaluated model.
          result: output of ``compute_metrics`` (PR curves need its histograms).
          run: the run, named after the evaluated split.
          loss: the evaluation loss per example, if known.
        """
        if not self.enabled:
            return
        summary = summary_pb2.Summary()
        tuned = bool(np.any(np.asarray(result.per_label["threshold"]) != 0.5))
        for name, value in result.aggregates.items():
            if name in CONSTANT_AGGREGATES or name.endswith("/num_labels"):
                continue
            suffix = "_at_tuned_thresholds" if tuned and name.rsplit("/", 1)[-1] in THRESHOLD_DEPENDENT else ""
            _add_scalar(summary, f"metrics/{name}{suffix}", value)
        if loss is not None:
            _add_scalar(summary, LOSS_TAG, loss)
        if self.per_label.enabled:
            self._per_label_values(summary, run, result, tuned)
        self._write(run, step, summary)
        self.flush()

    def _label_tags(self, names: Sequence[str]) -> tuple[list[str], dict[str, int]]:
        """Tag components and name -> index of the label names, computed once per label set (a second at
        50,000 labels)."""
        key = tuple(str(n) for n in names)
        if key != self._names:
            self._names, self._tags, self._index = key, sanitize_tag_names(key), {n: i for i, n in enumerate(key)}
        return self._tags, self._index

    def _per_label_values(self, summary, run: str, result: MetricsResult, tuned: bool) -> None:
        names = [str(n) for n in result.label_names]
        tags, _ = self._label_tags(names)
        pl = result.per_label
        fixed = self._pr_curve_indices(result)
        summary.MergeFrom(label_table.label_table_pb(result, describe=self._describe(run, label_table.TABLE_TAG)))
        if result.pos_hist is not None and result.neg_hist is not None:
            indices = label_table.curve_label_indices(result, fixed)
            summary.MergeFrom(label_table.pr_curves_pb(result, indices, self._describe(run, label_table.CURVES_TAG)))
            for i in fixed:
                data = pr_curve_data(result.pos_hist[i], result.neg_hist[i])
                meta = pr_metadata.create_summary_metadata(display_name=names[i], description="",
                                                           num_thresholds=data.shape[1])
                summary.value.add(tag=f"pr_curve/{tags[i]}", metadata=meta,
                                  tensor=tensor_util.make_tensor_proto(data))
        for metric in ("pr_auc", "roc_auc", "f1"):
            values = np.asarray(pl[metric], np.float64)
            values = values[~np.isnan(values)]
            if values.size:
                summary.MergeFrom(histogram_summary.histogram_pb(
                    f"across_labels/{metric}", values,
                    description=f"How per-label {metric} is spread over the labels with a value"))
        for tag, text in self._ranked_tables(result, tuned).items():
            summary.MergeFrom(text_summary.text_pb(tag, text))
        if self.per_label.scalars:
            for metric in PER_LABEL_SCALARS:
                for tag, value in zip(tags, np.asarray(pl[metric], np.float64)):
                    _add_scalar(summary, f"per_label/{metric}/{tag}", value)

    def _describe(self, run: str, tag: str) -> bool:
        """True the first time a tag is written to a run's current event file (it then carries the
        label names); see trainer.labels_plugin.table."""
        if (run, tag) in self._described:
            return False
        self._described.add((run, tag))
        return True

    def _pr_curve_indices(self, result: MetricsResult) -> list[int]:
        """The fixed PR-curve labels: from the options, else the logdir's file, else chosen now (and saved)."""
        names = [str(n) for n in result.label_names]
        _, index = self._label_tags(names)
        if self.per_label.pr_curve_labels:
            unknown = [n for n in self.per_label.pr_curve_labels if n not in index]
            if unknown:
                raise ValueError(f"metrics.pr_curve_labels: not among the label names: {unknown[:10]}")
            return [index[n] for n in self.per_label.pr_curve_labels]
        path = os.path.join(self.logdir, PR_CURVE_LABELS_FILE)
        if self._pr_curve_names is None and tf.io.gfile.exists(path):
            with tf.io.gfile.GFile(path) as f:
                self._pr_curve_names = json.load(f)
        if self._pr_curve_names is None or any(n not in index for n in self._pr_curve_names):
            chosen = choose_pr_curve_labels(result, min_support=self.per_label.min_support)
            self._pr_curve_names = [names[i] for i in chosen]
            tf.io.gfile.makedirs(self.logdir)
            with tf.io.gfile.GFile(path + ".tmp", "w") as f:
                json.dump(self._pr_curve_names, f)
            tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
        return [index[n] for n in self._pr_curve_names]

    def _ranked_tables(self, result: MetricsResult, tuned: bool) -> dict[str, str]:
        """Markdown tables of the worst and best labels by PR-AUC among those with enough support."""
        pl, names, agg = result.per_label, result.label_names, result.aggregates
        min_support = self.per_label.min_support
        ranked = worst_labels(result, len(names), min_support)
        head = (f"Ranked by PR-AUC: the {len(ranked)} of {len(names)} labels with at least {min_support} "
                f"positives among the {agg.get('num_examples', float('nan')):.0f} evaluated examples "
                f"({agg.get('num_labels_with_support', float('nan')):.0f} labels have any); precision, recall "
                f"and F1 at {'the tuned' if tuned else 'the 0.5'} thresholds.\n\n"
                "| label | train count | support | PR-AUC | ROC-AUC | F1 | precision | recall | threshold |\n"
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        k = self.per_label.num_ranked
        tables = {}
        for tag, rows in (("worst_labels", ranked[:k]), ("best_labels", ranked[::-1][:k])):
            lines = [head] + [
                f"| {_markdown_cell(names[i])} | {_number(pl['train_count'][i], 0)} | {pl['support'][i]:.0f} "
                f"| {_number(pl['pr_auc'][i])} | {_number(pl['roc_auc'][i])} | {_number(pl['f1'][i])} "
                f"| {_number(pl['precision'][i])} | {_number(pl['recall'][i])} | {pl['threshold'][i]:.3f} |"
                for i in rows]
            if not len(rows):
                lines.append(f"| (no label with {min_support} positives: lower metrics.min_support) "
                             "| | | | | | | | |")
            tables[tag] = "\n".join(lines)
        return tables

    def hparams(self, config: Mapping[str, object], final_metrics: Mapping[str, float] | None = None,
                step: int = 0) -> None:
        """Records the run's hyperparameters (and final metrics) for the HParams dashboard.

        The logdir root is the hparams session: it gets the experiment config (the hparams, model,
        optimizer and data keys first; one metric ``final/<name>`` per final metric of
        :data:`HPARAMS_METRICS`), the session's values, and those final metrics as scalars at ``step``
        (the step training ended at).

        Args:
          config: flat ``{dotted.key: value}``; values pass through :func:`readable_hparam`.
          final_metrics: optional ``{metric name: value}`` (e.g. the last aggregates).
          step: step for the final metric scalars.
        """
        if not self.enabled:
            return
        values = {_hparam_name(str(k)): readable_hparam(v) for k, v in config.items()}
        infos = [hp.HParam(name, display_name=name.split(".", 1)[1]) for name in sorted(values)]
        final = {k: float(final_metrics[k]) for k in HPARAMS_METRICS if k in (final_metrics or {})}
        metrics = [hp.Metric(f"final/{name}", display_name=name) for name in final]
        summary = summary_pb2.Summary()
        summary.MergeFrom(hp.hparams_config_pb(hparams=infos, metrics=metrics))
        summary.MergeFrom(hp.hparams_pb(values, start_time_secs=time.time()))
        for name, value in final.items():
            _add_scalar(summary, f"final/{name}", value)
        self._write("", step, summary)
        self.flush()

    def flush(self) -> None:
        """Flushes every open writer."""
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        """Flushes and closes the writers (further writes open new event files, described anew)."""
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        self._described.clear()

    def __enter__(self) -> "SummaryWriters":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
