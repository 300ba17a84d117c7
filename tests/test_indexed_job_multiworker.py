"""The Indexed-Job backend end to end on one machine: two real trainer processes.

Each process gets the container command and env of the pod that k8s/manifests.py renders,
plus JOB_COMPLETION_INDEX (set by Kubernetes in a real pod) and MLT_HOSTS with 127.0.0.1
and two free ports in place of the pod DNS names; TF_CONFIG is unset, so the trainer must
build it through trainer/cluster.py. Both must exit 0 and leave a checkpoint.
"""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pytest

from k8s import manifests

REPO = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def base_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k != "TF_CONFIG" and not k.startswith(("MLT_", "JOB_COMPLETION_INDEX"))}
    env.update(PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return env


@pytest.mark.timeout(300)
def test_two_indexed_job_workers_train_together(tmp_path):
    data, model_dir = tmp_path / "data", tmp_path / "model"
    subprocess.run([sys.executable, "-m", "data_pipeline", "generate", "--out", str(data),
                    "--examples", "512", "--features", "16", "--labels", "8", "--shards", "4",
                    "--seed", "1"], cwd=REPO, env=base_env(), check=True, capture_output=True, timeout=120)

    job, _service = manifests.render_job(manifests.JobOptions(
        backend="indexed-job", name="mw-test", workers=2, data=str(data), model_dir=str(model_dir),
        config="configs/tiny.yaml", train_args=("--max-steps", "20")))
    container = job["spec"]["template"]["spec"]["containers"][0]
    command = [sys.executable if container["command"][0] == "python" else container["command"][0],
               *container["command"][1:]]
    assert command[command.index("--distribution") + 1] == "multi_worker"
    pod_env = {v["name"]: v["value"] for v in container["env"] if "value" in v}
    hosts = ",".join(f"127.0.0.1:{port}" for port in free_ports(2))

    procs = []
    try:
        for index in range(2):
            env = dict(base_env(), **pod_env, JOB_COMPLETION_INDEX=str(index), MLT_HOSTS=hosts)
            procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # --distribution multi_worker without a TF_CONFIG is an error in the trainer, and each
    # step's all-reduce needs both processes: exit 0 from both means they trained as a pair.
    for index, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"worker {index} exited {proc.returncode}:\n{output[-3000:]}"
    assert list(model_dir.rglob("ckpt-*.index")), f"no checkpoint under {model_dir}"
