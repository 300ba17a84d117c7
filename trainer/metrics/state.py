"""Per-batch metric state: additive sums computed in the TF graph, inside the eval step.

Every entry of :func:`batch_metric_state` is a sum over the (weighted) examples of a batch, so the backend
sums it across replicas and workers and the host adds batches with :func:`accumulate`, in any order. The
pure functions of :mod:`trainer.metrics.compute` turn the accumulated state into values.

=======================  ======  ==========================================================================
key                      shape   sum over the examples of
=======================  ======  ==========================================================================
``pos_hist``             [L, K]  positives whose probability falls in bin k (``edges[k] <= p < edges[k+1]``)
``neg_hist``             [L, K]  negatives whose probability falls in bin k
``tp`` ``fp`` ``fn``     [L]     true / false positives, false negatives at the decision thresholds
``support``              [L]     positives
``pred_pos``             [L]     predicted positives (``prob >= threshold``)
``num_examples``         []      examples (weights; padding rows weigh 0)
``p_at_{k}``             []      precision@k, k in TOP_K (hits in the top k / k)
``ndcg_at_{k}``          []      nDCG@k with binary relevance
``psp_at_{k}``           []      propensity-weighted hits in the top k (PSP@k's numerator)
``psp_best_at_{k}``      []      the largest propensity-weighted hits k predictions can get (denominator)
``psndcg_at_{k}``        []      propensity-weighted DCG@k / ideal DCG@k (PSnDCG@k's numerator)
``psndcg_best_at_{k}``   []      the same for the best ranking of the example's positives (denominator)
``subset_correct``       []      examples whose predicted label set equals the true set
``lrap_sum``             []      label ranking average precision (sklearn's definition)
``lrap_count``           []      examples in ``lrap_sum``
=======================  ======  ==========================================================================

Everything is float64: counts stay exact to 2**53 (float32 stops at 2**24, which one histogram bin of a
frequent label passes within an epoch of a large dataset), and one dtype lets a backend reduce the whole
state at once. Inside a batch the arithmetic is float32 and cast once at the end.

The bin edges are ``bins.bin_edges(K)``, nearly equal width in log-odds (see :mod:`trainer.metrics.bins` for
the scale and why); :func:`_bin_index` finds a probability's bin exactly, in integer arithmetic on its float32
bits, so the histograms agree with ``prob >= edge`` on the same float32 probabilities.

Memory: the histograms are 2·L·K float64, so K comes from :func:`histogram_bins`, which lowers it below
``metrics.num_bins`` when the state would outgrow ``metrics.histogram_budget_mib``. The batch computation
is O(B·L) in time and memory besides the histograms' O(L·K) (no sort over the labels; see
:func:`_lrap_per_example`).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import tensorflow as tf

from trainer.metrics import bins
from trainer.metrics.compute import MIN_BINS, TOP_K

_RANKING_SUMS = ("p_at", "ndcg_at", "psp_at", "psp_best_at", "psndcg_at", "psndcg_best_at")
_SCALAR_KEYS = (
    ("num_examples",)
    + tuple(f"{name}_{k}" for name in _RANKING_SUMS for k in TOP_K)
    + ("subset_correct", "lrap_sum", "lrap_count")
)
_LABEL_KEYS = ("tp", "fp", "fn", "support", "pred_pos")
_HIST_KEYS = ("pos_hist", "neg_hist")

#: Every key of the state dict, in a fixed order (useful for building tf.Variables).
STATE_KEYS = _HIST_KEYS + _LABEL_KEYS + _SCALAR_KEYS


def state_shapes(num_labels: int, num_bins: int) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of every state entry for L = ``num_labels`` and K = ``num_bins``."""
    shapes: dict[str, tuple[int, ...]] = {k: (num_labels, num_bins) for k in _HIST_KEYS}
    shapes.update({k: (num_labels,) for k in _LABEL_KEYS})
    shapes.update({k: () for k in _SCALAR_KEYS})
    return shapes


def state_bytes(num_labels: int, num_bins: int) -> int:
    """Bytes of one state (float64 entries): what each replica returns per eval step and the host keeps."""
    return 8 * sum(int(np.prod(s)) for s in state_shapes(num_labels, num_bins).values())


def histogram_bins(num_labels: int, max_bins: int, budget_mib: float) -> int:
    """K: ``max_bins``, or the most bins that keep the state within ``budget_mib`` MiB (never below MIN_BINS).

    Fewer bins coarsen only the AUCs and threshold tuning (their error is bounded by
    compute.histogram_auc_error_bounds); everything else in the state is exact.
    """
    budget = budget_mib * 2**20 - state_bytes(num_labels, 0)
    return int(max(MIN_BINS, min(max_bins, budget // (len(_HIST_KEYS) * 8 * num_labels))))


def zero_state(num_labels: int, num_bins: int) -> dict[str, np.ndarray]:
    """An all-zero host-side state (float64), the start value for :func:`accumulate`."""
    return {k: np.zeros(s, np.float64) for k, s in state_shapes(num_labels, num_bins).items()}


def accumulate(acc: Mapping[str, np.ndarray], new: Mapping[str, object]) -> dict[str, np.ndarray]:
    """``{key: acc[key] + new[key]}`` in float64 (``acc`` is not modified; tensors are converted).

    Raises:
      ValueError: when the keys or shapes differ (e.g. a state built for another label count), instead of
        silently broadcasting.
    """
    if set(acc) != set(new):
        raise ValueError(
            f"metric state keys differ: missing {sorted(set(acc) - set(new))}, "
            f"unexpected {sorted(set(new) - set(acc))}"
        )
    out = {}
    for key, value in acc.items():
        add = np.asarray(new[key], dtype=np.float64)
        if add.shape != np.shape(value):
            raise ValueError(f"metric state {key!r}: shape {add.shape} != {np.shape(value)}")
        out[key] = np.asarray(value, np.float64) + add
    return out


def batch_metric_state(labels, probs, thresholds, num_bins: int, weights=None,
                       inv_propensity=None) -> dict[str, tf.Tensor]:
    """Additive metric state of one (per-replica) batch.

    Args:
      labels: ``[B, L]`` multi-hot labels (``>= 0.5`` counts as positive, so smoothed targets work).
      probs: ``[B, L]`` predicted probabilities in ``[0, 1]``; L must be static (it sizes the state).
      thresholds: ``[L]`` decision thresholds; a label is predicted when ``prob >= threshold``.
      num_bins: K, the number of histogram bins (a Python int, at least 3; edges ``bins.bin_edges(K)``).
      weights: optional ``[B]`` example weights, normally a 0/1 mask of padding rows; every entry is a
        weighted sum, so fractional weights act like sklearn's ``sample_weight``.
      inv_propensity: optional ``[L]`` inverse propensities of the labels
        (compute.inverse_propensity); without them the propensity-scored sums are 0.

    Returns:
      ``{key: tf.float64 tensor}`` for the keys in :data:`STATE_KEYS` (see the module doc).
    """
    probs = tf.convert_to_tensor(probs)
    num_labels = probs.shape[-1]
    if num_labels is None:
        raise ValueError("batch_metric_state needs a static number of labels (probs.shape[-1])")
    probs = tf.cast(probs, tf.float32)
    is_pos = tf.cast(labels, tf.float32) >= 0.5
    pos = tf.cast(is_pos, tf.float32)
    w = tf.ones([tf.shape(probs)[0]]) if weights is None else tf.reshape(tf.cast(weights, tf.float32), [-1])
    w_col = w[:, None]

    out = _histograms(probs, is_pos, w_col, num_labels, num_bins)
    pred = tf.cast(probs >= tf.reshape(tf.cast(thresholds, tf.float32), [1, num_labels]), tf.float32)
    out["tp"] = tf.reduce_sum(pred * pos * w_col, axis=0)
    out["fp"] = tf.reduce_sum(pred * (1.0 - pos) * w_col, axis=0)
    out["fn"] = tf.reduce_sum((1.0 - pred) * pos * w_col, axis=0)
    out["support"] = tf.reduce_sum(pos * w_col, axis=0)
    out["pred_pos"] = tf.reduce_sum(pred * w_col, axis=0)
    out["num_examples"] = tf.reduce_sum(w)
    exact = tf.reduce_all(tf.equal(pred, pos), axis=1)
    out["subset_correct"] = tf.reduce_sum(tf.cast(exact, tf.float32) * w)

    num_pos = tf.reduce_sum(pos, axis=1)
    out.update(_top_k_sums(pos, probs, num_pos, w, num_labels, inv_propensity))
    out["lrap_sum"] = tf.reduce_sum(_lrap_per_example(is_pos, probs, num_pos, num_labels) * w)
    out["lrap_count"] = tf.reduce_sum(w)
    return {k: tf.cast(out[k], tf.float64) for k in STATE_KEYS}


@tf.function(jit_compile=True, reduce_retracing=True)
def _bin_index(probs, num_bins: int):
    """The bin of each float32 probability: the number of interior edges of ``bins.bin_edges(K)`` at or below
    it. Exact: the key of the probability (from its bits, see :mod:`trainer.metrics.bins`) and an integer division,
    without a search over the edges or a logarithm. NaN and negative zero go to bin 0. Compiled with XLA so
    that its element-wise steps run as one pass over the [B, L] probabilities."""
    below_half = tf.bitcast(probs, tf.int32)
    from_half = bins.TOP_KEY - tf.bitcast(1.0 - probs, tf.int32)
    key = tf.cast(tf.where(probs < 0.5, below_half, from_half), tf.int64) - bins.LOW_KEY
    index = tf.clip_by_value(tf.math.floordiv(key * (num_bins - 2), bins.KEY_RANGE) + 1, 0, num_bins - 1)
    return tf.cast(tf.where(tf.math.is_nan(probs), tf.zeros_like(index), index), tf.int32)  # NaN of either sign


def _histograms(probs, is_pos, w_col, num_labels, num_bins):
    """Both histograms in one scatter over 2·L·K segments (id = is_pos·L·K + label·K + bin).

    A one_hot/einsum version materialises [B, L, K] and is hundreds of times slower.
    """
    seg = _bin_index(probs, num_bins) + tf.range(num_labels, dtype=tf.int32)[None, :] * num_bins
    seg += tf.cast(is_pos, tf.int32) * (num_labels * num_bins)
    data = tf.broadcast_to(w_col, tf.shape(probs))
    hist = tf.math.unsorted_segment_sum(tf.reshape(data, [-1]), tf.reshape(seg, [-1]), 2 * num_labels * num_bins)
    hist = tf.reshape(hist, [2, num_labels, num_bins])
    return {"pos_hist": hist[1], "neg_hist": hist[0]}


def _top_k_sums(pos, probs, num_pos, w, num_labels, inv_propensity):
    """Weighted sums of P@k, nDCG@k and the numerators and denominators of PSP@k and PSnDCG@k.

    P@k = (positives among the k highest scores) / k, the divisor k even with fewer than k labels (XMC
    convention). nDCG@k = sum_{r<k} rel_r / log2(r+2) over the ideal DCG of min(k, #positives) ones; 0 for
    an example without positives (as sklearn's ndcg_score). The propensity-scored sums follow pyxclib
    (compute.py): hits weighted by 1/p_label, and the same for the ranking that puts the example's positives
    of largest 1/p first. Score ties are broken by label index (tf.math.top_k puts lower indices first).
    """
    k_max = min(max(TOP_K), num_labels)
    _, idx = tf.math.top_k(probs, k=k_max, sorted=True)
    rel = tf.gather(pos, idx, batch_dims=1)  # [B, k_max] relevance in rank order
    discount = 1.0 / (tf.math.log(tf.range(k_max, dtype=tf.float32) + 2.0) / np.log(2.0))
    # ideal_dcg_table[n] = DCG of n relevant items at the top (n = 0..k_max).
    ideal_dcg_table = tf.concat([tf.zeros([1]), tf.cumsum(discount)], axis=0)
    if inv_propensity is None:
        weighted = best = tf.zeros_like(rel)
    else:
        inv_p = tf.cast(tf.reshape(inv_propensity, [num_labels]), tf.float32)
        weighted = rel * tf.gather(inv_p, idx)
        best, _ = tf.math.top_k(pos * inv_p[None, :], k=k_max, sorted=True)
    gains = {"p_at": rel, "psp_at": weighted, "psp_best_at": best}
    cum = {name: tf.cumsum(g, axis=1) for name, g in gains.items()}
    dcg = {name: tf.cumsum(g * discount[None, :], axis=1)
           for name, g in (("ndcg_at", rel), ("psndcg_at", weighted), ("psndcg_best_at", best))}
    sums = {}
    for k in TOP_K:
        kk = min(k, num_labels)
        ideal = tf.gather(ideal_dcg_table, tf.cast(tf.minimum(num_pos, float(kk)), tf.int32))
        sums[f"p_at_{k}"] = tf.reduce_sum(cum["p_at"][:, kk - 1] / float(k) * w)
        for name in ("psp_at", "psp_best_at"):
            sums[f"{name}_{k}"] = tf.reduce_sum(cum[name][:, kk - 1] * w)
        for name, value in dcg.items():
            sums[f"{name}_{k}"] = tf.reduce_sum(tf.math.divide_no_nan(value[:, kk - 1], ideal) * w)
    return sums


def _lrap_per_example(is_pos, probs, num_pos, num_labels):
    """Label ranking average precision per example, exactly as sklearn defines it, without sorting L scores.

    For a relevant label j: rank_j = #{l : s_l >= s_j} and L_j = #{relevant l : s_l >= s_j}; the example
    scores mean_j(L_j / rank_j), and 1 when it has no or only relevant labels. With q_1 <= ... <= q_P the
    example's positive scores and c_l = #{i : q_i <= s_l}, s_l >= q_j exactly when c_l >= j, so
    rank_j = #{l : c_l >= j}: one binary search per label into the P positive scores and a per-row count,
    O(B·L·log P) time and O(B·L) memory, where a full sort costs O(B·L·log L) and several [B, L] buffers.
    """
    batch = tf.shape(probs, out_type=tf.int64)[0]
    where = tf.where(is_pos)
    positive_scores = tf.RaggedTensor.from_value_rowids(tf.gather_nd(probs, where), where[:, 0], nrows=batch)
    # Ascending, padded with +inf (above every probability, so padding never counts as <= s_l); one padding
    # column at least, so that a batch without positives still has a row to search.
    q = tf.sort(positive_scores.to_tensor(default_value=np.inf), axis=1)
    max_pos = tf.shape(q)[1]
    q = tf.concat([q, tf.fill([batch, 1], np.float32(np.inf))], axis=1)
    c = tf.searchsorted(q, probs, side="right")  # [B, L], in 0..max_pos
    counts = tf.math.bincount(c, minlength=max_pos + 1, maxlength=max_pos + 1, axis=-1, dtype=tf.float32)
    rank = tf.cumsum(counts, axis=1, reverse=True)[:, 1:]  # rank of q_j, j = 1..max_pos
    below = tf.searchsorted(q, q, side="left")[:, :max_pos]  # #{i : q_i < q_j}
    rel_rank = num_pos[:, None] - tf.cast(below, tf.float32)  # #{i : q_i >= q_j}
    real = tf.range(max_pos)[None, :] < tf.cast(num_pos, tf.int32)[:, None]
    score = tf.reduce_sum(tf.where(real, rel_rank / tf.maximum(rank, 1.0), 0.0), axis=1) / tf.maximum(num_pos, 1.0)
    degenerate = tf.logical_or(num_pos == 0.0, num_pos == float(num_labels))
    return tf.where(degenerate, tf.ones_like(score), score)
