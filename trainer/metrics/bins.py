"""The bins of the metric-state histograms: the one definition of their edges, and the counts read from them.

Every histogram of :mod:`trainer.metrics.state` has K bins of predicted probability, and everything that reads
the histograms (AUCs, threshold tuning, PR curves for TensorBoard and the Labels dashboard) takes the bin edges
from :func:`bin_edges`, a function of K alone.

Why not equal width in probability: a rare label's probabilities sit far below 1/K, so with bins ``[k/K,
(k+1)/K)`` nearly all its positives and negatives share the lowest bin and its AUCs and thresholds are
guesses. The bins are instead (nearly) equal width in log-odds, which resolves probabilities of 1e-6 as well
as of 0.5 or 0.9999.

How: a float32 probability ``p`` in [0, 1] maps to an integer *key*: its bit pattern below 1/2, and
``2 * bits(1/2) - bits(1 - p)`` from 1/2 up (``1 - p`` is exact in float32 there). The key grows with ``p``
and is a piecewise-linear log2 of ``p`` below 1/2 and of ``1 / (1 - p)`` above it (exponent and mantissa of
a float32, linear within each power of two), so equal steps of the key are nearly equal steps of the
log-odds. The K bins are: bin 0 below :data:`LOWEST_EDGE` = 2**-23 (log-odds -15.9), K - 2 bins splitting
the keys from there to :data:`HIGHEST_EDGE` = 1 - 2**-12 (log-odds +8.3) into equal parts, and bin K - 1 from
there to 1. The range spans 33 powers of two, so K = 200 gives six bins per power of two (about 0.12 in
log-odds each). Below it lie only labels with a prevalence under about 1e-6; above it, the most confident
predictions of frequent labels; the reported error bounds (compute.histogram_auc_error_bounds) say when
the open outer bins cost accuracy.

The bin of a probability is integer arithmetic on its float32 bits (``state._bin_index``), the same on
every device, and the edges are the float32 probabilities where the bin changes, so a probability is in bin
k exactly when ``edges[k] <= p < edges[k + 1]`` (the last bin includes 1): a count read at an edge is what
``prob >= edge`` gives on the float32 probabilities that ``predict`` and the serving export threshold.
"""

from __future__ import annotations

import numpy as np

#: Lowest and highest interior bin edges: bin 0 holds the probabilities below LOWEST_EDGE, bin K-1 those from
#: HIGHEST_EDGE up.
LOWEST_EDGE = 2.0**-23
HIGHEST_EDGE = 1.0 - 2.0**-12

HALF_KEY = int(np.float32(0.5).view(np.int32))  # the key of 1/2: its float32 bit pattern
TOP_KEY = 2 * HALF_KEY  # the key of 1 (bits(1 - 1) = 0); below 2**31, so keys fit an int32
LOW_KEY = int(np.float32(LOWEST_EDGE).view(np.int32))
KEY_RANGE = TOP_KEY - int(np.float32(1.0 - HIGHEST_EDGE).view(np.int32)) - LOW_KEY


def bin_edges(num_bins: int) -> np.ndarray:
    """The K+1 probability edges of K bins: ``0``, the K-1 interior edges, ``1``.

    Bin k holds the probabilities ``p`` with ``edges[k] <= p < edges[k + 1]`` (the last also ``p = 1``).
    Every edge is a float32 value (returned as float64), so ``prob >= edge`` is the same test in either
    precision.

    Raises:
      ValueError: fewer than 3 bins (the two open outer bins and one between them).
    """
    if num_bins < 3:
        raise ValueError(f"histograms need at least 3 bins, got {num_bins}")
    # Interior edge i (i = 1..K-1) is the smallest probability whose key reaches LOW_KEY + ceil((i-1) R / (K-2)).
    steps = np.arange(num_bins - 1, dtype=np.int64) * KEY_RANGE
    keys = LOW_KEY - (-steps // (num_bins - 2))
    below = keys < HALF_KEY
    edges = np.empty(num_bins - 1, np.float64)
    edges[below] = keys[below].astype(np.int32).view(np.float32)
    # From 1/2 up: the smallest float32 p (a multiple of 2**-24 there) with bits(1 - p) <= TOP_KEY - key.
    gap = (TOP_KEY - keys[~below]).astype(np.int32).view(np.float32).astype(np.float64)
    edges[~below] = 1.0 - np.floor(gap * 2.0**24) * 2.0**-24
    return np.concatenate([[0.0], edges, [1.0]])


def counts_at_edges(hist) -> np.ndarray:
    """``[..., K+1]`` counts of the scores at or above each edge: the sum of bins ``k..K-1`` at edge k, 0 at
    edge K (a threshold above every score, the end of a curve)."""
    hist = np.asarray(hist, np.float64)
    above = np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]
    return np.concatenate([above, np.zeros(hist.shape[:-1] + (1,))], axis=-1)


def counts_at(hist, thresholds) -> np.ndarray:
    """``[..., T]`` counts of the scores at or above arbitrary probability thresholds.

    Exact at the bin edges; inside a bin the count is interpolated linearly in probability (the histogram
    does not say where in its bin a score lies), so it lies between the counts at the bin's two edges.
    """
    at_edges = counts_at_edges(hist)
    edges = bin_edges(at_edges.shape[-1] - 1)
    t = np.clip(np.asarray(thresholds, np.float64), 0.0, 1.0)
    k = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(edges) - 2)
    frac = (t - edges[k]) / (edges[k + 1] - edges[k])
    return at_edges[..., k] + frac * (at_edges[..., k + 1] - at_edges[..., k])
