"""TF_CONFIG for a plain Kubernetes Indexed Job (no training operator needed).

A batch/v1 Job with ``completionMode: Indexed`` gives every pod a stable index in the
``JOB_COMPLETION_INDEX`` environment variable, and, when the pod template sets
``subdomain`` to the name of a headless Service, a stable DNS name
``<job-name>-<index>.<service>[.<namespace>.svc]``. That is all
``MultiWorkerMirroredStrategy`` needs: this module turns it into ``TF_CONFIG``.

Every task is of type ``"worker"``; worker 0 is the chief-equivalent (TensorFlow's own
rule when the cluster has no ``"chief"`` task), so the same trainer code runs under an
Indexed Job, a TFJob with Worker replicas only, and ``scripts/train_multiworker_local.sh``.

Environment read by :func:`maybe_set_tf_config_from_indexed_job` (``k8s/manifests.py``
sets them in the ``indexed-job`` backend):

- ``JOB_COMPLETION_INDEX``: this worker's index (set by Kubernetes); absent: do nothing.
- ``MLT_NUM_WORKERS``: number of workers (required unless ``MLT_HOSTS`` is given).
- ``MLT_JOB_NAME``: Job name, the first part of the pod hostnames.
- ``MLT_SERVICE``: headless Service name (the pods' ``subdomain``).
- ``MLT_NAMESPACE``: optional; adds ``.<namespace>.svc`` to the DNS names.
- ``MLT_PORT``: gRPC port of every worker (default 2222).
- ``MLT_HOST_TEMPLATE``: optional format string for one address, see :func:`worker_addresses`.
- ``MLT_HOSTS``: optional explicit comma list ``host[:port],...``, one per worker; replaces
  the DNS names (local runs and tests: 127.0.0.1 and a port per worker).
"""
from __future__ import annotations

import json
import os
import re
from typing import Mapping, MutableMapping, Sequence

DEFAULT_PORT = 2222

# Fields a host template may use; anything else is a typo we want to report, not a KeyError.
_TEMPLATE_FIELDS = ("job_name", "index", "service", "namespace", "port")
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def _check_port(port: int, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"{what} must be a port number in 1..65535, got {port!r}")
    return port


def _with_port(host: str, port: int) -> str:
    """Return ``host:port``, keeping a port that ``host`` already carries."""
    host = host.strip()
    if not host:
        raise ValueError("empty host name in the worker address list")
    if _HOST_PORT.match(host):
        _check_port(int(host.rsplit(":", 1)[1]), f"port of {host!r}")
        return host
    if ":" in host and not host.startswith("["):
        raise ValueError(f"bad worker address {host!r}: expected host or host:port")
    return f"{host}:{port}"


def worker_addresses(
    num_workers: int,
    job_name: str,
    service: str,
    namespace: str | None = None,
    port: int = DEFAULT_PORT,
    host_template: str | Sequence[str] | None = None,
) -> list[str]:
    """Addresses (``host:port``) of all workers of an Indexed Job, in index order.

    Args:
        num_workers: number of workers (pods) in the job, at least 1.
        job_name: name of the Job; pod hostnames are ``<job_name>-<index>``.
        service: name of the headless Service the pods use as ``subdomain``.
        namespace: when given, names are fully qualified ``....<namespace>.svc``
            (works from any namespace and does not rely on the resolver's search list).
        port: gRPC port every worker listens on.
        host_template: optional; either a ``str.format`` template for one address, with
            fields ``{job_name} {index} {service} {namespace} {port}`` (e.g.
            ``"{job_name}-{index}.{service}.{namespace}.svc.cluster.local"``), or a sequence
            of ``num_workers`` explicit addresses in index order (e.g.
            ``["127.0.0.1:41001", "127.0.0.1:41002"]`` for workers on one host).
            ``:{port}`` is appended to any address that carries no port.

    Returns:
        A list of ``num_workers`` strings ``host:port``.

    Raises:
        ValueError: on a bad count, port, name or template.
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    _check_port(port, "port")
    if host_template is not None and not isinstance(host_template, str):
        hosts = [_with_port(str(h), port) for h in host_template]
        if len(hosts) != num_workers:
            raise ValueError(f"{len(hosts)} worker addresses given for num_workers={num_workers}")
        return hosts
    if host_template is None:
        if not job_name or not service:
            raise ValueError("job_name and service are required to build worker DNS names")
        host_template = "{job_name}-{index}.{service}" + (".{namespace}.svc" if namespace else "")
    addresses = []
    for index in range(num_workers):
        try:
            host = host_template.format(job_name=job_name, index=index, service=service,
                                        namespace=namespace or "", port=port)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"bad host template {host_template!r}: fields are "
                             f"{', '.join('{' + f + '}' for f in _TEMPLATE_FIELDS)} ({exc})") from None
        addresses.append(_with_port(host, port))
    return addresses


def tf_config(hosts: Sequence[str], index: int) -> dict:
    """TF_CONFIG dict for worker ``index`` of a worker-only cluster.

    Args:
        hosts: ``host:port`` of every worker, in index order.
        index: this worker's index into ``hosts``.

    Returns:
        ``{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": index}}``.

    Raises:
        ValueError: if ``index`` is outside ``hosts`` or an address repeats.
    """
    hosts = list(hosts)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(hosts):
        raise ValueError(f"worker index {index!r} is outside 0..{len(hosts) - 1}")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"worker addresses repeat: {hosts}")
    return {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}


def build_tf_config(
    index: int,
    num_workers: int,
    job_name: str,
    service: str,
    namespace: str | None,
    port: int = DEFAULT_PORT,
    host_template: str | Sequence[str] | None = None,
) -> dict:
    """TF_CONFIG for pod ``index`` of an Indexed Job behind a headless Service.

    Args:
        index: this pod's ``JOB_COMPLETION_INDEX``.
        num_workers: completions (= parallelism) of the Job.
        job_name: Job name (pod hostnames are ``<job_name>-<index>``).
        service: headless Service name, equal to the pod template's ``subdomain``.
        namespace: optional namespace for fully qualified names.
        port: gRPC port of every worker.
        host_template: optional address template or explicit address list, see
            :func:`worker_addresses`.

    Returns:
        The TF_CONFIG dict (all tasks of type ``"worker"``; worker 0 acts as chief).

    Raises:
        ValueError: on any bad argument.
    """
    hosts = worker_addresses(num_workers, job_name, service, namespace, port, host_template)
    return tf_config(hosts, index)


def _int_env(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise ValueError(f"{name} is not set (needed to build TF_CONFIG for an Indexed Job)")
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _str_env(environ: Mapping[str, str], name: str) -> str:
    value = (environ.get(name) or "").strip()
    if not value:
        raise ValueError(f"{name} is not set (needed to build TF_CONFIG for an Indexed Job)")
    return value


def tf_config_from_env(environ: Mapping[str, str]) -> dict:
    """Build TF_CONFIG from the Indexed-Job environment (see the module docstring).

    Args:
        environ: the environment; must contain ``JOB_COMPLETION_INDEX``.

    Returns:
        The TF_CONFIG dict.

    Raises:
        ValueError: one line naming the missing or bad variable.
    """
    index = _int_env(environ, "JOB_COMPLETION_INDEX")
    port = _int_env(environ, "MLT_PORT", DEFAULT_PORT)
    _check_port(port, "MLT_PORT")
    explicit = (environ.get("MLT_HOSTS") or "").strip()
    if explicit:
        # Explicit addresses replace the DNS names; the count is optional but must agree.
        try:
            hosts = [_with_port(h, port) for h in explicit.split(",")]
        except ValueError as exc:
            raise ValueError(f"MLT_HOSTS: {exc}") from None
        if (environ.get("MLT_NUM_WORKERS") or "").strip():
            expected = _int_env(environ, "MLT_NUM_WORKERS")
            if expected != len(hosts):
                raise ValueError(f"MLT_NUM_WORKERS={expected} but MLT_HOSTS lists {len(hosts)} workers")
    else:
        num_workers = _int_env(environ, "MLT_NUM_WORKERS")
        if num_workers < 1:
            raise ValueError(f"MLT_NUM_WORKERS must be >= 1, got {num_workers}")
        job_name = _str_env(environ, "MLT_JOB_NAME")
        service = _str_env(environ, "MLT_SERVICE")
        try:
            hosts = worker_addresses(num_workers, job_name, service,
                                     (environ.get("MLT_NAMESPACE") or "").strip() or None, port,
                                     (environ.get("MLT_HOST_TEMPLATE") or "").strip() or None)
        except ValueError as exc:
            # Everything else was checked above, so what is left is the template.
            raise ValueError(f"MLT_HOST_TEMPLATE: {exc}") from None
    if not 0 <= index < len(hosts):
        raise ValueError(f"JOB_COMPLETION_INDEX={index} is outside 0..{len(hosts) - 1}")
    return tf_config(hosts, index)


def maybe_set_tf_config_from_indexed_job(
    environ: MutableMapping[str, str] = os.environ,
) -> dict | None:
    """Set ``TF_CONFIG`` from the Indexed-Job environment when it is not set already.

    Called by the trainer at start-up, before any strategy is created. An explicit
    ``TF_CONFIG`` (TFJob operator, a user) always wins; without ``JOB_COMPLETION_INDEX``
    this is not an Indexed Job and nothing happens.

    Args:
        environ: the environment to read and update (``os.environ`` by default; tests pass a dict).

    Returns:
        The TF_CONFIG dict that was set, or None when nothing was done.

    Raises:
        ValueError: one line naming the missing or bad variable.
    """
    if environ.get("TF_CONFIG") or "JOB_COMPLETION_INDEX" not in environ:
        return None
    config = tf_config_from_env(environ)
    environ["TF_CONFIG"] = json.dumps(config)
    return config
