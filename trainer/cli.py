"""Command line of the trainer: train, evaluate and predict.

Exit status: 0 on success (also after SIGTERM/SIGINT, which stop training at the end of the current call with a
checkpoint), 2 with a one-line reason on bad input (config, data, model directory, a model directory in use),
1 when training stopped on a NaN/Inf loss or a disk is full (one line too). A second SIGTERM/SIGINT ends the
process at once, by the signal (exit status 143 / 130).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from trainer import config as config_lib
from trainer.backends import DISTRIBUTIONS


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m trainer", description=doc[0], epilog=doc[1])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model, or resume its training",
                       description="Train a model, or resume its training from the model directory's latest "
                                   "checkpoint (run the same command again). Settings: the defaults, then --config, "
                                   "then --set, then the flags below that name a key.")
    t.add_argument("--data", required=True, help="dataset directory (written by python -m data_pipeline "
                                                 "generate or convert)")
    t.add_argument("--eval-data", default=None, help="dataset directory whose data.eval_split is evaluated "
                                                     "during training (default: --data)")
    t.add_argument("--model-dir", required=True, help="directory for checkpoints, config.yaml, TensorBoard logs "
                                                      "and the export")
    t.add_argument("--config", default=None, help="YAML config, e.g. configs/tiny.yaml (default: the defaults, "
                                                  "written out in configs/default.yaml)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set a config key (YAML value), e.g. --set model.hidden=[1024,1024]; repeatable "
                        "(default: none)")
    t.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="same as --set train.epochs=N (default: the config's)")
    t.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="same as --set train.max_steps=N (default: the config's)")
    t.add_argument("--distribution", default=None, metavar="NAME",
                   help=f"same as --set train.distribution=NAME, one of auto, {', '.join(DISTRIBUTIONS)} "
                        "(default: the config's)")
    t.add_argument("--precision", default=None, metavar="NAME",
                   help="same as --set train.precision=NAME, one of "
                        f"{', '.join(sorted(config_lib.CHOICES['train.precision']))} (default: the config's)")

    e = sub.add_parser("evaluate", help="evaluate a model directory on a dataset split",
                       description="Evaluate a model directory on a dataset split: metrics JSON, per-label CSV and "
                                   "a table on stdout.")
    e.add_argument("--model-dir", required=True, help="model directory of a training run")
    e.add_argument("--data", required=True, help="dataset directory")
    e.add_argument("--split", default=None, help="split to evaluate (default: test, else eval, else train)")
    e.add_argument("--out", default=None, help="metrics JSON; the per-label CSV goes beside it "
                                                "(default: MODEL_DIR/metrics-SPLIT.json)")
    e.add_argument("--source", choices=["auto", "checkpoint", "export"], default="auto",
                   help="what to evaluate: auto takes the export if it is newer than the latest checkpoint (with "
                        "early stopping it holds the best evaluation's weights), else the checkpoint "
                        "(default: auto)")
    e.add_argument("--batch-size", type=int, default=1024, metavar="N", help="examples per batch (default: 1024)")

    r = sub.add_parser("predict", help="per-label probabilities, top-k labels and thresholded label sets",
                       description="Predict with a model directory (its export, else its latest checkpoint).")
    r.add_argument("--model-dir", required=True, help="model directory of a training run")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="dataset directory (records are predicted in dataset order)")
    src.add_argument("--input", help="features file: .npy, .npz (array 'features' or 'x'), .csv (no header), or "
                                      "LIBSVM text .libsvm/.svm/.txt ('[labels] idx:val ...' per line, labels "
                                      "ignored)")
    r.add_argument("--index-base", type=int, choices=[0, 1], default=0,
                   help="LIBSVM --input: index of the first feature (as data_pipeline convert: 0 for XMC repository "
                        "files, 1 for classic LIBSVM; default: 0)")
    r.add_argument("--split", default=None, help="split of --data (default: test, else eval, else train)")
    r.add_argument("--out", required=True, help=".jsonl (per example its top-k labels with probabilities and its "
                                                "thresholded label set) or .npz (the same as arrays, plus the [N, L] "
                                                "probabilities up to 1000 labels)")
    r.add_argument("--top-k", type=int, default=5, metavar="K", help="best labels written per example (default: 5)")
    r.add_argument("--batch-size", type=int, default=1024, metavar="N", help="examples per batch (default: 1024)")
    return p


def _set_up_process() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow's BFC allocator for host memory (read when TensorFlow starts): it keeps freed buffers for reuse
    # instead of returning each large temporary to the system (bench/README.md: 25-35 % less CPU per example on
    # both input paths). TF_CPU_ALLOCATOR_USE_BFC=false in the environment keeps the default allocator.
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    _set_up_process()
    # Logical CPU devices must be configured before TensorFlow touches a device (MirroredStrategy on CPU).
    if os.environ.get("MLT_LOGICAL_CPUS"):
        from trainer.backends import configure_logical_cpus

        configure_logical_cpus(int(os.environ["MLT_LOGICAL_CPUS"]))
    from data_pipeline.errors import DataError, as_disk_full
    from trainer.checkpointing import ResumeError
    from trainer.config import ConfigError, load_config

    try:
        if args.command == "train":
            from trainer import cluster
            from trainer.train import TrainingError, train

            cluster.maybe_set_tf_config_from_indexed_job()
            cfg = load_config(args.config, args.overrides, {
                "train.epochs": args.epochs, "train.max_steps": args.max_steps,
                "train.distribution": args.distribution, "train.precision": args.precision})
            try:
                result = train(cfg, args.data, args.model_dir, args.eval_data)
            except TrainingError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            logdir = os.path.join(args.model_dir, "logs")
            if result.stopped_by_signal:
                print(f"stopped by signal at step {result.step}; checkpoint saved; run the same command to resume")
            else:
                print(f"trained {result.step} steps; exported model: {result.export_dir}")
            print(f"TensorBoard logs: {logdir}  (tensorboard --logdir {logdir})")
        elif args.command == "evaluate":
            from trainer import inference

            inference.evaluate_command(args.model_dir, args.data, args.split, args.out, args.source, args.batch_size)
        else:
            from trainer import inference

            inference.predict_command(args.model_dir, args.data, args.input, args.split, args.out, args.top_k,
                                      args.batch_size, args.index_base)
    except (ConfigError, DataError, ResumeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a full disk is one line too (exit 1); anything else keeps its traceback
        full = as_disk_full(e)
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return 1
    return 0
