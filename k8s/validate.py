"""Offline validation of rendered manifests: what the API server and the operators would reject.

Three layers, each returning a list of one-line error strings (empty: valid):

* core kinds (Job, Service, Deployment, PVC, ...) against the Kubernetes OpenAPI schemas
  bundled with ``kubernetes-validate``, in strict mode (unknown fields are errors, as with
  ``kubectl apply --validate=strict``);
* TFJob / MPIJob against ``spec.versions[].schema.openAPIV3Schema`` of the released CRD
  files in a directory the caller names (never copied into this repo). The released
  schemas allow unknown fields, but the API server prunes them silently, so a typo such
  as ``restartPolicy`` one level too deep would be lost; we validate with unknown fields
  forbidden wherever the schema lists its properties;
* checks that mirror the operators' admission webhooks and controllers, which the
  schemas cannot express (container ``tensorflow`` in every TFJob replica, at most one
  Chief/Master, MPIJob Launcher replicas = 1, MPIJob restartPolicy Never/OnFailure, ...).

``jsonschema`` and ``kubernetes-validate`` come with the ``dev`` extra; callers that may run
without them (the submit tool) check :func:`schema_validators_available` and pass
``schemas=False`` to keep only the webhook-mirroring checks.
Command line: ``python -m k8s.validate [--crd-dir DIR] FILE.yaml ...``.
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import pathlib
import re
import sys
from typing import Iterable, Sequence

import yaml

K8S_VERSION = "1.29"  # oldest Kubernetes the manifests target (Indexed Jobs GA since 1.24)
CRD_KINDS = {("kubeflow.org/v1", "TFJob"), ("kubeflow.org/v2beta1", "MPIJob")}
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def default_crd_dir() -> pathlib.Path | None:
    """Directory with the Kubeflow CRD files, if one is known.

    Returns:
        ``$MLT_CRD_DIR`` when set, else ``<repo>/../shared/k8s-crds`` when it exists, else None.
    """
    env = os.environ.get("MLT_CRD_DIR")
    if env:
        return pathlib.Path(env)
    candidate = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "k8s-crds"
    return candidate if candidate.is_dir() else None


def schema_validators_available() -> bool:
    """True when ``jsonschema`` and ``kubernetes-validate`` can be imported."""
    try:
        import jsonschema  # noqa: F401
        import kubernetes_validate  # noqa: F401
    except ImportError:
        return False
    return True


def _forbid_unknown_fields(node):
    """Copy of an OpenAPI schema with ``additionalProperties: false`` wherever it lists
    ``properties`` and neither allows extra keys nor preserves unknown fields."""
    if isinstance(node, list):
        return [_forbid_unknown_fields(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _forbid_unknown_fields(v) for k, v in node.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=4)
def load_crd_schemas(crd_dir: str) -> dict:
    """Read every CRD in ``crd_dir`` (``*.yaml``).

    Args:
        crd_dir: directory with CustomResourceDefinition YAML files.

    Returns:
        ``{(apiVersion, kind): strict openAPIV3Schema}`` for every served version.

    Raises:
        FileNotFoundError: when the directory does not exist or holds no CRD.
    """
    root = pathlib.Path(crd_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"CRD directory {root} does not exist")
    schemas = {}
    # The CRD files are large (~1 MB); the libyaml loader is ten times faster when present.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for path in sorted(root.glob("*.yaml")):
        for doc in yaml.load_all(path.read_text(), Loader=loader):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                schema = version["schema"]["openAPIV3Schema"]
                schemas[(f"{group}/{version['name']}", kind)] = _forbid_unknown_fields(schema)
    if not schemas:
        raise FileNotFoundError(f"no CustomResourceDefinition in {root}")
    return schemas


def _where(doc: dict) -> str:
    return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


def _path(parts: Iterable) -> str:
    return ".".join(str(p) for p in parts) or "(root)"


def core_errors(doc: dict, version: str = K8S_VERSION) -> list[str]:
    """Validate a core kind with kubernetes-validate (strict, bundled schemas).

    Args:
        doc: one manifest.
        version: Kubernetes version whose schemas to use.

    Returns:
        Error lines (at most one: kubernetes-validate stops at the first error).
    """
    import kubernetes_validate  # dev extra; imported here so the submit tool works without it

    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{_where(doc)}: {_path(exc.path)}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{_where(doc)}: {exc.message}"]
    return []


def crd_errors(doc: dict, schemas: dict) -> list[str]:
    """Validate a TFJob/MPIJob against its CRD schema (unknown fields forbidden).

    Args:
        doc: one manifest.
        schemas: from :func:`load_crd_schemas`.

    Returns:
        Error lines, one per schema violation.
    """
    import jsonschema

    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in schemas:
        return [f"{_where(doc)}: no CRD schema for {key[0]} {key[1]}"]
    # CRD schemas are OpenAPI v3.0, whose keywords are those of JSON Schema draft 4.
    validator = jsonschema.Draft4Validator(schemas[key])
    return [f"{_where(doc)}: {_path(e.absolute_path)}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def _containers(replica: dict) -> list:
    return (((replica or {}).get("template") or {}).get("spec") or {}).get("containers") or []


def _replica_errors(where: str, rtype: str, replica: dict, replicas_required: bool) -> list[str]:
    """Checks shared by both operators: containers with images, a sane replica count."""
    errors = []
    if not isinstance(replica, dict):
        return [f"{where}: replica {rtype} is not a mapping"]
    containers = _containers(replica)
    if not containers:
        errors.append(f"{where}: replica {rtype} has no containers")
    errors += [f"{where}: replica {rtype} container {i} has no image"
               for i, c in enumerate(containers) if not c.get("image")]
    replicas = replica.get("replicas")
    if replicas is None:
        # The training operator defaults a missing count to 1; mpi-operator rejects it.
        if replicas_required:
            errors.append(f"{where}: replica {rtype} must set replicas")
    elif isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        errors.append(f"{where}: replica {rtype} replicas must be an integer >= 0, got {replicas!r}")
    return errors


def tfjob_errors(doc: dict) -> list[str]:
    """Checks of the training operator's TFJob admission webhook.

    Args:
        doc: a TFJob manifest.

    Returns:
        Error lines.
    """
    where, errors = _where(doc), []
    name = (doc.get("metadata") or {}).get("name") or ""
    if not _DNS1035.match(name) or len(name) > 63:
        errors.append(f"{where}: name must be a DNS-1035 label")
    specs = (doc.get("spec") or {}).get("tfReplicaSpecs")
    if not specs:
        return errors + [f"{where}: spec.tfReplicaSpecs is required"]
    for rtype, replica in specs.items():
        errors += _replica_errors(where, rtype, replica, replicas_required=False)
        if isinstance(replica, dict):
            if not any(c.get("name") == "tensorflow" for c in _containers(replica)):
                errors.append(f"{where}: replica {rtype} needs a container named 'tensorflow'")
            policy = replica.get("restartPolicy")
            if policy is not None and policy not in ("Always", "OnFailure", "Never", "ExitCode"):
                errors.append(f"{where}: replica {rtype} restartPolicy {policy!r} is not one of "
                              "Always, OnFailure, Never, ExitCode")
    chiefs = [r for r in specs if r in ("Chief", "Master")]
    if len(chiefs) > 1:
        errors.append(f"{where}: must not have more than 1 Chief or Master role ({', '.join(chiefs)})")
    for rtype in chiefs:
        replicas = (specs[rtype] or {}).get("replicas")
        if isinstance(replicas, int) and replicas > 1:
            errors.append(f"{where}: {rtype} replicas must be at most 1, got {replicas}")
    return errors


def mpijob_errors(doc: dict) -> list[str]:
    """Checks of mpi-operator's MPIJob validation (v2beta1).

    Args:
        doc: an MPIJob manifest.

    Returns:
        Error lines.
    """
    where, errors = _where(doc), []
    spec = doc.get("spec") or {}
    specs = spec.get("mpiReplicaSpecs") or {}
    launcher, worker = specs.get("Launcher"), specs.get("Worker")
    for rtype in specs:
        if rtype not in ("Launcher", "Worker"):
            errors.append(f"{where}: unknown replica type {rtype!r} (Launcher, Worker)")
    if launcher is None:
        errors.append(f"{where}: mpiReplicaSpecs.Launcher is required")
    for rtype, replica in (("Launcher", launcher), ("Worker", worker)):
        if replica is None:
            continue
        errors += _replica_errors(where, rtype, replica, replicas_required=True)
        if isinstance(replica, dict) and replica.get("restartPolicy", "Never") not in ("Never", "OnFailure"):
            errors.append(f"{where}: replica {rtype} restartPolicy {replica.get('restartPolicy')!r} "
                          "is not one of Never, OnFailure")
    if isinstance(launcher, dict) and launcher.get("replicas") != 1:
        errors.append(f"{where}: Launcher replicas must be 1, got {launcher.get('replicas')!r}")
    if isinstance(worker, dict) and isinstance(worker.get("replicas"), int) and worker["replicas"] < 1:
        errors.append(f"{where}: Worker replicas must be >= 1, got {worker['replicas']}")
    slots = spec.get("slotsPerWorker", 1)
    if not isinstance(slots, int) or slots < 0:
        errors.append(f"{where}: slotsPerWorker must be >= 0, got {slots!r}")
    policy = (spec.get("runPolicy") or {}).get("cleanPodPolicy", "None")
    if policy not in ("None", "Running", "All"):
        errors.append(f"{where}: runPolicy.cleanPodPolicy {policy!r} is not one of None, Running, All")
    # The operator names worker pods <name>-worker-<i>; the last one must be a DNS label.
    count = worker.get("replicas") if isinstance(worker, dict) else None
    count = count if isinstance(count, int) and count > 0 else 1
    hostname = f"{(doc.get('metadata') or {}).get('name', '')}-worker-{count - 1}"
    if not _DNS1123_LABEL.match(hostname) or len(hostname) > 63:
        errors.append(f"{where}: pod hostname {hostname!r} would not be a valid DNS label")
    return errors


def job_errors(doc: dict) -> list[str]:
    """API-server rules for an Indexed Job that its OpenAPI schema does not state.

    Args:
        doc: a batch/v1 Job manifest.

    Returns:
        Error lines.
    """
    where, spec, errors = _where(doc), doc.get("spec") or {}, []
    pod = (spec.get("template") or {}).get("spec") or {}
    if pod.get("restartPolicy") not in ("Never", "OnFailure"):
        errors.append(f"{where}: template restartPolicy must be Never or OnFailure for a Job")
    if spec.get("completionMode") == "Indexed" and not isinstance(spec.get("completions"), int):
        errors.append(f"{where}: completions is required when completionMode is Indexed")
    return errors


def validate_document(doc: dict, crd_dir: str | os.PathLike | None = None,
                      version: str = K8S_VERSION, schemas: bool = True) -> list[str]:
    """All checks for one manifest.

    Args:
        doc: one manifest dict.
        crd_dir: directory with the Kubeflow CRDs; None skips the CRD schema layer.
        version: Kubernetes version for the core schemas.
        schemas: False skips both schema layers (webhook-mirroring checks only).

    Returns:
        Error lines (empty: valid).
    """
    if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
        return [f"not a Kubernetes object (no apiVersion/kind): {str(doc)[:80]}"]
    key = (doc["apiVersion"], doc["kind"])
    doc = copy.deepcopy(doc)  # validators must not see (or keep) references into the caller's dict
    if key in CRD_KINDS:
        errors = crd_errors(doc, load_crd_schemas(str(crd_dir))) if crd_dir and schemas else []
        return errors + (tfjob_errors(doc) if key[1] == "TFJob" else mpijob_errors(doc))
    errors = core_errors(doc, version) if schemas else []
    if key == ("batch/v1", "Job"):
        errors += job_errors(doc)
    return errors


def validate_documents(docs: Sequence[dict], crd_dir: str | os.PathLike | None = None,
                       version: str = K8S_VERSION, schemas: bool = True) -> list[str]:
    """:func:`validate_document` for every manifest; errors of all of them.

    Args:
        docs: manifest dicts.
        crd_dir: directory with the Kubeflow CRDs (None: skip the CRD schema layer).
        version: Kubernetes version for the core schemas.
        schemas: False skips both schema layers (webhook-mirroring checks only).

    Returns:
        Error lines.
    """
    return [e for doc in docs for e in validate_document(doc, crd_dir, version, schemas)]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m k8s.validate FILE...``: print errors, exit 1 if any."""
    parser = argparse.ArgumentParser(prog="python -m k8s.validate", description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", help="YAML files (multi-document allowed)")
    parser.add_argument("--crd-dir", default=default_crd_dir(), help="directory with the Kubeflow CRDs")
    args = parser.parse_args(argv)
    errors = []
    for name in args.files:
        docs = [d for d in yaml.safe_load_all(pathlib.Path(name).read_text()) if d]
        errors += [f"{name}: {e}" for e in validate_documents(docs, args.crd_dir)]
    print("\n".join(errors) if errors else f"ok: {len(args.files)} file(s) valid")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
