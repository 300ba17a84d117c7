"""Rendered manifests, their validation, and the kustomize tree under k8s/.

Core kinds are checked with kubernetes-validate (strict), TFJob/MPIJob with jsonschema
against the released CRDs in <repo>/../shared/k8s-crds, plus the webhook-mirroring checks.
"""
from __future__ import annotations

import copy
import pathlib
import shutil
import subprocess

import pytest
import yaml

from k8s import kustomize, manifests, validate
from trainer import cluster

REPO = pathlib.Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
CRD_DIR = REPO.parent / "shared" / "k8s-crds"


@pytest.fixture(scope="module")
def crd_dir() -> pathlib.Path:
    if not (CRD_DIR / "kubeflow.org_tfjobs.yaml").is_file():
        pytest.skip(f"Kubeflow CRDs not found at {CRD_DIR}")
    return CRD_DIR


def render(backend: str, **kwargs) -> list[dict]:
    return manifests.render_job(manifests.JobOptions(backend=backend, **kwargs))


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


VARIANTS = {
    "defaults": {},
    "gpus": {"workers": 4, "gpus_per_worker": 8, "cpu": "16", "memory": "64Gi",
             "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
             "tolerations": ({"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},)},
    "uris": {"data": "gs://bucket/ds", "model_dir": "pvc://shared/runs/exp1",
             "eval_data": "pvc://shared/eval", "namespace": "team-a", "train_args": ("--epochs", "3")},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("backend", manifests.BACKENDS)
def test_every_backend_renders_valid_manifests(backend, variant, crd_dir):
    docs = render(backend, **VARIANTS[variant])
    assert validate.validate_documents(docs, crd_dir) == []
    # What the submit tool prints with --dry-run must round-trip through YAML unchanged.
    assert list(yaml.safe_load_all(manifests.to_yaml(docs))) == docs


def test_storage_and_tensorboard_validate(crd_dir):
    docs = (manifests.render_storage(storage_class="nfs") + manifests.render_tensorboard()
            + manifests.render_tensorboard("gs://bucket/runs", name="tb-gcs"))
    assert validate.validate_documents(docs, crd_dir) == []
    deployment = docs[2]
    command = containers(deployment["spec"]["template"])[0]["command"]
    assert command[:4] == ["tensorboard", "--logdir", "/model", "--bind_all"]
    assert deployment["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "mlt-model"
    assert docs[3]["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert "volumes" not in docs[4]["spec"]["template"]["spec"]  # gs:// needs no volume


def test_tfjob_layout():
    (job,) = render("tfjob", **VARIANTS["gpus"])
    specs = job["spec"]["tfReplicaSpecs"]
    assert list(specs) == ["Worker"] and specs["Worker"]["replicas"] == 4  # no Chief: worker 0 is chief
    pod = specs["Worker"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "tensorflow"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    cmd = container["command"]
    assert cmd[:4] == ["python", "-m", "trainer", "train"]
    assert cmd[cmd.index("--distribution") + 1] == "multi_worker"
    assert (cmd[cmd.index("--data") + 1], cmd[cmd.index("--model-dir") + 1]) == ("/data", "/model")
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"data": "mlt-data", "model": "mlt-model"}


def test_mpijob_layout():
    (job,) = render("mpijob", workers=3, gpus_per_worker=4)
    spec = job["spec"]
    assert spec["slotsPerWorker"] == 4
    assert spec["mpiReplicaSpecs"]["Launcher"]["replicas"] == 1
    assert spec["mpiReplicaSpecs"]["Worker"]["replicas"] == 3
    launcher = containers(spec["mpiReplicaSpecs"]["Launcher"]["template"])[0]
    assert launcher["image"] == manifests.HOROVOD_IMAGE
    cmd = launcher["command"]
    assert cmd[:6] == ["horovodrun", "--gloo", "-np", "12", "--hostfile", "/etc/mpi/hostfile"]
    assert cmd[cmd.index("--distribution") + 1] == "horovod"
    assert "resources" not in launcher  # GPUs belong to the workers, where the ranks run
    worker = containers(spec["mpiReplicaSpecs"]["Worker"]["template"])[0]
    assert worker["command"][0] == "/usr/sbin/sshd"
    assert worker["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    # CPU: one slot per worker.
    assert render("mpijob", workers=2)[0]["spec"]["slotsPerWorker"] == 1


def test_indexed_job_env_gives_each_pod_its_tf_config():
    job, service = render("indexed-job", workers=3, port=2345)
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (3, 3)
    assert job["spec"]["completionMode"] == "Indexed"
    pod = job["spec"]["template"]
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    # Resolve the env as the kubelet would and feed it to the trainer's builder.
    env = {}
    for var in containers(pod)[0]["env"]:
        env[var["name"]] = var.get("value") or ("team-a" if "valueFrom" in var else None)
    env["JOB_COMPLETION_INDEX"] = "2"
    config = cluster.tf_config_from_env(env)
    assert config["task"] == {"type": "worker", "index": 2}
    assert config["cluster"]["worker"] == [f"mlt-train-{i}.mlt-train.team-a.svc:2345" for i in range(3)]


def test_storage_uris():
    assert manifests.parse_uri("pvc://claim/a//b/") == manifests.Location("pvc://claim/a//b/", "claim", "a/b")
    assert manifests.parse_uri("gs://bucket/x").claim is None
    for bad in ("pvc://", "pvc://Bad_Name/x", "pvc://c/../etc", ""):
        with pytest.raises(ValueError):
            manifests.parse_uri(bad)
    # One claim for data and model dir: a single writable volume, both paths under /model.
    opts = manifests.JobOptions(backend="tfjob", data="pvc://c/data", model_dir="pvc://c/runs/1")
    paths, volumes, mounts = manifests.storage_layout(opts)
    assert paths == {"model": "/model/runs/1", "data": "/model/data"}
    assert [v["name"] for v in volumes] == ["model"] and mounts[0]["readOnly"] is False
    paths, volumes, _ = manifests.storage_layout(manifests.JobOptions(backend="tfjob", data="/d", model_dir="gs://b/m"))
    assert paths == {"model": "gs://b/m", "data": "/d"} and volumes == []


@pytest.mark.parametrize("kwargs,match", [
    ({"backend": "slurm"}, "unknown backend"),
    ({"workers": 0}, "--workers"),
    ({"gpus_per_worker": -1}, "--gpus-per-worker"),
    ({"name": "Exp_1"}, "bad job name"),
    ({"name": "x" * 60}, "too long"),
    ({"data": "pvc://UPPER"}, "bad PVC name"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        manifests.render_job(manifests.JobOptions(**{"backend": "tfjob", **kwargs}))


def _tf_worker(doc):
    return doc["spec"]["tfReplicaSpecs"]["Worker"]


def _mpi(doc, rtype):
    return doc["spec"]["mpiReplicaSpecs"][rtype]


def _break_chief_and_master(doc):
    for rtype in ("Chief", "Master"):
        doc["spec"]["tfReplicaSpecs"][rtype] = dict(copy.deepcopy(_tf_worker(doc)), replicas=1)


BROKEN = [
    ("tfjob", lambda d: containers(_tf_worker(d)["template"])[0].update(name="trainer"), "named 'tensorflow'"),
    ("tfjob", _break_chief_and_master, "more than 1 Chief or Master"),
    ("tfjob", lambda d: d["spec"]["tfReplicaSpecs"].update(Chief=dict(_tf_worker(d), replicas=2)), "at most 1"),
    ("tfjob", lambda d: _tf_worker(d).update(restartPolicy="Sometimes"), "restartPolicy 'Sometimes'"),
    ("tfjob", lambda d: _tf_worker(d).update(replicas="two"), "'two' is not of type 'integer'"),
    ("tfjob", lambda d: d["spec"]["runPolicy"].update(cleanPodPolicyy="All"), "'cleanPodPolicyy' was unexpected"),
    ("tfjob", lambda d: containers(_tf_worker(d)["template"])[0].update(image=""), "has no image"),
    ("tfjob", lambda d: d.update(metadata={"name": "Exp1"}), "DNS-1035"),
    ("mpijob", lambda d: _mpi(d, "Launcher").update(replicas=2), "Launcher replicas must be 1"),
    ("mpijob", lambda d: _mpi(d, "Worker").update(restartPolicy="Always"), "not one of Never, OnFailure"),
    ("mpijob", lambda d: _mpi(d, "Launcher").update(restartPolicy="ExitCode"), "not one of Never, OnFailure"),
    ("mpijob", lambda d: d["spec"]["mpiReplicaSpecs"].pop("Launcher"), "Launcher is required"),
    ("mpijob", lambda d: _mpi(d, "Worker").pop("replicas"), "Worker must set replicas"),
    ("mpijob", lambda d: d["spec"].update(mpiImplementation="LAM"), "'LAM' is not one of"),
    ("mpijob", lambda d: d["spec"]["runPolicy"].update(cleanPodPolicy="Sometimes"), "cleanPodPolicy"),
    ("mpijob", lambda d: _mpi(d, "Worker").update(replicas=10 ** 60), "would not be a valid DNS label"),
    ("indexed-job", lambda d: d["spec"]["template"]["spec"].update(restartPolicy="Always"), "Never or OnFailure"),
    ("indexed-job", lambda d: d["spec"].pop("completions"), "completions is required"),
    ("indexed-job", lambda d: containers(d["spec"]["template"])[0].update(comand=["x"]), "'comand' was unexpected"),
]


@pytest.mark.parametrize("backend,breaker,match", BROKEN,
                         ids=[f"{b}-{m[:30]}" for b, _, m in BROKEN])
def test_validation_catches_broken_manifests(backend, breaker, match, crd_dir):
    doc = render(backend)[0]
    assert validate.validate_document(doc, crd_dir) == []
    breaker(doc)
    errors = validate.validate_document(doc, crd_dir)
    assert any(match in e for e in errors), errors


def test_core_kinds_are_strict():
    service = render("indexed-job")[1]
    service["spec"]["clusterIp"] = "None"  # wrong case: the API server would drop it silently
    assert any("clusterIp" in e for e in validate.validate_document(service))
    pvc = manifests.render_storage()[0]
    pvc["spec"]["accessModes"] = "ReadWriteMany"
    assert validate.validate_document(pvc) != []


def test_released_crd_schema_alone_would_miss_unknown_fields(crd_dir):
    # Why validate.py tightens the schemas: the released ones accept any extra key.
    import jsonschema
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    raw = yaml.load((crd_dir / "kubeflow.org_tfjobs.yaml").read_text(), Loader=loader)
    schema = raw["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    doc = render("tfjob")[0]
    _tf_worker(doc)["restartPolicyy"] = "Never"
    assert list(jsonschema.Draft4Validator(schema).iter_errors(doc)) == []
    assert any("restartPolicyy" in e for e in validate.validate_document(doc, crd_dir))


def _yaml_files():
    return sorted(p for sub in ("base", "overlays") for p in (K8S / sub).rglob("*.yaml"))


def test_every_yaml_under_k8s_parses_and_validates(crd_dir):
    files = _yaml_files()
    assert {str(p.relative_to(K8S)) for p in files} >= set(kustomize.render_tree())
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs, path
        if path.name == "kustomization.yaml":
            (doc,) = docs
            assert doc["kind"] == "Kustomization"
            for resource in doc["resources"]:
                assert (path.parent / resource).exists(), f"{path}: {resource} missing"
            continue
        assert validate.validate_documents(docs, crd_dir) == [], path


def test_kustomize_files_match_the_renderer():
    for rel, text in kustomize.render_tree().items():
        path = K8S / rel
        assert path.is_file() and path.read_text() == text, (
            f"k8s/{rel} differs from k8s/manifests.py: run python -m k8s.kustomize")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("backend", manifests.BACKENDS)
def test_kubectl_kustomize_renders_overlay(backend, crd_dir):
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / backend)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    expected = manifests.render_storage() + manifests.render_tensorboard() + render(backend)
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, docs)) == sorted(map(key, expected))
    assert validate.validate_documents(docs, crd_dir) == []


def test_validate_cli(tmp_path, crd_dir, capsys):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(manifests.to_yaml(render("mpijob")))
    doc = render("mpijob")[0]
    _mpi(doc, "Launcher")["replicas"] = 3
    bad.write_text(manifests.to_yaml([doc]))
    assert validate.main([str(good), "--crd-dir", str(crd_dir)]) == 0
    assert validate.main([str(bad), "--crd-dir", str(crd_dir)]) == 1
    assert "Launcher replicas must be 1" in capsys.readouterr().out
