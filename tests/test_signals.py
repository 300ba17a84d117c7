"""SIGTERM / SIGINT: the first signal stops training at the end of the train call in progress (at most
train.steps_per_call steps) with one checkpoint and exit 0, however long the epoch; the same command then
resumes from that checkpoint. A second signal ends the process at once, without a checkpoint, with exit
status 128 + the signal's number. With several workers, a signal to any one of them stops all at one step."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

from conftest import (free_ports, latest_checkpoint_step, read_checkpoint, start_trainer, stop_process,
                      train_in_process, wait_for)
from trainer.config import load_config

# 20,000 training records in batches of 1: an epoch of 20,000 steps of a 1024-1024 MLP, minutes on any CPU,
# while a stop must come within one call (10 steps here) and one checkpoint.
RECORDS = 20000
STEPS_PER_CALL = 10
SECONDS_ALLOWED = 30  # from the signal to the exit: one call, one checkpoint, the end of the process
LONG_EPOCH = ["train.distribution=one_device", "model.hidden=[1024, 1024]", "train.batch_size=1",
              f"train.steps_per_call={STEPS_PER_CALL}", f"train.log_every_steps={2 * STEPS_PER_CALL}",
              "train.epochs=1", "train.precision=float32", "data.eval_split=''",
              "checkpoint.every_steps=0", "checkpoint.every_seconds=0", "checkpoint.keep=1000"]


@pytest.fixture(scope="module")
def long_epoch_data(tmp_path_factory) -> str:
    from data_pipeline.generate import generate

    out = tmp_path_factory.mktemp("long") / "data"
    generate(str(out), num_examples=RECORDS, num_features=8, num_labels=4, num_shards=1, seed=0)
    return str(out)


def train_args(data, model_dir, sets=LONG_EPOCH) -> list[str]:
    args = ["train", "--data", str(data), "--model-dir", str(model_dir)]
    for s in sets:
        args += ["--set", s]
    return args


def logged_step(log_path) -> int | None:
    """The step of the last progress log line written so far."""
    steps = re.findall(r"INFO step (\d+)/", log_path.read_text()) if log_path.exists() else []
    return int(steps[-1]) if steps else None


def checkpoint_steps(model_dir) -> list[int]:
    return sorted(int(p.name[len("ckpt-"):-len(".index")]) for p in (model_dir / "checkpoints").glob("ckpt-*.index"))


def test_sigterm_stops_within_one_call_of_a_long_epoch_and_resumes(long_epoch_data, tmp_path):
    model_dir, log = tmp_path / "m", tmp_path / "log"
    proc = start_trainer(*train_args(long_epoch_data, model_dir), log_path=log)
    try:
        seen = wait_for(lambda: logged_step(log), timeout=300, what="a progress line", proc=proc)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(SECONDS_ALLOWED)  # raises TimeoutExpired if it trains on
        seconds = time.monotonic() - signalled
    finally:
        stop_process(proc)
    out = log.read_text()
    assert code == 0, out[-3000:]
    stopped_at = int(re.search(r"stopped by signal at step (\d+); checkpoint saved", out).group(1))
    # The call in progress when the signal arrived, or the next one if this test was slow to send it.
    assert seen < stopped_at <= seen + 2 * STEPS_PER_CALL < RECORDS, (seen, stopped_at)
    assert checkpoint_steps(model_dir) == [stopped_at]  # exactly one checkpoint, written at the stop
    assert latest_checkpoint_step(model_dir) == stopped_at
    assert not (model_dir / "export").exists()
    print(f"SIGTERM to exit: {seconds:.1f} s")

    # The same run resumed: it continues the epoch from the stop.
    result, messages = train_in_process(load_config(None, LONG_EPOCH + [f"train.max_steps={stopped_at + 5}"]),
                                        long_epoch_data, model_dir)
    assert any(f"resuming at step {stopped_at} of {stopped_at + 5}" in m for m in messages), messages[:3]
    assert result.step == stopped_at + 5 and not result.stopped_by_signal
    state = read_checkpoint(model_dir)
    assert int(state["step_in_epoch/.ATTRIBUTES/VARIABLE_VALUE"]) == stopped_at + 5
    assert checkpoint_steps(model_dir) == [stopped_at, stopped_at + 5]


def test_second_signal_exits_at_once_without_checkpoint(long_epoch_data, tmp_path):
    # Ctrl-C twice (the first test sends SIGTERM; both signals take the same path). Calls of 500 steps
    # (seconds each): both signals arrive inside the same call, which the first one lets finish and the
    # second one does not.
    sig = signal.SIGINT
    sets = LONG_EPOCH + ["train.steps_per_call=500", "train.log_every_steps=500"]
    model_dir, log = tmp_path / "m", tmp_path / "log"
    proc = start_trainer(*train_args(long_epoch_data, model_dir, sets), log_path=log)
    try:
        wait_for(lambda: logged_step(log), timeout=300, what="a progress line", proc=proc)  # a call just began
        proc.send_signal(sig)
        wait_for(lambda: "received signal" in log.read_text(), timeout=SECONDS_ALLOWED, what="the first signal",
                 proc=proc)
        proc.send_signal(sig)
        code = proc.wait(10)
    finally:
        stop_process(proc)
    out = log.read_text()
    assert code == 128 + sig, out[-3000:]
    assert f"received signal {int(sig)} again: exiting now, without a checkpoint" in out
    assert latest_checkpoint_step(model_dir) is None


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_both_at_one_step(long_epoch_data, tmp_path):
    """Two multi-worker processes; only the non-chief worker is signalled. The stop request is agreed on
    after the call, so both stop at the same step, both exit 0, and the chief writes the one checkpoint."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    sets = [s for s in LONG_EPOCH if not s.startswith("train.distribution")] + ["train.distribution=multi_worker",
                                                                                  "train.batch_size=2"]
    model_dir = tmp_path / "m"
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = [start_trainer(*train_args(long_epoch_data, model_dir, sets), log_path=logs[i],
                           env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
             for i in range(2)]
    try:
        wait_for(lambda: logged_step(logs[0]), timeout=300, what="a progress line", proc=procs[0])
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(SECONDS_ALLOWED * 2) for p in procs]
    finally:
        for p in procs:
            stop_process(p)
    outs = [path.read_text() for path in logs]
    assert codes == [0, 0], [o[-2000:] for o in outs]
    steps = [int(re.search(r"stopped by signal at step (\d+)", o).group(1)) for o in outs]
    assert steps[0] == steps[1] < RECORDS // 2, steps
    assert checkpoint_steps(model_dir) == [steps[0]]
    assert not list(model_dir.glob(".tmp_worker_*"))
