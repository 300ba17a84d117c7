"""Input-pipeline throughput: our reader against a raw read and a naive per-example pipeline, in one run.

Usage:
  python bench/pipeline_throughput.py [--data-dir DIR] [--json FILE]

Pipelines, each measured over the same number of examples after a warm-up, in the same process:
  (a) raw:   TFRecordDataset interleave + batch, records counted, nothing parsed (the ceiling).
  (b) ours:  data_pipeline.reader.make_dataset (shuffle on, repeat off, batch 256).
  (c) naive: TFRecordDataset(files).map(tf.io.parse_single_example + dense labels per example).batch(256).
Prints examples/s and CPU time per example of each, and the ratios b/a (target >= 0.8) and b/c (target
>= 5): medians over rounds, each round measuring a, b and c back to back.

The dataset (default 200k examples x 1000 features x 200 labels, 16 shards) is generated once into
--data-dir and reused when its manifest already matches.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.common import ensure_dataset, parse_one_example, write_json  # noqa: E402
from data_pipeline.reader import ReaderOptions, make_dataset, split_files  # noqa: E402


def raw_pipeline(files, batch_size: int) -> tf.data.Dataset:
    """(a): read records in parallel and batch them; no parsing at all. Same read buffer as the reader
    (TFRecordDataset's default), the fastest tried for both (bench/README.md)."""
    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        lambda f: tf.data.TFRecordDataset(f), cycle_length=min(8, len(files)),
        block_length=16, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def naive_pipeline(files, batch_size: int, num_features: int, num_labels: int) -> tf.data.Dataset:
    """(c): the pipeline most tutorials write: parse one example at a time, densify its labels, batch."""
    return tf.data.TFRecordDataset(files).map(parse_one_example(num_features, num_labels)).batch(batch_size)


def measure(ds: tf.data.Dataset, warmup_batches: int, batches: int, batch_size: int) -> tuple[float, float]:
    """Returns (examples per second, process CPU microseconds per example) over ``batches`` batches
    after ``warmup_batches``.

    CPU time per example (all threads of this process) is reported beside wall-clock throughput because
    on a shared machine other processes take cores away from one measurement and not the next.
    """
    it = iter(ds)
    for _ in range(warmup_batches):
        next(it)
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    n = batches * batch_size
    return n / (time.perf_counter() - t), (time.process_time() - cpu) / n * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "mlt-bench-pipeline"))
    p.add_argument("--examples", type=int, default=200_000)
    p.add_argument("--features", type=int, default=1000)
    p.add_argument("--labels", type=int, default=200)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--warmup-batches", type=int, default=50)
    p.add_argument("--batches", type=int, default=700, help="measured batches per pipeline and round")
    p.add_argument("--rounds", type=int, default=5, help="rounds; each measures every pipeline once")
    p.add_argument("--json", default=None, help="write the figures to this file")
    args = p.parse_args(argv)
    if (args.warmup_batches + args.batches) * args.batch_size > args.examples:
        p.error("--warmup-batches + --batches must fit in one pass over --examples (repeat is off)")

    ensure_dataset(args.data_dir, args.examples, args.features, args.labels, args.shards)
    files = split_files(args.data_dir, "train")
    pipelines = {
        "a_raw": lambda: raw_pipeline(files, args.batch_size),
        "b_reader": lambda: make_dataset(args.data_dir, "train", args.batch_size,
                                         options=ReaderOptions(shuffle=True, repeat=False)),
        "c_naive": lambda: naive_pipeline(files, args.batch_size, args.features, args.labels),
    }
    # Each round measures a, b and c back to back, so a round's ratios compare pipelines under the same
    # load; the median over rounds discards rounds where another process took a core from one of them.
    rounds = []
    for r in range(args.rounds):
        rounds.append({})
        for name, build in pipelines.items():
            rate, cpu_us = measure(build(), args.warmup_batches, args.batches, args.batch_size)
            rounds[-1][name] = (rate, cpu_us)
            print(f"  round {r + 1} {name:9s} {rate:12,.0f} examples/s  {cpu_us:6.2f} CPU us/example", flush=True)
    rates = {k: float(np.median([r[k][0] for r in rounds])) for k in pipelines}
    cpu = {k: float(np.median([r[k][1] for r in rounds])) for k in pipelines}
    b_over_a = float(np.median([r["b_reader"][0] / r["a_raw"][0] for r in rounds]))
    b_over_c = float(np.median([r["b_reader"][0] / r["c_naive"][0] for r in rounds]))
    result = {
        "median_examples_per_s": {k: round(v) for k, v in rates.items()},
        "median_cpu_us_per_example": {k: round(v, 2) for k, v in cpu.items()},
        "ratio_b_over_a": round(b_over_a, 3), "ratio_b_over_c": round(b_over_c, 2),
        # What b/a would be if both were CPU-bound: the ratio of CPU time per example.
        "cpu_ratio_b_over_a": round(cpu["a_raw"] / cpu["b_reader"], 3),
        "rounds": [{k: [round(v[0]), round(v[1], 2)] for k, v in r.items()} for r in rounds],
        "measured_examples": args.batches * args.batch_size, "batch_size": args.batch_size,
        "dataset": {"examples": args.examples, "features": args.features, "labels": args.labels,
                    "shards": args.shards},
        "cpus": os.cpu_count(), "tensorflow": tf.__version__, "python": platform.python_version(),
    }
    print(f"median over {args.rounds} rounds:")
    labels = {"a_raw": "(a) raw read", "b_reader": "(b) make_dataset", "c_naive": "(c) naive"}
    for key, label in labels.items():
        print(f"{label:16s} {rates[key]:12,.0f} examples/s  {cpu[key]:6.2f} CPU us/example")
    print(f"b/a = {b_over_a:.2f} (target >= 0.8)   b/c = {b_over_c:.1f} (target >= 5)   "
          f"CPU-time b/a = {result['cpu_ratio_b_over_a']:.2f}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
