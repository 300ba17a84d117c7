"""Training throughput: this package's trainer in each input mode against the in-memory compute limit and plain
Keras, in one run.

Usage:
  python bench/train_throughput.py [--data-dir DIR] [--steps N] [--batch-size B[,B...]] [--precision P]
                                   [--hidden W [W ...]] [--modes M,...] [--peak-tflops T] [--repeats R]
                                   [--json FILE]
  python bench/train_throughput.py --gpu --peak-tflops 790 --json gpu.json   # the GPU mode (bench/README.md)

Measured in the same process, one after the other (``--repeats`` alternates the rounds and reports the median
of each), on the MLP of configs/default.yaml (2048-2048-200; ``--hidden 64`` makes the input path dominate the
step) and 1000-feature synthetic data, written twice with the same examples: one example per record (the
older layout) and packed blocks (``--feature-dtype``):

  (a) in memory: trainer.model.build_model + build_optimizer + the one-device train function of
      trainer.steps.make_train_function, fed by ``tf.data.Dataset.from_tensors(batch).repeat()`` (one real
      batch read once): the compute limit of the model and optimizer, no input pipeline, no loop.
  (b) trainer:   trainer.train.train end to end (one_device; also mirrored over all GPUs where there are
      several), checkpoints and evaluation off, in each input mode of ``--modes``: ``stream_example`` (the
      reader on one-example-per-record shards), ``stream`` (the reader on packed shards), ``memory`` (host
      arrays) and ``device`` (arrays on the replicas' devices, gathered in the step): data.input_mode.
  (c) keras:     Sequential(Dense relu ..., Dense 200 sigmoid), compile(binary_crossentropy, adam), fit on
      TFRecordDataset -> shuffle -> map(parse_single_example, multi-hot labels per example, AUTOTUNE) ->
      batch(B) -> prefetch, over the one-example-per-record shards.

Start-up costs are excluded the same way for all three: each first runs ``--warmup-steps`` steps (tracing,
oneDNN/XLA compilation, filling the input pipeline and prefetch buffers; the memory modes' load happens before
them), then the next ``--steps`` steps are timed by wall clock and by the process' CPU time. (a) runs them in
one call; (b) is timed between the trainer's own progress log lines (the first one after the warm-up and the
last one), so the window holds everything the loop does per step (host syncs, counters, logging); (c) between
Keras batch-end callbacks.

Prints examples/s, step time, CPU µs per example (all threads of the process: on a CPU the model's own work is
in it too) and achieved TFLOP/s (trainer.model.model_flops_per_example) of each, the fraction of
``--peak-tflops`` when given, and the ratios b/a and b/c. ``--json FILE`` writes the raw figures with the keys
in_memory_ex_s, trainer_ex_s (today's: streaming one example per record, one device), keras_baseline_ex_s,
trainer_vs_in_memory, trainer_vs_keras, and per measurement under ``results`` (plus device, precision, batch
sizes).

``--gpu``: the GPU mode, the same code with the settings a GPU needs: precision auto (mixed_float16 on GPUs
with tensor cores, trainer.precision), packed float16 data of ``--examples`` 1,048,576 (enough for the largest
batch), batch sizes 4096, 8192, 16384, 32768 and 65536 per device, every input mode, one GPU and, with several,
all local GPUs mirrored; the Keras baseline is left out (its per-example parse cannot feed a GPU).
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
# Input modes of (b): name -> (data.input_mode, which copy of the data)
MODES = {"stream_example": ("stream", "example"), "stream": ("stream", "packed"), "memory": ("memory", "packed"),
         "device": ("device", "packed")}
GPU_BATCH_SIZES = "4096,8192,16384,32768,65536"


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


def bench_config(args, precision: str, distribution: str, batch_size: int, max_steps: int,
                 input_mode: str = "stream") -> config_lib.Config:
    """configs/default.yaml with the benchmark's batch, precision, distribution, input mode and ``--hidden``; no
    evaluation, no periodic checkpoints, progress logged every ``--warmup-steps`` steps (the timing marks). One
    MLP (``model.ensemble=1``): the network the Keras baseline also trains; an ensemble of K costs K times the
    compute of one member (``--set model.ensemble=K`` measures it). The memory budget is unlimited: the mode
    is the one asked for."""
    hidden = [f"model.hidden={args.hidden}"] if args.hidden else []
    return config_lib.load_config(args.config, [
        f"train.batch_size={batch_size}", f"train.precision={precision}", f"train.distribution={distribution}",
        f"train.max_steps={max_steps}", "train.epochs=1000", "train.early_stopping_patience=0",
        f"train.log_every_steps={args.log_every}", "data.validation_fraction=0.0", "data.eval_split=''",
        f"data.input_mode={input_mode}", "checkpoint.every_steps=0", "checkpoint.every_seconds=0",
        "model.ensemble=1", *hidden, *args.set])


def run_in_memory(args, cfg: config_lib.Config, manifest: mf.Manifest, precision: str) -> dict:
    """(a): the trainer's model, optimizer and one-device train function on one batch held in memory."""
    policy = precision_lib.apply_policy(precision)
    backend = make_backend("one_device")
    options = reader.ReaderOptions(shuffle=False, repeat=True, drop_remainder=True)
    batch = next(iter(reader.make_dataset(args.data_dirs["packed"], "train", cfg.train.batch_size, options=options)))
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
    t0, c0 = time.perf_counter(), time.process_time()
    stats = train_fn(iterator, args.steps)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"examples": stats.examples, "steps": args.steps, "seconds": seconds, "cpu_seconds": cpu}


class _ProgressTimes(logging.Handler):
    """Records (step, wall time, process CPU time) of every progress line the trainer logs."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.marks: list[tuple[int, float]] = []

    def emit(self, record):
        m = _PROGRESS.match(record.getMessage())
        if m:
            self.marks.append((int(m.group(1)), time.perf_counter(), time.process_time()))


def run_trainer(args, precision: str, distribution: str, batch_size: int, mode: str = "stream_example") -> dict:
    """(b): trainer.train.train end to end in input mode ``mode`` (MODES), timed between its progress log lines
    after the warm-up."""
    total = args.warmup_steps + args.steps
    input_mode, layout = MODES[mode]
    cfg = bench_config(args, precision, distribution, batch_size, total, input_mode)
    handler = _ProgressTimes()
    train_log = logging.getLogger("trainer.train")
    train_log.addHandler(handler)
    try:
        with tempfile.TemporaryDirectory(prefix="mlt-bench-model-") as model_dir:
            trainer_train(cfg, args.data_dirs[layout], model_dir)
    finally:
        train_log.removeHandler(handler)
    marks = [m for m in handler.marks if m[0] >= args.warmup_steps]
    if len(marks) < 2:
        raise RuntimeError(f"the trainer logged too few progress lines: {handler.marks}")
    (s0, t0, c0), (s1, t1, c1) = marks[0], marks[-1]
    return {"examples": float((s1 - s0) * batch_size), "steps": s1 - s0, "seconds": t1 - t0, "cpu_seconds": c1 - c0}


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
        self.times.append((time.perf_counter(), time.process_time()))


def run_keras(args, manifest: mf.Manifest, precision: str, batch_size: int) -> dict:
    """(c): the plain Keras MLP with compile/fit, timed between batch-end callbacks after the warm-up."""
    precision_lib.apply_policy(precision)
    hidden = args.model_hidden
    model = keras.Sequential([keras.Input((manifest.num_features,))]
                             + [keras.layers.Dense(w, activation="relu") for w in hidden]
                             + [keras.layers.Dense(manifest.num_labels, activation="sigmoid", dtype="float32")])
    model.compile(loss="binary_crossentropy", optimizer="adam")
    ds = keras_dataset(reader.split_files(args.data_dirs["example"], "train"), batch_size, manifest.num_features,
                       manifest.num_labels)
    timer = _BatchTimes()
    model.fit(ds, steps_per_epoch=args.warmup_steps + args.steps, epochs=1, verbose=0, callbacks=[timer])
    (t0, c0), (t1, c1) = timer.times[args.warmup_steps - 1], timer.times[-1]
    steps = len(timer.times) - args.warmup_steps
    return {"examples": float(steps * batch_size), "steps": steps, "seconds": t1 - t0, "cpu_seconds": c1 - c0}


def summarise(name: str, runs: list[dict], flops: float, peak_tflops: float | None) -> dict:
    rates = [r["examples"] / r["seconds"] for r in runs]
    ex_s = statistics.median(rates)
    step_ms = statistics.median([1000.0 * r["seconds"] / r["steps"] for r in runs])
    cpu_us = statistics.median([1e6 * r["cpu_seconds"] / r["examples"] for r in runs])
    out = {"ex_s": ex_s, "step_ms": step_ms, "cpu_us_per_example": cpu_us, "tflop_s": ex_s * flops / 1e12,
           "rounds_ex_s": rates}
    peak = ""
    if peak_tflops:
        out["fraction_of_peak"] = out["tflop_s"] / peak_tflops
        peak = f" ({100 * out['fraction_of_peak']:5.1f} % of peak)"
    print(f"  {name:<44} {ex_s:>11,.0f} ex/s  {step_ms:8.1f} ms/step  {cpu_us:7.2f} CPU us/ex  "
          f"{out['tflop_s']:7.3f} TFLOP/s{peak}   rounds: {', '.join(f'{r:,.0f}' for r in rates)}", flush=True)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "mlt-bench"),
                   help="benchmark dataset, one example per record (generated when missing or of another shape); "
                        "the packed copy goes to DIR-packed-DTYPE")
    p.add_argument("--examples", type=int, default=None, help="default 60000 (--gpu: 1048576)")
    p.add_argument("--features", type=int, default=1000)
    p.add_argument("--labels", type=int, default=200)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--feature-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="stored dtype of the packed copy (default float32; --gpu: float16)")
    p.add_argument("--config", default=os.path.join(REPO, "configs", "default.yaml"),
                   help="trainer config of (a) and (b) (default: configs/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for (a) and (b), e.g. train.steps_per_call=20 (repeatable)")
    p.add_argument("--hidden", type=int, nargs="+", default=None, metavar="W",
                   help="hidden widths instead of the config's, e.g. --hidden 64 (the input path dominates)")
    p.add_argument("--modes", default=None, help=f"input modes of (b), comma-separated, of {', '.join(MODES)} "
                                                 "(default: all)")
    p.add_argument("--steps", type=int, default=200, help="timed steps of each measurement")
    p.add_argument("--warmup-steps", type=int, default=20, help="untimed steps before them")
    p.add_argument("--batch-size", default=None, help="batch per device, or several comma-separated (default 256; "
                                                      f"--gpu: {GPU_BATCH_SIZES})")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "mixed_bfloat16", "mixed_float16"])
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s at this precision (e.g. 790 for an H200's bf16/fp16 matrix "
                        "products): prints each row's fraction of it")
    p.add_argument("--gpu", action="store_true", help="the GPU mode (see below)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of (a), (b), (c); medians are reported")
    p.add_argument("--skip", default="", help="comma-separated measurements to leave out: in_memory,trainer,keras")
    p.add_argument("--json", default=None, help="write the raw figures to this JSON file")
    args = p.parse_args(argv)
    if args.steps % args.warmup_steps:
        p.error("--steps must be a multiple of --warmup-steps (the trainer logs every --warmup-steps steps)")
    args.examples = args.examples or (1048576 if args.gpu else 60000)
    args.feature_dtype = args.feature_dtype or ("float16" if args.gpu else "float32")
    args.batch_sizes = [int(b) for b in (args.batch_size or (GPU_BATCH_SIZES if args.gpu else "256")).split(",")]
    args.modes = (args.modes or ",".join(MODES)).split(",")
    unknown = set(args.modes) - set(MODES)
    if unknown:
        p.error(f"--modes: unknown {', '.join(sorted(unknown))} (of {', '.join(MODES)})")
    args.skip = {s for s in args.skip.split(",") if s} | ({"keras"} if args.gpu else set())
    args.log_every = args.warmup_steps
    return args


def measure(args, cfg, manifest, precision: str, gpus: list) -> dict[str, list[dict]]:
    """Every measurement of every round, keyed by its name."""
    runs: dict[str, list[dict]] = {}
    distributions = ["one_device"] + (["mirrored"] if len(gpus) > 1 else [])
    for r in range(args.repeats):
        print(f"round {r + 1}/{args.repeats} (load average {os.getloadavg()[0]:.1f})", flush=True)
        for batch in args.batch_sizes:
            if "in_memory" not in args.skip:
                runs.setdefault(f"in_memory/b{batch}", []).append(
                    run_in_memory(args, bench_config(args, precision, "one_device", batch, 1), manifest, precision))
            for distribution in distributions if "trainer" not in args.skip else ():
                replicas = len(gpus) if distribution == "mirrored" else 1
                for mode in args.modes:
                    runs.setdefault(f"trainer/{distribution}/{mode}/b{batch}", []).append(
                        run_trainer(args, precision, distribution, batch * replicas, mode))
            if "keras" not in args.skip:
                runs.setdefault(f"keras/b{batch}", []).append(run_keras(args, manifest, precision, batch))
    return runs


def report(args, runs: dict, flops: float, device: str, precision: str, cfg) -> dict:
    """Prints the medians and ratios; returns the JSON result."""
    print("results (median over rounds):")
    res = {name: summarise(name, v, flops, args.peak_tflops) for name, v in runs.items()}
    b = args.batch_sizes[0]
    out = {"device": device, "precision": precision, "batch_sizes": args.batch_sizes, "steps": args.steps,
           "warmup_steps": args.warmup_steps, "repeats": args.repeats, "flops_per_example": flops,
           "steps_per_call": cfg.train.steps_per_call, "jit_compile": cfg.train.jit_compile,
           "model": [args.features, *args.model_hidden, args.labels], "data_dirs": args.data_dirs,
           "peak_tflops": args.peak_tflops, "load_average_end": os.getloadavg()[0], "results": res}
    for key, name in (("in_memory_ex_s", f"in_memory/b{b}"),
                      ("trainer_ex_s", f"trainer/one_device/stream_example/b{b}"), ("keras_baseline_ex_s", f"keras/b{b}"),
                      ("trainer_mirrored_ex_s", f"trainer/mirrored/stream_example/b{b}")):
        if name in res:
            out[key] = res[name]["ex_s"]
    if "trainer_ex_s" in out and "in_memory_ex_s" in out:
        out["trainer_vs_in_memory"] = out["trainer_ex_s"] / out["in_memory_ex_s"]
        print(f"trainer (streaming, one example per record) / in memory (b/a): {out['trainer_vs_in_memory']:.3f}")
    if "trainer_ex_s" in out and "keras_baseline_ex_s" in out:
        out["trainer_vs_keras"] = out["trainer_ex_s"] / out["keras_baseline_ex_s"]
        print(f"trainer (streaming, one example per record) / Keras (b/c): {out['trainer_vs_keras']:.3f}")
    for name, r in res.items():
        base = res.get(f"in_memory/{name.rsplit('/', 1)[-1]}")
        if name.startswith("trainer/") and base:
            print(f"  {name:<44} / in memory: {r['ex_s'] / base['ex_s']:.3f}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("trainer").setLevel(logging.INFO)
    logging.getLogger("trainer.train").propagate = False  # progress lines are timing marks, not output

    shape = (args.examples, args.features, args.labels, args.shards)
    args.data_dirs = {"example": args.data_dir, "packed": f"{args.data_dir}-packed-{args.feature_dtype}"}
    manifest = ensure_dataset(args.data_dirs["packed"], *shape, layout="packed", feature_dtype=args.feature_dtype)
    if "keras" not in args.skip or "stream_example" in args.modes:
        ensure_dataset(args.data_dirs["example"], *shape)
    precision = precision_lib.resolve(args.precision)
    cfg = bench_config(args, precision, "one_device", args.batch_sizes[0], args.warmup_steps + args.steps)
    args.model_hidden = list(cfg.model.hidden)
    flops = model_flops_per_example(manifest.num_features, manifest.num_labels, args.model_hidden, cfg.model.ensemble)
    gpus = tf.config.list_logical_devices("GPU")
    device = device_name()
    print(f"device: {device}; precision {precision}; batch {args.batch_sizes} per device; model "
          f"{manifest.num_features}-{'-'.join(map(str, args.model_hidden))}-{manifest.num_labels} "
          f"({flops / 1e6:.2f} MFLOP/example for training); steps_per_call {cfg.train.steps_per_call}, "
          f"jit_compile {cfg.train.jit_compile}; {args.warmup_steps} warm-up + {args.steps} timed steps; input "
          f"modes {', '.join(args.modes)}; load average {os.getloadavg()[0]:.1f}", flush=True)
    runs = measure(args, cfg, manifest, precision, gpus)
    write_json(args.json, report(args, runs, flops, device, precision, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
