"""Metric state (TF) + metric values (NumPy) against scikit-learn and NumPy references."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from sklearn import metrics as skm

from trainer.metrics import compute
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


def bin_centers(u, num_bins=K):
    """Snaps probabilities to bin centres: every bin then holds one distinct value, so the
    histogram loses nothing and histogram AUCs must equal sklearn's up to float rounding."""
    return ((np.floor(u * num_bins) + 0.5) / num_bins).astype(np.float32)


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
    p = bin_centers(u)
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


def test_per_label_auc_matches_sklearn(data):
    y, p, pl = data["y"], data["p"], data["result"].per_label
    for j in range(y.shape[1]):
        n_pos = y[:, j].sum()
        if 0 < n_pos < len(y):
            assert pl["roc_auc"][j] == pytest.approx(skm.roc_auc_score(y[:, j], p[:, j]), abs=1e-9), j
        else:
            assert np.isnan(pl["roc_auc"][j]), j
        if n_pos > 0:
            assert pl["pr_auc"][j] == pytest.approx(skm.average_precision_score(y[:, j], p[:, j]), abs=1e-9), j
        else:
            assert np.isnan(pl["pr_auc"][j]), j
    assert pl["pr_auc"][1] == pytest.approx(1.0)
    agg = data["result"].aggregates
    both = (y.sum(0) > 0) & (y.sum(0) < len(y))
    assert agg["macro_roc_auc"] == pytest.approx(skm.roc_auc_score(y[:, both], p[:, both], average="macro"), abs=1e-9)
    has_pos = y.sum(0) > 0
    assert agg["macro_pr_auc"] == pytest.approx(
        skm.average_precision_score(y[:, has_pos], p[:, has_pos], average="macro"), abs=1e-9
    )
    assert agg["micro_roc_auc"] == pytest.approx(skm.roc_auc_score(y, p, average="micro"), abs=1e-9)
    assert agg["micro_pr_auc"] == pytest.approx(skm.average_precision_score(y, p, average="micro"), abs=1e-9)


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
            assert bound < (0.05 if num_bins == 20 else 0.005)


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
    # positives: 10 at 0.85, 2 at 0.35; negatives: 10 at 0.15, 3 at 0.55 (K=10 bins).
    # F1 is 20/22 for thresholds in (0.55, 0.85] = edges 0.6, 0.7, 0.8 (middle: 0.7),
    # 24/27 at (0.15, 0.35] and 20/25 at (0.35, 0.55].
    y = np.array([1] * 12 + [0] * 13, np.float32)[:, None]
    p = np.array([0.85] * 10 + [0.35] * 2 + [0.15] * 10 + [0.55] * 3, np.float32)[:, None]
    y2 = np.concatenate([y, np.ones_like(y)], 1)
    y2[5:, 1] = 0  # second label: 5 positives only -> below min_positives=6 -> default
    st = batch_metric_state(y2, np.concatenate([p, p], 1), np.full(2, 0.5), 10)
    state = {k: v.numpy() for k, v in st.items()}
    np.testing.assert_allclose(compute.tune_thresholds(state, min_positives=6, default=0.4), [0.7, 0.4])


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
    best_noise_f1 = max(skm.f1_score(y[:, 0], p[:, 0] >= e / 20) for e in range(20))
    assert f1_all_yes <= best_noise_f1 < 1.2 * f1_all_yes  # "always yes", or a lucky threshold near it
    tuned = compute.tune_thresholds(state, min_positives=5, default=0.5)
    assert tuned[0] == 0.5
    assert 0.25 <= tuned[1] <= 0.75


def test_tuned_threshold_maximises_f1(data):
    y, p, num_bins = data["y"], data["p"], 50
    st = run_state(y, p, data["t"], num_bins)
    tuned = compute.tune_thresholds(st, min_positives=5)
    edges = np.arange(num_bins) / num_bins
    for j in range(y.shape[1]):
        if y[:, j].sum() < 5:
            assert tuned[j] == 0.5
            continue
        f1s = [skm.f1_score(y[:, j], p[:, j] >= e, zero_division=0.0) for e in edges]
        if max(f1s) < f1s[0] + 0.2 * (1 - f1s[0]):  # not enough better than "always yes": not tuned
            assert tuned[j] == 0.5, j
            continue
        assert skm.f1_score(y[:, j], p[:, j] >= tuned[j], zero_division=0.0) == pytest.approx(max(f1s)), j


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
