"""Resume: a run stopped at any point (--max-steps, SIGKILL, SIGTERM) and started again ends with the state of
an uninterrupted run (deterministic mode): same step, same weights, same optimizer state. A model directory of
another shape is a one-line error, not a silent restart."""

from __future__ import annotations

import os
import re
import shutil
import signal

import pytest
import tensorflow as tf

from conftest import (assert_same_state, latest_checkpoint_step, mirrored_backend, read_checkpoint, run_trainer,
                      sigkill_after_first_checkpoint, start_trainer, stop_process, train_in_process, wait_for)
from trainer import cli
from trainer.config import load_config

# 2400 train records / batch 32 = 75 steps per epoch; 1000 steps = 13 epochs and 25 steps. Checkpoints every
# 40 steps fall inside epochs, so resuming must continue an epoch at the right record (step_in_epoch).
# Constant learning rate: the schedule's length comes from max_steps, so "--max-steps N, then --max-steps 2N"
# only equals one 2N run when the schedule does not depend on the total (the other tests keep one total).
TOTAL = 1000
RESUME_SETS = ["train.distribution=one_device", "model.hidden=[32]", "model.dropout=0.0", "train.batch_size=32",
               "train.epochs=14", f"train.max_steps={TOTAL}", "train.deterministic=true", "train.seed=5",
               "data.eval_split=''", "optimizer.decay=constant", "optimizer.warmup_steps=20",
               "optimizer.learning_rate=0.003", "checkpoint.every_steps=40", "checkpoint.every_seconds=0",
               "checkpoint.keep=3", "train.log_every_steps=200"]


def cli_args(data, model_dir, *extra) -> list[str]:
    args = ["train", "--data", str(data), "--model-dir", str(model_dir)]
    for s in RESUME_SETS:
        args += ["--set", s]
    return args + list(extra)


def resume_in_process(data, model_dir, expect_from: int) -> dict:
    """Reruns the same training here; checks it resumed at ``expect_from`` and finished; returns the state."""
    result, messages = train_in_process(load_config(None, RESUME_SETS), data, model_dir)
    assert any(f"resuming at step {expect_from} of {TOTAL}" in m for m in messages), messages[:3]
    assert result.step == TOTAL and not result.stopped_by_signal
    return read_checkpoint(model_dir)


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory) -> dict:
    """State after TOTAL steps in one go."""
    model_dir = tmp_path_factory.mktemp("uninterrupted") / "m"
    result, messages = train_in_process(load_config(None, RESUME_SETS), tiny_data, model_dir)
    assert result.step == TOTAL and any("starting at step 0" in m for m in messages)
    state = read_checkpoint(model_dir)
    assert int(state["step/.ATTRIBUTES/VARIABLE_VALUE"]) == TOTAL
    return state


def test_max_steps_then_resume_equals_one_run(tiny_data, tmp_path, uninterrupted):
    half = TOTAL // 2  # 500 = 6 epochs + 50 steps: mid-epoch
    model_dir = tmp_path / "m"
    run_trainer(*cli_args(tiny_data, model_dir, "--max-steps", str(half)), check=True)
    state = read_checkpoint(model_dir)
    assert int(state["step/.ATTRIBUTES/VARIABLE_VALUE"]) == half
    assert (int(state["epoch/.ATTRIBUTES/VARIABLE_VALUE"]), int(state["step_in_epoch/.ATTRIBUTES/VARIABLE_VALUE"])) \
        == (6, 50)
    assert_same_state(resume_in_process(tiny_data, model_dir, half), uninterrupted, rtol=1e-6, atol=1e-7)


def test_sigkill_then_resume_equals_one_run(tiny_data, tmp_path, uninterrupted):
    model_dir = tmp_path / "m"
    killed_at = sigkill_after_first_checkpoint(cli_args(tiny_data, model_dir), model_dir, tmp_path / "log")
    assert 0 < killed_at < TOTAL, killed_at  # killed mid-run, not after the last save
    assert not (model_dir / "export").exists()
    assert_same_state(resume_in_process(tiny_data, model_dir, killed_at), uninterrupted, rtol=1e-6, atol=1e-7)


def test_sigterm_checkpoints_exits_0_and_resumes(tiny_data, tmp_path, uninterrupted):
    model_dir, log = tmp_path / "m", tmp_path / "log"
    proc = start_trainer(*cli_args(tiny_data, model_dir), log_path=log)
    try:
        wait_for(lambda: latest_checkpoint_step(model_dir), timeout=120, what="the first checkpoint", proc=proc)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)  # bounded: the current call, one checkpoint, exit
    finally:
        stop_process(proc)
    out = log.read_text()
    assert code == 0, out[-3000:]
    match = re.search(r"stopped by signal at step (\d+); checkpoint saved; run the same command to resume", out)
    assert match, out[-3000:]
    stopped_at = int(match.group(1))
    assert 0 < stopped_at < TOTAL
    assert latest_checkpoint_step(model_dir) == stopped_at
    assert not (model_dir / "export").exists()
    assert_same_state(resume_in_process(tiny_data, model_dir, stopped_at), uninterrupted, rtol=1e-6, atol=1e-7)


def test_mirrored_resume_skips_per_replica_batches(tiny_data, tmp_path):
    """Under mirrored (1 input pipeline, 2 replicas) a step consumes 2 per-replica batches of the pipeline, so
    resuming at step_in_epoch k must skip 2k of them: stop at 30, resume to 60 == 60 in one go."""
    sets = RESUME_SETS + ["train.distribution=mirrored"]  # (a later --set wins)
    full, _ = train_in_process(load_config(None, sets + ["train.max_steps=60"]), tiny_data, tmp_path / "full",
                               backend=mirrored_backend())
    first, _ = train_in_process(load_config(None, sets + ["train.max_steps=30"]), tiny_data, tmp_path / "resumed",
                                backend=mirrored_backend())
    second, messages = train_in_process(load_config(None, sets + ["train.max_steps=60"]), tiny_data,
                                        tmp_path / "resumed", backend=mirrored_backend())
    assert (full.step, first.step, second.step) == (60, 30, 60)
    assert any("mirrored: 2 replica(s)" in m and "resuming at step 30 of 60" in m for m in messages), messages[:2]
    assert_same_state(read_checkpoint(tmp_path / "resumed"), read_checkpoint(tmp_path / "full"),
                      rtol=1e-6, atol=1e-7)


def test_changed_model_shape_is_one_line_error(trained_run, tiny_data, tmp_path, capsys):
    model_dir = tmp_path / "m"
    shutil.copytree(trained_run.model_dir, model_dir)
    index_before = (model_dir / "checkpoints" / "checkpoint").read_text()
    args = ["train", "--config", os.path.join(trained_run.model_dir, "config.yaml"), "--data", tiny_data,
            "--model-dir", str(model_dir), "--set", "model.hidden=[32]"]

    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a run of another shape (hidden [64, 64] -> [32])" in err, err

    # Without run_info.json the checkpoint itself does not fit: still one line, exit 2.
    os.remove(model_dir / "run_info.json")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint does not fit this model" in err, err
    assert (model_dir / "checkpoints" / "checkpoint").read_text() == index_before  # nothing overwritten
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
