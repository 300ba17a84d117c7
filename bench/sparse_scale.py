"""Sparse inputs at scale: the sparse path against today's densified path, and a 50,000-label run in bounded memory.

Usage:
  python bench/sparse_scale.py [--small] [--steps N] [--dense-steps N] [--data-dir DIR] [--json FILE]

Data: ``generate --sparse`` bag-of-words documents (Zipf word and label frequencies, 100 distinct words per
document), F = 100,000 features, 200,000 examples, in the packed sparse (CSR) encoding; L = 5,000 labels for the
throughput comparison, and a second dataset with L = 50,000 labels (5 % of it an eval split). Model: 2048-2048-L,
batch 256, trainer.optimizers.build_optimizer (lazy row-sparse AdamW for the sparse first layer), trained by
trainer/steps.py's train function on one device.

Phases, each in its own process (its peak RSS is that process's ru_maxrss), one after the other:

  sparse: trainer.model.build_model(..., sparse_features=True), batches from
      data_pipeline.reader.make_dataset(..., ReaderOptions(sparse_output=True)) as tf.SparseTensor;
  dense: the dense model on the same data, the reader densifying the batches ([256, 100,000] float32);
      it runs only ``--dense-steps`` steps;
  labels_50k: the sparse path with 50,000 labels: ``--steps`` training steps, then one evaluation pass over the
      eval split with the trainer's metric state (trainer.evaluation.metric_state_function, make_eval_function,
      trainer.metrics.compute.compute_metrics), peak RSS after training and after evaluation.

Examples/s is measured after 2 warm-up steps, wall clock, with the CPU time beside it. The phases run with
TF_CPU_ALLOCATOR_USE_BFC=true (bench/README.md, sparse first layer: TensorFlow's default CPU allocator gives
every large temporary back to the system). ``--json FILE`` writes sparse_ex_s, dense_ex_s, sparse_vs_dense,
peak_rss_gib_50k_labels and the details. ``--small``: a shape that runs in about a minute (a check of the
script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import write_json  # noqa: E402

FULL = dict(features=100_000, nonzeros=100, labels=5_000, many_labels=50_000, examples=200_000, width=2048,
            batch=256)
SMALL = dict(features=2_000, nonzeros=20, labels=100, many_labels=1_000, examples=4_000, width=64, batch=64)


def ensure_sparse_dataset(data_dir: str, shape: dict, labels: int, split_eval: float):
    """Generates the bag-of-words dataset unless ``data_dir`` holds one of this shape."""
    from data_pipeline import manifest as mf
    from data_pipeline.generate import generate

    try:
        m = mf.read_manifest(data_dir)
        if (m.num_features, m.num_labels, sum(s.num_examples for s in m.splits.values()), m.feature_encoding,
                "eval" in m.splits) == (shape["features"], labels, shape["examples"], mf.PACKED_SPARSE, split_eval > 0):
            print(f"reusing {data_dir}", flush=True)
            return
    except Exception:  # noqa: BLE001 - anything unusable is regenerated
        pass
    print(f"generating {shape['examples']:,} documents x {shape['features']:,} features x {labels:,} labels "
          f"into {data_dir} ...", flush=True)
    t = time.perf_counter()
    generate(data_dir, shape["examples"], shape["features"], labels, 16, seed=0, split_eval=split_eval,
             overwrite=True, sparse_nonzeros=shape["nonzeros"])
    print(f"  generated in {time.perf_counter() - t:.0f} s", flush=True)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _training(data_dir: str, shape: dict, sparse: bool, total_steps: int):
    """(model, train function, iterator, manifest) of one run on one device."""
    from data_pipeline import manifest as mf
    from data_pipeline.reader import ReaderOptions, make_dataset
    from trainer.backends import make_backend
    from trainer.config import LossConfig, ModelConfig, OptimizerConfig
    from trainer.losses import MultiLabelLoss
    from trainer.model import build_model
    from trainer.optimizers import build_optimizer
    from trainer.steps import make_train_function

    m = mf.read_manifest(data_dir)
    backend = make_backend("one_device")
    with backend.scope():
        model = build_model(m.num_features, m.num_labels, ModelConfig(hidden=[shape["width"]] * 2),
                            sparse_features=sparse)
        optimizer = build_optimizer(OptimizerConfig(), shape["batch"], total_steps, False)
        optimizer.build(model.trainable_variables)
    train = make_train_function(backend, model, optimizer, MultiLabelLoss(LossConfig(), m.num_labels), shape["batch"])
    options = ReaderOptions(sparse_output=sparse, seed=1, drop_remainder=True)
    iterator = iter(backend.distribute_dataset(
        lambda ctx: make_dataset(data_dir, "train", shape["batch"], ctx, options)))
    return backend, model, train, iterator, m


def _timed_steps(train, iterator, steps: int, batch: int, per_call: int) -> dict:
    train(iterator, 2)  # warm-up: tracing and the first batches
    wall, cpu = time.perf_counter(), time.process_time()
    done = 0
    while done < steps:
        n = min(per_call, steps - done)
        train(iterator, n)
        done += n
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"steps": steps, "ex_s": steps * batch / wall, "cpu_ms_per_example": 1000 * cpu / (steps * batch),
            "wall_s": wall}


def phase_throughput(data_dir: str, shape: dict, sparse: bool, steps: int) -> dict:
    backend, model, train, iterator, m = _training(data_dir, shape, sparse, steps + 2)
    result = _timed_steps(train, iterator, steps, shape["batch"], per_call=10 if sparse else 1)
    result["peak_rss_gib"] = peak_rss_gib()
    return result


def phase_many_labels(data_dir: str, shape: dict, steps: int) -> dict:
    import numpy as np

    from data_pipeline.reader import ReaderOptions, make_dataset
    from trainer.config import LossConfig, MetricsConfig
    from trainer.evaluation import EvalSource, metric_state_function, sum_metric_state
    from trainer.losses import MultiLabelLoss
    from trainer.metrics import compute
    from trainer.metrics import state as metric_state
    from trainer.steps import make_eval_function

    backend, model, train, iterator, m = _training(data_dir, shape, True, steps + 2)
    result = _timed_steps(train, iterator, steps, shape["batch"], per_call=10)
    result["peak_rss_gib_train"] = peak_rss_gib()
    train_split = m.splits["train"]
    thresholds = np.full(m.num_labels, 0.5, np.float32)
    num_bins, state_fn = metric_state_function(MetricsConfig(), m.num_labels, thresholds, train_split.label_counts,
                                               train_split.num_examples)
    evaluate = make_eval_function(backend, model, MultiLabelLoss(LossConfig(), m.num_labels), state_fn)
    options = ReaderOptions(shuffle=False, repeat=False, deterministic=True, sparse_output=True)
    batches = backend.distribute_dataset(lambda ctx: make_dataset(data_dir, "eval", shape["batch"], ctx, options))
    t = time.perf_counter()
    state = metric_state.zero_state(m.num_labels, num_bins)
    state["loss_sum"] = np.zeros((), np.float64)
    state = backend.reduce_eval_total(sum_metric_state(batches, evaluate, state, EvalSource(data_dir, "eval")))
    metrics = compute.compute_metrics(state, m.label_names, thresholds, train_split.label_counts)
    result.update(eval_s=time.perf_counter() - t, eval_examples=int(state["num_examples"]), num_bins=num_bins,
                  eval_loss=float(state["loss_sum"]) / float(state["num_examples"]),
                  eval_metrics={k: float(v) for k, v in metrics.aggregates.items()},
                  peak_rss_gib=peak_rss_gib())
    return result


def run_phase(name: str, args) -> dict:
    """Runs one phase in a fresh process (its own peak RSS); returns what it printed as its last line."""
    env = {**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true"}
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", name, "--data-dir", args.data_dir,
           "--steps", str(args.steps), "--dense-steps", str(args.dense_steps)] + (["--small"] if args.small else [])
    print(f"phase {name} ...", flush=True)
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(f"  {name}: {json.dumps(result)}", flush=True)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a small shape (checks the script; not a measurement)")
    p.add_argument("--steps", type=int, default=200, help="measured steps of the sparse runs")
    p.add_argument("--dense-steps", type=int, default=5, help="measured steps of the densified run")
    p.add_argument("--data-dir", default="/tmp/mlt_bench", help="where the generated datasets are kept")
    p.add_argument("--phase", choices=["sparse", "dense", "labels_50k"], help=argparse.SUPPRESS)
    p.add_argument("--json")
    args = p.parse_args(argv)
    shape = SMALL if args.small else FULL
    tag = "small" if args.small else "full"
    few, many = (os.path.join(args.data_dir, f"sparse_{tag}_{n}") for n in ("few_labels", "many_labels"))
    if args.phase:
        result = (phase_many_labels(many, shape, args.steps) if args.phase == "labels_50k" else
                  phase_throughput(few, shape, args.phase == "sparse",
                                   args.steps if args.phase == "sparse" else args.dense_steps))
        print(json.dumps(result))
        return result

    ensure_sparse_dataset(few, shape, shape["labels"], 0.0)
    ensure_sparse_dataset(many, shape, shape["many_labels"], 0.05)
    phases = {name: run_phase(name, args) for name in ("sparse", "dense", "labels_50k")}
    result = {"sparse_ex_s": phases["sparse"]["ex_s"], "dense_ex_s": phases["dense"]["ex_s"],
              "sparse_vs_dense": phases["sparse"]["ex_s"] / phases["dense"]["ex_s"],
              "peak_rss_gib_50k_labels": phases["labels_50k"]["peak_rss_gib"], "phases": phases,
              "shape": shape, "steps": args.steps, "dense_steps": args.dense_steps}
    print(f"sparse {result['sparse_ex_s']:.0f} ex/s, dense {result['dense_ex_s']:.1f} ex/s: "
          f"{result['sparse_vs_dense']:.1f}x; {shape['many_labels']:,} labels: peak RSS "
          f"{result['peak_rss_gib_50k_labels']:.2f} GiB (train {phases['labels_50k']['peak_rss_gib_train']:.2f})")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
