"""Accuracy on a real multi-label dataset: this package's CLI against two baselines, in one run.

Usage:
  python bench/real_data.py [--dataset bibtex] [--datasets-dir ../shared/datasets] [--work DIR] [--json FILE]

Steps (defaults for bibtex, the Mulan sparse ARFF files):
  1. convert:  python -m data_pipeline convert --format arff --input <name>-train.arff <name>-test.arff
               --labels-xml <name>.xml --out WORK/data
  2. train:    python -m trainer train --config configs/default.yaml --data WORK/data --model-dir WORK/model
               (nothing but the data paths: the defaults are what is measured)
  3. evaluate: python -m trainer evaluate --model-dir WORK/model --data WORK/data --split test
               --out WORK/metrics.json
  4. baselines on the same train/test split, read back from the converted dataset:
     - one-vs-rest logistic regression (scikit-learn, LogisticRegression(max_iter=1000), C=1);
     - the plain Keras MLP Dense 2048 relu -> Dense 2048 relu -> Dense L sigmoid, compile(binary_crossentropy,
       adam), fit 10 epochs, batch 128, on the raw features.

Prints P@1/3/5, micro/macro F1 and macro PR-AUC of each. The package's row is the evaluate command's output:
its F1 uses the per-label thresholds of the run (tuned on validation records when the config holds some out;
configs/default.yaml does not, so they are 0.5); the baselines use 0.5, so a row "this package @0.5" (same
model, thresholds 0.5, from ``python -m trainer predict``) is printed too.
All metrics come from the same code (trainer.metrics: P@k exact, PR-AUC from 200-bin histograms), so the rows
differ only in the predictions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("precision@1", "precision@3", "precision@5", "micro_f1", "macro_f1", "macro_pr_auc")


def sh(cmd: list[str], log_path: str) -> float:
    """Runs a CLI command from the repository root (output into log_path); returns its wall time."""
    print("  $ " + " ".join(cmd), flush=True)
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        with open(log_path) as f:
            sys.exit(f"command failed ({proc.returncode}):\n{f.read()[-3000:]}")
    return time.perf_counter() - t


def load_split(data_dir: str, split: str):
    """Features and multi-hot labels of a split, in dataset order, as NumPy arrays."""
    import numpy as np

    from data_pipeline import reader

    options = reader.ReaderOptions(shuffle=False, repeat=False, deterministic=True, cycle_length=1)
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in reader.make_dataset(data_dir, split, 1024, options=options)])
    return np.concatenate(xs), np.concatenate(ys)


def metrics_from_probs(y, probs, label_names, thresholds=None, num_bins: int = 200) -> dict:
    """The package's metric definitions applied to given probabilities (thresholds default to 0.5)."""
    import numpy as np
    import tensorflow as tf

    from trainer.metrics import compute
    from trainer.metrics import state as metric_state

    thresholds = np.full(y.shape[1], 0.5, np.float32) if thresholds is None else thresholds
    acc = metric_state.zero_state(y.shape[1], num_bins)
    for i in range(0, len(y), 1024):
        new = metric_state.batch_metric_state(tf.constant(y[i:i + 1024], tf.float32),
                                              tf.constant(probs[i:i + 1024], tf.float32),
                                              tf.constant(thresholds), num_bins)
        acc = metric_state.accumulate(acc, {k: v.numpy() for k, v in new.items()})
    return dict(compute.compute_metrics(acc, label_names, thresholds).aggregates)


def logistic_regression(x_train, y_train, x_test, seed: int):
    """One-vs-rest logistic regression; labels without positives in train get probability 0."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    probs = np.zeros((len(x_test), y_train.shape[1]), np.float32)
    for j in range(y_train.shape[1]):
        if 0 < y_train[:, j].sum() < len(y_train):
            clf = LogisticRegression(max_iter=1000, random_state=seed).fit(x_train, y_train[:, j])
            probs[:, j] = clf.predict_proba(x_test)[:, 1]
        else:
            probs[:, j] = y_train[0, j]
    return probs


def keras_mlp(x_train, y_train, x_test, seed: int):
    """The plain Keras 2048-2048-L MLP: adam, binary cross-entropy, 10 epochs, batch 128."""
    import keras

    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_global_policy("float32")
    model = keras.Sequential([keras.Input((x_train.shape[1],)), keras.layers.Dense(2048, activation="relu"),
                              keras.layers.Dense(2048, activation="relu"),
                              keras.layers.Dense(y_train.shape[1], activation="sigmoid")])
    model.compile(loss="binary_crossentropy", optimizer="adam")
    model.fit(x_train, y_train, epochs=10, batch_size=128, verbose=0)
    return model.predict(x_test, batch_size=1024, verbose=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dataset", default="bibtex", help="folder under --datasets-dir (Mulan ARFF + XML)")
    p.add_argument("--datasets-dir", default=os.path.join(os.path.dirname(REPO), "shared", "datasets"),
                   help="where the shared datasets are (read only; default: ../shared/datasets of the repo)")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--work", default=None, help="converted data, model, logs (default: a temporary directory)")
    p.add_argument("--python", default=sys.executable, help="interpreter running the package CLIs")
    p.add_argument("--seed", type=int, default=0, help="seed of the baselines")
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--json", default=None, help="write all figures to this JSON file")
    args = p.parse_args(argv)
    src = os.path.join(args.datasets_dir, args.dataset)
    work = args.work or tempfile.mkdtemp(prefix=f"mlt-{args.dataset}-")
    os.makedirs(work, exist_ok=True)
    data, model, metrics_path = (os.path.join(work, n) for n in ("data", "model", "metrics.json"))
    print(f"{args.dataset}: {src} -> {work}; load average {os.getloadavg()[0]:.1f}", flush=True)

    times = {}
    times["convert_s"] = sh([args.python, "-m", "data_pipeline", "convert", "--format", "arff", "--input",
                             os.path.join(src, f"{args.dataset}-train.arff"),
                             os.path.join(src, f"{args.dataset}-test.arff"),
                             "--labels-xml", os.path.join(src, f"{args.dataset}.xml"), "--out", data, "--overwrite"],
                            os.path.join(work, "convert.log"))
    subprocess.run(["rm", "-rf", model], check=True)
    times["train_s"] = sh([args.python, "-m", "trainer", "train", "--config", args.config, "--data", data,
                           "--model-dir", model], os.path.join(work, "train.log"))
    times["evaluate_s"] = sh([args.python, "-m", "trainer", "evaluate", "--model-dir", model, "--data", data,
                              "--split", "test", "--out", metrics_path], os.path.join(work, "evaluate.log"))
    preds = os.path.join(work, "test-predictions.npz")
    sh([args.python, "-m", "trainer", "predict", "--model-dir", model, "--data", data, "--split", "test",
        "--out", preds], os.path.join(work, "predict.log"))
    with open(metrics_path) as f:
        rows = {"this package": json.load(f)}

    import numpy as np

    from data_pipeline import manifest as mf

    names = mf.read_manifest(data).label_names
    x_train, y_train = load_split(data, "train")
    x_test, y_test = load_split(data, "test")
    with np.load(preds) as z:
        rows["this package @0.5"] = metrics_from_probs(y_test, z["probabilities"], names)
    if not args.skip_baselines:
        t = time.perf_counter()
        rows["logistic regression (OvR)"] = metrics_from_probs(
            y_test, logistic_regression(x_train, y_train, x_test, args.seed), names)
        times["logistic_regression_s"] = time.perf_counter() - t
        t = time.perf_counter()
        rows["Keras MLP 2048-2048"] = metrics_from_probs(y_test, keras_mlp(x_train, y_train, x_test, args.seed),
                                                         names)
        times["keras_mlp_s"] = time.perf_counter() - t

    print(f"\n{args.dataset} test split ({len(y_test)} examples, {y_test.shape[1]} labels); train "
          f"{times['train_s']:.0f} s")
    print(f"{'':<28}" + "".join(f"{k.replace('precision', 'P'):>14}" for k in KEYS))
    for name, m in rows.items():
        print(f"{name:<28}" + "".join(f"{m[k]:>14.4f}" for k in KEYS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dataset": args.dataset, "config": args.config, "work": work, "times": times,
                       "rows": {n: {k: m[k] for k in KEYS} for n, m in rows.items()}}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
