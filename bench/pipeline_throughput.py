"""Input-pipeline throughput: the reader on every dataset encoding, in memory, a raw read and a naive per-example
pipeline, in one run.

Usage:
  python bench/pipeline_throughput.py [--data-dir DIR] [--json FILE]

Pipelines, each measured over the same number of examples after a warm-up, in the same process, on the same
generated examples (one dataset directory per storage, under --data-dir):
  (a) raw:      TFRecordDataset interleave + batch over the one-example-per-record shards, records counted,
                nothing parsed (the ceiling of that layout).
  (b) reader:   data_pipeline.reader.make_dataset on the one-example-per-record shards (today's reader_cpu_us).
  (c) naive:    TFRecordDataset(files).map(tf.io.parse_single_example + dense labels per example).batch(256).
  (d) packed f32: make_dataset on packed shards, float32 features.
  (e) packed f16: make_dataset on packed shards, float16 features, yielded as float32 (the default).
  (f) in memory: data_pipeline.memory.make_memory_dataset over load_split of the packed float32 shards.
  (g) packed f16 stored, (h) in memory f16 stored: (e) and (f) on float16 data yielding float16 features
                (ReaderOptions.stored_dtype: what a GPU input path would copy to the device).
  (z) floor:    one precomputed batch repeated: what taking a batch costs the consumer loop and tf.data
                alone, with no input work at all (every row above includes it).
Every pipeline shuffles, batch 256. Batches are consumed inside a tf.function, 100 per call, as the trainer
consumes them (no Python per batch). Prints examples/s and CPU time per example (all threads of the process)
of each: medians over rounds, each round measuring every pipeline back to back; ratios to (b) per round,
then their median.

Targets (issue 17; CPU time per example, 1000 dense features, 200 labels): d <= 0.25 b, e <= 0.15 b,
f <= 0.05 b. --json FILE writes reader_cpu_us, packed_f32_cpu_us, packed_f16_cpu_us, in_memory_cpu_us and
the rest.
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
from data_pipeline import memory  # noqa: E402
from data_pipeline.reader import ReaderOptions, make_dataset, split_files  # noqa: E402

LABELS = {"a_raw": "(a) raw read", "b_reader": "(b) reader", "c_naive": "(c) naive",
          "d_packed_f32": "(d) packed f32", "e_packed_f16": "(e) packed f16", "f_in_memory": "(f) in memory",
          "g_packed_f16_stored": "(g) packed f16, f16 out", "h_in_memory_f16_stored": "(h) memory f16, f16 out",
          "z_floor": "(z) floor: one batch repeated"}
JSON_KEYS = {"b_reader": "reader_cpu_us", "d_packed_f32": "packed_f32_cpu_us", "e_packed_f16": "packed_f16_cpu_us",
             "f_in_memory": "in_memory_cpu_us", "g_packed_f16_stored": "packed_f16_stored_cpu_us",
             "h_in_memory_f16_stored": "in_memory_f16_stored_cpu_us", "a_raw": "raw_cpu_us", "c_naive": "naive_cpu_us",
             "z_floor": "floor_cpu_us"}
TARGETS = {"d_packed_f32": 0.25, "e_packed_f16": 0.15, "f_in_memory": 0.05}


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


def _drain_function():
    """A function taking ``batches`` batches inside one graph, as the trainer's steps do; returns the examples
    seen (one per pipeline: it is traced for the pipeline's element structure)."""

    @tf.function
    def drain(iterator, batches):
        seen = tf.constant(0, tf.int64)
        for _ in tf.range(batches):
            first = tf.nest.flatten(next(iterator))[0]
            seen += tf.shape(first, out_type=tf.int64)[0]
        return seen

    return drain


def measure(ds: tf.data.Dataset, warmup_batches: int, batches: int) -> tuple[float, float]:
    """Returns (examples per second, process CPU microseconds per example) over ``batches`` batches after
    ``warmup_batches``.

    CPU time per example (all threads of this process) is reported beside wall-clock throughput because
    on a shared machine other processes take cores away from one measurement and not the next.
    """
    it, drain = iter(ds), _drain_function()
    drain(it, tf.constant(warmup_batches))
    t, cpu = time.perf_counter(), time.process_time()
    n = 0
    for start in range(0, batches, 100):
        n += int(drain(it, tf.constant(min(100, batches - start))))
    return n / (time.perf_counter() - t), (time.process_time() - cpu) / n * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "mlt-bench-pipeline"),
                   help="parent of the datasets (example/, packed-float32/, packed-float16/)")
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
    tf.get_logger().setLevel("ERROR")  # each pipeline's drain function is traced once: not a retracing problem
    if (args.warmup_batches + args.batches) * args.batch_size > args.examples:
        p.error("--warmup-batches + --batches must fit in one pass over --examples (repeat is off)")

    dirs = {name: os.path.join(args.data_dir, name) for name in ("example", "packed-float32", "packed-float16")}
    shape = (args.examples, args.features, args.labels, args.shards)
    ensure_dataset(dirs["example"], *shape)
    ensure_dataset(dirs["packed-float32"], *shape, layout="packed")
    ensure_dataset(dirs["packed-float16"], *shape, layout="packed", feature_dtype="float16")
    t = time.perf_counter()
    in_memory = {dtype: memory.load_split(dirs[f"packed-{dtype}"], "train") for dtype in ("float32", "float16")}
    print(f"loaded both packed datasets into memory in {time.perf_counter() - t:.0f} s "
          f"({in_memory['float32'].nbytes / 2**20:.0f} + {in_memory['float16'].nbytes / 2**20:.0f} MiB)")
    files = split_files(dirs["example"], "train")
    one_batch = next(iter(memory.make_memory_dataset(in_memory["float32"], args.batch_size)))
    shuffled = ReaderOptions(shuffle=True, repeat=False)
    batch = args.batch_size
    pipelines = {
        "a_raw": lambda: raw_pipeline(files, batch),
        "b_reader": lambda: make_dataset(dirs["example"], "train", batch, options=shuffled),
        "c_naive": lambda: naive_pipeline(files, batch, args.features, args.labels),
        "d_packed_f32": lambda: make_dataset(dirs["packed-float32"], "train", batch, options=shuffled),
        "e_packed_f16": lambda: make_dataset(dirs["packed-float16"], "train", batch, options=shuffled),
        "f_in_memory": lambda: memory.make_memory_dataset(in_memory["float32"], batch, seed=1),
        "g_packed_f16_stored": lambda: make_dataset(dirs["packed-float16"], "train", batch, options=ReaderOptions(
            shuffle=True, repeat=False, stored_dtype=True)),
        "h_in_memory_f16_stored": lambda: memory.make_memory_dataset(in_memory["float16"], batch, seed=1,
                                                                     stored_dtype=True),
        "z_floor": lambda: tf.data.Dataset.from_tensors(one_batch).repeat().prefetch(tf.data.AUTOTUNE),
    }
    rounds = []
    for r in range(args.rounds):
        rounds.append({})
        for name, build in pipelines.items():
            rate, cpu_us = measure(build(), args.warmup_batches, args.batches)
            rounds[-1][name] = (rate, cpu_us)
            print(f"  round {r + 1} {name:22s} {rate:12,.0f} examples/s  {cpu_us:6.2f} CPU us/example", flush=True)
    rates = {k: float(np.median([r[k][0] for r in rounds])) for k in pipelines}
    cpu = {k: float(np.median([r[k][1] for r in rounds])) for k in pipelines}
    cpu_vs_reader = {k: float(np.median([r[k][1] / r["b_reader"][1] for r in rounds])) for k in pipelines}
    result = {
        **{JSON_KEYS[k]: round(v, 3) for k, v in cpu.items()},
        "median_examples_per_s": {k: round(v) for k, v in rates.items()},
        "median_cpu_us_per_example": {k: round(v, 3) for k, v in cpu.items()},
        "cpu_vs_reader": {k: round(v, 3) for k, v in cpu_vs_reader.items()},
        "ratio_b_over_a": round(float(np.median([r["b_reader"][0] / r["a_raw"][0] for r in rounds])), 3),
        "ratio_b_over_c": round(float(np.median([r["b_reader"][0] / r["c_naive"][0] for r in rounds])), 2),
        "rounds": [{k: [round(v[0]), round(v[1], 3)] for k, v in r.items()} for r in rounds],
        "measured_examples": args.batches * args.batch_size, "batch_size": args.batch_size,
        "dataset": {"examples": args.examples, "features": args.features, "labels": args.labels,
                    "shards": args.shards},
        "cpus": os.cpu_count(), "tensorflow": tf.__version__, "python": platform.python_version(),
    }
    print(f"median over {args.rounds} rounds (CPU time per example / the reader's, median of the rounds' ratios):")
    for key, label in LABELS.items():
        target = f"   target <= {TARGETS[key]}" if key in TARGETS else ""
        print(f"{label:26s} {rates[key]:12,.0f} examples/s  {cpu[key]:6.2f} CPU us/example  "
              f"{cpu_vs_reader[key]:6.3f} x reader{target}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
