"""Sparse or dense input on a real sparse dataset: the trainer's two paths on the same data and model, in one run.

Usage:
  python bench/sparse_input.py [--data DIR] [--arff-dir DIR] [--synthetic-features F] [--hidden 2048,2048]
                               [--batch-size B] [--calls N] [--steps-per-call S] [--json FILE]

The dataset (default: bibtex, F = 1836 features, ~69 non-zeros per example, sparse ARFF) is converted once with
``data_pipeline convert --format arff`` (packed CSR shards) into ``--data``. ``--synthetic-features F`` writes
instead 4096 bag-of-words examples over F features (70 Zipf-distributed ids each, 159 labels) as LIBSVM text and
converts that: the same density per example as bibtex, at another vocabulary size. For each path, the trainer's pieces
as ``trainer train`` uses them on one device: the reader (``sparse_output`` on or off: a tf.SparseTensor batch,
or the densified [B, F] one), ``build_model(sparse_features=...)`` (SparseDense or Dense first layer),
``build_optimizer`` (lazy row update or the fused dense one) and ``make_train_function``. Measured: ``--calls``
train calls of ``--steps-per-call`` steps after two warm-up calls; examples/s (wall) and CPU µs per example
(process time, both cores). Prints the ratios dense/sparse; ``--json FILE`` writes them (keys sparse_ex_s,
dense_ex_s, sparse_cpu_us, dense_cpu_us, dense_vs_sparse_cpu). Run it with and without
``TF_CPU_ALLOCATOR_USE_BFC=true`` (set before TensorFlow starts) to compare the allocators.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def measure(data_dir: str, sparse: bool, hidden: list[int], batch: int, calls: int, steps_per_call: int) -> dict:
    import keras

    from data_pipeline import manifest as mf
    from data_pipeline import reader
    from trainer.backends import make_backend
    from trainer.config import LossConfig, ModelConfig, OptimizerConfig
    from trainer.losses import MultiLabelLoss
    from trainer.model import build_model
    from trainer.optimizers import build_optimizer
    from trainer.steps import make_train_function

    m = mf.read_manifest(data_dir)
    keras.utils.set_random_seed(0)
    backend = make_backend("one_device")
    with backend.scope():
        model = build_model(m.num_features, m.num_labels, ModelConfig(hidden=hidden), sparse_features=sparse)
        optimizer = build_optimizer(OptimizerConfig(), batch, 10_000, loss_scale=False)
        optimizer.build(model.trainable_variables)
    train = make_train_function(backend, model, optimizer, MultiLabelLoss(LossConfig(), m.num_labels), batch)
    options = reader.ReaderOptions(shuffle=True, repeat=True, drop_remainder=True, sparse_output=sparse)
    iterator = iter(backend.distribute_dataset(
        lambda ctx: reader.make_dataset(data_dir, "train", batch, ctx, options)))
    for _ in range(2):
        train(iterator, steps_per_call)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        train(iterator, steps_per_call)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    examples = calls * steps_per_call * batch
    return {"ex_s": examples / wall, "cpu_us": 1e6 * cpu / examples}


def write_synthetic(data_dir: str, num_features: int, examples: int = 4096, labels: int = 159) -> None:
    import numpy as np

    from data_pipeline.converters import ConvertOptions, convert

    rng = np.random.default_rng(0)
    popularity = 1.0 / np.arange(1, num_features + 1)
    popularity /= popularity.sum()
    text = data_dir + ".libsvm"
    with open(text, "w") as f:
        for _ in range(examples):
            ids = np.unique(rng.choice(num_features, size=70, p=popularity))
            tags = ",".join(map(str, np.unique(rng.integers(0, labels, size=3))))
            f.write(tags + " " + " ".join(f"{i}:1" for i in ids) + "\n")
    convert(ConvertOptions(format="libsvm", out=data_dir, inputs=(text,), splits=("train",),
                           num_features=num_features, num_labels=labels))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/tmp/bench_bibtex_packed")
    p.add_argument("--arff-dir", default="/work/shared/datasets/bibtex")
    p.add_argument("--synthetic-features", type=int, default=0)
    p.add_argument("--hidden", default="2048,2048")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--steps-per-call", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.synthetic_features:
        args.data = f"{args.data}-synthetic-{args.synthetic_features}"
    if not os.path.exists(os.path.join(args.data, "manifest.json")):
        from data_pipeline.converters import ConvertOptions, convert

        if args.synthetic_features:
            write_synthetic(args.data, args.synthetic_features)
        else:
            convert(ConvertOptions(format="arff", out=args.data, inputs=tuple(
                os.path.join(args.arff_dir, f"bibtex-{s}.arff") for s in ("train", "test"))))
    hidden = [int(w) for w in args.hidden.split(",")]
    results = {path: measure(args.data, path == "sparse", hidden, args.batch_size, args.calls, args.steps_per_call)
               for path in ("sparse", "dense")}
    out = {"sparse_ex_s": results["sparse"]["ex_s"], "dense_ex_s": results["dense"]["ex_s"],
           "sparse_cpu_us": results["sparse"]["cpu_us"], "dense_cpu_us": results["dense"]["cpu_us"],
           "dense_vs_sparse_cpu": results["dense"]["cpu_us"] / results["sparse"]["cpu_us"],
           "bfc": os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "")}
    for path in ("sparse", "dense"):
        print(f"{path:6s} input: {results[path]['ex_s']:8,.0f} ex/s  {results[path]['cpu_us']:8,.0f} CPU us/example")
    print(f"dense / sparse CPU per example: {out['dense_vs_sparse_cpu']:.2f}x  "
          f"(TF_CPU_ALLOCATOR_USE_BFC={out['bfc']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
