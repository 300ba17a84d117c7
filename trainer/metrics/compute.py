"""Metric values from accumulated metric state: pure NumPy, no TensorFlow import.

The state comes from :func:`trainer.metrics.state.batch_metric_state` summed over replicas and batches
(keys documented there). Everything here is a pure function of that state, so summaries, ``evaluate`` and
threshold tuning read the same numbers and the tests can compare them with scikit-learn.

Conventions (undefined is NaN, never 0 or 1, and NaN labels are left out of macro means):

* ``roc_auc``: NaN when a label has no positives or no negatives in the evaluated data.
* ``pr_auc`` (average precision): NaN when a label has no positives.
* ``precision``: NaN when nothing was predicted (tp + fp == 0).
* ``recall``: NaN when the label has no positives.
* ``f1`` = 2tp / (2tp + fp + fn): NaN only when there are no positives *and* no predictions; a label with
  no positives but false positives has F1 = 0 (sklearn's ``f1_score(..., zero_division=np.nan)``).
* AUCs come from the threshold histograms, whose K bins are (nearly) equal width in log-odds
  (:mod:`trainer.metrics.bins`), so rare labels, whose probabilities lie far below 1/K, are resolved as well
  as frequent ones. The histograms keep the order of the bins but not the order inside a bin, so both AUCs
  are what the scores give when the scores inside each bin are in random order: ROC-AUC is the trapezoid
  over the K+1 bin edges (the exact expected ROC-AUC over those orders, and sklearn's value exactly when the
  scores inside each bin are tied); PR-AUC is average precision ``sum over positives of precision / P``
  with the precision of the i-th of a bin's m positives taken at the expected number of the bin's n negatives
  ranked before it, ``i n / (m + 1)`` (sklearn's value exactly when no bin holds both positives and
  negatives; sklearn's own rule for tied scores, all of a bin's negatives before its positives, would bias
  every binned AP downwards). Either differs from the exact value by at most the bounds of
  :func:`histogram_auc_error_bounds`, reported as ``macro_roc_auc_bin_error`` and ``macro_pr_auc_bin_error``.
* Micro AUCs use the histograms summed over labels (sklearn's ``average="micro"``).
* Ranking metrics (P@k, nDCG@k, LRAP) are means over examples; examples without positives contribute 0
  to P@k and nDCG@k and 1 to LRAP (sklearn's conventions).
* Propensity-scored PSP@k and PSnDCG@k (Jain, Prabhu and Varma, KDD 2016) weight a hit on label l by its
  inverse propensity ``1/p_l`` (:func:`inverse_propensity`, from the training label counts), so a hit on
  a rare label counts more. Normalised as in the Extreme Classification Repository's code and pyxclib
  (``xclib.evaluation.xc_metrics``): PSP@k is the sum over examples of weighted hits in the top k divided
  by the sum over examples of the best weighted hits k predictions could get (the example's positives of
  largest 1/p first), a ratio of two sums, not a mean of ratios; PSnDCG@k likewise, with each example's
  DCG divided by its ideal (unweighted) DCG as in nDCG. 1 means the rarest true labels ranked first.

Head / torso / tail buckets (:func:`assign_buckets`) use the *training* label counts: labels sorted by
count, most frequent first; a label is ``head`` while the share of all training positives held by the
more frequent labels is below ``bucket_edges[0]`` (default 0.5), ``torso`` while below
``bucket_edges[1]`` (0.9), else ``tail``. So head is the few labels carrying the first half of the
positives and tail the many rare labels carrying the last 10%.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Mapping, Sequence

import numpy as np

from trainer.metrics import bins

#: The k of every ranking metric (precision@k, ndcg@k, psp@k, psndcg@k).
TOP_K = (1, 3, 5)
#: The fewest histogram bins a state has (trainer.metrics.state.histogram_bins).
MIN_BINS = 10
#: The aggregates that grow as the model gets better (what early stopping may maximise), in report order.
MAXIMISED_AGGREGATES = (
    tuple(f"{name}@{k}" for name in ("precision", "ndcg", "psp", "psndcg") for k in TOP_K)
    + ("micro_precision", "micro_recall", "micro_f1", "macro_precision", "macro_recall", "macro_f1",
       "macro_roc_auc", "macro_pr_auc", "micro_roc_auc", "micro_pr_auc", "subset_accuracy", "lrap")
)
#: Every aggregate of compute_metrics besides the ``bucket/...`` ones.
AGGREGATES = MAXIMISED_AGGREGATES + ("hamming_loss", "macro_roc_auc_bin_error", "macro_pr_auc_bin_error",
                                     "num_examples", "num_labels", "num_labels_with_support")
#: Propensity model parameters (A, B) used in the literature for known datasets (Jain et al. 2016 and the
#: Extreme Classification Repository); metrics.propensity_a / propensity_b default to the general 0.55, 1.5.
PROPENSITY_PARAMETERS = {"default": (0.55, 1.5), "wikipedia-lshtc": (0.5, 0.4), "amazon": (0.6, 2.6)}

BUCKETS = ("head", "torso", "tail")
_PER_LABEL_COLUMNS = ("support", "roc_auc", "pr_auc", "precision", "recall", "f1", "threshold")


@dataclasses.dataclass
class MetricsResult:
    """Metric values computed from one accumulated state.

    Attributes:
      aggregates: ``{name: float}``; see :func:`compute_metrics` for the keys.
      per_label: ``{name: float64 array [L]}`` with ``roc_auc``, ``pr_auc``, ``precision``,
        ``recall``, ``f1``, ``support``, ``pred_pos_rate``, ``threshold``, ``train_count`` (NaN
        without training counts).
      label_names: the label names, in state order.
      buckets: ``[L]`` array of ``head``/``torso``/``tail`` or None without training counts.
      pos_hist, neg_hist: the ``[L, K]`` histograms the values came from (references, not
        copies), kept so that PR curves can be drawn from the result alone.
    """

    aggregates: dict[str, float]
    per_label: dict[str, np.ndarray]
    label_names: list[str]
    buckets: np.ndarray | None = None
    pos_hist: np.ndarray | None = dataclasses.field(default=None, repr=False)
    neg_hist: np.ndarray | None = dataclasses.field(default=None, repr=False)


def _divide(num, den):
    """num / den with NaN where den == 0 (the 'undefined' convention)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanmean(x) -> float:
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def _cumulative_counts(pos_hist, neg_hist):
    """tp/fp at the bin-edge thresholds, thresholds *descending*.

    Column i (i = 0..K) is the edge ``bin_edges(K)[K - i]``: i=0 predicts nothing, i=K predicts everything.
    """
    tp = bins.counts_at_edges(np.atleast_2d(pos_hist))[:, ::-1]
    fp = bins.counts_at_edges(np.atleast_2d(neg_hist))[:, ::-1]
    return tp, fp


def _digamma_difference(a, b):
    """psi(a) - psi(b) for a >= b >= 1 (arrays), accurate to about 1e-12 relative also when a - b is small:
    the recurrence psi(x) = psi(x + 1) - 1/x lifts b to 10, then the asymptotic series, written as differences."""
    a, b = np.array(a, np.float64), np.array(b, np.float64)
    total = np.zeros(np.broadcast(a, b).shape)
    for _ in range(10):
        low = b < 10.0
        total += np.where(low, (a - b) / (a * b), 0.0)
        a, b = np.where(low, a + 1.0, a), np.where(low, b + 1.0, b)
    d = a - b
    total += np.log1p(d / b) + d / (2 * a * b) + d * (a + b) / (12 * a**2 * b**2)
    return total + (a**-4 - b**-4) / 120 - (a**-6 - b**-6) / 252 + (a**-8 - b**-8) / 240


def _average_precision(pos_hist, neg_hist):
    """Average precision per row, the scores inside each bin in random order (see the module doc).

    Per bin (from the highest): with T0 positives and F0 negatives above it, m positives and n negatives
    in it, the i-th positive counts precision ``(T0 + i) / (T0 + F0 + i s)``, ``s = 1 + n / (m + 1)``; the
    sum over i = 1..m is ``m / s + (s T0 - c) / s**2 * (psi(x + m + 1) - psi(x + 1))`` with ``c = T0 + F0``,
    ``x = c / s``, which also holds for fractional (weighted) counts. Only bins holding positives are visited.
    """
    pos, neg = np.atleast_2d(pos_hist)[:, ::-1], np.atleast_2d(neg_hist)[:, ::-1]
    t0, f0 = np.cumsum(pos, axis=1) - pos, np.cumsum(neg, axis=1) - neg
    rows, cols = np.nonzero(pos > 0)
    m, n, t0, c = pos[rows, cols], neg[rows, cols], t0[rows, cols], t0[rows, cols] + f0[rows, cols]
    s = 1.0 + n / (m + 1.0)
    x = c / s
    in_bin = m / s + (s * t0 - c) / s**2 * _digamma_difference(x + m + 1.0, x + 1.0)
    n_pos = pos.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(rows, weights=in_bin, minlength=pos.shape[0]) / n_pos


def histogram_auc(pos_hist, neg_hist) -> tuple[np.ndarray, np.ndarray]:
    """ROC-AUC and average precision per row of the histograms (see the module doc for how).

    Args:
      pos_hist: ``[L, K]`` (or ``[K]``) positive counts per bin.
      neg_hist: ``[L, K]`` (or ``[K]``) negative counts per bin.

    Returns:
      ``(roc_auc [L], pr_auc [L])``; NaN where undefined (see module doc).
    """
    tp, fp = _cumulative_counts(pos_hist, neg_hist)
    n_pos, n_neg = tp[:, -1:], fp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, fpr = tp / n_pos, fp / n_neg
        roc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2.0, axis=1)
    ap = _average_precision(pos_hist, neg_hist)
    roc = np.where((n_pos[:, 0] > 0) & (n_neg[:, 0] > 0), roc, np.nan)
    ap = np.where(n_pos[:, 0] > 0, ap, np.nan)
    return roc, ap


def histogram_auc_error_bounds(pos_hist, neg_hist) -> tuple[np.ndarray, np.ndarray]:
    """Per-row bounds on |histogram AUC - exact AUC| over every way the scores could lie inside their bins.

    ROC-AUC: the trapezoid scores each (positive, negative) pair sharing a bin 1/2 where the exact value is
    0 or 1, so the error is at most ``sum_k pos_k neg_k / (2 P N)``. Average precision: a positive in bin k
    (T0 positives and F0 negatives in the bins above) has exact precision between
    ``(T0+1)/(T0+1+F0+neg_k)`` and ``(T0+pos_k)/(T0+pos_k+F0)``, and the histogram's value for it lies in
    that range too, so the error is at most ``sum_k pos_k (hi_k - lo_k) / P``.

    Returns:
      ``(roc_bound [L], ap_bound [L])``, NaN where the AUC itself is undefined.
    """
    pos_hist, neg_hist = np.atleast_2d(pos_hist), np.atleast_2d(neg_hist)
    n_pos, n_neg = pos_hist.sum(1), neg_hist.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        roc = np.where((n_pos > 0) & (n_neg > 0), 0.5 * np.sum(pos_hist * neg_hist, axis=1) / (n_pos * n_neg), np.nan)
        # Bins from the highest probabilities down; T0, F0: counts in the bins above.
        pos, neg = pos_hist[:, ::-1], neg_hist[:, ::-1]
        t0, f0 = np.cumsum(pos, axis=1) - pos, np.cumsum(neg, axis=1) - neg
        hi = np.where(pos > 0, (t0 + pos) / np.maximum(t0 + pos + f0, 1e-300), 0.0)
        lo = np.where(pos > 0, (t0 + 1) / (t0 + 1 + f0 + neg), 0.0)
        ap = np.where(n_pos > 0, np.sum(pos * (hi - lo), axis=1) / n_pos, np.nan)
    return roc, ap


def inverse_propensity(label_counts, num_examples: int, a: float = 0.55, b: float = 1.5) -> np.ndarray:
    """Inverse propensities ``1/p_l = 1 + C (N_l + B)^-A`` with ``C = (ln N - 1)(B + 1)^A`` (Jain et al. 2016).

    Args:
      label_counts: ``[L]`` training positives N_l per label.
      num_examples: N, the number of training examples.
      a, b: the model's A and B (see PROPENSITY_PARAMETERS).

    Returns:
      float64 ``[L]``, >= 1; largest for the labels never seen in training.
    """
    counts = np.asarray(label_counts, np.float64)
    c = (np.log(num_examples) - 1.0) * (b + 1.0) ** a
    return 1.0 + c * (counts + b) ** -a


def assign_buckets(train_label_counts, bucket_edges: Sequence[float] = (0.5, 0.9)) -> np.ndarray:
    """Head / torso / tail bucket per label from training label counts.

    Args:
      train_label_counts: ``[L]`` positives per label in the training set.
      bucket_edges: two increasing cumulative-share edges (see module doc).

    Returns:
      ``[L]`` array of ``"head"``, ``"torso"`` or ``"tail"``.
    """
    counts = np.asarray(train_label_counts, np.float64)
    lo, hi = bucket_edges
    if not 0.0 < lo < hi <= 1.0:
        raise ValueError(f"bucket_edges must satisfy 0 < lo < hi <= 1, got {bucket_edges}")
    order = np.argsort(-counts, kind="stable")  # most frequent first, ties by index
    total = counts.sum()
    share_before = np.zeros(len(counts))
    if total > 0:
        share_before[order] = (np.cumsum(counts[order]) - counts[order]) / total
    else:
        share_before[:] = 1.0
    buckets = np.where(share_before < lo, "head", np.where(share_before < hi, "torso", "tail"))
    buckets[counts <= 0] = "tail"  # never seen in training: rare by definition
    return buckets.astype(object)


def compute_metrics(
    state: Mapping[str, np.ndarray],
    label_names: Sequence[str],
    thresholds,
    train_label_counts=None,
    bucket_edges: Sequence[float] = (0.5, 0.9),
) -> MetricsResult:
    """All metric values from an accumulated state.

    Args:
      state: accumulated state (host-side float64 arrays; see ``state.STATE_KEYS``).
      label_names: ``L`` label names, in the order of the state's label axis.
      thresholds: ``[L]`` decision thresholds the state's tp/fp/fn were counted at.
      train_label_counts: optional ``[L]`` training positives per label; enables the
        ``bucket/<head|torso|tail>/...`` aggregates. Without it no bucket keys are added.
      bucket_edges: cumulative-share edges for :func:`assign_buckets`.

    Returns:
      A :class:`MetricsResult`. ``aggregates`` keys: :data:`AGGREGATES`, and with training counts per
      bucket ``bucket/<b>/{macro_f1,macro_roc_auc,macro_pr_auc,num_labels}``. PSP@k and PSnDCG@k are NaN
      when the state was computed without inverse propensities.
    """
    label_names = [str(n) for n in label_names]
    num_labels = len(label_names)
    pos_hist = np.asarray(state["pos_hist"], np.float64)
    neg_hist = np.asarray(state["neg_hist"], np.float64)
    if pos_hist.shape[0] != num_labels:
        raise ValueError(f"state has {pos_hist.shape[0]} labels but {num_labels} label names")
    thresholds = np.broadcast_to(np.asarray(thresholds, np.float64), (num_labels,)).copy()
    tp, fp, fn = (np.asarray(state[k], np.float64) for k in ("tp", "fp", "fn"))
    support = np.asarray(state["support"], np.float64)
    n = float(state["num_examples"])

    roc, ap = histogram_auc(pos_hist, neg_hist)
    roc_error, ap_error = histogram_auc_error_bounds(pos_hist, neg_hist)
    per_label = {
        "roc_auc": roc,
        "pr_auc": ap,
        "precision": _divide(tp, tp + fp),
        "recall": _divide(tp, tp + fn),
        "f1": _divide(2 * tp, 2 * tp + fp + fn),
        "support": support,
        "pred_pos_rate": _divide(np.asarray(state["pred_pos"], np.float64), np.full(num_labels, n)),
        "threshold": thresholds,
        "train_count": np.full(num_labels, np.nan) if train_label_counts is None
        else np.asarray(train_label_counts, np.float64).reshape(-1),
    }
    micro_roc, micro_ap = histogram_auc(pos_hist.sum(0), neg_hist.sum(0))
    stp, sfp, sfn = tp.sum(), fp.sum(), fn.sum()
    agg: dict[str, float] = {}
    for name, numerator, denominator in (("precision", "p_at", None), ("ndcg", "ndcg_at", None),
                                         ("psp", "psp_at", "psp_best_at"), ("psndcg", "psndcg_at", "psndcg_best_at")):
        for k in TOP_K:
            total = n if denominator is None else state[f"{denominator}_{k}"]
            agg[f"{name}@{k}"] = float(_divide(state[f"{numerator}_{k}"], total))
    agg.update(
        micro_precision=float(_divide(stp, stp + sfp)),
        micro_recall=float(_divide(stp, stp + sfn)),
        micro_f1=float(_divide(2 * stp, 2 * stp + sfp + sfn)),
        macro_f1=_nanmean(per_label["f1"]),
        macro_precision=_nanmean(per_label["precision"]),
        macro_recall=_nanmean(per_label["recall"]),
        macro_roc_auc=_nanmean(roc),
        macro_pr_auc=_nanmean(ap),
        macro_roc_auc_bin_error=_nanmean(roc_error),
        macro_pr_auc_bin_error=_nanmean(ap_error),
        micro_roc_auc=float(micro_roc[0]),
        micro_pr_auc=float(micro_ap[0]),
        hamming_loss=float(_divide(sfp + sfn, n * num_labels)),
        subset_accuracy=float(_divide(state["subset_correct"], n)),
        lrap=float(_divide(state["lrap_sum"], state["lrap_count"])),
        num_examples=n,
        num_labels=float(num_labels),
        num_labels_with_support=float(np.sum(support > 0)),
    )
    buckets = None
    if train_label_counts is not None:
        if len(train_label_counts) != num_labels:
            raise ValueError(f"train_label_counts has {len(train_label_counts)} entries, expected {num_labels}")
        buckets = assign_buckets(train_label_counts, bucket_edges)
        for b in BUCKETS:
            sel = buckets == b
            agg[f"bucket/{b}/num_labels"] = float(sel.sum())
            agg[f"bucket/{b}/macro_f1"] = _nanmean(per_label["f1"][sel])
            agg[f"bucket/{b}/macro_roc_auc"] = _nanmean(roc[sel])
            agg[f"bucket/{b}/macro_pr_auc"] = _nanmean(ap[sel])
    return MetricsResult(agg, per_label, label_names, buckets, pos_hist, neg_hist)


def tune_thresholds(state: Mapping[str, np.ndarray], min_positives: int = 5, default: float = 0.5,
                    min_gain: float = 0.2) -> np.ndarray:
    """Per-label F1-optimal decision thresholds from the validation histograms.

    Candidates are the bin edges ``e_j = bins.bin_edges(K)[j]`` for j = 0..K-1 (``prob >= e_j`` predicts
    the bins ``>= j``, exactly, on the float32 probabilities the export thresholds), so the F1 a threshold
    gets on the validation histograms is the F1 it gives applied to the same scores.  When several edges
    reach the best F1 (empty bins make plateaus), the middle edge of the first best run is taken (about the
    middle in log-odds: the point farthest from both neighbouring populations, which generalises better than
    the plateau's end).

    A label keeps ``default`` too unless its best F1 closes at least ``min_gain`` of the gap between
    the F1 of predicting *every* example positive (``2p/(1+p)`` for prevalence p, what F1 gives a
    label the model has not learnt) and a perfect 1. Without that rule an unlearnt rare label gets a
    threshold near 0 (its F1 optimum over noise is "almost always yes") and switches itself on for
    most examples; with a few hundred such labels micro precision falls to the label density
    (bench/README.md, "Metric state").

    Args:
      state: accumulated state with ``pos_hist`` and ``neg_hist``.
      min_positives: labels with fewer validation positives keep ``default`` (an F1
        optimum over a handful of positives is noise).
      default: threshold for those labels and for labels tuning cannot help.
      min_gain: the fraction of the gap from the "always yes" F1 to 1 the tuned F1 must close.

    Returns:
      float64 ``[L]`` thresholds.
    """
    pos_hist = np.asarray(state["pos_hist"], np.float64)
    neg_hist = np.asarray(state["neg_hist"], np.float64)
    num_bins = pos_hist.shape[1]
    edges = bins.bin_edges(num_bins)
    tp, fp = _cumulative_counts(pos_hist, neg_hist)
    tp, fp = tp[:, 1:][:, ::-1], fp[:, 1:][:, ::-1]  # column j = threshold edges[j], j=0..K-1
    n_pos = pos_hist.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp > 0, 2 * tp / (tp + fp + n_pos), 0.0)
    out = np.full(pos_hist.shape[0], float(default))
    for i in np.flatnonzero(n_pos[:, 0] >= max(min_positives, 1)):
        row = f1[i]
        always_yes = row[0]  # threshold 0: every example predicted positive
        if row.max() < always_yes + min_gain * (1.0 - always_yes):
            continue  # no better than "always yes" by enough to be skill rather than noise
        best = np.isclose(row, row.max(), rtol=1e-12, atol=0.0)
        start = int(np.argmax(best))
        stop = start + int(np.argmin(best[start:])) if not best[start:].all() else num_bins
        out[i] = edges[(start + stop - 1) // 2]
    return out


def save_thresholds(path: str | os.PathLike, thresholds, label_names: Sequence[str]) -> None:
    """Writes ``{label_name: threshold}`` as JSON (label order kept).

    Args:
      path: output file.
      thresholds: ``[L]`` thresholds.
      label_names: ``L`` unique label names.
    """
    thresholds = np.asarray(thresholds, np.float64).reshape(-1)
    names = [str(n) for n in label_names]
    if len(names) != len(thresholds) or len(set(names)) != len(names):
        raise ValueError(f"{path}: need one threshold per unique label name ({len(thresholds)} vs {len(names)} names)")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({n: float(t) for n, t in zip(names, thresholds)}, f, indent=1)


def load_thresholds(path: str | os.PathLike, label_names: Sequence[str] | None = None) -> np.ndarray:
    """Reads a thresholds file written by :func:`save_thresholds`.

    Args:
      path: JSON file ``{label_name: threshold}``.
      label_names: if given, the result is ordered like it and the file must hold exactly
        these labels; otherwise the file's order is used.

    Returns:
      float64 ``[L]`` thresholds.

    Raises:
      ValueError: naming the file, when it is not such a mapping, a value is not a number
        in [0, 1], or its labels differ from ``label_names``.
    """
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{label_name: threshold}}")
    for name, t in data.items():
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ValueError(f"{path}: threshold for label {name!r} must be a number in [0, 1], got {t!r}")
    if label_names is None:
        return np.array(list(data.values()), np.float64)
    names = [str(n) for n in label_names]
    missing = [n for n in names if n not in data]
    extra = sorted(set(data) - set(names))
    if missing or extra:
        raise ValueError(
            f"{path}: thresholds do not match the model's labels: {len(missing)} missing "
            f"(e.g. {missing[:5]}), {len(extra)} unknown (e.g. {extra[:5]})"
        )
    return np.array([data[n] for n in names], np.float64)


def per_label_csv(result: MetricsResult, label_names: Sequence[str] | None, path: str | os.PathLike) -> None:
    """Writes one CSV row per label: label, support, roc_auc, pr_auc, precision, recall,
    f1, threshold (NaN written as empty cells so spreadsheets read them as missing).

    Args:
      result: output of :func:`compute_metrics`.
      label_names: label names; None uses ``result.label_names``.
      path: output file.
    """
    names = list(result.label_names if label_names is None else label_names)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("label",) + _PER_LABEL_COLUMNS)
        for i, name in enumerate(names):
            vals = [result.per_label[c][i] for c in _PER_LABEL_COLUMNS]
            w.writerow([name] + ["" if np.isnan(v) else f"{v:.6g}" for v in vals])


def worst_labels(result: MetricsResult, k: int = 10, min_support: float = 0) -> np.ndarray:
    """Indices of the k labels with the lowest PR-AUC among labels with positives (and at least
    ``min_support`` of them: a PR-AUC over a handful of positives is mostly noise)."""
    ap = result.per_label["pr_auc"]
    idx = np.flatnonzero(~np.isnan(ap) & (result.per_label["support"] >= min_support))
    return idx[np.argsort(ap[idx], kind="stable")][:k]


def format_table(result: MetricsResult, k: int = 10) -> str:
    """A short text report: aggregates, then the k worst labels by PR-AUC.

    Args:
      result: output of :func:`compute_metrics`.
      k: number of worst labels listed.

    Returns:
      A multi-line string.
    """
    lines = ["metric                          value"]
    for name in sorted(result.aggregates):
        lines.append(f"{name:<30s}  {result.aggregates[name]:.4f}")
    lines.append("")
    lines.append(f"worst {k} labels by pr_auc")
    header = f"{'label':<30s} {'support':>8s} {'pr_auc':>7s} {'roc_auc':>7s} {'f1':>7s} {'thresh':>7s}"
    lines.append(header)
    pl = result.per_label
    for i in worst_labels(result, k):
        name = result.label_names[i]
        name = name if len(name) <= 30 else name[:27] + "..."
        lines.append(
            f"{name:<30s} {pl['support'][i]:>8.0f} {pl['pr_auc'][i]:>7.4f} {pl['roc_auc'][i]:>7.4f} "
            f"{pl['f1'][i]:>7.4f} {pl['threshold'][i]:>7.3f}"
        )
    return "\n".join(lines)
