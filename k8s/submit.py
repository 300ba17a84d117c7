"""Submit, inspect and delete training jobs on Kubernetes.

Entry points: ``python scripts/submit_k8s.py`` and the ``mlt-submit`` console command. Usage::

    submit_k8s.py [submit] --backend tfjob|mpijob|indexed-job --image IMG --data URI --model-dir URI
                  [--workers N] [--gpus-per-worker G] [--config FILE] [--name NAME] [--namespace NS]
                  [--kubeconfig FILE] [--context CTX] [--dry-run] [-- EXTRA TRAINER ARGS]
    submit_k8s.py status NAME [--backend B] [--namespace NS] [--kubeconfig FILE]
    submit_k8s.py delete NAME [--backend B] [--namespace NS] [--kubeconfig FILE]

URIs: ``pvc://CLAIM/SUB/PATH`` mounts a PersistentVolumeClaim, anything else (``gs://...``)
is passed to the trainer as is (see :mod:`k8s.manifests`). ``--dry-run`` prints the
manifests as YAML and needs no cluster. Errors are one line on stderr, exit status 1 (2 when the ``k8s`` extra,
the Kubernetes client, is not installed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

from k8s import manifests, validate

PROG = "submit_k8s.py"
# kind -> (group, version, plural) for the custom resources.
CUSTOM = {"TFJob": ("kubeflow.org", "v1", "tfjobs"), "MPIJob": ("kubeflow.org", "v2beta1", "mpijobs")}
BACKEND_KIND = {"tfjob": "TFJob", "mpijob": "MPIJob", "indexed-job": "Job"}
OPERATOR = {"TFJob": "install the Kubeflow training operator",
            "MPIJob": "install the Kubeflow mpi-operator (v0.4 or later, kubeflow.org/v2beta1)"}


class SubmitError(Exception):
    """A user-facing failure; its message is printed as one line.

    ``reason`` lets callers react without parsing the text: "not_found", "crd_missing",
    "namespace_missing", or None.
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


def _api_error(exc, kind: str, name: str, namespace: str) -> SubmitError:
    """Translate an ApiException into a one-line, actionable message."""
    status, message, details = exc.status, "", {}
    try:
        body = json.loads(exc.body or "")
        message, details = body.get("message", ""), body.get("details") or {}
    except (ValueError, AttributeError):
        message = (exc.body or "").strip()
    if status == 404:
        if details.get("kind") == "namespaces":
            return SubmitError(f"namespace {namespace!r} not found", "namespace_missing")
        if kind in CUSTOM and not details:
            # The group/version is not served at all: plain "404 page not found".
            return SubmitError(f"{kind} CRD not installed: {OPERATOR[kind]}", "crd_missing")
        return SubmitError(f"{kind} {name} not found in namespace {namespace}", "not_found")
    if status == 409:
        return SubmitError(f"{kind} {name} already exists in namespace {namespace}: choose another "
                           f"--name or run '{PROG} delete {name} -n {namespace}'")
    if status == 403:
        return SubmitError(f"forbidden: {message or 'the API server refused the request'} "
                           "(ask for RBAC permissions in this namespace)")
    if status == 401:
        return SubmitError("unauthorized: the API server rejected the kubeconfig credentials")
    return SubmitError(f"API server answered {status} {exc.reason or ''} for {kind} {name}: "
                       f"{message}".replace("\n", " ").strip())


def _unreachable(api_client, exc) -> SubmitError:
    reason = getattr(exc, "reason", None) or exc
    return SubmitError(f"cannot reach the Kubernetes API server at "
                       f"{api_client.configuration.host}: {str(reason).splitlines()[0]}")


def load_client(kubeconfig: str | None, context: str | None, environ=os.environ):
    """An ApiClient and the default namespace from a kubeconfig (or the in-cluster config).

    Args:
        kubeconfig: explicit file; None: ``$KUBECONFIG``, then ``~/.kube/config``, then in-cluster.
        context: kubeconfig context (None: current context).
        environ: environment to read ``KUBECONFIG``/``HOME``/``KUBERNETES_SERVICE_HOST`` from.

    Returns:
        ``(api_client, namespace)``.

    Raises:
        SubmitError: when no usable configuration is found.
    """
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    if kubeconfig and not os.path.isfile(kubeconfig):
        raise SubmitError(f"kubeconfig {kubeconfig} not found")
    path = kubeconfig
    if not path:
        candidates = [p for p in environ.get("KUBECONFIG", "").split(os.pathsep) if p]
        candidates += [os.path.join(environ.get("HOME", os.path.expanduser("~")), ".kube", "config")]
        existing = [p for p in candidates if os.path.isfile(p)]
        # The client merges a KUBECONFIG-style list itself.
        path = os.pathsep.join(existing) if existing else None
    if path is None:
        if environ.get("KUBERNETES_SERVICE_HOST"):
            cfg = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=cfg)
            except ConfigException as exc:
                raise SubmitError(f"in-cluster config unusable: {exc}") from None
            ns_file = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
            namespace = open(ns_file).read().strip() if os.path.isfile(ns_file) else "default"
            return client.ApiClient(cfg), namespace
        raise SubmitError("no kubeconfig found: pass --kubeconfig FILE, set KUBECONFIG, "
                          "or create ~/.kube/config (e.g. with your cloud's get-credentials command)")
    try:
        contexts, current = config.list_kube_config_contexts(config_file=path)
        chosen = next((c for c in contexts if c["name"] == context), None) if context else current
        if chosen is None:
            raise SubmitError(f"context {context!r} not in kubeconfig {path}")
        api_client = config.new_client_from_config(config_file=path, context=chosen["name"],
                                                   persist_config=False)
    except (ConfigException, KeyError, TypeError, ValueError) as exc:
        raise SubmitError(f"bad kubeconfig {path}: {str(exc).splitlines()[0]}") from None
    return api_client, (chosen.get("context") or {}).get("namespace") or "default"


def _call(api_client, fn, kind: str, name: str, namespace: str) -> dict:
    """Run one API call made with ``_preload_content=False``; return the JSON body as a dict.

    Raw responses, because the client's typed models reject some valid server answers
    (e.g. a Status where a Service is declared) and we only need plain dicts anyway.
    Client and network errors become SubmitError.
    """
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        response = fn()
    except ApiException as exc:
        raise _api_error(exc, kind, name, namespace) from None
    except HTTPError as exc:
        raise _unreachable(api_client, exc) from None
    except ValueError as exc:  # pydantic: the typed client refused the object before sending it
        raise SubmitError(f"{kind} {name}: the kubernetes client rejected it: "
                          f"{str(exc).splitlines()[0]}") from None
    try:
        return json.loads(response.data or b"{}")
    except ValueError:
        return {}


def create(api_client, docs: Sequence[dict], namespace: str) -> None:
    """Create the rendered job resources in order (the job first, then its Service).

    Args:
        api_client: a kubernetes ApiClient.
        docs: manifests from :func:`k8s.manifests.render_job`.
        namespace: target namespace.

    Raises:
        SubmitError: on any API error.
    """
    from kubernetes import client

    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        # fieldValidation=Strict: unknown fields are errors, not silently dropped.
        if kind in CUSTOM:
            group, version, plural = CUSTOM[kind]
            fn = lambda: client.CustomObjectsApi(api_client).create_namespaced_custom_object(  # noqa: E731
                group, version, namespace, plural, doc, field_validation="Strict", _preload_content=False)
        elif kind == "Job":
            fn = lambda: client.BatchV1Api(api_client).create_namespaced_job(  # noqa: E731
                namespace, client.V1Job.from_dict(doc), field_validation="Strict", _preload_content=False)
        elif kind == "Service":
            fn = lambda: client.CoreV1Api(api_client).create_namespaced_service(  # noqa: E731
                namespace, client.V1Service.from_dict(doc), field_validation="Strict", _preload_content=False)
        else:
            raise SubmitError(f"cannot create kind {kind}")
        _call(api_client, fn, kind, name, namespace)


def _read(api_client, kind: str, name: str, namespace: str) -> dict:
    from kubernetes import client

    if kind in CUSTOM:
        group, version, plural = CUSTOM[kind]
        fn = lambda: client.CustomObjectsApi(api_client).get_namespaced_custom_object(  # noqa: E731
            group, version, namespace, plural, name, _preload_content=False)
    else:
        fn = lambda: client.BatchV1Api(api_client).read_namespaced_job(  # noqa: E731
            name, namespace, _preload_content=False)
    return _call(api_client, fn, kind, name, namespace)


def find(api_client, name: str, namespace: str, backend: str | None) -> tuple[str, dict]:
    """Find job ``name``: of the backend's kind, or the first of Job, TFJob, MPIJob that exists.

    Returns:
        ``(kind, object dict)``.

    Raises:
        SubmitError: when it does not exist (or the API fails).
    """
    kinds = [BACKEND_KIND[backend]] if backend else ["Job", "TFJob", "MPIJob"]
    for kind in kinds:
        try:
            return kind, _read(api_client, kind, name, namespace)
        except SubmitError as exc:
            # Probing: "not found" and "CRD not installed" both mean "not this kind".
            if backend or exc.reason not in ("not_found", "crd_missing"):
                raise
    raise SubmitError(f"no Job, TFJob or MPIJob named {name} in namespace {namespace}")


def describe(kind: str, obj: dict) -> str:
    """A few lines of status for a Job/TFJob/MPIJob object.

    Args:
        kind: object kind.
        obj: the object as a dict.

    Returns:
        Text for the terminal.
    """
    status, meta = obj.get("status") or {}, obj.get("metadata") or {}
    conditions = [c for c in status.get("conditions") or [] if c.get("status") == "True"]
    if conditions:
        state = conditions[-1].get("type", "?")
    elif kind == "Job":
        state = "Running" if status.get("active") else "Pending"
    else:
        state = "Pending"
    lines = [f"{kind} {meta.get('name')} (namespace {meta.get('namespace')}): {state}"]
    if conditions and conditions[-1].get("message"):
        lines.append(f"  {conditions[-1]['message']}")
    if kind == "Job":
        lines.append(f"  pods: active={status.get('active', 0)} succeeded={status.get('succeeded', 0)} "
                     f"failed={status.get('failed', 0)}; completed indexes: "
                     f"{status.get('completedIndexes') or '-'}")
    for rtype, counts in sorted((status.get("replicaStatuses") or {}).items()):
        lines.append(f"  {rtype}: " + " ".join(f"{k}={counts.get(k, 0)}" for k in ("active", "succeeded", "failed")))
    return "\n".join(lines)


def delete(api_client, kind: str, name: str, namespace: str) -> None:
    """Delete a job (and, for an Indexed Job, its headless Service); pods go with it.

    Raises:
        SubmitError: on API errors (a missing Service is fine).
    """
    from kubernetes import client

    # Background propagation: batch/v1 Jobs deleted through the API orphan their pods otherwise.
    if kind in CUSTOM:
        group, version, plural = CUSTOM[kind]
        _call(api_client, lambda: client.CustomObjectsApi(api_client).delete_namespaced_custom_object(
            group, version, namespace, plural, name, propagation_policy="Background",
            _preload_content=False), kind, name, namespace)
        return
    _call(api_client, lambda: client.BatchV1Api(api_client).delete_namespaced_job(
        name, namespace, propagation_policy="Background", _preload_content=False), kind, name, namespace)
    try:
        _call(api_client, lambda: client.CoreV1Api(api_client).delete_namespaced_service(
            name, namespace, _preload_content=False),
              "Service", name, namespace)
    except SubmitError as exc:
        if exc.reason != "not_found":
            raise


def _hints(opts: manifests.JobOptions, kind: str, namespace: str, kubeconfig: str | None) -> str:
    ns = f"-n {namespace}" + (f" --kubeconfig {kubeconfig}" if kubeconfig else "")
    selector = f"app.kubernetes.io/instance={opts.name}"
    if kind == "MPIJob":
        selector += ",app.kubernetes.io/component=launcher"  # horovodrun prints every rank
    model = manifests.parse_uri(opts.model_dir)
    tensorboard = (f"kubectl port-forward {ns} svc/{manifests.TENSORBOARD_NAME} "
                   f"{manifests.TENSORBOARD_PORT}:{manifests.TENSORBOARD_PORT}  "
                   f"(created by 'kubectl apply -k k8s/base'; then open http://localhost:6006)"
                   if model.claim else f"tensorboard --logdir {opts.model_dir}")
    return "\n".join([
        f"submitted {kind} {opts.name} in namespace {namespace}",
        f"  status:      python scripts/{PROG} status {opts.name} {ns}",
        f"  logs:        kubectl logs {ns} -f -l {selector} --prefix --max-log-requests {opts.workers + 1}",
        f"  tensorboard: {tensorboard}",
        f"  delete:      python scripts/{PROG} delete {opts.name} {ns}",
    ])


def _key_values(items: Sequence[str], flag: str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SubmitError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _tolerations(items: Sequence[str]) -> tuple:
    out = []
    for item in items:
        spec, _, effect = item.rpartition(":") if ":" in item else (item, "", "")
        key, sep, value = spec.partition("=")
        if not key or effect not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise SubmitError(f"--toleration expects KEY[=VALUE][:NoSchedule|PreferNoSchedule|NoExecute], "
                              f"got {item!r}")
        tol = {"key": key, "operator": "Equal" if sep else "Exists"}
        if sep:
            tol["value"] = value
        if effect:
            tol["effect"] = effect
        out.append(tol)
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands submit, status, delete)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's, else 'default')")
    common.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    common.add_argument("--context", help="kubeconfig context (default: current)")
    s = sub.add_parser("submit", parents=[common], help="render and create a training job",
                       epilog="Arguments after '--' are appended to 'python -m trainer train'.")
    s.add_argument("--backend", required=True, choices=manifests.BACKENDS)
    s.add_argument("--image", required=True, help="training image (k8s/Dockerfile; --target horovod for mpijob)")
    s.add_argument("--data", required=True, help="dataset URI: pvc://CLAIM/SUB/PATH or a path/URL (gs://...)")
    s.add_argument("--model-dir", required=True, help="model dir URI: pvc://CLAIM/SUB/PATH or a path/URL")
    s.add_argument("--eval-data", help="eval dataset URI (default: the trainer's own default)")
    s.add_argument("--workers", type=int, default=2, help="worker pods (default 2)")
    s.add_argument("--gpus-per-worker", type=int, default=0, help="nvidia.com/gpu per worker (default 0)")
    s.add_argument("--config", help="trainer config path inside the image (default: per backend)")
    s.add_argument("--name", help="job name (default: mlt-<backend>-<MMDD-HHMMSS>)")
    s.add_argument("--cpu", help="CPU request per worker, e.g. 8")
    s.add_argument("--memory", help="memory request per worker, e.g. 32Gi")
    s.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]")
    s.add_argument("--port", type=int, default=2222, help="worker gRPC port (default 2222)")
    s.add_argument("--dry-run", action="store_true", help="print the manifests as YAML, create nothing")
    for command, text in (("status", "show a job's state"), ("delete", "delete a job and its pods")):
        p = sub.add_parser(command, parents=[common], help=text)
        p.add_argument("name")
        p.add_argument("--backend", choices=manifests.BACKENDS, help="kind to look for (default: try all)")
    return parser


def _submit(args, extra: Sequence[str]) -> int:
    name = args.name or f"mlt-{args.backend}-{time.strftime('%m%d-%H%M%S')}"
    opts = manifests.JobOptions(
        backend=args.backend, name=name, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        image=args.image, data=args.data, model_dir=args.model_dir, eval_data=args.eval_data,
        config=args.config, namespace=args.namespace, cpu=args.cpu, memory=args.memory,
        node_selector=_key_values(args.node_selector, "--node-selector"),
        tolerations=_tolerations(args.toleration), port=args.port, train_args=tuple(extra))
    try:
        docs = manifests.render_job(opts)
    except ValueError as exc:
        raise SubmitError(str(exc)) from None
    schemas = validate.schema_validators_available()
    errors = validate.validate_documents(docs, validate.default_crd_dir() if schemas else None,
                                         schemas=schemas)
    if errors:
        raise SubmitError("rendered manifests are invalid: " + "; ".join(errors))
    if args.dry_run:
        sys.stdout.write(manifests.to_yaml(docs))
        return 0
    api_client, default_ns = load_client(args.kubeconfig, args.context)
    namespace = args.namespace or default_ns
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
    create(api_client, docs, namespace)
    print(_hints(opts, docs[0]["kind"], namespace, args.kubeconfig))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``);
            ``submit`` may be left out.

    Returns:
        Exit status: 0 on success, 1 on a reported error, 2 on bad usage (argparse) or without the
            Kubernetes client (the ``k8s`` extra).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    if argv and argv[0] not in ("submit", "status", "delete", "-h", "--help"):
        argv.insert(0, "submit")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "submit":
            return _submit(args, extra)
        if extra:
            raise SubmitError(f"'--' arguments are only for submit, got {' '.join(extra)}")
        api_client, default_ns = load_client(args.kubeconfig, args.context)
        namespace = args.namespace or default_ns
        if args.command == "status":
            kind, obj = find(api_client, args.name, namespace, args.backend)
            print(describe(kind, obj))
            return 0
        # With --backend the kind is known: delete directly; otherwise look it up first.
        kind = BACKEND_KIND[args.backend] if args.backend else find(api_client, args.name, namespace, None)[0]
        delete(api_client, kind, args.name, namespace)
        print(f"deleted {kind} {args.name} in namespace {namespace}")
        return 0
    except SubmitError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:  # The Kubernetes client is an extra: name it.
        if (exc.name or "").split(".")[0] not in ("kubernetes", "urllib3"):
            raise
        print(f"{PROG}: error: the Kubernetes client is not installed ({exc.name}): "
              "pip install 'multilabel-trainer[k8s]'", file=sys.stderr)
        return 2
