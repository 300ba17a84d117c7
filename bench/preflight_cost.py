"""Cost of the pre-flight shard check (trainer.preflight.check_shards: records counted from the TFRecord
framing) against one pass of the input pipeline over the same split, in one run.

Usage:
  python bench/preflight_cost.py [--data DIR] [--examples 200000] [--features 1000] [--labels 200] [--shards 16]

The dataset is generated into --data unless it already holds one of that shape. Prints wall and CPU seconds of
the check (3 rounds; the files are in the page cache after the first round or after generating them) and of
one unshuffled pass of data_pipeline.reader at batch 256, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import ensure_dataset  # noqa: E402
from data_pipeline import reader  # noqa: E402
from trainer import preflight  # noqa: E402


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def read_once(data_dir: str) -> None:
    options = reader.ReaderOptions(shuffle=False, repeat=False, deterministic=True)
    for _ in reader.make_dataset(data_dir, "train", 256, options=options):
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/tmp/mlt-bench/preflight")
    p.add_argument("--examples", type=int, default=200000)
    p.add_argument("--features", type=int, default=1000)
    p.add_argument("--labels", type=int, default=200)
    p.add_argument("--shards", type=int, default=16)
    args = p.parse_args()
    m = ensure_dataset(args.data, args.examples, args.features, args.labels, args.shards)
    size = sum(os.path.getsize(os.path.join(args.data, s)) for s in m.splits["train"].shards)
    print(f"{args.data}: {m.splits['train'].num_examples} records, {len(m.splits['train'].shards)} shards, "
          f"{size / 2**20:.0f} MiB")
    checks = [timed(lambda: preflight.check_shards(args.data, "train", m)) for _ in range(3)]
    for wall, cpu in checks:
        print(f"  check_shards: {wall:.3f} s wall, {cpu:.3f} s CPU "
              f"({1e6 * cpu / m.splits['train'].num_examples:.2f} µs CPU per record)")
    wall, cpu = timed(lambda: read_once(args.data))
    print(f"  one reader pass (batch 256, no shuffle): {wall:.2f} s wall, {cpu:.2f} s CPU")
    best = min(checks)
    print(f"  check / reader pass: {best[0] / wall:.3f} wall, {best[1] / cpu:.3f} CPU")


if __name__ == "__main__":
    main()
