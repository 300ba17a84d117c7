"""Training throughput: this package's trainer against the in-memory compute limit and plain Keras, in one run.

Usage:
  python bench/train_throughput.py [--data-dir DIR] [--steps N] [--batch-size B] [--precision P]
                                   [--repeats R] [--json FILE]

Measured in the same process, one after the other (``--repeats`` alternates the rounds a, b, c, a, b, c, ...
and reports the median of each), on the 2048-2048-200 MLP of configs/default.yaml and 1000-feature
synthetic TFRecords:

  (a) in memory: trainer.model.build_model + build_optimizer + the one-device train function of
      trainer.steps.make_train_function, fed by ``tf.data.Dataset.from_tensors(batch).repeat()`` (one real
      batch read once): the compute limit of the model and optimizer, no input pipeline, no loop.
  (b) trainer:   trainer.train.train end to end from the TFRecords (one_device; also mirrored over all GPUs
      where there are several), checkpoints and evaluation off.
  (c) keras:     Sequential(Dense 2048 relu, Dense 2048 relu, Dense 200 sigmoid), compile(binary_crossentropy,
      adam), fit on TFRecordDataset -> shuffle -> map(parse_single_example, multi-hot labels per example,
      AUTOTUNE) -> batch(B) -> prefetch.

Start-up costs are excluded the same way for all three: each first runs ``--warmup-steps`` steps (tracing,
oneDNN/XLA compilation, filling the input pipeline and prefetch buffers), then the next ``--steps`` steps are
timed by wall clock. (a) runs them in one call; (b) is timed between the trainer's own progress log lines
(the first one after the warm-up and the last one), so the window holds everything the loop does per step
(host syncs, counters, logging); (c) between Keras batch-end callbacks.

Prints examples/s, step time and achieved TFLOP/s (trainer.model.model_flops_per_example) of each, and the
ratios b/a (target >= 0.95) and b/c (target >= 1.0). ``--json FILE`` writes the raw figures with the keys
in_memory_ex_s, trainer_ex_s, keras_baseline_ex_s, trainer_vs_in_memory and trainer_vs_keras (plus
per-round values, device, precision and batch size).

``--precision auto`` is mixed_float16 on GPUs with tensor cores and float32 elsewhere (trainer.precision);
all three measurements use the resolved policy (the Keras baseline's output layer stays float32).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.common import ensure_dataset, parse_one_example, write_json  # noqa: E402
from data_pipeline import manifest as mf  # noqa: E402
from data_pipeline import reader  # noqa: E402
from trainer import config as config_lib  # noqa: E402
from trainer import precision as precision_lib  # noqa: E402
from trainer.backends import make_backend  # noqa: E402
from trainer.losses import MultiLabelLoss  # noqa: E402
from trainer.model import build_model, model_flops_per_example  # noqa: E402
from trainer.optimizers import build_optimizer  # noqa: E402
from trainer import steps as steps_lib  # noqa: E402
from trainer.train import train as trainer_train  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROGRESS = re.compile(r"^step (\d+)/(\d+) ")


def device_name() -> str:
    """The accelerator's name, else the CPU model with its core count."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
        return f"{len(gpus)} x {names[0]}"
    cpu = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores (CPU only)"


def bench_config(args, precision: str, distribution: str, batch_size: int, max_steps: int) -> config_lib.Config:
    """configs/default.yaml with the benchmark's batch, precision and distribution; no evaluation, no
    periodic checkpoints, progress logged every ``--warmup-steps`` steps (the timing marks). One MLP
    (``model.ensemble=1``): the 2048-2048-L network the Keras baseline also trains; an ensemble of K costs
    K times the compute of one member (``--set model.ensemble=K`` measures it)."""
    return config_lib.load_config(args.config, [
        f"train.batch_size={batch_size}", f"train.precision={precision}", f"train.distribution={distribution}",
        f"train.max_steps={max_steps}", "train.epochs=1000", "train.early_stopping_patience=0",
        f"train.log_every_steps={args.log_every}", "data.validation_fraction=0.0", "data.eval_split=''",
        "checkpoint.every_steps=0", "checkpoint.every_seconds=0", "model.ensemble=1", *args.set])


def run_in_memory(args, cfg: config_lib.Config, manifest: mf.Manifest, precision: str) -> dict:
    """(a): the trainer's model, optimizer and one-device train function on one batch held in memory."""
    policy = precision_lib.apply_policy(precision)
    backend = make_backend("one_device")
    batch = next(iter(reader.make_dataset(args.data_dir, "train", cfg.train.batch_size, options=reader.ReaderOptions(
        shuffle=False, repeat=True, drop_remainder=True))))
    batch = tuple(tf.identity(t) for t in batch)  # Materialised once, outside any pipeline.
    total = args.warmup_steps + args.steps
    with backend.scope():
        model = build_model(manifest.num_features, manifest.num_labels, cfg.model, seed=cfg.train.seed)
        optimizer = build_optimizer(cfg.optimizer, cfg.train.batch_size, total, loss_scale=policy == "mixed_float16")
        optimizer.build(model.trainable_variables)
    loss_fn = MultiLabelLoss(cfg.loss, manifest.num_labels)
    train_fn = steps_lib.make_train_function(backend, model, optimizer, loss_fn, cfg.train.batch_size,
                                             cfg.train.jit_compile)
    iterator = iter(backend.distribute_dataset(lambda ctx: tf.data.Dataset.from_tensors(batch).repeat()))
    train_fn(iterator, args.warmup_steps)
    t0 = time.perf_counter()
    stats = train_fn(iterator, args.steps)
    seconds = time.perf_counter() - t0
    return {"examples": stats.examples, "steps": args.steps, "seconds": seconds}


class _ProgressTimes(logging.Handler):
    """Records (step, wall time) of every progress line the trainer logs."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.marks: list[tuple[int, float]] = []

    def emit(self, record):
        m = _PROGRESS.match(record.getMessage())
        if m:
            self.marks.append((int(m.group(1)), time.perf_counter()))


def run_trainer(args, precision: str, distribution: str, batch_size: int) -> dict:
    """(b): trainer.train.train end to end, timed between its progress log lines after the warm-up."""
    total = args.warmup_steps + args.steps
    cfg = bench_config(args, precision, distribution, batch_size, total)
    handler = _ProgressTimes()
    train_log = logging.getLogger("trainer.train")
    train_log.addHandler(handler)
    try:
        with tempfile.TemporaryDirectory(prefix="mlt-bench-model-") as model_dir:
            trainer_train(cfg, args.data_dir, model_dir)
    finally:
        train_log.removeHandler(handler)
    marks = [(s, t) for s, t in handler.marks if s >= args.warmup_steps]
    if len(marks) < 2:
        raise RuntimeError(f"the trainer logged too few progress lines: {handler.marks}")
    (s0, t0), (s1, t1) = marks[0], marks[-1]
    return {"examples": float((s1 - s0) * batch_size), "steps": s1 - s0, "seconds": t1 - t0}


def keras_dataset(files: list[str], batch_size: int, num_features: int, num_labels: int) -> tf.data.Dataset:
    """(c)'s input: the straightforward per-example pipeline over the same files."""
    ds = tf.data.TFRecordDataset(files).repeat().shuffle(10000)
    ds = ds.map(parse_one_example(num_features, num_labels), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


class _BatchTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())


def run_keras(args, manifest: mf.Manifest, precision: str, batch_size: int) -> dict:
    """(c): the plain Keras MLP with compile/fit, timed between batch-end callbacks after the warm-up."""
    precision_lib.apply_policy(precision)
    hidden = args.hidden
    model = keras.Sequential([keras.Input((manifest.num_features,))]
                             + [keras.layers.Dense(w, activation="relu") for w in hidden]
                             + [keras.layers.Dense(manifest.num_labels, activation="sigmoid", dtype="float32")])
    model.compile(loss="binary_crossentropy", optimizer="adam")
    ds = keras_dataset(reader.split_files(args.data_dir, "train"), batch_size, manifest.num_features,
                       manifest.num_labels)
    timer = _BatchTimes()
    model.fit(ds, steps_per_epoch=args.warmup_steps + args.steps, epochs=1, verbose=0, callbacks=[timer])
    t0, t1 = timer.times[args.warmup_steps - 1], timer.times[-1]
    steps = len(timer.times) - args.warmup_steps
    return {"examples": float(steps * batch_size), "steps": steps, "seconds": t1 - t0}


def summarise(name: str, runs: list[dict], flops: float) -> dict:
    rates = [r["examples"] / r["seconds"] for r in runs]
    ex_s = statistics.median(rates)
    step_ms = statistics.median([1000.0 * r["seconds"] / r["steps"] for r in runs])
    out = {"ex_s": ex_s, "step_ms": step_ms, "tflop_s": ex_s * flops / 1e12, "rounds_ex_s": rates}
    print(f"  {name:<34} {ex_s:>10,.0f} ex/s  {step_ms:8.1f} ms/step  {out['tflop_s']:6.3f} TFLOP/s"
          f"   rounds: {', '.join(f'{r:,.0f}' for r in rates)}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "mlt-bench"),
                   help="benchmark dataset (generated when missing or of another shape)")
    p.add_argument("--examples", type=int, default=60000)
    p.add_argument("--features", type=int, default=1000)
    p.add_argument("--labels", type=int, default=200)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "default.yaml"),
                   help="trainer config of (a) and (b) (default: configs/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for (a) and (b), e.g. train.steps_per_call=20 (repeatable)")
    p.add_argument("--steps", type=int, default=200, help="timed steps of each measurement")
    p.add_argument("--warmup-steps", type=int, default=20, help="untimed steps before them")
    p.add_argument("--batch-size", type=int, default=256, help="batch per device")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "mixed_bfloat16", "mixed_float16"])
    p.add_argument("--repeats", type=int, default=1, help="rounds of (a), (b), (c); medians are reported")
    p.add_argument("--skip", default="", help="comma-separated measurements to leave out: in_memory,trainer,keras")
    p.add_argument("--json", default=None, help="write the raw figures to this JSON file")
    args = p.parse_args(argv)
    if args.steps % args.warmup_steps:
        p.error("--steps must be a multiple of --warmup-steps (the trainer logs every --warmup-steps steps)")
    args.log_every = args.warmup_steps
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("trainer").setLevel(logging.INFO)
    logging.getLogger("trainer.train").propagate = False  # progress lines are timing marks, not output
    skip = {s for s in args.skip.split(",") if s}

    manifest = ensure_dataset(args.data_dir, args.examples, args.features, args.labels, args.shards)
    precision = precision_lib.resolve(args.precision)
    cfg = bench_config(args, precision, "one_device", args.batch_size, args.warmup_steps + args.steps)
    args.hidden = list(cfg.model.hidden)
    flops = model_flops_per_example(manifest.num_features, manifest.num_labels, args.hidden, cfg.model.ensemble)
    gpus = tf.config.list_logical_devices("GPU")
    device = device_name()
    print(f"device: {device}; precision {precision}; batch {args.batch_size} per device; model "
          f"{manifest.num_features}-{'-'.join(map(str, args.hidden))}-{manifest.num_labels}"
          f"{f' x {cfg.model.ensemble} members' if cfg.model.ensemble > 1 else ''} "
          f"({flops / 1e6:.1f} MFLOP/example for training); steps_per_call {cfg.train.steps_per_call}, "
          f"jit_compile {cfg.train.jit_compile}; {args.warmup_steps} warm-up + {args.steps} timed steps; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    runs: dict[str, list[dict]] = {"in_memory": [], "trainer": [], "keras": [], "trainer_mirrored": []}
    for r in range(args.repeats):
        print(f"round {r + 1}/{args.repeats} (load average {os.getloadavg()[0]:.1f})", flush=True)
        if "in_memory" not in skip:
            runs["in_memory"].append(run_in_memory(args, cfg, manifest, precision))
        if "trainer" not in skip:
            runs["trainer"].append(run_trainer(args, precision, "one_device", args.batch_size))
            if len(gpus) > 1:
                runs["trainer_mirrored"].append(run_trainer(args, precision, "mirrored",
                                                            args.batch_size * len(gpus)))
        if "keras" not in skip:
            runs["keras"].append(run_keras(args, manifest, precision, args.batch_size))

    print("results (median over rounds):")
    labels = {"in_memory": "(a) in memory (compute limit)", "trainer": "(b) trainer, one device",
              "trainer_mirrored": f"(b) trainer, mirrored x{len(gpus)}", "keras": "(c) plain Keras fit"}
    res = {k: summarise(labels[k], v, flops) for k, v in runs.items() if v}
    out = {"device": device, "precision": precision, "batch_size": args.batch_size, "steps": args.steps,
           "warmup_steps": args.warmup_steps, "repeats": args.repeats, "flops_per_example": flops,
           "steps_per_call": cfg.train.steps_per_call, "jit_compile": cfg.train.jit_compile,
           "model": [manifest.num_features, *args.hidden, manifest.num_labels], "data_dir": args.data_dir,
           "load_average_end": os.getloadavg()[0], "results": res}
    for key, name in (("in_memory_ex_s", "in_memory"), ("trainer_ex_s", "trainer"),
                      ("keras_baseline_ex_s", "keras"), ("trainer_mirrored_ex_s", "trainer_mirrored")):
        if name in res:
            out[key] = res[name]["ex_s"]
    if "trainer" in res and "in_memory" in res:
        out["trainer_vs_in_memory"] = res["trainer"]["ex_s"] / res["in_memory"]["ex_s"]
        print(f"trainer / in memory (b/a): {out['trainer_vs_in_memory']:.3f}  (target >= 0.95)")
    if "trainer" in res and "keras" in res:
        out["trainer_vs_keras"] = res["trainer"]["ex_s"] / res["keras"]["ex_s"]
        print(f"trainer / Keras     (b/c): {out['trainer_vs_keras']:.3f}  (target >= 1.0)")
    if "trainer_mirrored" in res and "in_memory" in res:
        out["mirrored_scaling"] = res["trainer_mirrored"]["ex_s"] / (len(gpus) * res["in_memory"]["ex_s"])
        print(f"mirrored / ({len(gpus)} x in memory): {out['mirrored_scaling']:.3f}")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
