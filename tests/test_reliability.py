"""Reliability under crashes and misuse: an export replaced atomically (a crash injected between each of its
steps never leaves evaluate / predict without a whole model), the model-directory lock (a second trainer
stops with one line, a dead holder's lock is taken over), restore falling back past a damaged checkpoint,
and a full disk during generate, convert and a checkpoint (a private tmpfs, or RLIMIT_FSIZE where mounting
is not allowed) giving one line and losing nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import (PYTHON, REPO_ROOT, assert_same_state, latest_checkpoint_step, read_checkpoint, repo_env,
                      start_trainer, stop_process, train_in_process, wait_for)
from trainer import cli, export, lock
from trainer.config import load_config
from trainer.model import build_model


def cli_fails(capsys, argv, status=2) -> str:
    """Runs ``python -m trainer`` in process; expects ``status`` and exactly one stderr line, returned."""
    assert cli.main([str(a) for a in argv]) == status
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and " INFO " not in line
           and " WARNING " not in line]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# --- Export replaced atomically ------------------------------------------------------------------------------

class Killed(BaseException):
    """Stands for SIGKILL at an injected point: a BaseException, so no ``except Exception`` cleanup runs."""


def inject(monkeypatch, point: str, export_dir: str) -> None:
    """Makes the next export die at ``point``, one of the steps of export.export_model / replace_dir."""
    real_rename, real_rmtree = os.rename, shutil.rmtree
    renames = []

    def rename(src, dst):
        renames.append((src, dst))
        if point == "before_aside" and len(renames) == 1 or point == "between_renames" and len(renames) == 2:
            raise Killed(point)
        return real_rename(src, dst)

    def rmtree(path, *args, **kwargs):
        if point == "while_deleting_old" and str(path) == export_dir + export.OLD_SUFFIX and os.path.isdir(path):
            os.remove(os.path.join(path, export.SAVED_MODEL, "saved_model.pb"))  # half deleted
            os.remove(os.path.join(path, export.LABELS_FILE))
            raise Killed(point)
        return real_rmtree(path, *args, **kwargs)

    def write_label_files(directory, names, thresholds):
        with open(os.path.join(directory, export.LABELS_FILE), "w") as f:
            f.write(json.dumps(list(names))[:5])  # half a file
        raise Killed(point)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    if point == "while_writing":
        monkeypatch.setattr(export, "write_label_files", write_label_files)


@pytest.mark.parametrize("point", ["while_writing", "before_aside", "between_renames", "while_deleting_old"])
def test_export_killed_between_steps_leaves_a_whole_export(point, trained_run, tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "m"
    shutil.copytree(trained_run.model_dir, model_dir)
    export_dir = str(model_dir / "export")
    info = json.loads((model_dir / "run_info.json").read_text())
    x = np.random.default_rng(0).normal(size=(6, info["num_features"])).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    old_probs = export.load_export(export_dir)[0](x)
    new_model = build_model(info["num_features"], info["num_labels"], trained_run.cfg.model, seed=99)
    new_probs = tf.sigmoid(new_model(x)).numpy()
    assert not np.allclose(old_probs, new_probs, atol=1e-3)

    with monkeypatch.context() as patch:
        inject(patch, point, export_dir)
        with pytest.raises(Killed):
            export.export_model(new_model, export_dir, info["label_names"], np.full(info["num_labels"], 0.9))

    predict, names, thresholds = export.load_export(export_dir)
    probs = predict(x)
    got_new = np.allclose(probs, new_probs, atol=1e-5)
    assert got_new or np.allclose(probs, old_probs, atol=1e-5), point
    assert got_new == np.allclose(thresholds, 0.9)  # the model and its label files come from one export
    assert got_new == (point == "while_deleting_old")
    # The commands read it too (auto: the export is newer than the last checkpoint; and --source export).
    assert cli.main(["predict", "--model-dir", str(model_dir), "--input", str(tmp_path / "x.npy"),
                     "--out", str(tmp_path / "p.npz")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "p.npz")["probabilities"], probs, atol=1e-5)
    assert cli.main(["evaluate", "--model-dir", str(model_dir), "--data", info["data_dir"], "--split", "eval",
                     "--source", "export", "--out", str(tmp_path / "metrics.json")]) == 0

    # The next export replaces whichever copy is there and removes the leftovers.
    export.export_model(new_model, export_dir, info["label_names"])
    assert sorted(p.name for p in model_dir.iterdir() if p.name.startswith("export")) == ["export"]
    np.testing.assert_allclose(export.load_export(export_dir)[0](x), new_probs, atol=1e-5)
    capsys.readouterr()


KILL_BETWEEN_RENAMES = """
import os, signal, sys
import numpy as np
from trainer import export
from trainer.config import ModelConfig
from trainer.model import build_model

real_rename, renames = os.rename, []
def rename(src, dst):
    renames.append(dst)
    if len(renames) == 2:  # the old export is aside, the new one not yet in: die for real
        os.kill(os.getpid(), signal.SIGKILL)
    real_rename(src, dst)
export_dir = sys.argv[1]
model = build_model(4, 3, ModelConfig(hidden=[5]), seed=1)
export.export_model(model, export_dir, ["a", "b", "c"])
os.rename = rename
export.export_model(build_model(4, 3, ModelConfig(hidden=[5]), seed=2), export_dir, ["a", "b", "c"])
"""


def test_sigkill_between_the_renames_of_an_export(tmp_path):
    export_dir = str(tmp_path / "export")
    proc = subprocess.run([PYTHON, "-c", KILL_BETWEEN_RENAMES, export_dir], cwd=REPO_ROOT, env=repo_env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not os.path.exists(export_dir)  # killed with the old export aside and the new one not yet in
    assert export.find_export(export_dir) == export_dir + export.OLD_SUFFIX
    predict, names, thresholds = export.load_export(export_dir)
    assert predict(np.ones((2, 4), np.float32)).shape == (2, 3) and names == ["a", "b", "c"]


# --- The model-directory lock ---------------------------------------------------------------------------------

TRAIN_SETS = ["train.distribution=one_device", "model.hidden=[16]", "train.batch_size=32", "train.epochs=40",
              "train.deterministic=true", "checkpoint.every_steps=20", "checkpoint.every_seconds=0",
              "train.log_every_steps=50", "data.eval_split=''"]


def train_args(data, model_dir, *sets):
    args = ["train", "--data", str(data), "--model-dir", str(model_dir)]
    for s in [*TRAIN_SETS, *sets]:
        args += ["--set", s]
    return args


def test_second_trainer_on_a_model_dir_stops_and_the_first_finishes_untouched(tiny_data, tmp_path, capsys):
    model_dir, log = tmp_path / "m", tmp_path / "first.log"
    first = start_trainer(*train_args(tiny_data, model_dir, "train.max_steps=100"), log_path=log)
    try:
        # run_info.json is written (atomically, after config.yaml) just before the first step.
        wait_for(lambda: (model_dir / "run_info.json").exists(), timeout=180, what="the first step", proc=first)
        first.send_signal(signal.SIGSTOP)  # paused while it holds the lock: no race with its end
        try:
            assert first.poll() is None
            holder = json.loads((model_dir / lock.LOCK_FILE).read_text())
            config_before = (model_dir / "config.yaml").read_text()
            line = cli_fails(capsys, train_args(tiny_data, model_dir, "train.max_steps=200", "train.seed=7"))
        finally:
            first.send_signal(signal.SIGCONT)
        assert line == (f"error: {model_dir}: in use by another trainer (host {socket.gethostname()}, pid "
                        f"{first.pid}, since {holder['since']}); wait for it to finish, stop it, or use another "
                        "--model-dir"), line
        assert first.wait(300) == 0, log.read_text()[-3000:]
    finally:
        stop_process(first)
    assert (model_dir / "config.yaml").read_text() == config_before  # the second run wrote nothing
    assert latest_checkpoint_step(model_dir) == 100
    state = tf.train.get_checkpoint_state(str(model_dir / "checkpoints"))
    indexed = {os.path.basename(p) for p in state.all_model_checkpoint_paths}
    on_disk = {p.name.split(".")[0] for p in (model_dir / "checkpoints").glob("ckpt-*")}
    assert on_disk == indexed  # no orphan checkpoint outside the index
    assert len(list((model_dir / "logs" / "train").glob("events.out.tfevents.*"))) == 1
    assert not (model_dir / lock.LOCK_FILE).exists()  # released at the end


HOLD_LOCK = """
import sys, time
from trainer.lock import ModelDirLock
ModelDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_dead_trainers_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    holder = subprocess.Popen([PYTHON, "-c", HOLD_LOCK, str(tmp_path)], cwd=REPO_ROOT, env=repo_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(lock.LockedError, match=f"pid {holder.pid}, since "):
            lock.ModelDirLock(str(tmp_path)).acquire()  # alive: refused
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    finally:
        stop_process(holder)
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["pid"] == holder.pid  # left behind by the kill
    taker = lock.ModelDirLock(str(tmp_path))
    with caplog.at_level("WARNING", logger="trainer.lock"):
        taker.acquire()
    try:
        assert f"taking over the lock of a trainer that is gone (host {socket.gethostname()}, pid {holder.pid}" \
            in caplog.text
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(lock.LockedError, match="in this process"):
            lock.ModelDirLock(str(tmp_path)).acquire()
    finally:
        taker.release()
    assert not (tmp_path / lock.LOCK_FILE).exists()


def write_foreign_lock(directory: Path, age: float) -> Path:
    """A lock file as a trainer on another host leaves it (its flock does not reach this host)."""
    path = directory / lock.LOCK_FILE
    path.write_text(json.dumps({"host": "other-host", "pid": 4242, "since": "2026-01-01T00:00:00+00:00"}))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_another_hosts_lock_counts_while_its_heartbeat_moves(tmp_path):
    path = write_foreign_lock(tmp_path, age=0)
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(0.2):
            os.utime(path)

    beat = threading.Thread(target=heartbeat)
    beat.start()
    try:
        with pytest.raises(lock.LockedError, match=r"host other-host, pid 4242, .*\(its heartbeat moves\)"):
            lock.ModelDirLock(str(tmp_path), stale_seconds=5).acquire()
    finally:
        stop.set()
        beat.join()
    # Standing still for stale_seconds, or already older than that: a dead holder.
    for age in (0, 60):
        write_foreign_lock(tmp_path, age)
        start = time.monotonic()
        taker = lock.ModelDirLock(str(tmp_path), stale_seconds=1.5)
        taker.acquire()
        waited = time.monotonic() - start
        taker.release()
        assert (waited >= 1.4) if age == 0 else (waited < 1.0), (age, waited)


# --- Restore falls back past a damaged checkpoint ---------------------------------------------------------------

def checkpoints_of(model_dir) -> list[str]:
    return list(tf.train.get_checkpoint_state(str(Path(model_dir) / "checkpoints")).all_model_checkpoint_paths)


@pytest.fixture(scope="module")
def three_checkpoints(tiny_data, tmp_path_factory) -> Path:
    """A model directory trained 60 steps, with checkpoints at 20, 40 and 60 (copy it before damaging it)."""
    model_dir = tmp_path_factory.mktemp("three") / "m"
    train_in_process(load_config(None, TRAIN_SETS + ["train.max_steps=60", "checkpoint.keep=3"]), tiny_data, model_dir)
    assert [os.path.basename(p) for p in checkpoints_of(model_dir)] == ["ckpt-20", "ckpt-40", "ckpt-60"]
    return model_dir


@pytest.mark.parametrize("damage", ["truncated data", "truncated index", "missing data"])
def test_restore_falls_back_to_the_newest_readable_checkpoint(damage, three_checkpoints, tiny_data, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(three_checkpoints, model_dir)
    *_, previous, latest = checkpoints_of(model_dir)
    data, index = latest + ".data-00000-of-00001", latest + ".index"
    if damage == "truncated data":
        os.truncate(data, os.path.getsize(data) // 2)
    elif damage == "truncated index":
        os.truncate(index, os.path.getsize(index) // 2)
    else:
        os.remove(data)
    os.makedirs(latest + "_temp")  # and the leftover of a save that was killed
    result, messages = train_in_process(load_config(None, TRAIN_SETS + ["train.max_steps=80", "checkpoint.keep=3"]),
                                        tiny_data, model_dir)
    assert result.step == 80
    assert any(m.startswith(f"{latest}: damaged checkpoint (") for m in messages), messages[:5]
    assert f"resumed from {previous}" in messages
    assert any("resuming at step 40 of 80" in m for m in messages)
    assert not os.path.exists(latest + "_temp")


def test_every_checkpoint_damaged_is_one_line(three_checkpoints, tiny_data, tmp_path, capsys):
    model_dir = tmp_path / "m"
    shutil.copytree(three_checkpoints, model_dir)
    for path in checkpoints_of(model_dir):
        os.truncate(path + ".index", 10)
    line = cli_fails(capsys, train_args(tiny_data, model_dir, "train.max_steps=80", "checkpoint.keep=3"))
    assert line.startswith(f"error: {model_dir / 'checkpoints'}: every checkpoint is damaged ("), line


def test_resume_with_dropout_equals_one_run(tiny_data, tmp_path):
    """The dropout layers' random state is in the checkpoint: stopped and resumed, a run with dropout draws the
    masks the uninterrupted run draws (it drew others when only the weights were saved)."""
    sets = TRAIN_SETS + ["model.hidden=[16, 16]", "model.dropout=0.5", "model.input_dropout=0.2",
                         "optimizer.decay=constant", "optimizer.learning_rate=0.01"]
    train_in_process(load_config(None, sets + ["train.max_steps=50"]), tiny_data, tmp_path / "one")
    train_in_process(load_config(None, sets + ["train.max_steps=30"]), tiny_data, tmp_path / "resumed")
    train_in_process(load_config(None, sets + ["train.max_steps=50"]), tiny_data, tmp_path / "resumed")
    one, resumed = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "resumed")
    assert [k for k in one if k.startswith("non_trainable/")]  # the seed generators' states
    assert_same_state(one, resumed, rtol=1e-6, atol=1e-7)


# --- A full disk -------------------------------------------------------------------------------------------------

def can_mount_private_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True, timeout=30)
    return probe.returncode == 0


# Runs in a child whose DISK directory is small: a private 4 MiB tmpfs (ENOSPC), or, where mounting is not
# allowed, a soft RLIMIT_FSIZE (EFBIG). fill() leaves SLACK bytes of room, free() gives it back.
DISK_PRELUDE = """
import contextlib, io, json, os, resource, signal, sys
DISK, MODE, SLACK = sys.argv[1], sys.argv[2], int(sys.argv[3])
FILLER = os.path.join(DISK, "filler")

def fill():
    if MODE == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (SLACK, resource.RLIM_INFINITY))
        return
    fd = os.open(FILLER, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\\0" * 4096)
    except OSError:
        pass
    os.ftruncate(fd, max(0, os.lseek(fd, 0, os.SEEK_CUR) - SLACK))
    os.close(fd)

def free():
    if MODE == "fsize":
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    else:
        os.remove(FILLER)

def run(main, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(argv)
    return {"status": status, "stderr": err.getvalue()}

def listing(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else None
"""

DISK_SCENARIO = """
from data_pipeline import cli as data_cli, manifest as mf
from trainer import cli as trainer_cli
DATA, TINY, SVM = sys.argv[4:7]
out = {}

# generate: an existing dataset (the one --overwrite would replace) and nothing else must survive.
keep = os.path.join(DISK, "keep")
data_cli.main(["generate", "--out", keep, "--examples", "200", "--features", "8", "--labels", "3", "--shards", "2"])
before = {n: open(os.path.join(keep, n), "rb").read() for n in listing(keep)}
fill()
out["generate"] = run(data_cli.main, ["generate", "--out", keep, "--overwrite", "--examples", "20000",
                                      "--features", "64", "--labels", "8", "--shards", "2"])
out["generate"]["keep_intact"] = {n: open(os.path.join(keep, n), "rb").read() for n in listing(keep)} == before
out["generate"]["disk"] = listing(DISK)
out["convert"] = run(data_cli.main, ["convert", "--format", "libsvm", "--input", SVM, "--out",
                                     os.path.join(DISK, "svm"), "--num-features", "64", "--num-labels", "5"])
out["convert"]["disk"] = listing(DISK)
free()

# a checkpoint: the first run fits; the resumed run's next save does not.
model = os.path.join(DISK, "m")
args = ["train", "--data", TINY, "--model-dir", model, "--set", "train.distribution=one_device",
        "--set", "model.hidden=[64,64]", "--set", "checkpoint.every_steps=10", "--set", "checkpoint.every_seconds=0",
        "--set", "data.eval_split=''", "--set", "train.batch_size=32"]
out["first"] = run(trainer_cli.main, args + ["--max-steps", "20"])
fill()
out["checkpoint"] = run(trainer_cli.main, args + ["--max-steps", "40"])
out["checkpoint"]["files"] = listing(os.path.join(model, "checkpoints"))
out["checkpoint"]["index"] = open(os.path.join(model, "checkpoints", "checkpoint")).read()
free()
out["resumed"] = run(trainer_cli.main, args + ["--max-steps", "40"])
out["resumed"]["index"] = open(os.path.join(model, "checkpoints", "checkpoint")).read()
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def full_disk(tiny_data, tmp_path_factory):
    """Runs DISK_SCENARIO once on a small disk; returns (mode, results). MLT_TEST_FULL_DISK=fsize forces the
    RLIMIT_FSIZE variant where a private tmpfs could be mounted."""
    tmp = tmp_path_factory.mktemp("full_disk")
    disk = tmp / "disk"
    disk.mkdir()
    svm = tmp / "data.svm"
    rng = np.random.default_rng(0)
    svm.write_text("".join(f"{i % 5} " + " ".join(f"{j}:{rng.normal():.6f}" for j in range(64)) + "\n"
                           for i in range(3000)))
    mode = os.environ.get("MLT_TEST_FULL_DISK") or ("tmpfs" if can_mount_private_tmpfs() else "fsize")
    # fsize: every file is limited, not the disk; 64 KiB is below a shard and a checkpoint, above the rest.
    slack = "65536" if mode == "fsize" else "49152"
    command = [PYTHON, "-c", DISK_PRELUDE + DISK_SCENARIO, str(disk), mode, slack, str(tmp), tiny_data, str(svm)]
    if mode == "tmpfs":
        command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                   'mount -t tmpfs -o size=4m tmpfs "$0" && exec "$@"', str(disk), *command]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=repo_env(), capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return mode, json.loads(lines[-1][len("RESULT "):])


def one_full_disk_line(result, mode) -> str:
    assert result["status"] == 1, result
    assert "Traceback" not in result["stderr"], result["stderr"]
    errors = [line for line in result["stderr"].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result["stderr"]
    assert ("No space left on device" if mode == "tmpfs" else "File too large") in errors[0]
    return errors[0]


def test_full_disk_during_generate_keeps_the_existing_dataset(full_disk):
    mode, results = full_disk
    line = one_full_disk_line(results["generate"], mode)
    assert "keep.tmp-" in line and ".tfrecord" in line  # names the file being written
    assert results["generate"]["keep_intact"]
    assert [n for n in results["generate"]["disk"] if n != "filler"] == ["keep"]  # no temporary directory left


def test_full_disk_during_convert_leaves_nothing_half_written(full_disk):
    mode, results = full_disk
    line = one_full_disk_line(results["convert"], mode)
    assert "svm.tmp-" in line
    assert [n for n in results["convert"]["disk"] if n != "filler"] == ["keep"]


def test_full_disk_during_a_checkpoint_keeps_the_last_one(full_disk):
    mode, results = full_disk
    assert results["first"]["status"] == 0, results["first"]
    line = one_full_disk_line(results["checkpoint"], mode)
    assert "ckpt-30: checkpoint not written (" in line and line.endswith("ckpt-20, is kept"), line
    files = results["checkpoint"]["files"]
    assert not [f for f in files if "_temp" in f or "ckpt-30" in f or ".tmp" in f], files
    assert 'model_checkpoint_path: "ckpt-20"' in results["checkpoint"]["index"]
    assert results["resumed"]["status"] == 0, results["resumed"]
    assert 'model_checkpoint_path: "ckpt-40"' in results["resumed"]["index"]
