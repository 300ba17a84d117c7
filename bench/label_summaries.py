"""Size and write time of one evaluation's per-label TensorBoard output, at many labels.

Usage:
  python bench/label_summaries.py [--labels 1000 50000] [--bins 200] [--evals 3] [--json FILE]

For each label count: a synthetic metric state (Zipf training counts, positives and negatives per probability
bin; no model), ``compute_metrics``, then ``--evals`` evaluations written by ``SummaryWriters.eval_results``
twice into fresh logdirs: with the default output (per-label table, curves, fixed PR curves, ranked tables,
histograms) and with ``per_label.scalars`` on as well (the baseline: 5 scalar tags per label, what every label
used to cost).  Reports seconds per evaluation (after the first, which also writes the label names) and event
file bytes per evaluation, and the ratio of the two settings.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from bench.common import write_json  # noqa: E402
from trainer.metrics import compute  # noqa: E402
from trainer.summaries import PerLabelOptions, SummaryWriters  # noqa: E402


def synthetic_result(num_labels: int, bins: int, seed: int = 0) -> compute.MetricsResult:
    rng = np.random.default_rng(seed)
    counts = np.minimum(rng.zipf(1.3, num_labels), 100_000)
    rate = np.minimum(counts, 5000) / 500 + 0.01
    pos = rng.poisson(np.outer(rate, np.linspace(0.2, 1.8, bins)))
    neg = rng.poisson(np.outer(np.full(num_labels, 20.0), np.linspace(1.8, 0.2, bins)))
    half = bins // 2
    state = {"pos_hist": pos, "neg_hist": neg, "tp": pos[:, half:].sum(1), "fp": neg[:, half:].sum(1),
             "fn": pos[:, :half].sum(1), "support": pos.sum(1), "pred_pos": (pos + neg)[:, half:].sum(1),
             "num_examples": 20.0 * bins, "subset_correct": 0.0, "lrap_sum": 0.0, "lrap_count": 1.0,
             **{f"{m}_at_{k}": 0.0 for m in ("p", "ndcg") for k in (1, 3, 5)}}
    return compute.compute_metrics(state, [f"label_{i:06d}" for i in range(num_labels)], 0.5,
                                   train_label_counts=counts)


def measure(result: compute.MetricsResult, evals: int, scalars: bool) -> dict:
    with tempfile.TemporaryDirectory() as logdir:
        times, sizes = [], []
        with SummaryWriters(logdir, per_label=PerLabelOptions(scalars=scalars)) as writers:
            for step in range(evals):
                t0 = time.perf_counter()
                writers.eval_results(step, result, loss=0.1)
                times.append(time.perf_counter() - t0)
                sizes.append(sum(os.path.getsize(f) for f in glob.glob(os.path.join(logdir, "eval", "*"))))
    later = np.diff(sizes) if evals > 1 else np.array(sizes)
    return {"first_s": times[0], "later_s": float(np.median(times[1:] or times)), "first_bytes": sizes[0],
            "later_bytes": float(np.median(later))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, nargs="+", default=[1000, 50_000])
    parser.add_argument("--bins", type=int, default=200)
    parser.add_argument("--evals", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = {}
    for num_labels in args.labels:
        result = synthetic_result(num_labels, args.bins)
        table = measure(result, args.evals, scalars=False)
        baseline = measure(result, args.evals, scalars=True)
        out[str(num_labels)] = {"table": table, "with_per_label_scalars": baseline,
                                "bytes_ratio": table["later_bytes"] / baseline["later_bytes"],
                                "time_ratio": table["later_s"] / baseline["later_s"]}
        for name, m in (("table", table), ("+ per-label scalars", baseline)):
            print(f"{num_labels:>7,} labels  {name:<20} first {m['first_s']:6.2f} s {m['first_bytes'] / 1e6:7.2f} MB, "
                  f"then {m['later_s']:6.2f} s {m['later_bytes'] / 1e6:7.2f} MB per evaluation")
        print(f"{num_labels:>7,} labels  table / with scalars: bytes {out[str(num_labels)]['bytes_ratio']:.3f}, "
              f"time {out[str(num_labels)]['time_ratio']:.3f}")
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
