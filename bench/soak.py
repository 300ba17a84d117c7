"""Soak test (not CI): one training run on real data interrupted by N random SIGKILLs and SIGTERMs, resumed
after each, against the same run left alone.

Usage:
  python bench/soak.py [--kills 10] [--seed 0] [--work DIR] [--datasets-dir ../shared/datasets]

Steps:
  1. convert bibtex (once):  python -m data_pipeline convert --format arff --input bibtex-train.arff
                             bibtex-test.arff --labels-xml bibtex.xml --out WORK/data
  2. the reference run:      python -m trainer train --config configs/default.yaml --data WORK/data
                             --model-dir WORK/reference SETS        (SETS below: a small, deterministic model)
  3. the soaked run: the same command on WORK/soaked, started again after each interruption; each signal
     (SIGKILL or SIGTERM, drawn with --seed) comes 0.2-1.8 x T/(N+1) seconds after training (re)started, T the
     reference run's training time; after the N-th the run is resumed to the end.
  4. python -m trainer evaluate --split test on both model directories; their final checkpoints compared.

Prints, per interruption: the signal, the exit status, the last step logged before the signal, the step a
SIGTERM stopped at, the step the next run resumed from, completed steps lost (last step done - resumed from;
the steps of a call in flight at a SIGKILL are not counted), steps trained after a SIGTERM, the seconds from
the signal to the exit, and whether the next run took over the lock the interrupted one left. Then the test
metrics of both runs and the largest difference between their final weights (0 in deterministic mode).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
# Small enough for a few minutes on 2 CPU cores: one MLP 1836-256-159 (0.5 M weights), 30 epochs of 19 steps.
SETS = ["model.hidden=[256]", "model.ensemble=1", "train.deterministic=true", "train.distribution=one_device",
        "train.steps_per_call=10", "train.log_every_steps=10", "checkpoint.every_steps=50",
        "checkpoint.every_seconds=0", "checkpoint.keep=3"]
KEYS = ("precision@1", "precision@3", "precision@5", "micro_f1", "macro_f1", "macro_pr_auc")


def train_cmd(data: str, model_dir: str) -> list[str]:
    cmd = [PYTHON, "-m", "trainer", "train", "--config", "configs/default.yaml", "--data", data,
           "--model-dir", model_dir]
    for s in SETS:
        cmd += ["--set", s]
    return cmd


def run(cmd: list[str], log_path: str) -> None:
    """Runs a command from the repository root to the end; exits with its log's tail if it fails."""
    with open(log_path, "w") as log:
        code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        with open(log_path) as f:
            sys.exit(f"{' '.join(cmd)} failed ({code}):\n{f.read()[-3000:]}")


def started(log_path: str) -> int | None:
    """The step training (re)started at, once the run has logged it."""
    with open(log_path) as f:
        match = re.search(r"(starting|resuming) at step (\d+) of \d+", f.read())
    return int(match.group(2)) if match else None


def last_logged_step(text: str, default: int) -> int:
    return max((int(s) for s in re.findall(r"INFO step (\d+)/\d+ ", text)), default=default)


def start(cmd: list[str], log_path: str) -> tuple[subprocess.Popen, int, float]:
    """Starts a run; returns (process, step it started at, time training started) once training started."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    while (step := started(log_path)) is None:
        if proc.poll() is not None:
            sys.exit(f"the run exited ({proc.returncode}) before training started:\n{open(log_path).read()[-3000:]}")
        time.sleep(0.05)
    return proc, step, time.perf_counter()


def training_seconds(cmd: list[str], log_path: str) -> float:
    """Runs to the end; returns the seconds from the start of training to the exit."""
    proc, _, t = start(cmd, log_path)
    if proc.wait():
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{open(log_path).read()[-3000:]}")
    return time.perf_counter() - t


def interrupt_once(cmd: list[str], log_path: str, sig: int, delay: float) -> dict:
    """Starts the run, sends ``sig`` ``delay`` seconds after training (re)started; returns what happened."""
    proc, step, _ = start(cmd, log_path)
    time.sleep(delay)
    if proc.poll() is not None:
        return {"signal": None, "started_at": step}
    at_signal = last_logged_step(open(log_path).read(), step)
    sent = time.perf_counter()
    proc.send_signal(sig)
    code = proc.wait()
    seconds = time.perf_counter() - sent
    text = open(log_path).read()
    stopped = re.search(r"stopped by signal at step (\d+)", text)
    return {"signal": signal.Signals(sig).name, "started_at": step, "exit": code, "logged_at_signal": at_signal,
            "done": int(stopped.group(1)) if stopped else last_logged_step(text, step),
            "stopped_at": int(stopped.group(1)) if stopped else None, "seconds_to_exit": seconds}


def soak(data: str, model_dir: str, kills: int, spread: float, rng: random.Random, logs: str) -> list[dict]:
    """The interrupted run: ``kills`` interruptions, each resumed from its checkpoint; then to the end.
    Returns one dict per interruption (``resumed_from``: where the next run started)."""
    events = []
    for k in range(kills):
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        event = interrupt_once(train_cmd(data, model_dir), f"{logs}/soak-{k}.log", sig, rng.uniform(0.2, 1.8) * spread)
        if event["signal"] is None:  # the run finished before the signal
            break
        events.append(event)
    final_log = f"{logs}/soak-final.log"
    run(train_cmd(data, model_dir), final_log)
    next_logs = [f"{logs}/soak-{k}.log" for k in range(1, len(events))] + [final_log]
    for event, path in zip(events, next_logs):
        event["resumed_from"] = started(path)
        event["next_took_over_lock"] = "taking over the lock" in open(path).read()
    return events


def evaluate(model_dir: str, data: str, logs: str, name: str) -> dict:
    out = f"{logs}/{name}-metrics.json"
    run([PYTHON, "-m", "trainer", "evaluate", "--model-dir", model_dir, "--data", data, "--split", "test",
         "--out", out], f"{logs}/{name}-evaluate.log")
    with open(out) as f:
        return json.load(f)


def max_weight_difference(a: str, b: str) -> float:
    import numpy as np
    import tensorflow as tf

    ra = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(a, "checkpoints")))
    rb = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(b, "checkpoints")))
    names = [n for n in ra.get_variable_to_shape_map() if "save_counter" not in n and "OBJECT_GRAPH" not in n]
    return max(float(np.max(np.abs(np.asarray(ra.get_tensor(n), np.float64) - np.asarray(rb.get_tensor(n), np.float64))))
               for n in names)


def report(events: list[dict], reference: dict, soaked: dict, weight_diff: float, seconds: float) -> None:
    print(f"\nreference run: {seconds:.1f} s from the first step to the exit; {len(events)} interruptions\n")
    print("| # | signal | exit | logged step at signal | stopped at | resumed from | completed steps lost | "
          "steps after the signal | signal -> exit (s) | next run took over a stale lock |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, e in enumerate(events):
        after = e["stopped_at"] - e["logged_at_signal"] if e["stopped_at"] is not None else ""
        print(f"| {i + 1} | {e['signal']} | {e['exit']} | {e['logged_at_signal']} | {e['stopped_at'] or ''} | "
              f"{e['resumed_from']} | {e['done'] - e['resumed_from']} | {after} | {e['seconds_to_exit']:.2f} | "
              f"{'yes' if e['next_took_over_lock'] else 'no'} |")
    print("\n| bibtex test | " + " | ".join(KEYS) + " |\n|---|" + "---|" * len(KEYS))
    for name, m in (("uninterrupted", reference), (f"{len(events)} interruptions", soaked)):
        print(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in KEYS) + " |")
    print(f"\nlargest difference between the final weights and optimizer state: {weight_diff:.3g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/mlt-soak")
    p.add_argument("--datasets-dir", default=os.path.join(REPO, "..", "shared", "datasets"))
    args = p.parse_args()
    data, logs = os.path.join(args.work, "data"), os.path.join(args.work, "logs")
    os.makedirs(logs, exist_ok=True)
    for d in ("reference", "soaked"):
        shutil.rmtree(os.path.join(args.work, d), ignore_errors=True)
    if not os.path.exists(os.path.join(data, "manifest.json")):
        src = os.path.join(args.datasets_dir, "bibtex")
        run([PYTHON, "-m", "data_pipeline", "convert", "--format", "arff", "--input", f"{src}/bibtex-train.arff",
             f"{src}/bibtex-test.arff", "--labels-xml", f"{src}/bibtex.xml", "--out", data], f"{logs}/convert.log")
    seconds = training_seconds(train_cmd(data, os.path.join(args.work, "reference")), f"{logs}/reference.log")
    spread = seconds / (args.kills + 1)
    events = soak(data, os.path.join(args.work, "soaked"), args.kills, spread, random.Random(args.seed), logs)
    reference = evaluate(os.path.join(args.work, "reference"), data, logs, "reference")
    soaked = evaluate(os.path.join(args.work, "soaked"), data, logs, "soaked")
    report(events, reference, soaked, max_weight_difference(os.path.join(args.work, "reference"),
                                                             os.path.join(args.work, "soaked")), seconds)


if __name__ == "__main__":
    main()
