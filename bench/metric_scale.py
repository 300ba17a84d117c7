"""Metric state at many labels: its size and cost per batch, and the AUC error of fewer histogram bins.

Usage:
  python bench/metric_scale.py [--labels 1000 10000 50000] [--batch-size 256] [--dataset bibtex]
                               [--datasets-dir ../shared/datasets] [--json FILE]

1. Cost: for each label count L, the bins K = trainer.metrics.state.histogram_bins(L, 200, 64 MiB) (the
   defaults of metrics.num_bins and metrics.histogram_budget_mib), the bytes of one state, and the CPU ms of
   ``batch_metric_state`` on one batch (B examples, ~5 positives each, with propensities), median of 5 after a
   warm-up; and LRAP alone, the implementation without a sort over L against the sort-based one it replaced
   (``lrap_by_sort`` below, the baseline), same data, same process.
2. Error: one-vs-rest logistic regression (scikit-learn) on the dataset's train split, its test-split
   probabilities evaluated with K = 1000, 200, 81 and 20 bins: |macro ROC-AUC / PR-AUC - exact sklearn|, the
   largest per-label error, and the a-posteriori bounds compute_metrics reports (macro_*_bin_error).
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


def bin_errors(dataset: str, datasets_dir: str) -> list[dict]:
    from sklearn import metrics as skm

    from bench.real_data import load_split, logistic_regression

    work = tempfile.mkdtemp(prefix=f"mlt-bins-{dataset}-")
    src = os.path.join(datasets_dir, dataset)
    subprocess.run([sys.executable, "-m", "data_pipeline", "convert", "--format", "arff", "--input",
                    os.path.join(src, f"{dataset}-train.arff"), os.path.join(src, f"{dataset}-test.arff"),
                    "--labels-xml", os.path.join(src, f"{dataset}.xml"), "--out", os.path.join(work, "data")],
                   cwd=REPO, check=True, capture_output=True)
    x_train, y_train = load_split(os.path.join(work, "data"), "train")
    x_test, y_test = load_split(os.path.join(work, "data"), "test")
    probs = logistic_regression(x_train, y_train, x_test, seed=0).astype(np.float32)
    has_pos = y_test.sum(0) > 0
    both = has_pos & (y_test.sum(0) < len(y_test))
    exact_roc = np.array([skm.roc_auc_score(y_test[:, j], probs[:, j]) if both[j] else np.nan
                          for j in range(y_test.shape[1])])
    exact_ap = np.array([skm.average_precision_score(y_test[:, j], probs[:, j]) if has_pos[j] else np.nan
                         for j in range(y_test.shape[1])])
    rows = []
    for k in (1000, 200, 81, 20):
        acc = metric_state.zero_state(y_test.shape[1], k)
        for i in range(0, len(y_test), 1024):
            acc = metric_state.accumulate(acc, metric_state.batch_metric_state(
                y_test[i:i + 1024], probs[i:i + 1024], np.full(y_test.shape[1], 0.5, np.float32), k))
        roc, ap = compute.histogram_auc(acc["pos_hist"], acc["neg_hist"])
        agg = compute.compute_metrics(acc, [str(j) for j in range(y_test.shape[1])], 0.5).aggregates
        row = {"bins": k, "macro_roc_auc_error": abs(np.nanmean(roc) - np.nanmean(exact_roc)),
               "macro_pr_auc_error": abs(np.nanmean(ap) - np.nanmean(exact_ap)),
               "max_label_roc_auc_error": float(np.nanmax(np.abs(roc - exact_roc))),
               "max_label_pr_auc_error": float(np.nanmax(np.abs(ap - exact_ap))),
               "macro_roc_auc_bin_error": agg["macro_roc_auc_bin_error"],
               "macro_pr_auc_bin_error": agg["macro_pr_auc_bin_error"]}
        print(f"  K={k:>4}: macro ROC-AUC error {row['macro_roc_auc_error']:.5f} (bound "
              f"{row['macro_roc_auc_bin_error']:.4f}, worst label {row['max_label_roc_auc_error']:.4f})  "
              f"macro PR-AUC error {row['macro_pr_auc_error']:.5f} (bound {row['macro_pr_auc_bin_error']:.4f}, "
              f"worst label {row['max_label_pr_auc_error']:.4f})", flush=True)
        rows.append(row)
    print(f"  (exact macro ROC-AUC {np.nanmean(exact_roc):.4f}, PR-AUC {np.nanmean(exact_ap):.4f}; "
          f"{len(y_test)} test examples, {y_test.shape[1]} labels)")
    return rows


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
    print(f"histogram AUC error on {args.dataset} (one-vs-rest logistic regression):")
    result["error"] = bin_errors(args.dataset, args.datasets_dir)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
