"""Shared test fixtures and helpers (generic: any test file may use them).

Import-time setup: the CPU is split into 2 logical devices *before any TensorFlow op runs*, so that
MirroredStrategy (2 replicas) can be tested in-process on a CPU-only machine. Logical devices can only be
configured before TensorFlow initialises its devices, hence here and not in a fixture. Tests that do not
ask for a strategy still run on ``/CPU:0`` as before.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from trainer.backends import configure_logical_cpus  # noqa: E402 (after the env var above)

configure_logical_cpus(2)

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# The tiny synthetic dataset every trainer test uses (small enough for a few hundred steps in seconds).
TINY_DATA = dict(num_examples=3000, num_features=32, num_labels=8, num_shards=4, seed=0, split_eval=0.2)


def repo_env(**extra: str) -> dict[str, str]:
    """Environment for a child process that imports the repository's packages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.pop("TF_CONFIG", None)
    env.pop("MLT_LOGICAL_CPUS", None)
    env.update(extra)
    return env


def trainer_cmd(*args: str) -> list[str]:
    """The argv of ``python -m trainer ARGS``."""
    return [PYTHON, "-m", "trainer", *map(str, args)]


def run_trainer(*args: str, timeout: float = 180, env: dict[str, str] | None = None,
                check: bool = False) -> subprocess.CompletedProcess:
    """Runs ``python -m trainer ARGS`` to completion in the repository (text output captured).

    Args:
      args: command-line arguments after ``python -m trainer``.
      timeout: seconds before the child is killed (the test then fails with TimeoutExpired).
      env: extra environment variables.
      check: assert exit status 0 (printing the child's stderr tail if not).
    """
    proc = subprocess.run(trainer_cmd(*args), cwd=REPO_ROOT, env=repo_env(**(env or {})), capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def start_trainer(*args: str, env: dict[str, str] | None = None, log_path: str | os.PathLike | None = None
                  ) -> subprocess.Popen:
    """Starts ``python -m trainer ARGS`` in the background; stdout and stderr go to ``log_path``
    (a file, so a chatty child never blocks on a full pipe) or are discarded."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(trainer_cmd(*args), cwd=REPO_ROOT, env=repo_env(**(env or {})), stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    finally:
        if log_path:
            out.close()


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Kills a child that is still running (test cleanup)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout)


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition",
             proc: subprocess.Popen | None = None):
    """Polls ``predicate()`` until it returns a truthy value, which is returned.

    Fails the test after ``timeout`` seconds, or as soon as ``proc`` (if given) has exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def sigkill_after_first_checkpoint(args, model_dir, log_path, env: dict[str, str] | None = None,
                                   timeout: float = 120) -> int | None:
    """Starts ``python -m trainer ARGS``, SIGKILLs it once its first checkpoint is written, and returns the
    step of the latest checkpoint it left."""
    proc = start_trainer(*args, env=env, log_path=log_path)
    try:
        wait_for(lambda: latest_checkpoint_step(model_dir), timeout=timeout, what="the first checkpoint", proc=proc)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        stop_process(proc)
    return latest_checkpoint_step(model_dir)


def train_two_workers(args, tmp_path, timeout: float = 300) -> tuple[list[str], Path]:
    """Runs ``python -m trainer ARGS`` as the two workers of a multi_worker job (TF_CONFIG on two free ports of
    127.0.0.1), each logging to ``tmp_path/worker{i}.log`` and dumping its final weights (MLT_DUMP_WEIGHTS) to
    ``tmp_path/dumps/weights-{i}.npz``; asserts both exit 0. Returns (the two logs, the dumps directory)."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    dumps = Path(tmp_path) / "dumps"
    dumps.mkdir()
    logs = [Path(tmp_path) / f"worker{index}.log" for index in range(2)]
    procs = []
    try:
        for index in range(2):
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            procs.append(start_trainer(*args, env={"TF_CONFIG": tf_config,
                                                   "MLT_DUMP_WEIGHTS": str(dumps / "weights-{worker}.npz")},
                                       log_path=logs[index]))
        for index, proc in enumerate(procs):
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            assert code == 0, f"worker {index} exit {code}\n{logs[index].read_text()[-4000:]}"
    finally:
        for proc in procs:
            stop_process(proc)
    return [log.read_text() for log in logs], dumps


def mirrored_backend():
    """trainer's mirrored backend over the 2 logical CPUs; skips the test on a host with exactly one GPU
    (mirrored then takes the GPUs, and one is not enough)."""
    from trainer.backends import make_backend

    try:
        return make_backend("mirrored")
    except ValueError as e:
        pytest.skip(str(e))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all sockets held open together, so no port is returned twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def latest_checkpoint_step(model_dir: str | os.PathLike) -> int | None:
    """Step number of the latest checkpoint named by the model directory's checkpoint index, or None.

    Reads the small ``checkpoints/checkpoint`` text file directly (no TensorFlow call), so it is cheap
    to poll while another process trains.
    """
    index = Path(model_dir) / "checkpoints" / "checkpoint"
    try:
        text = index.read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        if line.startswith("model_checkpoint_path:"):
            name = line.split(":", 1)[1].strip().strip('"')
            return int(name.rsplit("-", 1)[1])
    return None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The training state in a checkpoint (a prefix, or a model directory: then its latest checkpoint):
    every tensor keyed by checkpoint key -- model weights, optimizer slots and counters, loss scale, step,
    epoch, step_in_epoch -- except ``save_counter`` (how often *this* process saved, not training state).

    Keras 3 model weights have no ``model/...`` key: a checkpoint stores each variable once, under the
    first path that reaches it, here ``optimizer/_trainable_variables/<i>``; comparing every tensor
    compares them too.
    """
    import tensorflow as tf

    path = str(path)
    if os.path.isdir(path):
        path = tf.train.latest_checkpoint(os.path.join(path, "checkpoints"))
        assert path, "no checkpoint"
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path)
            if name not in ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter/.ATTRIBUTES/VARIABLE_VALUE")}


def assert_same_state(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Asserts two read_checkpoint dicts hold the same keys and values within tolerance."""
    import numpy as np

    assert sorted(a) == sorted(b)
    for key in sorted(a):
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=atol, err_msg=key)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """A small synthetic dataset (train + eval splits; see TINY_DATA), made once per session."""
    from data_pipeline.generate import generate

    out = tmp_path_factory.mktemp("data") / "tiny"
    generate(str(out), **TINY_DATA)
    return str(out)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def train_in_process(cfg, data_dir, model_dir, backend=None, **kwargs):
    """Runs trainer.train.train here, returning (TrainResult, the trainer's log messages)."""
    from trainer.train import train

    logger = logging.getLogger("trainer")  # trainer.train, trainer.evaluation, ...
    records, level = _Records(), logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        result = train(cfg, str(data_dir), str(model_dir), backend=backend, **kwargs)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    return result, records.messages


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory):
    """A model trained once per session on tiny_data with configs/tiny.yaml (deterministic, evaluated on the
    eval split, exported): namespace(model_dir, result, messages)."""
    from trainer.config import load_config

    # distribution one_device, not tiny.yaml's auto: a TF_CONFIG left in os.environ by another test would
    # turn auto into multi_worker.
    cfg = load_config(str(REPO_ROOT / "configs" / "tiny.yaml"),
                      ["train.deterministic=true", "train.epochs=4", "train.distribution=one_device"])
    model_dir = tmp_path_factory.mktemp("trained") / "model"
    result, messages = train_in_process(cfg, tiny_data, model_dir)
    return types.SimpleNamespace(model_dir=str(model_dir), result=result, messages=messages, cfg=cfg)
