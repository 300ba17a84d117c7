"""Horovod backend: real ``horovodrun -np 2 --gloo`` jobs on the CPU, in the pinned Horovod environment.

The environment is the one scripts/install_horovod.sh builds (.venv-horovod, or MLT_HOROVOD_ENV). Without it
these tests skip, except under CI (CI=true), where a missing Horovod environment is a failure.
"""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.horovod, pytest.mark.slow]


def _horovod_env() -> Path | None:
    here = Path(sys.executable).parent
    candidates = [os.environ.get("MLT_HOROVOD_ENV"), here.parent, REPO / ".venv-horovod"]
    for c in candidates:
        if c and (Path(c) / "bin" / "horovodrun").exists():
            return Path(c)
    return None


HVD_ENV = _horovod_env()
if HVD_ENV is None:
    if os.environ.get("CI", "").lower() == "true":
        raise RuntimeError("CI: no Horovod environment found (run scripts/install_horovod.sh first)")
    pytest.skip("no Horovod environment (scripts/install_horovod.sh builds one)", allow_module_level=True)

PYTHON = str(HVD_ENV / "bin" / "python")
HOROVODRUN = str(HVD_ENV / "bin" / "horovodrun")
BATCH = 32  # global; 16 per rank
COMMON = ["--config", "configs/tiny.yaml", "--set", "data.input_mode=stream",  # the reader (memory: test_input_modes)
          "--set", "data.shuffle=false", "--set", "data.cycle_length=2", "--set", f"data.block_length={BATCH // 2}",
          "--set", f"train.batch_size={BATCH}", "--set", "train.deterministic=true",
          "--set", "train.log_every_steps=5", "--set", "checkpoint.every_steps=5",
          "--set", "checkpoint.every_seconds=0", "--set", "data.eval_split=eval",
          # Zero output biases: the loss then starts at log(2) and its fall over 20 steps is a clear signal
          # (with the default prior biases it starts near the base-rate loss already).
          "--set", "model.output_bias=zeros"]


def _env(dump: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOROVOD_", "OMPI_", "PMI_", "TF_CONFIG"))}
    env["PYTHONPATH"] = str(REPO)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if dump:
        env["MLT_DUMP_WEIGHTS"] = str(dump / "weights-{worker}.npz")
    return env


def _train_cmd(data: Path, model_dir: Path, steps: int, distribution: str) -> list[str]:
    return [PYTHON, "-m", "trainer", "train", "--data", str(data), "--model-dir", str(model_dir),
            "--max-steps", str(steps), "--distribution", distribution, *COMMON]


def _horovodrun(args: list[str]) -> list[str]:
    return [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", *args]


def _run(cmd, dump=None, timeout=300) -> str:
    p = subprocess.run(cmd, cwd=REPO, env=_env(dump), capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL horovodrun and every worker it started (it puts the workers in process groups of their own)."""
    import psutil

    procs = [psutil.Process(proc.pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait()


def _weights(path: Path) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from data_pipeline.generate import generate

    out = tmp_path_factory.mktemp("hvd") / "data"
    # Two train shards: rank r reads shard r, so the ranks read different data. Blocks of 16 examples (half the
    # global batch): reading both shards in order, one device takes its batches as one block of each shard.
    generate(str(out), num_examples=1280, num_features=16, num_labels=8, num_shards=2, seed=3, split_eval=0.2,
             block_size=16)
    return out


@pytest.fixture(scope="module")
def horovod_run(dataset, tmp_path_factory):
    """One 20-step horovodrun job, shared by the tests that inspect it."""
    root = tmp_path_factory.mktemp("hvd_run")
    model_dir, dump = root / "model", root / "dump"
    dump.mkdir()
    out = _run(_horovodrun(_train_cmd(dataset, model_dir, 20, "horovod")), dump)
    return model_dir, dump, out


def test_ranks_end_identical_and_loss_falls(horovod_run):
    model_dir, dump, out = horovod_run
    w0, w1 = _weights(dump / "weights-0.npz"), _weights(dump / "weights-1.npz")
    assert len(w0) == len(w1) > 0
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)
    losses = [float(x) for x in re.findall(r"\[0\]<stderr>:.*step \d+/20 .*? loss ([0-9.]+)", out)]
    assert len(losses) >= 3, out[-3000:]
    assert losses[-1] < 0.8 * losses[0], losses


def test_only_rank0_wrote_files(horovod_run):
    model_dir, _, out = horovod_run
    assert len(glob.glob(str(model_dir / "logs" / "train" / "events.out.tfevents.*"))) == 1
    assert len(glob.glob(str(model_dir / "logs" / "eval" / "events.out.tfevents.*"))) == 1
    assert (model_dir / "export" / "saved_model" / "saved_model.pb").exists()
    assert not list(model_dir.glob(".tmp_worker_*"))
    # Rank 1 logs warnings only; progress lines come from rank 0 alone.
    assert re.search(r"\[0\]<stderr>:.*step 20/20", out)
    assert not re.search(r"\[1\]<stderr>:.*step 20/20", out)


def test_matches_one_device_on_same_global_batch(dataset, horovod_run, tmp_path):
    """2 ranks x 16 examples, each from its own shard == one device x 32 examples taken 16 from each shard."""
    _, dump, _ = horovod_run
    ref = tmp_path / "dump"
    ref.mkdir()
    _run(_train_cmd(dataset, tmp_path / "one", 20, "one_device"), ref)
    for a, b in zip(_weights(ref / "weights-0.npz"), _weights(dump / "weights-0.npz")):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_resume_after_stop_matches_uninterrupted(dataset, horovod_run, tmp_path):
    _, dump, _ = horovod_run
    model_dir, resumed = tmp_path / "model", tmp_path / "dump"
    resumed.mkdir()
    _run(_horovodrun(_train_cmd(dataset, model_dir, 10, "horovod")))
    out = _run(_horovodrun(_train_cmd(dataset, model_dir, 20, "horovod")), resumed)
    assert "resuming at step 10" in out
    for a, b in zip(_weights(resumed / "weights-0.npz"), _weights(dump / "weights-0.npz")):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(_weights(resumed / "weights-0.npz"), _weights(resumed / "weights-1.npz")):
        np.testing.assert_array_equal(a, b)


def test_sigkill_then_resume(dataset, tmp_path):
    """Killing the whole job mid-run leaves a readable checkpoint; the same command finishes the run."""
    model_dir = tmp_path / "model"
    cmd = _horovodrun(_train_cmd(dataset, model_dir, 100000, "horovod")
                      + ["--set", "train.epochs=1000", "--set", "data.eval_split="])
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    index = model_dir / "checkpoints" / "checkpoint"
    deadline = time.time() + 180
    try:
        while time.time() < deadline and not index.exists():
            assert proc.poll() is None, "training exited early"
            time.sleep(0.5)
        assert index.exists(), "no checkpoint written within 180 s"
        time.sleep(1.0)  # Let it get past the first checkpoint, so the kill lands mid-run.
    finally:
        _kill_tree(proc)
    first = int(re.search(r'model_checkpoint_path: "ckpt-(\d+)"', index.read_text()).group(1))
    out = _run(_horovodrun(_train_cmd(dataset, model_dir, first + 10, "horovod")
                           + ["--set", "train.epochs=1000", "--set", "data.eval_split="]))
    assert re.search(r"resuming at step (\d+)", out), out[-3000:]
    resumed_at = int(re.search(r"resuming at step (\d+)", out).group(1))
    assert resumed_at == first
    assert re.search(rf"step {first + 10}/{first + 10}", out)


def _rank_process(horovodrun: subprocess.Popen, rank: int):
    """The trainer process of one rank, among horovodrun's descendants."""
    import psutil

    for child in psutil.Process(horovodrun.pid).children(recursive=True):
        try:
            if "trainer" in child.cmdline() and child.environ().get("HOROVOD_RANK") == str(rank):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def test_sigterm_to_one_rank_stops_the_job_with_one_checkpoint(dataset, tmp_path):
    """SIGTERM to rank 1 alone: the stop request is agreed on (an allreduce after the call), so both ranks
    stop at the same step, rank 0 writes one checkpoint, and the job exits 0."""
    model_dir, log = tmp_path / "model", tmp_path / "log"
    cmd = _horovodrun(_train_cmd(dataset, model_dir, 100000, "horovod") + [
        "--set", "train.epochs=1000", "--set", "data.eval_split=", "--set", "checkpoint.every_steps=0"])
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 180
        while not re.search(r"\[0\]<stderr>:.*INFO step \d+/", log.read_text()):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        _rank_process(proc, 1).send_signal(signal.SIGTERM)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    out = log.read_text()
    assert code == 0, out[-3000:]
    steps = {rank: int(step) for rank, step in re.findall(r"\[(\d)\]<stdout>:stopped by signal at step (\d+)", out)}
    assert set(steps) == {"0", "1"} and steps["0"] == steps["1"], steps
    assert sorted(p.name for p in (model_dir / "checkpoints").glob("ckpt-*.index")) == [f"ckpt-{steps['0']}.index"]


def test_fp16_compression_trains(dataset, tmp_path):
    model_dir, dump = tmp_path / "model", tmp_path / "dump"
    dump.mkdir()
    _run(_horovodrun(_train_cmd(dataset, model_dir, 10, "horovod") + ["--set", "horovod.fp16_compression=true"]),
         dump)
    for a, b in zip(_weights(dump / "weights-0.npz"), _weights(dump / "weights-1.npz")):
        np.testing.assert_array_equal(a, b)
        assert np.all(np.isfinite(a))


def test_train_horovod_script_runs_end_to_end(dataset, tmp_path):
    script = REPO / "scripts" / "train_horovod.sh"
    if not script.exists():
        pytest.fail("scripts/train_horovod.sh is missing")
    env = _env()
    env["HOROVODRUN"] = HOROVODRUN
    env["PATH"] = f"{HVD_ENV / 'bin'}:{env['PATH']}"
    p = subprocess.run(["bash", str(script), "-np", "2", "-H", "localhost:2", str(dataset), str(tmp_path / "m"),
                        "--set", "model.hidden=[32]", "--set", "train.batch_size=64", "--max-steps", "6",
                        "--set", "train.precision=float32", "--set", "data.validation_fraction=0.0",
                        "--set", "data.eval_split=eval"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert (tmp_path / "m" / "export" / "saved_model" / "saved_model.pb").exists()
