"""Metric state at many labels: its size and cost per batch, and the AUC error of its histogram bins.

Usage:
  python bench/metric_scale.py [--labels 1000 10000 50000] [--batch-size 256] [--dataset bibtex]
                               [--datasets-dir ../shared/datasets] [--json FILE]

1. Cost: for each label count L, the bins K = trainer.metrics.state.histogram_bins(L, 200, 64 MiB) (the
   defaults of metrics.num_bins and metrics.histogram_budget_mib), the bytes of one state, and the CPU ms of
   ``batch_metric_state`` on one batch (B examples, ~5 positives each, with propensities), median of 5 after a
   warm-up; and LRAP alone, the implementation without a sort over L against the sort-based one it replaced
   (``lrap_by_sort`` below, the baseline), same data, same process.
2. Error: the probabilities of one-vs-rest logistic regression (scikit-learn) trained on the dataset's train
   split, on its test split; and synthetic scores of 40 very rare labels (300,000 examples, prevalence 3e-5 to
   1e-3, like the tail of 50,000 labels: probabilities around 1e-5 and below). Evaluated with K = 1000, 200, 81
   and 20 bins through batch_metric_state and compute_metrics: |macro ROC-AUC / PR-AUC - exact sklearn|, the
   largest per-label error, and the a-posteriori bounds compute_metrics reports (macro_*_bin_error). Baselines
   in the same run, from the same probabilities: the former histograms (equal-width probability bins, AP with
   sklearn's rule for tied scores) and the present bins with that former AP rule.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.common import write_json  # noqa: E402
from trainer.metrics import compute  # noqa: E402
from trainer.metrics import state as metric_state  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lrap_by_sort(pos, probs, num_pos, num_labels):
    """The former LRAP: one full sort per example, tie blocks found with a segment max."""
    batch = tf.shape(probs)[0]
    values, order = tf.math.top_k(probs, k=num_labels, sorted=True)
    rel = tf.gather(pos, order, batch_dims=1)
    cum_rel = tf.cumsum(rel, axis=1)
    new_block = tf.concat([tf.ones([batch, 1], tf.bool), values[:, 1:] != values[:, :-1]], axis=1)
    block = tf.cumsum(tf.cast(new_block, tf.int32), axis=1) - 1 + tf.range(batch)[:, None] * num_labels
    position = tf.broadcast_to(tf.range(num_labels)[None, :], tf.shape(block))
    flat_block = tf.reshape(block, [-1])
    block_end = tf.math.unsorted_segment_max(tf.reshape(position, [-1]), flat_block, batch * num_labels)
    end = tf.reshape(tf.gather(block_end, flat_block), tf.shape(block))
    score = tf.reduce_sum(rel * tf.gather(cum_rel, end, batch_dims=1) / tf.cast(end + 1, tf.float32), axis=1)
    score /= tf.maximum(num_pos, 1.0)
    degenerate = tf.logical_or(num_pos == 0.0, num_pos == float(num_labels))
    return tf.where(degenerate, tf.ones_like(score), score)


def cpu_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(1000 * (time.process_time() - t))
    return statistics.median(times)


def cost(num_labels: int, batch: int) -> dict:
    rng = np.random.default_rng(0)
    y = np.zeros((batch, num_labels), np.float32)
    for row in y:
        row[rng.integers(0, num_labels, 5)] = 1.0
    y, p = tf.constant(y), tf.constant(rng.random((batch, num_labels)).astype(np.float32))
    k = metric_state.histogram_bins(num_labels, 200, 64)
    inv = tf.constant(compute.inverse_propensity(rng.integers(0, 100, num_labels), 100_000), tf.float32)
    thresholds = tf.fill([num_labels], 0.5)
    state_fn = tf.function(lambda: metric_state.batch_metric_state(y, p, thresholds, k, inv_propensity=inv))
    num_pos = tf.reduce_sum(y, axis=1)
    new = tf.function(lambda: metric_state._lrap_per_example(y > 0.5, p, num_pos, num_labels))
    old = tf.function(lambda: lrap_by_sort(y, p, num_pos, num_labels))
    np.testing.assert_allclose(new().numpy(), old().numpy(), rtol=1e-5)
    row = {"labels": num_labels, "bins": k, "state_mib": metric_state.state_bytes(num_labels, k) / 2**20,
           "state_ms": cpu_ms(lambda: state_fn()["lrap_sum"].numpy()), "lrap_ms": cpu_ms(lambda: new().numpy()),
           "lrap_by_sort_ms": cpu_ms(lambda: old().numpy())}
    print(f"  L={num_labels:>6,}  K={k:>3}  state {row['state_mib']:6.1f} MiB  batch_metric_state "
          f"{row['state_ms']:7.1f} CPU ms  LRAP {row['lrap_ms']:6.1f} ms (by sort {row['lrap_by_sort_ms']:6.1f} ms, "
          f"{row['lrap_by_sort_ms'] / row['lrap_ms']:.1f}x)", flush=True)
    return row


def numpy_histograms(y, bin_of, num_bins: int):
    """``(pos_hist, neg_hist)`` [L, K] of the bin indices ``bin_of`` [N, L] (each in 0..K-1)."""
    pos = np.stack([np.bincount(bin_of[y[:, j] > 0.5, j], minlength=num_bins) for j in range(y.shape[1])])
    neg = np.stack([np.bincount(bin_of[y[:, j] <= 0.5, j], minlength=num_bins) for j in range(y.shape[1])])
    return pos.astype(np.float64), neg.astype(np.float64)


def former_average_precision(pos_hist, neg_hist):
    """The former AP of the histograms: sklearn's rule for tied scores (a bin's positives all at the precision
    after the whole bin)."""
    tp = np.cumsum(pos_hist[:, ::-1], axis=1)
    fp = np.cumsum(neg_hist[:, ::-1], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(pos_hist[:, ::-1] * tp / np.maximum(tp + fp, 1e-300), axis=1) / tp[:, -1]


def exact_aucs(y, probs):
    from sklearn import metrics as skm

    has_pos = y.sum(0) > 0
    both = has_pos & (y.sum(0) < len(y))
    roc = np.array([skm.roc_auc_score(y[:, j], probs[:, j]) if both[j] else np.nan for j in range(y.shape[1])])
    ap = np.array([skm.average_precision_score(y[:, j], probs[:, j]) if has_pos[j] else np.nan
                   for j in range(y.shape[1])])
    return roc, ap


def errors(y, probs, num_bins: int, exact) -> dict:
    """The package's AUC errors and bounds with ``num_bins`` bins, and the two baselines' errors."""
    acc = metric_state.zero_state(y.shape[1], num_bins)
    for i in range(0, len(y), 4096):
        acc = metric_state.accumulate(acc, metric_state.batch_metric_state(
            y[i:i + 4096], probs[i:i + 4096], np.full(y.shape[1], 0.5, np.float32), num_bins))
    agg = compute.compute_metrics(acc, [str(j) for j in range(y.shape[1])], 0.5).aggregates
    roc, ap = compute.histogram_auc(acc["pos_hist"], acc["neg_hist"])
    former = numpy_histograms(y, np.clip(np.floor(probs * num_bins).astype(np.int64), 0, num_bins - 1), num_bins)
    former_roc, _ = compute.histogram_auc(*former)
    (exact_roc, exact_ap), mean = exact, np.nanmean
    return {"bins": num_bins, "macro_roc_auc_error": abs(mean(roc) - mean(exact_roc)),
            "macro_pr_auc_error": abs(mean(ap) - mean(exact_ap)),
            "max_label_roc_auc_error": float(np.nanmax(np.abs(roc - exact_roc))),
            "max_label_pr_auc_error": float(np.nanmax(np.abs(ap - exact_ap))),
            "macro_roc_auc_bin_error": agg["macro_roc_auc_bin_error"],
            "macro_pr_auc_bin_error": agg["macro_pr_auc_bin_error"],
            "former_bins_macro_roc_auc_error": abs(mean(former_roc) - mean(exact_roc)),
            "former_bins_macro_pr_auc_error": abs(mean(former_average_precision(*former)) - mean(exact_ap)),
            "former_ap_rule_macro_pr_auc_error": abs(
                mean(former_average_precision(acc["pos_hist"], acc["neg_hist"])) - mean(exact_ap))}


def bin_errors(name: str, y, probs) -> list[dict]:
    exact = exact_aucs(y, probs)
    print(f"histogram AUC error on {name} ({len(y)} examples, {y.shape[1]} labels; exact macro ROC-AUC "
          f"{np.nanmean(exact[0]):.4f}, PR-AUC {np.nanmean(exact[1]):.4f}):")
    rows = []
    for k in (1000, 200, 81, 20):
        row = errors(y, probs, k, exact)
        print(f"  K={k:>4}: macro ROC-AUC error {row['macro_roc_auc_error']:.5f} (bound "
              f"{row['macro_roc_auc_bin_error']:.4f}, worst label {row['max_label_roc_auc_error']:.4f}; former bins "
              f"{row['former_bins_macro_roc_auc_error']:.4f})  macro PR-AUC error {row['macro_pr_auc_error']:.5f} "
              f"(bound {row['macro_pr_auc_bin_error']:.4f}, worst label {row['max_label_pr_auc_error']:.4f}; "
              f"former AP rule {row['former_ap_rule_macro_pr_auc_error']:.4f}, former bins "
              f"{row['former_bins_macro_pr_auc_error']:.4f})", flush=True)
        rows.append(row)
    return rows


def logistic_regression_probs(dataset: str, datasets_dir: str):
    """Test labels and the test-split probabilities of one-vs-rest logistic regression trained on the train split."""
    from bench.real_data import load_split, logistic_regression

    src = os.path.join(datasets_dir, dataset)
    with tempfile.TemporaryDirectory(prefix=f"mlt-bins-{dataset}-") as work:
        subprocess.run([sys.executable, "-m", "data_pipeline", "convert", "--format", "arff", "--input",
                        os.path.join(src, f"{dataset}-train.arff"), os.path.join(src, f"{dataset}-test.arff"),
                        "--labels-xml", os.path.join(src, f"{dataset}.xml"), "--out", os.path.join(work, "data")],
                       cwd=REPO, check=True, capture_output=True)
        x_train, y_train = load_split(os.path.join(work, "data"), "train")
        x_test, y_test = load_split(os.path.join(work, "data"), "test")
    return y_test, logistic_regression(x_train, y_train, x_test, seed=0).astype(np.float32)


def very_rare_scores(examples: int = 300_000, labels: int = 40):
    """Labels of prevalence 3e-5 to 1e-3, logits N(log-odds of the prevalence - 1 - margin/2, 1.5) for negatives,
    a margin of 1-5 higher for positives."""
    rng = np.random.default_rng(1)
    prevalence = np.exp(rng.uniform(np.log(3e-5), np.log(1e-3), labels))
    y = (rng.random((examples, labels)) < prevalence).astype(np.float32)
    margin = rng.uniform(1, 5, labels)
    logits = np.log(prevalence / (1 - prevalence)) - margin / 2 + margin * y + rng.normal(0, 1.5, y.shape) - 1.0
    return y, (1 / (1 + np.exp(-logits))).astype(np.float32)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=int, nargs="+", default=[1000, 10_000, 50_000])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dataset", default="bibtex")
    p.add_argument("--datasets-dir", default=os.path.join(os.path.dirname(REPO), "shared", "datasets"))
    p.add_argument("--json")
    args = p.parse_args(argv)
    print(f"cost per batch of {args.batch_size} (load average {os.getloadavg()[0]:.1f}):")
    result = {"cost": [cost(n, args.batch_size) for n in args.labels]}
    y, probs = logistic_regression_probs(args.dataset, args.datasets_dir)
    result["error"] = bin_errors(f"{args.dataset}, one-vs-rest logistic regression", y, probs)
    result["error_very_rare"] = bin_errors("very rare synthetic labels", *very_rare_scores())
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
