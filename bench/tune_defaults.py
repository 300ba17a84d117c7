"""Choosing defaults by validation only: K-fold cross-validation of config candidates on a train split.

Usage:
  python bench/tune_defaults.py --data DATA_DIR [--folds 3] [--candidate 'NAME:KEY=VALUE;KEY=VALUE' ...]
                                [--config configs/default.yaml] [--work DIR] [--json FILE]

The train split of DATA_DIR (a dataset written by ``python -m data_pipeline convert``) is cut into
``--folds`` folds (a fixed random permutation of its records). For every candidate and fold, the model is
trained on the other folds exactly as the CLI trains it (``python -m trainer train --config CONFIG --set ...``,
so early stopping still uses the validation records the config carves out of that training data) and
evaluated on the held-out fold (``python -m trainer evaluate --split valid``). Prints, per candidate, the mean
(and spread) over folds of P@1/3/5, micro/macro F1 and macro PR-AUC, and the training time.

No test split is read: the folds come from the train split only, so the choice made from this table never
sees test data. A candidate with no overrides (``--candidate base:``) is the config as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import write_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("precision@1", "precision@3", "precision@5", "micro_f1", "macro_f1", "macro_pr_auc")


def make_folds(data_dir: str, out_dir: str, folds: int, seed: int = 0) -> list[str]:
    """Writes ``folds`` dataset directories, fold k holding split 'valid' = fold k and 'train' = the rest.

    Records are copied as they are (same encoding and manifest fields); label counts are recomputed.
    Existing fold directories of the same source and seed are reused.
    """
    import numpy as np
    import tensorflow as tf

    from data_pipeline import manifest as mf
    from data_pipeline import reader

    m = mf.read_manifest(data_dir)
    tag = f"{os.path.abspath(data_dir)} folds={folds} seed={seed}"
    dirs = [os.path.join(out_dir, f"fold{k}") for k in range(folds)]
    if all(os.path.exists(os.path.join(d, mf.MANIFEST_NAME)) and mf.read_manifest(d).source == tag for d in dirs):
        return dirs
    records = [r.numpy() for r in tf.data.TFRecordDataset(reader.split_files(data_dir, "train", m),
                                                          compression_type=m.compression or None)]
    labels = [tf.io.parse_single_example(r, {mf.KEY_LABELS: tf.io.VarLenFeature(tf.int64)})[mf.KEY_LABELS]
              .values.numpy() for r in records]
    fold_of = np.random.default_rng(seed).permutation(len(records)) % folds
    for k, d in enumerate(dirs):
        os.makedirs(d, exist_ok=True)
        splits = {}
        for split, members in (("train", fold_of != k), ("valid", fold_of == k)):
            name = mf.shard_name(split, 0, 1)
            counts = np.zeros(m.num_labels, np.int64)
            with tf.io.TFRecordWriter(os.path.join(d, name),
                                      options=tf.io.TFRecordOptions(compression_type=m.compression or None)) as w:
                for i in np.flatnonzero(members):
                    w.write(records[i])
                    counts[np.unique(labels[i])] += 1
            splits[split] = mf.SplitInfo([name], [int(members.sum())], counts.tolist())
        mf.write_manifest(d, mf.Manifest(m.num_features, m.num_labels, m.label_names, m.feature_encoding, splits,
                                         m.compression, tag))
    return dirs


def parse_candidate(text: str) -> tuple[str, list[str]]:
    """'name:key=value;key=value' -> (name, ['key=value', ...])."""
    name, _, rest = text.partition(":")
    return name.strip(), [s.strip() for s in rest.split(";") if s.strip()]


def run_fold(python: str, config: str, fold_dir: str, model_dir: str, overrides: list[str]) -> dict:
    """Trains on the fold's train split and evaluates on its valid split; returns the metrics."""
    cmd = [python, "-m", "trainer", "train", "--config", config, "--data", fold_dir, "--model-dir", model_dir]
    for o in overrides:
        cmd += ["--set", o]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    out = os.path.join(model_dir, "metrics-valid.json")
    subprocess.run([python, "-m", "trainer", "evaluate", "--model-dir", model_dir, "--data", fold_dir,
                    "--split", "valid", "--out", out], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    with open(out) as f:
        metrics = json.load(f)
    metrics["train_seconds"] = seconds
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", required=True, help="dataset directory with a train split")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    p.add_argument("--config", default=os.path.join(REPO, "configs", "default.yaml"))
    p.add_argument("--candidate", action="append", default=[], metavar="'NAME:KEY=VALUE;KEY=VALUE'",
                   help="config overrides to try (repeatable); default: the config unchanged")
    p.add_argument("--work", default=None, help="folds and model directories (default: a temporary directory)")
    p.add_argument("--python", default=sys.executable, help="interpreter running the trainer CLI")
    p.add_argument("--json", default=None, help="write every fold's metrics to this JSON file")
    args = p.parse_args(argv)
    candidates = [parse_candidate(c) for c in args.candidate] or [("base", [])]
    work = args.work or tempfile.mkdtemp(prefix="mlt-tune-")
    folds = make_folds(args.data, os.path.join(work, "folds"), args.folds, args.seed)
    print(f"{args.data}: {args.folds} folds of the train split in {work}; config {args.config}", flush=True)
    results = {}
    for name, overrides in candidates:
        runs = []
        for k, fold_dir in enumerate(folds):
            model_dir = os.path.join(work, "runs", name, f"fold{k}")
            subprocess.run(["rm", "-rf", model_dir], check=True)
            runs.append(run_fold(args.python, args.config, fold_dir, model_dir, overrides))
        results[name] = {"overrides": overrides, "folds": runs}
        mean = {k: statistics.mean(r[k] for r in runs) for k in (*KEYS, "train_seconds")}
        spread = {k: (max(r[k] for r in runs) - min(r[k] for r in runs)) / 2 for k in KEYS}
        results[name]["mean"] = mean
        print(f"{name:<28} " + "  ".join(f"{k.replace('precision', 'P')} {mean[k]:.4f}±{spread[k]:.3f}" for k in KEYS)
              + f"  {mean['train_seconds']:.0f} s  [{'; '.join(overrides)}]", flush=True)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
