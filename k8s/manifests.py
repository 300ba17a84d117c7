"""Render the Kubernetes manifests of a training run as plain Python dicts.

Three backends run the same trainer on N worker pods:

``tfjob``
    Kubeflow ``TFJob`` (``kubeflow.org/v1``, training operator). ``Worker`` replicas only,
    no ``Chief``: the operator then writes ``TF_CONFIG`` with a worker-only cluster, and
    worker 0 is the chief, exactly as in the ``indexed-job`` backend and in local
    multi-worker runs, so the trainer has one convention to follow. ``successPolicy:
    AllWorkers`` because MultiWorkerMirroredStrategy workers finish together.
``mpijob``
    ``MPIJob`` (``kubeflow.org/v2beta1``, mpi-operator) for Horovod: a ``Launcher`` runs
    ``horovodrun --gloo`` over ssh on N ``Worker`` pods that only run ``sshd``;
    ``slotsPerWorker`` = GPUs per worker (1 on CPU), so ``-np`` = N * slots.
``indexed-job``
    A plain ``batch/v1`` Job (``completionMode: Indexed``) plus a headless Service; no
    operator needed. ``trainer/cluster.py`` builds ``TF_CONFIG`` from the env set here.

Storage URIs (``--data``, ``--eval-data``, ``--model-dir``):

``pvc://CLAIM[/SUB/PATH]``
    Mount PersistentVolumeClaim ``CLAIM`` (model dir at ``/model`` read-write, data at
    ``/data`` and eval data at ``/eval-data`` read-only; one volume when two roles share
    a claim) and pass ``<mount>/SUB/PATH`` to the trainer.
anything else (``gs://bucket/x``, ``s3://...``, ``/abs/path``)
    Passed to the trainer unchanged; nothing is mounted (TensorFlow reads ``gs://`` itself).
"""
from __future__ import annotations

import dataclasses
import posixpath
import re
from typing import Any, Sequence

import yaml

BACKENDS = ("tfjob", "mpijob", "indexed-job")
APP = "multilabel-trainer"
DEFAULT_NAME = "mlt-train"
DEFAULT_IMAGE = "multilabel-trainer:cpu"
HOROVOD_IMAGE = "multilabel-trainer:horovod"
DATA_CLAIM = "mlt-data"
MODEL_CLAIM = "mlt-model"
TENSORBOARD_NAME = "mlt-tensorboard"
TENSORBOARD_PORT = 6006
DEFAULT_CONFIG = {"tfjob": "configs/default.yaml", "indexed-job": "configs/default.yaml",
                  "mpijob": "configs/horovod.yaml"}
GPU_RESOURCE = "nvidia.com/gpu"
SSH_AUTH_PATH = "/root/.ssh"  # mpi-operator mounts the generated key pair here (root user)
HOSTFILE = "/etc/mpi/hostfile"  # written by mpi-operator v2 into the launcher

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclasses.dataclass(frozen=True)
class Location:
    """Where one URI lives: a PVC (``claim`` + ``sub_path``) or a plain path (``claim`` None)."""

    uri: str
    claim: str | None
    sub_path: str


def parse_uri(uri: str) -> Location:
    """Parse a storage URI (see the module docstring).

    Args:
        uri: ``pvc://CLAIM[/SUB/PATH]`` or any path/URL TensorFlow can open.

    Returns:
        A :class:`Location`.

    Raises:
        ValueError: on an empty URI, a bad claim name or a sub path with ``..``.
    """
    if not uri or not uri.strip():
        raise ValueError("empty storage URI")
    if not uri.startswith("pvc://"):
        return Location(uri, None, "")
    claim, _, sub = uri[len("pvc://"):].partition("/")
    if not claim or len(claim) > 253 or not _DNS1123_SUBDOMAIN.match(claim):
        raise ValueError(f"bad PVC name {claim!r} in {uri!r}: expected pvc://CLAIM[/SUB/PATH] "
                         "with a lower-case DNS name as CLAIM")
    parts = [p for p in sub.split("/") if p]
    if ".." in parts:
        raise ValueError(f"'..' is not allowed in the sub path of {uri!r}")
    return Location(uri, claim, "/".join(parts))


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """Everything that shapes the rendered training job.

    Attributes:
        backend: one of :data:`BACKENDS`.
        name: job name (DNS-1035 label; pods are ``<name>-worker-<i>`` / ``<name>-<i>``).
        workers: number of worker pods.
        gpus_per_worker: ``nvidia.com/gpu`` limit per worker (0: CPU only).
        image: training image (None: :data:`DEFAULT_IMAGE`, or :data:`HOROVOD_IMAGE` for
            ``mpijob``, which needs the ``horovod`` target of k8s/Dockerfile).
        data, model_dir, eval_data: storage URIs (see the module docstring).
        config: trainer config path inside the image (None: backend default).
        namespace: metadata.namespace (None: left out, the API/kubectl namespace applies).
        node_selector: nodeSelector of the worker pods.
        tolerations: extra tolerations (a GPU toleration is added when GPUs are asked for).
        cpu, memory: optional resource requests per worker, e.g. "4", "16Gi".
        port: gRPC port of the workers (tfjob, indexed-job).
        train_args: extra arguments appended to ``python -m trainer train``.
    """

    backend: str
    name: str = DEFAULT_NAME
    workers: int = 2
    gpus_per_worker: int = 0
    image: str | None = None
    data: str = f"pvc://{DATA_CLAIM}"
    model_dir: str = f"pvc://{MODEL_CLAIM}"
    eval_data: str | None = None
    config: str | None = None
    namespace: str | None = None
    node_selector: dict = dataclasses.field(default_factory=dict)
    tolerations: tuple = ()
    cpu: str | None = None
    memory: str | None = None
    port: int = 2222
    train_args: tuple = ()

    @property
    def resolved_image(self) -> str:
        """The image to run: ``image`` or the backend's default."""
        return self.image or (HOROVOD_IMAGE if self.backend == "mpijob" else DEFAULT_IMAGE)

    def check(self) -> None:
        """Raise ValueError (one line) when the options cannot make a valid job."""
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers!r}")
        if not isinstance(self.gpus_per_worker, int) or self.gpus_per_worker < 0:
            raise ValueError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker!r}")
        if not _DNS1035.match(self.name or ""):
            raise ValueError(f"bad job name {self.name!r}: lower-case letters, digits and '-', "
                             "starting with a letter")
        # The longest pod hostname / per-replica Service name must stay a DNS label (63).
        longest = f"{self.name}-worker-{self.workers - 1}"
        if len(longest) > 63:
            raise ValueError(f"job name {self.name!r} is too long: {longest!r} exceeds 63 characters")
        if self.image is not None and not self.image.strip():
            raise ValueError("--image is empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        for uri in (self.data, self.model_dir, self.eval_data):
            if uri is not None:
                parse_uri(uri)


def _labels(name: str, component: str) -> dict:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/instance": name,
            "app.kubernetes.io/component": component}


def _metadata(name: str, namespace: str | None, labels: dict) -> dict:
    meta = {"name": name, "labels": dict(labels)}
    if namespace:
        meta["namespace"] = namespace
    return meta


def storage_layout(opts: JobOptions) -> tuple[dict, list, list]:
    """Trainer paths, pod volumes and volume mounts for the job's storage URIs.

    Args:
        opts: job options.

    Returns:
        ``(paths, volumes, mounts)``: ``paths`` maps "model"/"data"/"eval" to the path the
        trainer gets; ``volumes``/``mounts`` are pod-spec lists (empty without PVCs).
    """
    # Model first: a claim shared with the data becomes one writable volume at /model.
    roles = [("model", opts.model_dir, "/model"), ("data", opts.data, "/data"),
             ("eval", opts.eval_data, "/eval-data")]
    mount_of_claim: dict[str, str] = {}
    paths, volumes, mounts = {}, [], []
    for role, uri, mount_path in roles:
        if uri is None:
            continue
        loc = parse_uri(uri)
        if loc.claim is None:
            paths[role] = loc.uri
            continue
        if loc.claim not in mount_of_claim:
            mount_of_claim[loc.claim] = mount_path
            volumes.append({"name": role, "persistentVolumeClaim": {"claimName": loc.claim}})
            mounts.append({"name": role, "mountPath": mount_path, "readOnly": role != "model"})
        mount_path = mount_of_claim[loc.claim]
        paths[role] = posixpath.join(mount_path, loc.sub_path) if loc.sub_path else mount_path
    return paths, volumes, mounts


def train_command(opts: JobOptions, distribution: str) -> list[str]:
    """The ``python -m trainer train ...`` argv run in every worker (or by horovodrun).

    Args:
        opts: job options.
        distribution: value of ``--distribution``.

    Returns:
        The argv list.
    """
    paths, _, _ = storage_layout(opts)
    cmd = ["python", "-m", "trainer", "train", "--data", paths["data"], "--model-dir", paths["model"]]
    if "eval" in paths:
        cmd += ["--eval-data", paths["eval"]]
    cmd += ["--config", opts.config or DEFAULT_CONFIG[opts.backend], "--distribution", distribution]
    return cmd + [str(a) for a in opts.train_args]


def _pod_spec(opts: JobOptions, container: dict, worker: bool = True) -> dict:
    """Pod spec around one container.

    Worker pods (the ones that train) get the storage volumes, GPUs, /dev/shm, resource
    requests, nodeSelector and tolerations; the MPIJob launcher (``worker=False``) only
    runs horovodrun and gets none of them, so it fits on any node.
    """
    # Unbuffered output so `kubectl logs -f` shows progress as it happens.
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}] + container.get("env", [])
    container = {**container, "imagePullPolicy": "IfNotPresent", "env": env}
    if not worker:
        return {"containers": [container]}
    _, volumes, mounts = storage_layout(opts)
    resources: dict[str, dict] = {}
    requests = {k: v for k, v in (("cpu", opts.cpu), ("memory", opts.memory)) if v}
    if requests:
        resources["requests"] = requests
    tolerations = [dict(t) for t in opts.tolerations]
    if opts.gpus_per_worker:
        resources["limits"] = {GPU_RESOURCE: str(opts.gpus_per_worker)}  # quantities are strings
        # NCCL moves data through /dev/shm; the container default (64 MiB) is too small.
        volumes = volumes + [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
        mounts = mounts + [{"name": "dshm", "mountPath": "/dev/shm"}]
        # GPU node pools are commonly tainted nvidia.com/gpu:NoSchedule (GKE, AKS, EKS add-ons).
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    if resources:
        container["resources"] = resources
    if mounts:
        container["volumeMounts"] = mounts
    spec: dict[str, Any] = {"containers": [container]}
    if volumes:
        spec["volumes"] = volumes
    if opts.node_selector:
        spec["nodeSelector"] = dict(opts.node_selector)
    if tolerations:
        spec["tolerations"] = tolerations
    return spec


def render_tfjob(opts: JobOptions) -> list[dict]:
    """TFJob with ``opts.workers`` Worker replicas (no Chief; worker 0 is chief).

    Args:
        opts: job options with ``backend == "tfjob"``.

    Returns:
        ``[tfjob]``.
    """
    labels = _labels(opts.name, "worker")
    container = {"name": "tensorflow",  # the training operator requires this name
                 "image": opts.resolved_image, "command": train_command(opts, "multi_worker"),
                 "ports": [{"name": "tfjob-port", "containerPort": opts.port}]}
    return [{
        "apiVersion": "kubeflow.org/v1", "kind": "TFJob",
        "metadata": _metadata(opts.name, opts.namespace, labels),
        "spec": {
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 3},
            "successPolicy": "AllWorkers",
            "tfReplicaSpecs": {"Worker": {
                "replicas": opts.workers,
                "restartPolicy": "OnFailure",  # a restarted worker resumes from the checkpoint
                "template": {"metadata": {"labels": labels}, "spec": _pod_spec(opts, container)},
            }},
        },
    }]


def render_mpijob(opts: JobOptions) -> list[dict]:
    """MPIJob: one Launcher running horovodrun, ``opts.workers`` sshd Workers.

    Args:
        opts: job options with ``backend == "mpijob"``.

    Returns:
        ``[mpijob]``.
    """
    slots = max(1, opts.gpus_per_worker)
    # Horovod is built with Gloo only (scripts/install_horovod.sh), so horovodrun --gloo,
    # not mpirun; it reads the operator's hostfile ("host slots=N" lines) and uses ssh.
    launch = ["horovodrun", "--gloo", "-np", str(opts.workers * slots), "--hostfile", HOSTFILE]
    launcher = {"name": "launcher", "image": opts.resolved_image,
                "command": launch + train_command(opts, "horovod")}
    worker = {"name": "worker", "image": opts.resolved_image, "command": ["/usr/sbin/sshd", "-De"],
              # With launcherCreationPolicy WaitForWorkersReady the launcher starts once
              # every worker's sshd accepts connections.
              "readinessProbe": {"tcpSocket": {"port": 22}, "initialDelaySeconds": 2,
                                 "periodSeconds": 5}}
    launcher_labels, worker_labels = _labels(opts.name, "launcher"), _labels(opts.name, "worker")
    return [{
        "apiVersion": "kubeflow.org/v2beta1", "kind": "MPIJob",
        "metadata": _metadata(opts.name, opts.namespace, _labels(opts.name, "job")),
        "spec": {
            "slotsPerWorker": slots,
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 3},
            "sshAuthMountPath": SSH_AUTH_PATH,
            "mpiImplementation": "OpenMPI",
            "launcherCreationPolicy": "WaitForWorkersReady",
            "mpiReplicaSpecs": {
                "Launcher": {"replicas": 1, "restartPolicy": "OnFailure",
                             "template": {"metadata": {"labels": launcher_labels},
                                          "spec": _pod_spec(opts, launcher, worker=False)}},
                "Worker": {"replicas": opts.workers, "restartPolicy": "OnFailure",
                           "template": {"metadata": {"labels": worker_labels},
                                        "spec": _pod_spec(opts, worker)}},
            },
        },
    }]


def render_indexed_job(opts: JobOptions) -> list[dict]:
    """Indexed Job plus the headless Service that gives its pods DNS names.

    Args:
        opts: job options with ``backend == "indexed-job"``.

    Returns:
        ``[job, service]`` (the order the submit tool creates them in).
    """
    labels = _labels(opts.name, "worker")
    env = [{"name": "MLT_NUM_WORKERS", "value": str(opts.workers)},
           {"name": "MLT_JOB_NAME", "value": opts.name},
           {"name": "MLT_SERVICE", "value": opts.name},
           {"name": "MLT_PORT", "value": str(opts.port)},
           {"name": "MLT_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    container = {"name": "trainer", "image": opts.resolved_image, "env": env,
                 "command": train_command(opts, "multi_worker"),
                 "ports": [{"name": "grpc", "containerPort": opts.port}]}
    pod_spec = _pod_spec(opts, container)
    # Hostnames become <job>-<index>.<subdomain>; the Service below has the same name.
    pod_spec = {"subdomain": opts.name, "restartPolicy": "OnFailure", **pod_spec}
    job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _metadata(opts.name, opts.namespace, labels),
        "spec": {"completionMode": "Indexed", "completions": opts.workers,
                 "parallelism": opts.workers, "backoffLimit": 3 * opts.workers,
                 "template": {"metadata": {"labels": labels}, "spec": pod_spec}},
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _metadata(opts.name, opts.namespace, labels),
        "spec": {"clusterIP": "None", "selector": dict(labels),
                 # Workers must resolve each other while starting, before any is "ready".
                 "publishNotReadyAddresses": True,
                 "ports": [{"name": "grpc", "port": opts.port, "targetPort": opts.port}]},
    }
    return [job, service]


def render_job(opts: JobOptions) -> list[dict]:
    """Render the job resources of ``opts.backend`` (what the submit tool creates).

    Args:
        opts: job options.

    Returns:
        A list of manifest dicts.

    Raises:
        ValueError: when the options are invalid.
    """
    opts.check()
    return {"tfjob": render_tfjob, "mpijob": render_mpijob,
            "indexed-job": render_indexed_job}[opts.backend](opts)


def render_storage(data_claim: str = DATA_CLAIM, model_claim: str = MODEL_CLAIM,
                   data_size: str = "10Gi", model_size: str = "20Gi",
                   storage_class: str | None = None, namespace: str | None = None) -> list[dict]:
    """PersistentVolumeClaims for the dataset and the model dirs.

    ReadWriteMany because workers on different nodes read the data and write checkpoints
    (non-chief workers write to temporary dirs under the model dir); pick an RWX storage
    class (NFS, Filestore, EFS, Azure Files, CephFS) with ``storage_class``.

    Args:
        data_claim, model_claim: claim names.
        data_size, model_size: requested sizes.
        storage_class: storageClassName (None: cluster default).
        namespace: optional metadata.namespace.

    Returns:
        ``[data_pvc, model_pvc]``.
    """
    docs = []
    for claim, size in ((data_claim, data_size), (model_claim, model_size)):
        spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"],
                                "resources": {"requests": {"storage": size}}}
        if storage_class:
            spec["storageClassName"] = storage_class
        docs.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                     "metadata": _metadata(claim, namespace, _labels(claim, "storage")),
                     "spec": spec})
    return docs


def render_tensorboard(model_dir: str = f"pvc://{MODEL_CLAIM}", image: str = DEFAULT_IMAGE,
                       name: str = TENSORBOARD_NAME, namespace: str | None = None) -> list[dict]:
    """TensorBoard Deployment + ClusterIP Service reading the model dir.

    The training image already contains ``tensorboard`` (a dependency of the package).

    Args:
        model_dir: model-dir URI; a PVC is mounted read-only at ``/model``.
        image: image with ``tensorboard`` on PATH.
        name: name of the Deployment and the Service.
        namespace: optional metadata.namespace.

    Returns:
        ``[deployment, service]``.
    """
    loc = parse_uri(model_dir)
    logdir, volumes, mounts = loc.uri, [], []
    if loc.claim:
        logdir = posixpath.join("/model", loc.sub_path) if loc.sub_path else "/model"
        volumes = [{"name": "model", "persistentVolumeClaim": {"claimName": loc.claim, "readOnly": True}}]
        mounts = [{"name": "model", "mountPath": "/model", "readOnly": True}]
    labels = _labels(name, "tensorboard")
    container = {"name": "tensorboard", "image": image, "imagePullPolicy": "IfNotPresent",
                 "command": ["tensorboard", "--logdir", logdir, "--bind_all",
                             "--port", str(TENSORBOARD_PORT)],
                 "ports": [{"name": "http", "containerPort": TENSORBOARD_PORT}],
                 "readinessProbe": {"httpGet": {"path": "/", "port": TENSORBOARD_PORT}}}
    if mounts:
        container["volumeMounts"] = mounts
    pod_spec: dict[str, Any] = {"containers": [container]}
    if volumes:
        pod_spec["volumes"] = volumes
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _metadata(name, namespace, labels),
        "spec": {"replicas": 1, "selector": {"matchLabels": dict(labels)},
                 "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec}},
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _metadata(name, namespace, labels),
        "spec": {"selector": dict(labels),
                 "ports": [{"name": "http", "port": TENSORBOARD_PORT, "targetPort": "http"}]},
    }
    return [deployment, service]


def to_yaml(docs: Sequence[dict]) -> str:
    """Multi-document YAML (``---`` separated), keys in insertion order.

    Args:
        docs: manifest dicts.

    Returns:
        The YAML text.
    """
    return yaml.safe_dump_all(list(docs), sort_keys=False, default_flow_style=False)
