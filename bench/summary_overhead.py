"""Cost of per-label TensorBoard summaries: training with them on and off, alternated, in one run.

Usage:
  python bench/summary_overhead.py [--data-dir DIR] [--labels 1000] [--rounds 3] [--steps 600]
                                   [--eval-every 50] [--json FILE]

Trains the same setup (a 1000-label synthetic dataset with a small eval split, model hidden [256], an
evaluation every ``--eval-every`` steps) with ``metrics.per_label_summaries=false`` and ``=true``, alternating
the two (off, on, off, on, ... ``--rounds`` times each, the order swapped every round), each a complete
``trainer.train.train`` call into a fresh model directory. Reports training examples/s by wall clock over the
whole call (model building, tracing, every evaluation and its summaries, the final checkpoint and export:
everything but the interpreter start-up), the median of each setting, and the ratio on/off (target: the
slowdown 1 - on/off at most 10 %). Also prints the size of the eval event files.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import ensure_dataset, write_json  # noqa: E402
from trainer import config as config_lib  # noqa: E402
from trainer.train import train  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(args, per_label: bool) -> dict:
    """One complete training run; returns its wall-clock examples/s."""
    cfg = config_lib.load_config(os.path.join(REPO, "configs", "default.yaml"), [
        f"model.hidden={args.hidden}", "model.dropout=0.0", "model.ensemble=1",
        f"train.batch_size={args.batch_size}",
        f"train.max_steps={args.steps}", "train.epochs=1000", f"train.eval_every_steps={args.eval_every}",
        "train.early_stopping_patience=0", "train.precision=float32", "train.distribution=one_device",
        f"train.log_every_steps={args.eval_every}", "data.validation_fraction=0.0", "data.eval_split=eval",
        "checkpoint.every_steps=0", "checkpoint.every_seconds=0",
        f"metrics.per_label_summaries={str(per_label).lower()}"])
    with tempfile.TemporaryDirectory(prefix="mlt-summaries-") as model_dir:
        t = time.perf_counter()
        result = train(cfg, args.data_dir, model_dir)
        seconds = time.perf_counter() - t
        event_bytes = sum(os.path.getsize(f) for f in glob.glob(os.path.join(model_dir, "logs", "eval", "*")))
    examples = result.step * args.batch_size
    return {"per_label_summaries": per_label, "seconds": seconds, "ex_s": examples / seconds,
            "eval_event_bytes": event_bytes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "mlt-bench-1000-labels"))
    p.add_argument("--examples", type=int, default=22000, help="train + eval examples")
    p.add_argument("--features", type=int, default=500)
    p.add_argument("--labels", type=int, default=1000)
    p.add_argument("--split-eval", type=float, default=2000 / 22000, help="fraction in the eval split")
    p.add_argument("--hidden", default="[256]", help="model.hidden")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=600, help="training steps per run")
    p.add_argument("--eval-every", type=int, default=50, help="train.eval_every_steps")
    p.add_argument("--rounds", type=int, default=3, help="runs of each setting (at least 2)")
    p.add_argument("--json", default=None, help="write the raw figures to this JSON file")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be at least 2")
    logging.basicConfig(level=logging.WARNING)
    ensure_dataset(args.data_dir, args.examples, args.features, args.labels, 8, args.split_eval)
    print(f"{args.labels} labels, hidden {args.hidden}, batch {args.batch_size}, {args.steps} steps, evaluation "
          f"every {args.eval_every} steps; load average {os.getloadavg()[0]:.1f}", flush=True)
    one_run(args, False)  # Untimed: first-use costs of the process (imports, thread pools, file cache).
    runs = []
    for r in range(args.rounds):
        for per_label in ((False, True) if r % 2 == 0 else (True, False)):
            run = one_run(args, per_label)
            runs.append(run)
            print(f"  round {r + 1} per_label_summaries={str(per_label).lower():<5} {run['ex_s']:8,.0f} ex/s "
                  f"({run['seconds']:.1f} s, eval events {run['eval_event_bytes'] / 1e6:.2f} MB; load "
                  f"{os.getloadavg()[0]:.1f})", flush=True)
    off = statistics.median(r["ex_s"] for r in runs if not r["per_label_summaries"])
    on = statistics.median(r["ex_s"] for r in runs if r["per_label_summaries"])
    out = {"labels": args.labels, "hidden": args.hidden, "steps": args.steps, "eval_every": args.eval_every,
           "batch_size": args.batch_size, "off_ex_s": off, "on_ex_s": on, "on_vs_off": on / off,
           "slowdown": 1 - on / off, "runs": runs}
    print(f"per-label summaries off: {off:,.0f} ex/s; on: {on:,.0f} ex/s; on/off {on / off:.3f} "
          f"(slowdown {100 * (1 - on / off):.1f} %, target <= 10 %)")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
