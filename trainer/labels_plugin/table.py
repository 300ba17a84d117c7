"""The per-label table summary: one tensor of labels x metrics per evaluation (defined here, once).

Written by :meth:`trainer.summaries.SummaryWriters.eval_results` through :func:`label_table_pb` and
:func:`pr_curves_pb`; read back by the Labels dashboard (:mod:`trainer.labels_plugin.reader`).  Two
summary values per evaluation, in the run of the evaluated split (``eval``, ``test``, ...), both with
``SummaryMetadata.plugin_data.plugin_name == "mlt_labels"``:

``labels/table``
  float32 ``[L, C]``, one row per label (in the model's label order), one column per name of
  :data:`COLUMNS`: ``train_count`` (positives in the training split; NaN if unknown), ``support``
  (positives in the evaluated data), ``prevalence`` (support / examples), ``pred_pos_rate`` (share of
  examples predicted positive), ``pr_auc``, ``roc_auc``, ``f1``, ``precision``, ``recall`` (the last three
  at the label's threshold), ``threshold``, ``bucket`` (0 head, 1 torso, 2 tail; NaN if unknown).
  Undefined values are NaN (see ``trainer.metrics.compute``).
``labels/pr_curves``
  float16 ``[N, 2, T]``: precision (``[:, 0]``) and recall (``[:, 1]``) of N labels at T thresholds
  (NaN where undefined), N <= :data:`MAX_CURVE_LABELS`. The thresholds are listed in the description: bin
  edges of the histograms (:func:`curve_points`), so not evenly spaced in probability (older logs have
  ``0, 0.02, ..., 1``); a reader takes them from there.

The plugin data ``content`` is UTF-8 JSON.  The first value of a tag in each event file carries the full
description -- ``{"version": 1, "columns": [...], "labels": [...], "buckets": ["head", "torso", "tail"]}``
for the table, ``{"version": 1, "thresholds": [...T], "label_indices": [...N]}`` for the curves -- and
later values of that tag in the same file carry ``{"version": 1}`` only, so the label names (about 1 MB at
50,000 labels) are written once per file, not once per evaluation.  A reader keeps the last full
description of each tag per file.

Size per evaluation: ``4 * L * C`` bytes for the table (2.2 MB at 50,000 labels, against ~18 MB for the
same values as per-label scalars) plus at most ``2 * 2 * T * MAX_CURVE_LABELS`` = 204 kB of curves.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.util import tensor_util

from trainer.metrics import bins
from trainer.metrics.compute import BUCKETS, MetricsResult

PLUGIN_NAME = "mlt_labels"
TABLE_TAG = "labels/table"
CURVES_TAG = "labels/pr_curves"
FORMAT_VERSION = 1
COLUMNS = ("train_count", "support", "prevalence", "pred_pos_rate", "pr_auc", "roc_auc", "f1", "precision",
           "recall", "threshold", "bucket")
CURVE_THRESHOLDS = 51  # bin edges, about evenly spaced in log-odds: enough for a curve on screen
MAX_CURVE_LABELS = 1000


def _metadata(content: dict, description: str) -> summary_pb2.SummaryMetadata:
    meta = summary_pb2.SummaryMetadata(summary_description=description)
    meta.plugin_data.plugin_name = PLUGIN_NAME
    meta.plugin_data.content = json.dumps({"version": FORMAT_VERSION, **content}).encode("utf-8")
    return meta


def table_values(result: MetricsResult) -> np.ndarray:
    """The ``[L, C]`` float32 table of :data:`COLUMNS` for one evaluation result."""
    pl = result.per_label
    num_labels = len(result.label_names)
    examples = float(result.aggregates.get("num_examples", np.nan))
    columns = dict(pl)
    columns["prevalence"] = np.asarray(pl["support"], np.float64) / examples if examples > 0 else \
        np.full(num_labels, np.nan)
    columns.setdefault("train_count", np.full(num_labels, np.nan))
    columns["bucket"] = np.full(num_labels, np.nan) if result.buckets is None else \
        np.array([BUCKETS.index(b) for b in result.buckets], np.float64)
    return np.stack([np.asarray(columns[c], np.float64) for c in COLUMNS], axis=1).astype(np.float32)


def label_table_pb(result: MetricsResult, describe: bool = True) -> summary_pb2.Summary:
    """The ``labels/table`` summary of one evaluation.

    Args:
      result: output of ``trainer.metrics.compute.compute_metrics``.
      describe: carry the column and label names (the first value of the tag in an event file).
    """
    content = {"columns": list(COLUMNS), "labels": [str(n) for n in result.label_names],
               "buckets": list(BUCKETS)} if describe else {}
    summary = summary_pb2.Summary()
    summary.value.add(tag=TABLE_TAG, metadata=_metadata(content, "Per-label metrics (Labels dashboard)"),
                      tensor=tensor_util.make_tensor_proto(table_values(result)))
    return summary


def curve_label_indices(result: MetricsResult, always: Sequence[int] = ()) -> np.ndarray:
    """Labels that get a PR curve in ``labels/pr_curves``: all of them up to :data:`MAX_CURVE_LABELS`,
    else ``always`` (the run's fixed PR-curve labels) and then the most frequent in training (by
    evaluation support without training counts) up to that many.  Fixed for a run, so a label's curves
    can be followed over its evaluations."""
    num_labels = len(result.label_names)
    if num_labels <= MAX_CURVE_LABELS:
        return np.arange(num_labels)
    counts = result.per_label.get("train_count")
    if counts is None or np.isnan(counts).all():
        counts = result.per_label["support"]
    chosen = list(dict.fromkeys(int(i) for i in always))[:MAX_CURVE_LABELS]
    taken = set(chosen)
    for i in np.argsort(-np.nan_to_num(counts, nan=-1.0), kind="stable"):
        if len(chosen) == MAX_CURVE_LABELS:
            break
        if int(i) not in taken:
            chosen.append(int(i))
    return np.sort(np.array(chosen, np.int64))


def curve_points(pos_hist: np.ndarray, neg_hist: np.ndarray, num_thresholds: int = CURVE_THRESHOLDS):
    """Precision and recall of each row of the histograms at about ``num_thresholds`` bin edges.

    Args:
      pos_hist, neg_hist: ``[N, K]`` counts of positives / negatives per bin (edges ``bins.bin_edges(K)``).
      num_thresholds: wanted thresholds: 0, 1 and the edges between them at about equal steps of the edge
        index, i.e. of log-odds, so that a rare label's curve, whose scores lie far below 0.01, has as many
        points as a frequent label's. Counts at edges below 1 are exact, so are the curves (at 1 they end with
        nothing predicted).

    Returns:
      ``(thresholds [T], float32 [N, 2, T])``: precision (NaN where nothing is predicted) and recall
      (NaN for a label without positives) at ``prob >= threshold``.
    """
    pos = np.atleast_2d(np.asarray(pos_hist, np.float64))
    neg = np.atleast_2d(np.asarray(neg_hist, np.float64))
    k = pos.shape[1]
    chosen = np.unique(np.round(np.linspace(0, k, min(num_thresholds, k + 1))).astype(np.int64))
    tp, fp = bins.counts_at_edges(pos)[:, chosen], bins.counts_at_edges(neg)[:, chosen]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        recall = tp / pos.sum(1, keepdims=True)
    return bins.bin_edges(k)[chosen], np.stack([precision, recall], axis=1).astype(np.float32)


def pr_curves_pb(result: MetricsResult, indices: np.ndarray, describe: bool = True) -> summary_pb2.Summary:
    """The ``labels/pr_curves`` summary: curves of the labels ``indices`` (see :func:`curve_label_indices`).

    Args:
      result: an evaluation result with its histograms (``pos_hist`` / ``neg_hist``).
      indices: label indices, ascending.
      describe: carry the thresholds and label indices (the first value of the tag in an event file).
    """
    thresholds, curves = curve_points(result.pos_hist[indices], result.neg_hist[indices])
    content = {"thresholds": [float(t) for t in thresholds],
               "label_indices": [int(i) for i in indices]} if describe else {}
    summary = summary_pb2.Summary()
    summary.value.add(tag=CURVES_TAG, metadata=_metadata(content, "Per-label PR curves (Labels dashboard)"),
                      tensor=_half_tensor_proto(curves))
    return summary


def _half_tensor_proto(values: np.ndarray) -> tensor_pb2.TensorProto:
    """A float16 TensorProto from raw bytes (``make_tensor_proto`` converts float16 one value at a time: 1.7 s
    for 1000 curves)."""
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in values.shape])
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_HALF, tensor_shape=shape,
                                  tensor_content=np.ascontiguousarray(values, "<f2").tobytes())


def parse_content(metadata: summary_pb2.SummaryMetadata) -> dict:
    """The JSON description of a value of this plugin (``{"version": 1}`` alone when not described).

    Raises:
      ValueError: the content is not this format, or of a newer version than this reader.
    """
    try:
        content = json.loads(metadata.plugin_data.content.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"plugin {PLUGIN_NAME}: unreadable summary metadata ({e})") from None
    if not isinstance(content, dict) or content.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"plugin {PLUGIN_NAME}: summary format {content!r:.60} is newer than this reader; "
                         "upgrade multilabel-trainer")
    return content
