"""Metric state (TF) + metric values (NumPy) against scikit-learn and NumPy references."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from sklearn import metrics as skm

from trainer.metrics import bins, compute
from trainer.metrics import state as metric_state
from trainer.metrics.state import (STATE_KEYS, accumulate, batch_metric_state, histogram_bins, state_bytes, state_shapes,
                                    zero_state)

K = 1000  # histogram bins for the sklearn comparisons


def run_state(labels, probs, thresholds, num_bins=K, batch_sizes=(100, 77, 123), weights=None):
    """Feeds the data through batch_metric_state in several batches and accumulates."""
    acc = zero_state(labels.shape[1], num_bins)
    start = 0
    for size in batch_sizes:
        sl = slice(start, start + size)
        w = None if weights is None else weights[sl]
        acc = accumulate(acc, batch_metric_state(labels[sl], probs[sl], thresholds, num_bins, w))
        start += size
    assert start == labels.shape[0]
    return acc


def snap_to_bins(u, num_bins=K):
    """Moves each probability to the lower edge of its bin: every bin then holds one distinct value (tied
    scores), so the histogram loses no order and its ROC-AUC must equal sklearn's up to float rounding."""
    edges = bins.bin_edges(num_bins)
    return edges[np.searchsorted(edges[1:-1], np.asarray(u, np.float32), side="right")].astype(np.float32)


def expected_order_ap(y, p):
    """Average precision of tied scores taken in random order, straight from its definition (compute's
    module doc): within each group of equal scores with m positives and n negatives below T0 positives
    and F0 negatives of higher scores, the i-th positive counts precision (T0 + i) / (T0 + F0 + i + i n / (m + 1))."""
    y, total, t0, f0 = np.asarray(y, np.float64), 0.0, 0.0, 0.0
    for score in np.unique(p)[::-1]:
        group = p == score
        m, n = y[group].sum(), (1 - y[group]).sum()
        total += sum((t0 + i) / (t0 + f0 + i + i * n / (m + 1)) for i in range(1, int(m) + 1))
        t0, f0 = t0 + m, f0 + n
    return total / y.sum()


@pytest.fixture(scope="module")
def data():
    """300 x 40 with special labels:
    0: no positives, never predicted   -> AUCs, precision, recall, F1 all NaN
    1: all positives                   -> ROC-AUC NaN (no negatives), PR-AUC 1
    2: positives but never predicted   -> precision NaN, recall 0, F1 0
    3: no positives but predicted      -> AUCs NaN, precision 0, recall NaN, F1 0
    """
    rng = np.random.default_rng(42)
    n, num_labels = 300, 40
    y = (rng.random((n, num_labels)) < rng.uniform(0.05, 0.5, num_labels)).astype(np.float32)
    y[:, 0] = 0
    y[:, 1] = 1
    y[:, 3] = 0
    # Informative scores so that AUCs are far from 0.5 and curves have structure.
    u = np.clip(0.35 * y + 0.65 * rng.random((n, num_labels)), 0, 0.999)
    u[:, 0] *= 0.4
    u[:, 2] *= 0.4
    u[:, 3] = 0.6 + 0.3 * u[:, 3]
    p = snap_to_bins(u)
    t = rng.choice([0.3, 0.5, 0.6], num_labels).astype(np.float32)
    t[[0, 2, 3]] = 0.5
    state = run_state(y, p, t)
    names = [f"label_{i}" for i in range(num_labels)]
    result = compute.compute_metrics(state, names, t)
    return dict(y=y, p=p, t=t, state=state, result=result, names=names)


def test_state_keys_shapes_dtypes(data):
    s = batch_metric_state(data["y"][:10], data["p"][:10], data["t"], 7)
    assert tuple(s) == STATE_KEYS
    for key, shape in state_shapes(40, 7).items():
        assert s[key].dtype == tf.float64, key
        assert tuple(s[key].shape) == shape, key
    np.testing.assert_array_equal(s["pos_hist"].numpy().sum(1), data["y"][:10].sum(0))
    assert float(s["pos_hist"].numpy().sum() + s["neg_hist"].numpy().sum()) == 10 * 40


def test_per_label_auc_with_tied_scores(data):
    """One score per bin: ROC-AUC is sklearn's exactly; PR-AUC is the AP of tied scores in random order."""
    y, p, pl = data["y"], data["p"], data["result"].per_label
    for j in range(y.shape[1]):
        n_pos = y[:, j].sum()
        if 0 < n_pos < len(y):
            assert pl["roc_auc"][j] == pytest.approx(skm.roc_auc_score(y[:, j], p[:, j]), abs=1e-9), j
        else:
            assert np.isnan(pl["roc_auc"][j]), j
        if n_pos > 0:
            assert pl["pr_auc"][j] == pytest.approx(expected_order_ap(y[:, j], p[:, j]), abs=1e-9), j
        else:
            assert np.isnan(pl["pr_auc"][j]), j
    assert pl["pr_auc"][1] == pytest.approx(1.0)
    agg = data["result"].aggregates
    both = (y.sum(0) > 0) & (y.sum(0) < len(y))
    assert agg["macro_roc_auc"] == pytest.approx(skm.roc_auc_score(y[:, both], p[:, both], average="macro"), abs=1e-9)
    has_pos = y.sum(0) > 0
    assert agg["macro_pr_auc"] == pytest.approx(np.mean([expected_order_ap(y[:, j], p[:, j])
                                                         for j in np.flatnonzero(has_pos)]), abs=1e-9)
    assert agg["micro_roc_auc"] == pytest.approx(skm.roc_auc_score(y, p, average="micro"), abs=1e-9)
    assert agg["micro_pr_auc"] == pytest.approx(expected_order_ap(y.ravel(), p.ravel()), abs=1e-9)


def test_average_precision_is_sklearns_when_no_bin_holds_both_classes():
    """Distinct scores, positives only in even bins and negatives only in odd ones: the order the histogram
    loses (inside a bin) cannot change AP, so it equals sklearn's exactly."""
    rng = np.random.default_rng(4)
    y = (rng.random((500, 6)) < [0.01, 0.05, 0.1, 0.3, 0.5, 0.9]).astype(np.float32)
    y[0] = 1
    edges = bins.bin_edges(200)
    b = 2 * rng.integers(40, 99, y.shape) + (1 - y).astype(int)  # bins 80..197, by class
    p = (edges[b] + rng.random(y.shape) * (edges[b + 1] - edges[b])).astype(np.float32)
    st = run_state(y, p, np.full(6, 0.5, np.float32), 200, batch_sizes=(500,))
    _, ap = compute.histogram_auc(st["pos_hist"], st["neg_hist"])
    np.testing.assert_allclose(ap, [skm.average_precision_score(y[:, j], p[:, j]) for j in range(6)], atol=1e-12)


def realistic_scores(seed=0, n=20_000):
    """Scores as a trained model gives them: 24 labels from prevalence 5e-4 (probabilities around 1e-3 and
    below) to 0.5 (around 0.5), logits of positives higher by a label-dependent margin; label 20 rounded to
    two decimals (tied scores), label 21 frequent and confident (most positives exactly 1.0 in float32), label 22
    float16-rounded."""
    rng = np.random.default_rng(seed)
    prevalence = np.geomspace(5e-4, 0.5, 24)
    y = (rng.random((n, 24)) < prevalence).astype(np.float32)
    margin = np.linspace(1.0, 4.0, 24)[rng.permutation(24)]
    logits = np.log(prevalence / (1 - prevalence)) - 1.0 + margin * y + rng.normal(0.0, 1.5, y.shape)
    logits[:, 21] += 18.0 * y[:, 21]
    p = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    p[:, 20] = np.round(p[:, 20], 2)
    p[:, 22] = p[:, 22].astype(np.float16)
    return y, p


# bins: (largest per-label ROC-AUC error, PR-AUC error, macro ROC-AUC error, macro PR-AUC error) allowed.
REALISTIC_TOLERANCE = {200: (0.005, 0.01, 0.001, 0.002), 81: (0.01, 0.02, 0.002, 0.003)}


@pytest.mark.parametrize("num_bins", sorted(REALISTIC_TOLERANCE))
def test_aucs_match_sklearn_on_realistic_scores(num_bins):
    """200 bins (metrics.num_bins) and 81 (what 50,000 labels get): AUCs within REALISTIC_TOLERANCE of
    sklearn's and within the reported bounds. Equal-width probability bins fail this by far: macro ROC-AUC off
    by 0.036 at 200 bins and 0.073 at 81 (the rare labels' scores all fall into the lowest bin)."""
    y, p = realistic_scores()
    st = run_state(y, p, np.full(24, 0.5, np.float32), num_bins, batch_sizes=(8000, 12_000))
    result = compute.compute_metrics(st, [str(j) for j in range(24)], 0.5)
    roc_bound, ap_bound = compute.histogram_auc_error_bounds(st["pos_hist"], st["neg_hist"])
    exact_roc = np.array([skm.roc_auc_score(y[:, j], p[:, j]) for j in range(24)])
    exact_ap = np.array([skm.average_precision_score(y[:, j], p[:, j]) for j in range(24)])
    roc, ap = result.per_label["roc_auc"], result.per_label["pr_auc"]
    label_roc, label_ap, macro_roc, macro_ap = REALISTIC_TOLERANCE[num_bins]
    assert np.max(np.abs(roc - exact_roc)) < label_roc and np.max(np.abs(ap - exact_ap)) < label_ap
    assert abs(result.aggregates["macro_roc_auc"] - exact_roc.mean()) < macro_roc
    assert abs(result.aggregates["macro_pr_auc"] - exact_ap.mean()) < macro_ap
    assert np.all(np.abs(roc - exact_roc) <= roc_bound + 1e-12) and np.all(np.abs(ap - exact_ap) <= ap_bound + 1e-12)
    assert result.aggregates["micro_roc_auc"] == pytest.approx(skm.roc_auc_score(y, p, average="micro"), abs=macro_roc)
    assert result.aggregates["micro_pr_auc"] == pytest.approx(skm.average_precision_score(y, p, average="micro"),
                                                              abs=macro_ap)


def test_roc_auc_error_bounded_by_within_bin_pairs():
    """Unrounded scores: the histogram trapezoid scores each (pos, neg) pair sharing a bin
    as 1/2 while sklearn scores it 0 or 1, so |error| <= 0.5 * same-bin pairs / (P*N)."""
    rng = np.random.default_rng(1)
    y = (rng.random((400, 5)) < 0.3).astype(np.float32)
    p = np.clip(0.2 * y + rng.random((400, 5)), 0, 1).astype(np.float32)
    for num_bins in (20, 200):
        st = run_state(y, p, np.full(5, 0.5, np.float32), num_bins, batch_sizes=(400,))
        roc, _ = compute.histogram_auc(st["pos_hist"], st["neg_hist"])
        for j in range(5):
            bound = 0.5 * np.sum(st["pos_hist"][j] * st["neg_hist"][j]) / (y[:, j].sum() * (1 - y[:, j]).sum())
            assert abs(roc[j] - skm.roc_auc_score(y[:, j], p[:, j])) <= bound + 1e-12
            assert bound < (0.15 if num_bins == 20 else 0.02)  # scores spread over [0, 1]: ~14 bins at K = 20


def test_threshold_metrics_match_sklearn(data):
    y, p, t, res = data["y"], data["p"], data["t"], data["result"]
    pred = (p >= t[None, :]).astype(np.float32)
    prec, rec, f1, _ = skm.precision_recall_fscore_support(y, pred, average=None, zero_division=np.nan)
    pl = res.per_label
    np.testing.assert_array_equal(np.isnan(pl["f1"]), np.isnan(f1))
    np.testing.assert_allclose(pl["precision"], prec, equal_nan=True, rtol=1e-12)
    np.testing.assert_allclose(pl["recall"], rec, equal_nan=True, rtol=1e-12)
    np.testing.assert_allclose(pl["f1"], f1, equal_nan=True, rtol=1e-12)
    assert np.isnan(pl["f1"][0]) and pl["f1"][2] == 0 and pl["f1"][3] == 0
    assert np.isnan(pl["precision"][2]) and pl["recall"][2] == 0 and np.isnan(pl["recall"][3])
    np.testing.assert_array_equal(pl["support"], y.sum(0))
    np.testing.assert_allclose(pl["pred_pos_rate"], pred.astype(np.float64).mean(0), rtol=1e-12)
    agg = res.aggregates
    assert agg["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=np.nan), abs=1e-12)
    assert agg["micro_f1"] == pytest.approx(skm.f1_score(y, pred, average="micro"), abs=1e-12)
    assert agg["micro_precision"] == pytest.approx(skm.precision_score(y, pred, average="micro"), abs=1e-12)
    assert agg["micro_recall"] == pytest.approx(skm.recall_score(y, pred, average="micro"), abs=1e-12)
    assert agg["hamming_loss"] == pytest.approx(skm.hamming_loss(y, pred), abs=1e-12)
    assert agg["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert agg["num_examples"] == 300 and agg["num_labels"] == 40


@pytest.fixture(scope="module")
def ranking_data():
    rng = np.random.default_rng(7)
    y = (rng.random((200, 40)) < 0.1).astype(np.float32)
    y[0] = 0  # no positives: P@k = nDCG = 0, LRAP = 1
    y[1] = 1  # all positives: LRAP = 1
    p = np.clip(0.3 * y + rng.random((200, 40)), 0, 1).astype(np.float32)
    return y, p


def precision_at_k_ref(y, p, k):
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(y, top, axis=1).sum(1) / k


def test_ranking_metrics(ranking_data):
    y, p = ranking_data
    state = run_state(y, p, np.full(40, 0.5, np.float32), 50, (64, 64, 72))
    agg = compute.compute_metrics(state, [str(i) for i in range(40)], 0.5).aggregates
    for k in (1, 3, 5):
        assert agg[f"precision@{k}"] == pytest.approx(precision_at_k_ref(y, p, k).mean(), abs=1e-6)
        # sklearn's ndcg_score with binary relevance and no score ties is the same nDCG@k,
        # and also gives 0 to examples without positives, so all examples are compared.
        assert agg[f"ndcg@{k}"] == pytest.approx(skm.ndcg_score(y, p, k=k), abs=1e-6)
        has_pos = y.sum(1) > 0
        ours = batch_metric_state(y[has_pos], p[has_pos], np.full(40, 0.5), 10)[f"ndcg_at_{k}"] / has_pos.sum()
        assert float(ours) == pytest.approx(skm.ndcg_score(y[has_pos], p[has_pos], k=k), abs=1e-6)
    assert agg["lrap"] == pytest.approx(skm.label_ranking_average_precision_score(y, p), abs=1e-6)


def test_lrap_with_ties_matches_sklearn(data):
    """Scores snapped to bin centres have many ties; sklearn ranks ties by their max rank."""
    y, p = data["y"], np.round(data["p"] * 10) / 10
    st = batch_metric_state(y, p, data["t"], 10)
    assert float(st["lrap_sum"] / st["lrap_count"]) == pytest.approx(
        skm.label_ranking_average_precision_score(y, p), abs=1e-6
    )


def test_fewer_labels_than_k():
    y = np.array([[1, 0, 1], [0, 0, 0]], np.float32)
    p = np.array([[0.9, 0.8, 0.1], [0.2, 0.3, 0.4]], np.float32)
    st = batch_metric_state(y, p, np.full(3, 0.5), 4)
    assert float(st["p_at_5"]) == pytest.approx(2 / 5)  # top-3 hits over k=5
    assert float(st["p_at_1"]) == pytest.approx(1.0)
    assert float(st["ndcg_at_5"]) == pytest.approx((1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3)))


def test_weights_mask_padding_rows(data):
    y, p, t = data["y"][:50], data["p"][:50], data["t"]
    rng = np.random.default_rng(3)
    junk_y = (rng.random((14, 40)) < 0.5).astype(np.float32)
    y_pad, p_pad = np.concatenate([y, junk_y]), np.concatenate([p, rng.random((14, 40)).astype(np.float32)])
    w = np.concatenate([np.ones(50), np.zeros(14)]).astype(np.float32)
    masked = batch_metric_state(y_pad, p_pad, t, 100, w)
    plain = batch_metric_state(y, p, t, 100)
    for key in STATE_KEYS:
        np.testing.assert_allclose(masked[key].numpy(), plain[key].numpy(), rtol=1e-6, err_msg=key)
    empty = batch_metric_state(y_pad, p_pad, t, 100, np.zeros(64, np.float32))
    assert all(not np.any(empty[k].numpy()) for k in STATE_KEYS)


def test_replica_sum_equals_whole_batch(data):
    y, p, t = data["y"], data["p"], data["t"]
    whole = batch_metric_state(y, p, t, 100)
    halves = accumulate(accumulate(zero_state(40, 100), batch_metric_state(y[:150], p[:150], t, 100)),
                        batch_metric_state(y[150:], p[150:], t, 100))
    for key in STATE_KEYS:
        np.testing.assert_allclose(halves[key], whole[key].numpy(), rtol=1e-6, err_msg=key)


def test_empty_batch_and_tf_function(data):
    fn = tf.function(lambda yy, pp: batch_metric_state(yy, pp, data["t"], 10))
    st = fn(tf.zeros([0, 40]), tf.zeros([0, 40]))
    assert all(not np.any(st[k].numpy()) for k in STATE_KEYS)


def test_accumulate_rejects_mismatch():
    with pytest.raises(ValueError, match="keys differ"):
        accumulate(zero_state(3, 4), {"tp": np.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        accumulate(zero_state(3, 4), zero_state(4, 4))


def test_tune_thresholds_known_optimum():
    # K = 10 bins, scores at bin edges e[b]: positives 10 at e[8], 2 at e[5]; negatives 10 at e[3], 3 at e[6].
    # F1 is 20/22 for the thresholds e[7], e[8] (middle of that run: e[7]), 24/27 at e[4], e[5], 20/25 at e[6],
    # 24/37 ("always yes") at e[0..3].
    e = bins.bin_edges(10).astype(np.float32)
    y = np.array([1] * 12 + [0] * 13, np.float32)[:, None]
    p = np.array([e[8]] * 10 + [e[5]] * 2 + [e[3]] * 10 + [e[6]] * 3, np.float32)[:, None]
    y2 = np.concatenate([y, np.ones_like(y)], 1)
    y2[5:, 1] = 0  # second label: 5 positives only -> below min_positives=6 -> default
    st = batch_metric_state(y2, np.concatenate([p, p], 1), np.full(2, 0.5), 10)
    state = {k: v.numpy() for k, v in st.items()}
    tuned = compute.tune_thresholds(state, min_positives=6, default=0.4)
    np.testing.assert_array_equal(tuned, [e[7], 0.4])
    assert skm.f1_score(y[:, 0], p[:, 0] >= tuned[0]) == pytest.approx(20 / 22)


def test_unlearnt_label_keeps_the_default_threshold():
    # Label 0: scores carry no information, so the best F1 over the noise is about that of predicting every
    # example positive; tuning must not switch the label on for (almost) everyone. Label 1 separates.
    rng = np.random.default_rng(0)
    y = np.zeros((400, 2), np.float32)
    y[:20, 0] = 1
    y[:100, 1] = 1
    p = np.stack([rng.uniform(0.0, 0.1, 400), np.where(y[:, 1] > 0, 0.8, 0.2) + rng.uniform(-0.05, 0.05, 400)], 1)
    state = {k: v.numpy() for k, v in batch_metric_state(y, p.astype(np.float32), np.full(2, 0.5), 20).items()}
    f1_all_yes = 2 * 20 / (400 + 20)
    best_noise_f1 = max(skm.f1_score(y[:, 0], p[:, 0] >= e) for e in bins.bin_edges(20)[:-1])
    assert f1_all_yes <= best_noise_f1 < 1.2 * f1_all_yes  # "always yes", or a lucky threshold near it
    tuned = compute.tune_thresholds(state, min_positives=5, default=0.5)
    assert tuned[0] == 0.5
    assert 0.25 <= tuned[1] <= 0.75


def test_tuned_threshold_maximises_f1(data):
    y, p, num_bins = data["y"], data["p"], 50
    st = run_state(y, p, data["t"], num_bins)
    tuned = compute.tune_thresholds(st, min_positives=5)
    edges = bins.bin_edges(num_bins)[:-1]
    for j in range(y.shape[1]):
        if y[:, j].sum() < 5:
            assert tuned[j] == 0.5
            continue
        f1s = [skm.f1_score(y[:, j], p[:, j] >= e, zero_division=0.0) for e in edges]
        if max(f1s) < f1s[0] + 0.2 * (1 - f1s[0]):  # not enough better than "always yes": not tuned
            assert tuned[j] == 0.5, j
            continue
        assert skm.f1_score(y[:, j], p[:, j] >= tuned[j], zero_division=0.0) == pytest.approx(max(f1s)), j


def test_tuned_thresholds_give_the_f1_they_were_chosen_for():
    """The F1 the histograms promise at a tuned threshold is the F1 the threshold gives applied to the raw float32
    scores (``prob >= threshold``, as predict and the export do) and what an evaluation at that threshold
    reports, also for scores lying exactly on a bin edge or one float32 step below it."""
    y, p = realistic_scores(seed=3, n=6000)
    edges = bins.bin_edges(200).astype(np.float32)
    rng = np.random.default_rng(5)
    on_edge = rng.random(p.shape) < 0.05
    p = np.where(on_edge, edges[rng.integers(1, 200, p.shape)], p)
    p = np.where(rng.random(p.shape) < 0.5, p, np.nextafter(p, np.float32(0))).astype(np.float32)
    state = run_state(y, p, np.full(24, 0.5, np.float32), 200, batch_sizes=(6000,))
    tuned = compute.tune_thresholds(state, min_positives=5)
    assert np.all(tuned.astype(np.float32) == tuned)  # exact float32 values: the export compares in float32
    column = np.searchsorted(bins.bin_edges(200), tuned)
    tp = bins.counts_at_edges(state["pos_hist"])[np.arange(24), column]
    fp = bins.counts_at_edges(state["neg_hist"])[np.arange(24), column]
    promised = 2 * tp / (tp + fp + y.sum(0))
    applied = np.array([skm.f1_score(y[:, j], p[:, j] >= np.float32(tuned[j])) for j in range(24)])
    np.testing.assert_allclose(promised, applied, rtol=1e-12)
    assert np.sum(tuned != 0.5) >= 10  # most labels with enough positives were tuned
    evaluated = compute.compute_metrics(run_state(y, p, tuned.astype(np.float32), 200, batch_sizes=(6000,)),
                                        [str(j) for j in range(24)], tuned)
    np.testing.assert_allclose(evaluated.per_label["f1"], applied, rtol=1e-12)


def test_threshold_file_round_trip_and_errors(tmp_path):
    names = ["a", "b/c", "ü"]
    path = tmp_path / "thresholds.json"
    compute.save_thresholds(path, [0.1, 0.5, 0.25], names)
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 0.1, "b/c": 0.5, "ü": 0.25}
    np.testing.assert_array_equal(compute.load_thresholds(path, ["ü", "a", "b/c"]), [0.25, 0.1, 0.5])
    np.testing.assert_array_equal(compute.load_thresholds(path), [0.1, 0.5, 0.25])
    with pytest.raises(ValueError, match="thresholds.json.*missing"):
        compute.load_thresholds(path, ["a", "b/c", "d"])
    with pytest.raises(ValueError, match="thresholds.json.*unknown"):
        compute.load_thresholds(path, ["a", "b/c"])
    path.write_text('{"a": 1.5}')
    with pytest.raises(ValueError, match="thresholds.json.*'a'"):
        compute.load_thresholds(path)
    path.write_text("[0.5]")
    with pytest.raises(ValueError, match="thresholds.json"):
        compute.load_thresholds(path)


def test_buckets():
    counts = np.array([50, 30, 10, 5, 3, 2, 0])  # share before: 0 .5 .8 .9 .95 .98 1
    assert list(compute.assign_buckets(counts)) == ["head", "torso", "torso", "tail", "tail", "tail", "tail"]
    rng = np.random.default_rng(0)
    y = (rng.random((100, 7)) < 0.3).astype(np.float32)
    p = rng.random((100, 7)).astype(np.float32)
    st = run_state(y, p, np.full(7, 0.5, np.float32), 20, (100,))
    res = compute.compute_metrics(st, list("abcdefg"), 0.5, train_label_counts=counts)
    agg = res.aggregates
    assert [agg[f"bucket/{b}/num_labels"] for b in compute.BUCKETS] == [1, 2, 4]
    assert agg["bucket/head/macro_f1"] == pytest.approx(res.per_label["f1"][0])
    assert agg["bucket/torso/macro_roc_auc"] == pytest.approx(res.per_label["roc_auc"][1:3].mean())
    assert agg["bucket/tail/macro_pr_auc"] == pytest.approx(res.per_label["pr_auc"][3:].mean())
    assert not any(k.startswith("bucket/") for k in compute.compute_metrics(st, list("abcdefg"), 0.5).aggregates)


def test_csv_and_table(data, tmp_path):
    res = data["result"]
    path = tmp_path / "per_label.csv"
    compute.per_label_csv(res, data["names"], path)
    rows = path.read_text().splitlines()
    assert rows[0] == "label,support,roc_auc,pr_auc,precision,recall,f1,threshold"
    assert len(rows) == 41
    assert rows[1].startswith("label_0,0,,,")  # label 0: NaN metrics are empty cells
    table = compute.format_table(res, k=3)
    worst = compute.worst_labels(res, 3)
    assert "precision@1" in table and "macro_pr_auc" in table
    assert all(data["names"][i] in table for i in worst)
    assert res.per_label["pr_auc"][worst[0]] == np.nanmin(res.per_label["pr_auc"])


_MIRRORED_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from trainer.metrics.state import batch_metric_state
data = np.load(sys.argv[1])
y, p, t = data["y"], data["p"], data["t"]
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((y, p)).batch(64))

@tf.function
def step(batch):
    per_replica = strategy.run(lambda yy, pp: batch_metric_state(yy, pp, t, 20), args=batch)
    return {k: strategy.reduce("SUM", v, axis=None) for k, v in per_replica.items()}

total = None
for batch in ds:
    out = {k: v.numpy() for k, v in step(batch).items()}
    total = out if total is None else {k: total[k] + out[k] for k in out}
print(json.dumps({k: np.asarray(v).tolist() for k, v in total.items()}))
"""


def test_under_mirrored_strategy(data, tmp_path):
    """Traced inside strategy.run on 2 replicas and SUM-reduced, the state equals the
    single-device state (run in a subprocess: logical devices must be set before TF starts)."""
    y, p, t = data["y"][:200], data["p"][:200], data["t"]
    np.savez(tmp_path / "d.npz", y=y, p=p, t=t)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT, str(tmp_path / "d.npz")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reduced = json.loads(proc.stdout.strip().splitlines()[-1])
    whole = batch_metric_state(y, p, t, 20)
    for key in STATE_KEYS:
        np.testing.assert_allclose(np.array(reduced[key]), whole[key].numpy(), rtol=1e-6, err_msg=key)


# --- Propensity-scored metrics ----------------------------------------------------------------------------

def test_inverse_propensity_by_hand():
    # A = 0.5, B = 1, N = 100: C = (ln 100 - 1) * sqrt(2) = 3.605170 * 1.414214 = 5.098481, and
    # 1/p = 1 + C / sqrt(N_l + 1): N_l = 0 -> 6.098481, 3 -> 1 + C/2 = 3.549240, 99 -> 1 + C/10 = 1.509848.
    np.testing.assert_allclose(compute.inverse_propensity([0, 3, 99], 100, a=0.5, b=1.0),
                               [6.098481, 3.549240, 1.509848], atol=1e-6)
    # Rarer labels weigh more; the defaults are the usual A = 0.55, B = 1.5.
    inv = compute.inverse_propensity([0, 10, 1000], 10_000)
    assert inv[0] > inv[1] > inv[2] > 1.0
    assert compute.PROPENSITY_PARAMETERS["default"] == (0.55, 1.5)


def test_psp_and_psndcg_by_hand():
    """Two examples, four labels with inverse propensities 1, 2, 4, 8.

    Example 1: positives {0, 2, 3}, ranking 0, 1, 2, 3. Weighted hits in rank order 1, 0, 4, 8; the best
      ranking of its positives gives 8, 4, 1.  Top 1: 1 of best 8. Top 3: 1+0+4 = 5 of 8+4+1 = 13.
      Top 5 (= all 4 labels): 13 of 13.
    Example 2: positive {1}, ranking 2, 3, 1, 0. Weighted hits 0, 0, 2, 0; best 2.
      Top 1: 0 of 2. Top 3: 2 of 2. Top 5: 2 of 2.
    PSP@k = sum of hits / sum of best: PSP@1 = 1/10, PSP@3 = 7/15, PSP@5 = 15/15.
    PSnDCG: discounts d = 1, 1/log2(3), 1/2, 1/log2(5); each example's DCGs divided by its ideal DCG of
      min(k, #positives) ones: example 1 (3 positives) 1, 1 + d1 + 1/2 at k = 3 and 5; example 2 (1) 1.
      k=1: (1/1 + 0) / (8/1 + 2/1) = 1/10.
      k=3: (3/I3 + (2*1/2)/1) / ((8 + 4 d1 + 1/2)/I3 + 2/1), I3 = 1 + d1 + 1/2 (example 1: 1 + 4*1/2 = 3).
      k=5: ((3 + 8 d3)/I3 + 1) / ((8 + 4 d1 + 1/2)/I3 + 2).
    """
    y = np.array([[1, 0, 1, 1], [0, 1, 0, 0]], np.float32)
    p = np.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.9, 0.3]], np.float32)
    inv = np.array([1.0, 2.0, 4.0, 8.0])
    state = {k: v.numpy() for k, v in batch_metric_state(y, p, np.full(4, 0.5), 10, inv_propensity=inv).items()}
    agg = compute.compute_metrics(state, list("abcd"), 0.5).aggregates
    d1, d3 = 1 / np.log2(3), 1 / np.log2(5)
    i3 = 1 + d1 + 0.5
    best = (8 + 4 * d1 + 0.5) / i3 + 2
    expected = {"psp@1": 1 / 10, "psp@3": 7 / 15, "psp@5": 1.0,
                "psndcg@1": 1 / 10, "psndcg@3": (3 / i3 + 1) / best, "psndcg@5": ((3 + 8 * d3) / i3 + 1) / best}
    for key, value in expected.items():
        assert agg[key] == pytest.approx(value, rel=1e-6), key


def psp_reference(y, p, inv, k):
    """PSP@k and PSnDCG@k as pyxclib's xc_metrics computes them (numerators and denominators summed)."""
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    gains = np.take_along_axis(y * inv, order, axis=1)
    best = -np.sort(-(y * inv), axis=1)[:, :k]
    disc = 1 / np.log2(np.arange(k) + 2)
    ideal = np.array([disc[:min(int(n), k)].sum() for n in y.sum(1)])
    with np.errstate(invalid="ignore", divide="ignore"):
        ndcg = np.where(ideal > 0, (gains * disc[:gains.shape[1]]).sum(1) / ideal, 0.0)
        best_ndcg = np.where(ideal > 0, (best * disc[:best.shape[1]]).sum(1) / ideal, 0.0)
    return gains.sum() / best.sum(), ndcg.sum() / best_ndcg.sum()


def test_propensity_scored_metrics_match_a_numpy_reference(ranking_data):
    y, p = ranking_data
    counts = np.random.default_rng(5).integers(0, 50, size=40)
    inv = compute.inverse_propensity(counts, 500)
    acc = zero_state(40, 20)
    for start in (0, 64, 128):  # in batches, summed
        acc = accumulate(acc, batch_metric_state(y[start:start + 64], p[start:start + 64], np.full(40, 0.5), 20,
                                                 inv_propensity=inv))
    agg = compute.compute_metrics(acc, [str(i) for i in range(40)], 0.5).aggregates
    for k in (1, 3, 5):
        psp, psndcg = psp_reference(y[:192], p[:192], inv, k)
        assert agg[f"psp@{k}"] == pytest.approx(psp, rel=1e-5)
        assert agg[f"psndcg@{k}"] == pytest.approx(psndcg, rel=1e-5)
        assert 0 < agg[f"psp@{k}"] < 1
    without = compute.compute_metrics(run_state(y, p, np.full(40, 0.5), 20, (200,)), [str(i) for i in range(40)], 0.5)
    assert np.isnan(without.aggregates["psp@1"])  # no propensities: undefined, not 0


def test_padding_rows_do_not_count_in_propensity_sums(data):
    y, p, t = data["y"][:50], data["p"][:50], data["t"]
    inv = compute.inverse_propensity(data["y"].sum(0), 300)
    pad_y, pad_p = np.ones((6, 40), np.float32), np.ones((6, 40), np.float32)
    masked = batch_metric_state(np.concatenate([y, pad_y]), np.concatenate([p, pad_p]), t, 20,
                                np.concatenate([np.ones(50), np.zeros(6)]), inv_propensity=inv)
    plain = batch_metric_state(y, p, t, 20, inv_propensity=inv)
    for key in STATE_KEYS:
        np.testing.assert_allclose(masked[key].numpy(), plain[key].numpy(), rtol=1e-6, err_msg=key)
    assert float(plain["psp_best_at_5"]) > 0


# --- Bins ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_bins", [3, 10, 81, 200, 1000, 10_000])
def test_bin_edges_and_the_graph_bin_index_agree_exactly(num_bins):
    """Edges: 0, 2**-23 ... 1 - 2**-12, 1, strictly increasing float32 values. The TF bin of every probability,
    also on an edge, one float32 step either side of it, at 0 or 1, is the number of interior edges at or
    below it; NaN of either sign (a diverged model's inf - inf gives a negative one) is in bin 0."""
    edges = bins.bin_edges(num_bins)
    assert len(edges) == num_bins + 1 and edges[0] == 0 and edges[-1] == 1 and np.all(np.diff(edges) > 0)
    assert edges[1] == bins.LOWEST_EDGE and edges[-2] == bins.HIGHEST_EDGE
    assert np.all(edges.astype(np.float32) == edges)
    e32 = edges.astype(np.float32)
    rng = np.random.default_rng(num_bins)
    p = np.concatenate([e32, np.nextafter(e32, np.float32(-1)), np.nextafter(e32, np.float32(2)),
                        rng.random(20_000).astype(np.float32) ** 12, rng.random(20_000).astype(np.float32),
                        1 - rng.random(20_000).astype(np.float32) ** 6, [0.0, -0.0, 1e-45, 1.0, np.nan, -np.nan]])
    p = p[~((p < 0) | (p > 1))].astype(np.float32)
    got = metric_state._bin_index(tf.constant(p), num_bins).numpy()
    expected = np.where(np.isnan(p), 0, np.searchsorted(edges[1:-1], p, side="right"))
    np.testing.assert_array_equal(got, expected)


def test_bins_are_nearly_equal_width_in_log_odds():
    logit = np.log(bins.bin_edges(200)[1:-1]) - np.log1p(-bins.bin_edges(200)[1:-1])
    widths = np.diff(logit)
    assert logit[0] == pytest.approx(-15.94, abs=0.01) and logit[-1] == pytest.approx(8.32, abs=0.01)
    assert 0.08 < widths.min() and widths.max() < 0.22 and widths.mean() == pytest.approx(24.26 / 197, rel=0.01)
    assert 0.5 in bins.bin_edges(200)


def test_counts_at_thresholds_between_edges():
    pos = np.array([[3.0, 0.0, 5.0, 2.0]])
    at_edges = bins.counts_at_edges(pos)
    np.testing.assert_array_equal(at_edges, [[10, 7, 7, 2, 0]])
    edges = bins.bin_edges(4)
    middle = (edges[2] + edges[3]) / 2
    np.testing.assert_allclose(bins.counts_at(pos, [0.0, edges[1], edges[2], middle, 1.0]), [[10, 7, 7, 4.5, 0]])


# --- Many labels --------------------------------------------------------------------------------------------

def test_histogram_bins_keep_the_state_within_its_budget():
    assert histogram_bins(1000, 200, 64) == 200  # small label sets keep metrics.num_bins (and its exactness)
    k = histogram_bins(50_000, 200, 64)
    assert k == 81 and state_bytes(50_000, k) <= 64 * 2**20 < state_bytes(50_000, k + 1)
    assert state_bytes(50_000, k) == 8 * (2 * 50_000 * 81 + 5 * 50_000 + len(STATE_KEYS) - 7)
    assert histogram_bins(10_000_000, 200, 64) == compute.MIN_BINS  # the floor


def test_histogram_auc_error_bounds_hold_against_sklearn():
    rng = np.random.default_rng(11)
    y = (rng.random((600, 6)) < rng.uniform(0.02, 0.4, 6)).astype(np.float32)
    p = np.clip(rng.beta(1.0, 6.0, (600, 6)) + 0.3 * y * rng.random((600, 6)), 0, 1).astype(np.float32)
    previous = None
    for num_bins in (10, 50, 200):
        st = run_state(y, p, np.full(6, 0.5, np.float32), num_bins, batch_sizes=(600,))
        roc, ap = compute.histogram_auc(st["pos_hist"], st["neg_hist"])
        roc_bound, ap_bound = compute.histogram_auc_error_bounds(st["pos_hist"], st["neg_hist"])
        for j in range(6):
            assert abs(roc[j] - skm.roc_auc_score(y[:, j], p[:, j])) <= roc_bound[j] + 1e-12
            assert abs(ap[j] - skm.average_precision_score(y[:, j], p[:, j])) <= ap_bound[j] + 1e-12
        if previous is not None:
            assert roc_bound.mean() < previous[0] and ap_bound.mean() < previous[1]
        previous = roc_bound.mean(), ap_bound.mean()
        agg = compute.compute_metrics(st, list("abcdef"), 0.5).aggregates
        assert agg["macro_roc_auc_bin_error"] == pytest.approx(roc_bound.mean())
        assert agg["macro_pr_auc_bin_error"] == pytest.approx(ap_bound.mean())


def test_lrap_without_a_sort_matches_sklearn_with_many_labels_and_ties():
    rng = np.random.default_rng(12)
    y = (rng.random((40, 3000)) < 0.01).astype(np.float32)
    y[0, :] = 0
    y[1, :40] = 1
    p = np.round(rng.random((40, 3000)) * 200 + 100 * y) / 300  # many ties, positives and negatives alike
    st = batch_metric_state(y, p.astype(np.float32), np.full(3000, 0.5), 10)
    assert float(st["lrap_sum"] / st["lrap_count"]) == pytest.approx(
        skm.label_ranking_average_precision_score(y, p.astype(np.float32)), abs=1e-6)


def test_one_list_of_aggregate_names(data):
    assert set(data["result"].aggregates) == set(compute.AGGREGATES)
    from trainer.config import load_config

    for name in ("psp@5", "psndcg@1", "lrap"):
        assert load_config(None, [f"train.early_stopping_metric={name}"]).train.early_stopping_metric == name


def test_evaluator_reports_propensity_scored_metrics_from_training_counts(tiny_data):
    """What training's evaluation (and TensorBoard) reports: PSP@k / PSnDCG@k of the model on the eval split,
    with propensities from the train split's counts and metrics.propensity_a/b, as the NumPy reference."""
    from data_pipeline import manifest as mf
    from data_pipeline import reader
    from trainer import evaluation
    from trainer.backends import make_backend
    from trainer.config import load_config
    from trainer.losses import MultiLabelLoss
    from trainer.model import build_model

    cfg = load_config(None, ["model.hidden=[8]", "train.batch_size=64", "metrics.propensity_a=0.6",
                             "metrics.propensity_b=2.6"])
    manifest = mf.read_manifest(tiny_data)
    model = build_model(manifest.num_features, manifest.num_labels, cfg.model, seed=0)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(scale=0.5, size=w.shape).astype(np.float32) for w in model.get_weights()])
    result = evaluation.Evaluator(make_backend("one_device"), model, MultiLabelLoss(cfg.loss, manifest.num_labels),
                                  manifest, cfg).run(evaluation.EvalSource(tiny_data, "eval"))
    options = reader.ReaderOptions(shuffle=False, repeat=False, deterministic=True)
    x, y = (np.concatenate(a) for a in zip(*[(xb.numpy(), yb.numpy())
                                             for xb, yb in reader.make_dataset(tiny_data, "eval", 256, options=options)]))
    probs = 1 / (1 + np.exp(-model.predict(x, verbose=0).astype(np.float64)))
    train = manifest.splits["train"]
    inv = compute.inverse_propensity(train.label_counts, train.num_examples, a=0.6, b=2.6)
    for k in (1, 3, 5):
        psp, psndcg = psp_reference(y, probs.astype(np.float32), inv, k)
        assert result.metrics.aggregates[f"psp@{k}"] == pytest.approx(psp, rel=1e-5)
        assert result.metrics.aggregates[f"psndcg@{k}"] == pytest.approx(psndcg, rel=1e-5)
